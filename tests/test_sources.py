"""The batch source adapters against real files, real SQLite databases and a real Postgres.

The ledger side (KnownDocs + CheckpointStore) is a small in-memory stand-in defined here; the
integration tests with the SQLite ledger live elsewhere.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    insert,
    text,
    update,
)
from sqlalchemy.engine import Engine
from structlog.testing import capture_logs

from adapters.sources.folder import FolderSource
from adapters.sources.jsonl import LINE_BYTES_MAX, JsonlSource
from adapters.sources.sql_table import CurrentDoc, SqlTableSource
from chaos.servers import EmbeddedPostgres
from coordinator.errors import ConfigError, SourceError
from coordinator.events import ChangeEvent, Op
from coordinator.model import DocState, record_bytes
from coordinator.planner import document_hash
from coordinator.ports import BadRecord, SourceRecord

# --- an in-memory ledger (KnownDocs + CheckpointStore) ------------------------------------------


class MemoryLedger:
    """Documents and checkpoints in dicts, applying events behind the same version gate as the ledger."""

    def __init__(self) -> None:
        self.docs: dict[str, DocState] = {}
        self.checkpoints: dict[str, str] = {}

    def get_docs(self, doc_ids: Iterable[str]) -> dict[str, DocState]:
        return {d: self.docs[d] for d in doc_ids if d in self.docs}

    def iter_docs(self, *, include_deleted: bool = False) -> Iterator[DocState]:
        for doc_id in sorted(self.docs):
            state = self.docs[doc_id]
            if include_deleted or not state.deleted:
                yield state

    def get_checkpoint(self, source: str) -> str | None:
        return self.checkpoints.get(source)

    def set_checkpoint(self, source: str, position: str) -> None:
        self.checkpoints[source] = position

    def apply(self, records: Iterable[SourceRecord]) -> None:
        for record in records:
            assert isinstance(record, ChangeEvent), record
            self._apply(record)

    def _apply(self, event: ChangeEvent) -> None:
        current = self.docs.get(event.doc_id)
        if current is not None and event.version <= current.version:
            return
        if event.op is Op.DELETE:
            self.docs[event.doc_id] = DocState(event.doc_id, event.version, deleted=True)
            return
        assert event.text is not None
        source_hash = document_hash(event.text, event.metadata)
        self.docs[event.doc_id] = DocState(event.doc_id, event.version, False, source_hash=source_hash)


def events(records: Iterable[SourceRecord]) -> list[ChangeEvent]:
    out = list(records)
    assert all(isinstance(r, ChangeEvent) for r in out), out
    return out  # type: ignore[return-value]  # checked just above


def summary(records: Iterable[SourceRecord]) -> list[tuple[str, str | None, int | None]]:
    """(kind, doc_id, version) per record: enough to compare a read with what it should be."""
    out: list[tuple[str, str | None, int | None]] = []
    for r in records:
        if isinstance(r, BadRecord):
            out.append(("bad", r.doc_id, None))
        else:
            out.append((r.op.value, r.doc_id, r.version))
    return out


# --- JSONL --------------------------------------------------------------------------------------


def event_line(doc_id: str, version: object, **overrides: Any) -> bytes:
    fields: dict[str, Any] = {
        "op": "upsert",
        "doc_id": doc_id,
        "version": version,
        "text": f"text of {doc_id}",
        "metadata": {"n": version},
    }
    fields.update(overrides)
    return json.dumps(fields).encode("utf-8") + b"\n"


def write_lines(path: Path, *lines: bytes) -> list[int]:
    """Write the lines; return the byte offset after each."""
    path.write_bytes(b"".join(lines))
    ends, total = [], 0
    for line in lines:
        total += len(line)
        ends.append(total)
    return ends


def test_jsonl_reads_events_with_byte_offsets_after_each_line(tmp_path: Path) -> None:
    """Every line becomes an event whose position is the byte offset after that line."""
    path = tmp_path / "events.jsonl"
    ends = write_lines(
        path, event_line("a", 1), event_line("b", 2, text="ünïcode ✓"), event_line("a", 3, op="delete")
    )
    got = events(JsonlSource(path, MemoryLedger()).read())
    assert summary(got) == [("upsert", "a", 1), ("upsert", "b", 2), ("delete", "a", 3)]
    assert [e.position for e in got] == [str(end) for end in ends]
    assert got[1].text == "ünïcode ✓" and got[0].metadata == {"n": 1}


BAD_LINES = [
    pytest.param(b"{not json\n", "invalid JSON", None, id="invalid-json"),
    pytest.param(b"[1, 2]\n", "event must be a JSON object", None, id="not-an-object"),
    pytest.param(event_line("x", 1, op="merge"), "unknown op 'merge'", "x", id="unknown-op"),
    pytest.param(b'{"op": "upsert", "doc_id": "x", "text": "t"}\n', "missing version", "x", id="missing-version"),
    pytest.param(event_line("x", "3"), "version must be an integer", "x", id="string-version"),
    pytest.param(event_line("x", -1), "outside 0..2^63-1", "x", id="negative-version"),
    pytest.param(event_line("x", 2**63), "outside 0..2^63-1", "x", id="version-overflow"),
    pytest.param(event_line("x", 1, text=None), "upsert needs a text string", "x", id="upsert-without-text"),
    pytest.param(event_line("", 1), "doc_id must be a non-empty string", None, id="empty-doc-id"),
    pytest.param(event_line("x:chunk-1", 1), "reserved for chunk IDs", "x:chunk-1", id="chunk-id-as-doc-id"),
    pytest.param(event_line("x", 1, metadata=[1]), "metadata must be an object", "x", id="metadata-not-object"),
    pytest.param(b'{"op": "upsert", "doc_id": "x", "version": 1, "text": "\\ud800"}\n', "lone surrogate", "x",
                 id="lone-surrogate"),
    pytest.param(b'{"op": "delete", "doc_id": "x", "version": 1, "\xff\xfe": 1}\n', "invalid UTF-8 at byte 47", None,
                 id="invalid-utf8"),
    pytest.param(b"[" * 100_000 + b"\n", "nested too deeply", None, id="deep-nesting"),
]  # fmt: skip


@pytest.mark.parametrize(("bad", "reason", "doc_id"), BAD_LINES)
def test_jsonl_bad_line_becomes_bad_record_and_reading_goes_on(
    tmp_path: Path, bad: bytes, reason: str, doc_id: str | None
) -> None:
    """A malformed line yields a BadRecord with its reason, position and doc_id; the next line still reads."""
    path = tmp_path / "events.jsonl"
    ends = write_lines(path, event_line("before", 1), bad, event_line("after", 1))
    before, record, after = JsonlSource(path, MemoryLedger()).read()
    assert isinstance(record, BadRecord)
    assert reason in record.reason
    assert (record.position, record.doc_id) == (str(ends[1]), doc_id)
    assert record_bytes(record.payload, record.encoding) == bad.rstrip(b"\r\n") and not record.truncated
    assert summary([before, after]) == [("upsert", "before", 1), ("upsert", "after", 1)]


def test_jsonl_bad_record_is_logged_with_doc_id(tmp_path: Path) -> None:
    """A bad line is logged as a warning carrying the source, position, doc_id and reason."""
    path = tmp_path / "events.jsonl"
    ends = write_lines(path, event_line("x", 1, op="merge"))
    with capture_logs() as logs:
        list(JsonlSource(path, MemoryLedger(), name="feed").read())
    assert logs == [
        {
            "event": "bad_record",
            "log_level": "warning",
            "source": "feed",
            "position": str(ends[0]),
            "doc_id": "x",
            "reason": "unknown op 'merge'",
        }
    ]


def test_jsonl_skips_blank_lines_and_reads_crlf_bom_and_unterminated_last_line(tmp_path: Path) -> None:
    """Blank lines are skipped, CRLF endings and a leading BOM are tolerated, and a last line without newline is read."""
    path = tmp_path / "events.jsonl"
    first = b"\xef\xbb\xbf" + event_line("a", 1).replace(b"\n", b"\r\n")
    last = event_line("b", 2).rstrip(b"\n")
    ends = write_lines(path, first, b"\n", b"   \t\r\n", last)
    got = events(JsonlSource(path, MemoryLedger()).read())
    assert summary(got) == [("upsert", "a", 1), ("upsert", "b", 2)]
    assert [e.position for e in got] == [str(ends[0]), str(ends[3])]


def test_jsonl_resumes_after_last_committed_position(tmp_path: Path) -> None:
    """After a crash, a new reader starts after the committed line, redelivering only uncommitted lines."""
    path = tmp_path / "events.jsonl"
    write_lines(path, event_line("a", 1), event_line("b", 1), event_line("c", 1), event_line("d", 1))
    ledger = MemoryLedger()
    first = JsonlSource(path, ledger, name="feed")
    reader = first.read()
    _a, b, _c = next(reader), next(reader), next(reader)
    assert b.position is not None
    first.commit(b.position)  # a and b applied; c read but not applied when the process "dies"
    assert ledger.checkpoints == {"feed": b.position}
    assert summary(JsonlSource(path, ledger, name="feed").read()) == [("upsert", "c", 1), ("upsert", "d", 1)]


def test_jsonl_reads_only_lines_appended_after_commit(tmp_path: Path) -> None:
    """Lines appended after a full read and commit are the only ones the next read yields."""
    path = tmp_path / "events.jsonl"
    write_lines(path, event_line("a", 1))
    ledger = MemoryLedger()
    source = JsonlSource(path, ledger)
    (only,) = source.read()
    assert only.position is not None
    source.commit(only.position)
    assert list(source.read()) == []
    with path.open("ab") as handle:
        handle.write(event_line("b", 1))
    assert summary(source.read()) == [("upsert", "b", 1)]


def test_jsonl_oversize_line_is_skipped_as_bad_record(tmp_path: Path) -> None:
    """A line longer than the limit becomes one BadRecord ending after the whole line; a line at the limit reads."""
    path = tmp_path / "events.jsonl"
    at_limit = event_line("fits", 1)
    limit = len(at_limit) - 1  # the newline does not count
    oversize = event_line("big", 1, text="x" * 50_000)
    ends = write_lines(path, at_limit, oversize, event_line("next", 1))
    fits, record, after = JsonlSource(path, MemoryLedger(), line_bytes_max=limit).read()
    assert isinstance(record, BadRecord)
    assert record.reason == f"line longer than {limit} bytes"
    assert record.position == str(ends[1])
    assert record.truncated and record_bytes(record.payload, record.encoding) == oversize[:limit]
    assert summary([fits, after]) == [("upsert", "fits", 1), ("upsert", "next", 1)]


def test_jsonl_default_limit_rejects_a_line_beyond_line_bytes_max(tmp_path: Path) -> None:
    """A line just over LINE_BYTES_MAX (no newline, at end of file) is rejected under the default limit."""
    path = tmp_path / "events.jsonl"
    ends = write_lines(path, event_line("a", 1), b"x" * (LINE_BYTES_MAX + 1))
    first, record = JsonlSource(path, MemoryLedger()).read()
    assert isinstance(first, ChangeEvent) and isinstance(record, BadRecord)
    assert (record.reason, record.position) == (f"line longer than {LINE_BYTES_MAX} bytes", str(ends[1]))


def test_jsonl_rejects_checkpoint_beyond_end_and_malformed_positions(tmp_path: Path) -> None:
    """A checkpoint past the end of a truncated file, or a non-offset position, raises SourceError."""
    path = tmp_path / "events.jsonl"
    write_lines(path, event_line("a", 1))
    ledger = MemoryLedger()
    source = JsonlSource(path, ledger, name="feed")
    ledger.set_checkpoint("feed", "100000")
    with pytest.raises(SourceError, match="beyond the end"):
        list(source.read())
    with pytest.raises(SourceError, match="byte offset"):
        source.commit("[1, 2]")


# --- folder -------------------------------------------------------------------------------------


def write(root: Path, relative: str, content: str | bytes) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    return path


def test_folder_new_files_become_version_1_upserts_with_path_and_title(tmp_path: Path) -> None:
    """Matching files (nested too) become v1 upserts with POSIX doc_ids and a title; others are ignored."""
    write(tmp_path, "guide.md", "intro\n```\n# not a title\n```\n## Getting started ##\n\nbody")
    write(tmp_path, "notes/plain.txt", "# a txt file has no headings")
    write(tmp_path, "notes/deep/er/untitled.md", "no heading at all")
    write(tmp_path, "notes/image.png", b"\x89PNG")
    write(tmp_path, ".hidden.md", "hidden")
    write(tmp_path, ".git/config.md", "hidden directory")
    got = events(FolderSource(tmp_path, MemoryLedger()).read())
    assert summary(got) == [
        ("upsert", "guide.md", 1),
        ("upsert", "notes/deep/er/untitled.md", 1),
        ("upsert", "notes/plain.txt", 1),
    ]
    assert [dict(e.metadata) for e in got] == [
        {"path": "guide.md", "title": "Getting started"},
        {"path": "notes/deep/er/untitled.md", "title": "untitled"},
        {"path": "notes/plain.txt", "title": "plain"},
    ]
    assert got[2].text == "# a txt file has no headings"


def test_folder_unchanged_and_touched_files_yield_nothing(tmp_path: Path) -> None:
    """Once applied, files that did not change, even if touched, produce no events."""
    write(tmp_path, "a.md", "# A\n")
    touched = write(tmp_path, "b/c.txt", "c")
    ledger = MemoryLedger()
    source = FolderSource(tmp_path, ledger)
    ledger.apply(source.read())
    os.utime(touched, (1, 1))
    assert list(source.read()) == []


def test_folder_changed_file_gets_ledger_version_plus_one(tmp_path: Path) -> None:
    """A file whose text or title changed is upserted at the ledger's version + 1; unchanged siblings are not."""
    changed = write(tmp_path, "changed.md", "# Old\n")
    retitled = write(tmp_path, "retitled.md", "# Title\nbody\n")
    write(tmp_path, "same.md", "same")
    ledger = MemoryLedger()
    source = FolderSource(tmp_path, ledger)
    ledger.apply(source.read())
    ledger.docs["changed.md"] = DocState(
        "changed.md", 7, False, source_hash=ledger.docs["changed.md"].source_hash
    )
    changed.write_text("# Old\nnew body\n", encoding="utf-8")
    retitled.write_text("# New title\nbody\n", encoding="utf-8")
    got = events(source.read())
    assert summary(got) == [("upsert", "changed.md", 8), ("upsert", "retitled.md", 2)]
    assert got[1].metadata["title"] == "New title"


