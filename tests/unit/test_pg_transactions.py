"""pgoutput messages assembled into records (``adapters/sources/pg_logical/transactions.py``),
without a server: constructed messages, and the stream captured from a real PostgreSQL 18 that
``tests/unit/test_pgoutput.py`` decodes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from adapters.sources.pg_logical.rows import Columns, TableRef
from adapters.sources.pg_logical.transactions import TransactionAssembler
from adapters.sources.pgoutput import (
    UNCHANGED,
    Begin,
    Column,
    Commit,
    Datum,
    Delete,
    Insert,
    Relation,
    Truncate,
    Update,
    lsn_to_text,
)
from coordinator.events import ChangeEvent, Op
from coordinator.ports import BadRecord, SourceRecord
from tests.unit.test_pgoutput import DECODED

TEXT_OID, INT_OID = 25, 23
DOCS = TableRef("docs", "public", "docs", "")
DOCS_RELATION = Relation(
    100,
    "public",
    "docs",
    "f",
    (Column(True, "id", TEXT_OID, -1), Column(True, "body", TEXT_OID, -1), Column(True, "n", INT_OID, -1)),
)
COLUMNS = Columns("id", "body", None, ("n",))

Row = tuple[Datum, ...]


def assembler(
    buffer_max: int = 100,
    known: Mapping[TableRef, Sequence[str]] | None = None,
    tables: Sequence[TableRef] = (DOCS,),
    columns: Columns = COLUMNS,
) -> TransactionAssembler:
    def docs_of(table: TableRef) -> Iterable[str]:
        return (known or {}).get(table, ())

    return TransactionAssembler(tables, columns, buffer_max, docs_of, name="test")


def txn(commit_lsn: int, *changes: object) -> list[object]:
    """One transaction: Begin, its changes, Commit (end LSN = commit LSN + 8, as on a server)."""
    return [Begin(commit_lsn, 0, commit_lsn), *changes, Commit(0, commit_lsn, commit_lsn + 8, 0)]


def feed(asm: TransactionAssembler, messages: Iterable[object]) -> list[SourceRecord]:
    return [record for message in messages for record in asm.on_message(message)]


def peek(asm: TransactionAssembler, messages: Sequence[object]) -> list[SourceRecord]:
    """One peek as the source drives it: stop early when a transaction needs a second pass."""
    asm.start_peek()
    out: list[SourceRecord] = []
    try:
        for message in messages:
            out.extend(asm.on_message(message))
            if asm.restart_peek:
                break
    finally:
        asm.end_peek()
    return out


def row(doc_id: str, body: str | None, n: int = 1) -> Row:
    return (doc_id.encode(), None if body is None else body.encode(), str(n).encode())


def shape(records: Iterable[SourceRecord]) -> list[tuple[str, str, int | None, str | None]]:
    """(op or "bad", doc_id, version, position) of each record."""
    out: list[tuple[str, str, int | None, str | None]] = []
    for r in records:
        if isinstance(r, ChangeEvent):
            out.append((r.op.value, r.doc_id, r.version, r.position))
        else:
            out.append(("bad", r.doc_id or "", None, r.position))
    return out


def test_only_the_last_change_of_a_document_is_emitted_at_the_end_lsn() -> None:
    """Two changes of one document in a transaction give one record, versioned with the commit's
    end LSN; only the transaction's last record carries it as its position."""
    asm = assembler()
    records = feed(asm, [DOCS_RELATION, *txn(1000, Insert(100, row("a", "one")), Insert(100, row("b", "bee")),
                                              Update(100, "O", row("a", "one"), row("a", "two", 2)))])  # fmt: skip
    end = lsn_to_text(1008)
    assert shape(records) == [("upsert", "b", 1008, None), ("upsert", "a", 1008, end)]
    last = records[-1]
    assert isinstance(last, ChangeEvent) and (last.text, last.metadata) == ("two", {"n": 2})


def test_a_key_update_is_a_delete_of_the_old_id_and_an_upsert_of_the_new() -> None:
    """An UPDATE that changes the id deletes the old document and upserts the new one."""
    asm = assembler()
    records = feed(asm, [DOCS_RELATION, *txn(2000, Update(100, "O", row("a", "x"), row("z", "x")))])
    assert shape(records) == [("delete", "a", 2008, None), ("upsert", "z", 2008, lsn_to_text(2008))]


def test_an_unchanged_toasted_text_is_taken_from_the_full_old_row() -> None:
    """A TOASTed text the UPDATE left alone comes from the old row; without one it is a bad record."""
    asm = assembler()
    kept = feed(asm, [DOCS_RELATION, *txn(3000, Update(100, "O", row("a", "long"), (b"a", UNCHANGED, b"5")))])
    assert isinstance(kept[0], ChangeEvent) and (kept[0].text, kept[0].metadata) == ("long", {"n": 5})
    lost = feed(asm, txn(3100, Update(100, None, None, (b"a", UNCHANGED, b"5"))))
    assert isinstance(lost[0], BadRecord) and "unchanged TOASTed value" in lost[0].reason
    assert lost[0].position == lsn_to_text(3108)


def test_a_row_that_cannot_be_a_document_is_a_bad_record() -> None:
    """A NULL text is a BadRecord naming its document, in that document's place; a row without
    an id has no place and comes last, so here it carries the transaction's position."""
    asm = assembler()
    changes = [Insert(100, (None, b"x", b"1")), Insert(100, row("bad", None)), Insert(100, row("ok", "fine"))]
    records = feed(asm, [DOCS_RELATION, *txn(4000, *changes)])
    assert shape(records) == [("bad", "bad", None, None), ("upsert", "ok", 4008, None), ("bad", "", None, lsn_to_text(4008))]
    assert [r.reason for r in records if isinstance(r, BadRecord)] == ["text is NULL", "id is NULL"]


def test_a_truncate_deletes_known_documents_not_written_again_after_it() -> None:
    """TRUNCATE deletes every known document of the table; a row written after it in the same
    transaction stands, and one written before it becomes a delete."""
    asm = assembler(known={DOCS: ["k1", "k2", "after"]})
    messages = [DOCS_RELATION, *txn(5000, Insert(100, row("before", "b")), Truncate((100,), False, False),
                                     Insert(100, row("after", "a")))]  # fmt: skip
    records = feed(asm, messages)
    assert shape(records) == [
        ("delete", "k1", 5008, None),
        ("delete", "k2", 5008, None),
        ("delete", "before", 5008, None),
        ("upsert", "after", 5008, lsn_to_text(5008)),
    ]


def test_a_delivered_transaction_is_skipped_when_a_later_peek_sends_it_again() -> None:
    """Each peek starts over at the slot; a transaction delivered before is passed over, a new one is not."""
    asm = assembler()
    first = [DOCS_RELATION, *txn(6000, Insert(100, row("a", "one")))]
    assert shape(peek(asm, first)) == [("upsert", "a", 6008, lsn_to_text(6008))]
    again = [*first, *txn(6100, Delete(100, "O", row("a", "one")))]
    assert shape(peek(asm, again)) == [("delete", "a", 6108, lsn_to_text(6108))]


def test_an_oversized_transaction_is_emitted_in_a_second_pass() -> None:
    """A transaction over the buffer asks for the peek to start over, then emits each document's
    last change as it goes: the same records a big enough buffer gives."""
    changes = [Insert(100, row(f"d{i % 4}", f"v{i}", i)) for i in range(10)]
    messages = [DOCS_RELATION, *txn(7000, *changes)]
    small = assembler(buffer_max=2)
    assert peek(small, messages) == [] and small.replaying
    second = peek(small, messages)
    assert not small.replaying
    whole = feed(assembler(), messages)
    assert sorted(shape(second)) == sorted(shape(whole))
    assert shape(second)[-1][3] == lsn_to_text(7008) and [r[3] for r in shape(second)[:-1]] == [None] * 3
    assert {r.doc_id: r.text for r in second if isinstance(r, ChangeEvent)} == {"d0": "v8", "d1": "v9", "d2": "v6", "d3": "v7"}


def test_an_oversized_transaction_ending_in_a_truncate_still_carries_its_position() -> None:
    """When a TRUNCATE leaves no row change to emit, its deletes carry the transaction's position."""
    changes = [Insert(100, row(f"d{i}", "x")) for i in range(5)]
    messages = [DOCS_RELATION, *txn(8000, *changes, Truncate((100,), False, False))]
    asm = assembler(buffer_max=2, known={DOCS: ["k"]})
    assert peek(asm, messages) == []
    records = peek(asm, messages)
    assert shape(records)[-1][3] == lsn_to_text(8008)
    assert {r.doc_id for r in records if isinstance(r, ChangeEvent)} == {"k", "d0", "d1", "d2", "d3", "d4"}
    assert all(isinstance(r, ChangeEvent) and r.op is Op.DELETE for r in records)


def test_changes_of_tables_not_configured_are_ignored() -> None:
    """A relation the source does not follow yields nothing; its transaction still counts as delivered."""
    other = Relation(200, "public", "other", "f", DOCS_RELATION.columns)
    asm = assembler()
    assert feed(asm, [other, *txn(9000, Insert(200, row("a", "x")))]) == []


def test_the_captured_stream_becomes_these_records() -> None:
    """The messages a real server sent (inserts, a TOASTed update, a key change, deletes, a
    logical message, a TRUNCATE of both tables) as records, one state per document per transaction."""
    full = TableRef("cap_full", "public", "cap_full", "cap_full/")
    key = TableRef("cap_key", "public", "cap_key", "cap_key/")
    asm = assembler(tables=(full, key), columns=Columns("id", "body", None, ()), known={full: ["cap_full/7"]})
    records = feed(asm, DECODED)
    commits = [d.end_lsn for d in DECODED if isinstance(d, Commit)]
    assert shape(records) == [
        ("upsert", "cap_full/1", commits[0], None),
        ("bad", "cap_key/a", None, lsn_to_text(commits[0])),
        ("upsert", "cap_full/1", commits[1], lsn_to_text(commits[1])),
        ("delete", "cap_key/a", commits[2], None),
        ("upsert", "cap_key/b", commits[2], lsn_to_text(commits[2])),
        ("delete", "cap_key/b", commits[3], lsn_to_text(commits[3])),
        ("delete", "cap_full/1", commits[4], lsn_to_text(commits[4])),
        ("delete", "cap_full/7", commits[6], lsn_to_text(commits[6])),
    ]
    toasted = records[2]
    assert isinstance(toasted, ChangeEvent) and toasted.text == "x" * 2100
    renamed = records[4]
    assert isinstance(renamed, ChangeEvent) and renamed.text == "é"