def test_folder_deleted_files_become_deletes_at_version_plus_one(tmp_path: Path) -> None:
    """A live ledger document whose file is gone gets a delete at its version + 1, in doc_id order."""
    for name in ("a.md", "b/one.md", "b/two.md", "c.md"):
        write(tmp_path, name, name)
    ledger = MemoryLedger()
    source = FolderSource(tmp_path, ledger)
    ledger.apply(source.read())
    (tmp_path / "b" / "one.md").unlink()
    (tmp_path / "c.md").unlink()
    assert summary(source.read()) == [("delete", "b/one.md", 2), ("delete", "c.md", 2)]


def test_folder_recreated_file_continues_after_its_tombstone(tmp_path: Path) -> None:
    """A file re-created over a tombstone is upserted at the tombstone's version + 1, even with the old content."""
    write(tmp_path, "back.md", "same text")
    ledger = MemoryLedger()
    ledger.docs["back.md"] = DocState("back.md", 5, deleted=True)
    assert summary(FolderSource(tmp_path, ledger).read()) == [("upsert", "back.md", 6)]


def test_folder_merge_handles_tricky_order_and_small_lookup_batches(tmp_path: Path) -> None:
    """Deletes are found by a merge with the ledger that agrees on order ('a-b' < 'a.md' < 'a/' < 'ab') across batches."""
    for name in ("a-b.md", "a.md", "a/x.md", "a/y/z.md", "ab.md", "é.md"):
        write(tmp_path, name, name)
    ledger = MemoryLedger()
    for gone in ("0.md", "a/gone.md", "a/y/gone.md", "a0.md", "zz.md"):
        ledger.docs[gone] = DocState(gone, 3, False, source_hash="old")
    ledger.docs["a.md"] = DocState("a.md", 4, False, source_hash="old")
    got = summary(FolderSource(tmp_path, ledger, lookup_batch_max=2).read())
    assert got == [
        ("delete", "0.md", 4),
        ("upsert", "a-b.md", 1),
        ("upsert", "a.md", 5),
        ("delete", "a/gone.md", 4),
        ("upsert", "a/x.md", 1),
        ("delete", "a/y/gone.md", 4),
        ("upsert", "a/y/z.md", 1),
        ("delete", "a0.md", 4),
        ("upsert", "ab.md", 1),
        ("delete", "zz.md", 4),
        ("upsert", "é.md", 1),
    ]


def test_folder_unreadable_invalid_and_oversize_files_become_bad_records(tmp_path: Path) -> None:
    """Broken links, non-files, invalid UTF-8 and oversize files are BadRecords; their live documents are not deleted."""
    write(tmp_path, "bad-utf8.md", b"ok \xff\xfe no")
    write(tmp_path, "big.txt", "x" * 101)
    (tmp_path / "broken.md").symlink_to(tmp_path / "missing-target.md")
    os.mkfifo(tmp_path / "pipe.md")
    write(tmp_path, "good.md", "fine")
    ledger = MemoryLedger()
    ledger.docs["broken.md"] = DocState("broken.md", 2, False, source_hash="old")
    got = list(FolderSource(tmp_path, ledger, file_bytes_max=100).read())
    bad = {r.doc_id: r.reason for r in got if isinstance(r, BadRecord)}
    assert bad == {
        "bad-utf8.md": "invalid UTF-8 at byte 3",
        "big.txt": "file larger than 100 bytes",
        "broken.md": "unreadable: symbolic link to a missing file",
        "pipe.md": "not a regular file",
    }
    assert summary(r for r in got if isinstance(r, ChangeEvent)) == [("upsert", "good.md", 1)]


def test_folder_commit_is_a_no_op_and_missing_root_raises(tmp_path: Path) -> None:
    """commit() stores nothing (the ledger is the snapshot's position) and a missing root raises SourceError."""
    ledger = MemoryLedger()
    source = FolderSource(tmp_path / "absent", ledger)
    source.commit("anything")
    assert ledger.checkpoints == {}
    with pytest.raises(SourceError, match="does not exist"):
        list(source.read())


class MisorderedDocs(MemoryLedger):
    """A ledger that lists its documents in reverse order, as a differently collated database would."""

    def iter_docs(self, *, include_deleted: bool = False) -> Iterator[DocState]:
        return iter(
            sorted(super().iter_docs(include_deleted=include_deleted), key=lambda s: s.doc_id, reverse=True)
        )


def test_folder_refuses_to_diff_against_misordered_ledger(tmp_path: Path) -> None:
    """If the ledger's doc order disagrees with code-point order, the read fails instead of deleting live documents."""
    ledger = MisorderedDocs()
    for name in ("a.md", "b.md"):
        write(tmp_path, name, name)
        ledger.docs[name] = DocState(name, 1, False, source_hash="old")
    with pytest.raises(SourceError, match="not in code-point order"):
        list(FolderSource(tmp_path, ledger).read())


# --- SQL table (SQLite and Postgres) ------------------------------------------------------------

T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)


def micros(moment: datetime) -> int:
    return int((moment - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds()) * 1_000_000 + moment.microsecond


@pytest.fixture(scope="session")
def postgres_url(postgres_server: EmbeddedPostgres) -> str:
    """The session's real PostgreSQL (tests/support/postgres_servers.py), as a SQLAlchemy URL."""
    return postgres_server.uri.replace("postgresql://", "postgresql+psycopg://", 1)


class SourceDb:
    """A documents table in a real database, with the few writes the tests need."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: Engine = create_engine(url)
        self.table = Table(
            f"docs_{uuid.uuid4().hex[:10]}",
            MetaData(),
            Column("id", Integer, primary_key=True, autoincrement=False),
            Column("text", Text, nullable=True),
            Column("title", String(200), nullable=True),
            Column("meta", JSON, nullable=True),
            Column("rev", Integer, nullable=True),
            Column("updated_at", DateTime(timezone=True), nullable=True),
            Column("deleted_at", DateTime(timezone=True), nullable=True),
        )
        self.table.create(self.engine)

    def insert(self, *rows: dict[str, Any]) -> None:
        defaults = {"text": "body", "title": None, "meta": None, "rev": None, "deleted_at": None}
        with self.engine.begin() as connection:
            connection.execute(insert(self.table), [defaults | {"text": f"text {r['id']}"} | r for r in rows])

    def update(self, row_id: int, **values: Any) -> None:
        with self.engine.begin() as connection:
            connection.execute(update(self.table).where(self.table.c.id == row_id).values(**values))

    def delete(self, *row_ids: int) -> None:
        with self.engine.begin() as connection:
            connection.execute(delete(self.table).where(self.table.c.id.in_(row_ids)))

    def source(self, ledger: MemoryLedger, **options: Any) -> SqlTableSource:
        merged: dict[str, Any] = {
            "deleted_at_column": "deleted_at",
            "batch_rows": 2,
            "name": "table",
        } | options
        return SqlTableSource(self.url, self.table.name, ledger, ledger, **merged)


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SourceDb]:
    """A fresh documents table, in SQLite and in Postgres."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'source.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    database = SourceDb(url)
    yield database
    database.engine.dispose()


def test_sql_rows_with_equal_timestamps_are_read_exactly_once(db: SourceDb) -> None:
    """Rows sharing an updated_at across page boundaries are each read once, and a later equal-timestamp row is read next."""
    db.insert(*({"id": i, "updated_at": T0} for i in (5, 1, 4, 2, 3)))
    ledger = MemoryLedger()
    source = db.source(ledger)
    got = events(source.read())
    assert summary(got) == [("upsert", str(i), micros(T0)) for i in (1, 2, 3, 4, 5)]
    assert got[-1].position is not None
    source.commit(got[-1].position)
    assert list(source.read()) == []
    db.insert({"id": 6, "updated_at": T0}, {"id": 7, "updated_at": T0 + timedelta(microseconds=1)})
    assert summary(source.read()) == [("upsert", "6", micros(T0)), ("upsert", "7", micros(T0) + 1)]
    source.close()


def test_sql_resumes_after_last_committed_watermark(db: SourceDb) -> None:
    """A new source resumes strictly after the committed (updated_at, id), including within a shared timestamp."""
    t1 = T0 + timedelta(seconds=1)
    db.insert({"id": 1, "updated_at": T0}, {"id": 2, "updated_at": t1}, {"id": 3, "updated_at": t1})
    db.insert({"id": 4, "updated_at": t1 + timedelta(days=400)})
    ledger = MemoryLedger()
    first = db.source(ledger)
    reader = first.read()
    _one, two, _three = next(reader), next(reader), next(reader)
    assert two.position is not None
    first.commit(two.position)  # 3 was read but not applied when the process "dies"
    first.close()
    assert ledger.checkpoints["table"] == two.position
    resumed = db.source(ledger)
    assert summary(resumed.read()) == [
        ("upsert", "3", micros(t1)),
        ("upsert", "4", micros(t1 + timedelta(days=400))),
    ]
    resumed.close()


def test_sql_soft_delete_becomes_delete_event(db: SourceDb) -> None:
    """A row whose deleted_at is set (with updated_at bumped) is read as a delete at its new version."""
    db.insert({"id": 1, "updated_at": T0}, {"id": 2, "updated_at": T0})
    ledger = MemoryLedger()
    source = db.source(ledger)
    got = events(source.read())
    ledger.apply(got)
    assert got[-1].position is not None
    source.commit(got[-1].position)
    later = T0 + timedelta(minutes=5)
    db.update(2, deleted_at=later, updated_at=later)
    (deleted,) = events(source.read())
    assert (deleted.op, deleted.doc_id, deleted.version, deleted.text) == (
        Op.DELETE,
        "2",
        micros(later),
        None,
    )
    source.close()


def test_sql_reconcile_ids_deletes_documents_whose_rows_are_gone(db: SourceDb) -> None:
    """Hard-deleted rows still live in the ledger get deletes at ledger version + 1; present rows and tombstones do not."""
    db.insert(*({"id": i, "updated_at": T0} for i in range(1, 12)))
    ledger = MemoryLedger()
    source = db.source(ledger, lookup_batch_max=3)
    ledger.apply(source.read())
    ledger.docs["99"] = DocState("99", 4, deleted=True)
    ledger.docs["not-an-int"] = DocState("not-an-int", 4, False)
    db.delete(2, 9, 10)
    got = events(source.reconcile_ids())
    version = micros(T0) + 1
    assert summary(got) == [("delete", "10", version), ("delete", "2", version), ("delete", "9", version), (
        "delete", "not-an-int", 5)]  # fmt: skip
    ledger.apply(got)
    assert list(source.reconcile_ids()) == []
    source.close()


def test_sql_null_text_becomes_bad_record_and_reading_goes_on(db: SourceDb) -> None:
    """A row with NULL text yields a BadRecord with its doc_id and watermark position; the other rows still read."""
    db.insert(
        {"id": 1, "updated_at": T0}, {"id": 2, "updated_at": T0, "text": None}, {"id": 3, "updated_at": T0}
    )
    ledger = MemoryLedger()
    source = db.source(ledger)
    first, bad, third = source.read()
    assert isinstance(bad, BadRecord)
    assert (bad.reason, bad.doc_id) == ("text is NULL", "2")
    assert bad.position is not None
    source.commit(bad.position)
    assert summary(source.read()) == [("upsert", "3", micros(T0))]
    assert summary([first, third]) == [("upsert", "1", micros(T0)), ("upsert", "3", micros(T0))]
    source.close()


def test_sql_version_column_and_metadata_columns(db: SourceDb) -> None:
    """version_column supplies the version, and metadata is the JSON column overlaid with the named columns."""
    db.insert(
        {"id": 1, "updated_at": T0, "rev": 42, "title": "Hello", "meta": {"lang": "en", "title": "old"}}
    )
    db.insert({"id": 2, "updated_at": T0, "rev": None})
    source = db.source(
        MemoryLedger(), version_column="rev", metadata_columns=["title"], metadata_json_column="meta"
    )
    one, two = source.read()
    assert isinstance(one, ChangeEvent) and isinstance(two, BadRecord)
    assert (one.version, dict(one.metadata)) == (42, {"lang": "en", "title": "Hello"})
    assert two.reason == "version column holds a NoneType"
    source.close()


def test_sql_iter_current_streams_live_rows_in_id_order(db: SourceDb) -> None:
    """iter_current yields every live row across pages (soft-deleted rows left out, invalid rows as BadRecords)."""
    db.insert(*({"id": i, "updated_at": T0} for i in (3, 1, 2, 5)))
    db.insert({"id": 4, "updated_at": T0, "deleted_at": T0}, {"id": 6, "updated_at": T0, "text": None})
    source = db.source(MemoryLedger(), metadata_columns=["title"])
    got = list(source.iter_current())
    assert got[:4] == [CurrentDoc(str(i), micros(T0), f"text {i}", {"title": None}) for i in (1, 2, 3, 5)]
    assert isinstance(got[4], BadRecord) and got[4].doc_id == "6"
    assert len(got) == 5
    source.close()


def test_sql_configuration_errors_are_reported_up_front(db: SourceDb) -> None:
    """A missing table or column raises ConfigError at construction, and a malformed position SourceError on commit."""
    ledger = MemoryLedger()
    with pytest.raises(ConfigError, match="does not exist"):
        SqlTableSource(db.url, "no_such_table", ledger, ledger)
    with pytest.raises(ConfigError, match="no column 'body'"):
        db.source(ledger, text_column="body")
    source = db.source(ledger)
    with pytest.raises(SourceError, match="not a SQL table position"):
        source.commit("12")
    source.close()


def test_sql_sqlite_values_of_the_wrong_type_become_bad_records(tmp_path: Path) -> None:
    """SQLite's dynamic typing can store bytes as text or garbage as a timestamp; such rows are BadRecords."""
    database = SourceDb(f"sqlite:///{tmp_path / 'source.db'}")
    with database.engine.begin() as connection:
        connection.execute(
            text(
                f"INSERT INTO {database.table.name} (id, text, updated_at) VALUES (1, X'FF00', '2024-01-01 00:00:00')"
            )
        )
        connection.execute(
            text(f"INSERT INTO {database.table.name} (id, text, updated_at) VALUES (2, 'ok', 'soon')")
        )
    source = database.source(MemoryLedger())
    reasons = [r.reason for r in source.read() if isinstance(r, BadRecord)]
    assert reasons == ["text is a bytes, not a string", "updated_at 'soon' is not an ISO-8601 timestamp"]
    source.close()
    database.engine.dispose()
