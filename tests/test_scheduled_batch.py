"""`lockstep run` polling a SQL table (SQLite file, Postgres) and a folder on an interval: inserts,
updates, soft deletes, hard deletes (found by periodic ID reconciliation), primary-key changes and
truncates made while it runs all reach both indexes."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    MetaData,
    String,
    Table,
    create_engine,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Engine

from adapters.ledger.postgres import PostgresLedger
from adapters.ledger.sqlite import SqliteLedger
from chaos import check
from chaos.servers import EmbeddedPostgres
from chaos.stream import StreamFaults
from chaos.workload import CHUNK_CHARS_MAX, CHUNKING, SourceModel, random_history
from coordinator.chunking import chunk_id, chunk_text, content_hash
from coordinator.events import ChangeEvent, Op
from coordinator.invariants import ExpectedChunk, check_index
from coordinator.planner import document_hash
from lockstep.runtime import runtime
from lockstep.settings import load_settings
from tests.support.postgres_servers import PgSchema
from tests.support.service_process import free_port, ready, start_service, stop_service, wait_for

POLL_INTERVAL_S = 0.3
RECONCILE_INTERVAL_S = 1.0
T0 = datetime(2025, 1, 1, tzinfo=UTC)
AnyLedger = SqliteLedger | PostgresLedger


def _config(tmp_path: Path, port: int, source: dict[str, Any], ledger: dict[str, Any]) -> Path:
    suffix = uuid.uuid4().hex[:8]
    config = {
        "source": source,
        "keyword": {"kind": "tantivy", "path": str(tmp_path / "tantivy")},
        "vector": {"uri": str(tmp_path / "milvus.db"), "collection": f"sb_{suffix}"},
        "ledger": ledger,
        "embedder": {"kind": "hashing"},
        "chunking": {"max_chars": CHUNK_CHARS_MAX},
        "run": {"shards": 2, "http_port": port, "batch_docs_max": 50, "audit_interval_s": 0,
                "poll_interval_s": POLL_INTERVAL_S, "reconcile_interval_s": RECONCILE_INTERVAL_S},
    }
    path = tmp_path / "lockstep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# --- a SQL table -------------------------------------------------------------------------------


@dataclass
class SourceTable:
    """The documents table the source polls, written the way an application would."""

    engine: Engine
    rng: random.Random
    table: Table = field(init=False)
    ticks: int = 0
    hard_deletes: int = 0
    soft_deletes: int = 0

    def __post_init__(self) -> None:
        self.table = Table(
            f"docs_{uuid.uuid4().hex[:10]}",
            MetaData(),
            Column("id", String(64), primary_key=True),
            Column("body", String(4000), nullable=False),
            Column("meta", JSON, nullable=False),
            Column("version", BigInteger, nullable=False),
            Column("updated_at", DateTime(timezone=True), nullable=False),
            Column("deleted_at", DateTime(timezone=True), nullable=True),
        )
        self.table.create(self.engine)

    def source_settings(self, url: str) -> dict[str, Any]:
        return {"kind": "sql", "url": url, "table": str(self.table.name), "name": "table", "text_column": "body",
                "metadata_column": "meta", "deleted_at_column": "deleted_at", "version_column": "version"}

    def apply(self, event: ChangeEvent) -> None:
        """One source change: every change bumps updated_at; half the deletes are hard deletes."""
        self.ticks += 1
        now = T0 + timedelta(milliseconds=self.ticks)
        t = self.table
        with self.engine.begin() as db:
            exists = db.execute(select(t.c.id).where(t.c.id == event.doc_id)).first() is not None
            if event.op is Op.UPSERT:
                row = {"body": event.text, "meta": dict(event.metadata), "version": event.version,
                       "updated_at": now, "deleted_at": None}
                db.execute(update(t).where(t.c.id == event.doc_id).values(**row) if exists
                           else insert(t).values(id=event.doc_id, **row))
            elif self.rng.random() < 0.5:
                self.hard_deletes += 1
                db.execute(delete(t).where(t.c.id == event.doc_id))
            else:
                self.soft_deletes += 1
                db.execute(update(t).where(t.c.id == event.doc_id)
                           .values(deleted_at=now, updated_at=now, version=event.version))


def _table_history(seed: int, namespace: str) -> tuple[SourceModel, list[list[ChangeEvent]]]:
    """A random history with primary-key changes and a truncate, cut into four waves."""
    rng = random.Random(seed)
    model = SourceModel(namespace)
    random_history(model, rng, 60)
    faults = StreamFaults(rng)
    for _ in range(3):
        faults.pk_change(model)
    faults.truncate(model)
    assert faults.injected["pk_change"] and faults.injected["truncate"]
    events = model.history
    cut = len(events) // 4
    return model, [events[:cut], events[cut : 2 * cut], events[2 * cut : 3 * cut], events[3 * cut :]]


def _latest(events: list[ChangeEvent]) -> dict[str, ChangeEvent]:
    out: dict[str, ChangeEvent] = {}
    for event in events:
        out[event.doc_id] = event
    return out


def _ledger_matches(ledger: AnyLedger, latest: dict[str, ChangeEvent]) -> bool:
    """Live rows at their version; deleted rows tombstoned (or never seen, if created and hard-
    deleted between two polls)."""
    docs = ledger.get_docs(latest)
    for doc_id, event in latest.items():
        doc = docs.get(doc_id)
        if event.op is Op.UPSERT and (doc is None or doc.deleted or doc.version != event.version):
            return False
        if event.op is Op.DELETE and doc is not None and not doc.deleted:
            return False
    return True


def _run_table_waves(
    config: Path, table: SourceTable, waves: list[list[ChangeEvent]], ledger: AnyLedger, base: str
) -> None:
    """The first wave is there before the service starts; each later one is made while it runs,
    and the next waits until the ledger holds the previous one."""
    done: list[ChangeEvent] = []
    for event in waves[0]:
        table.apply(event)
    proc = start_service(config)
    try:
        wait_for(lambda: ready(base), "ready", proc)
        for wave in waves:
            if wave is not waves[0]:
                for event in wave:
                    table.apply(event)
            done += wave
            latest = _latest(done)
            wait_for(partial(_ledger_matches, ledger, latest), "the wave reached the ledger", proc)
    finally:
        err = stop_service(proc)
    assert proc.returncode == 0, err[-3000:]
    assert '"ids reconciled"' in err


def _assert_indexes_match(config: Path, model: SourceModel) -> None:
    with runtime(load_settings(config)) as rt:
        violations = [
            *check.index_against_source("keyword", model, set(), rt.keyword.scan(with_text=True)),
            *check.index_against_source("vector", model, set(), rt.vector.scan(with_text=True)),
            *check.nothing_pending(rt.ledger),
        ]
        dead = rt.ledger.counts()["dead_letters"]
    assert violations == [], "\n".join(map(str, violations[:20]))
    assert dead == 0


@pytest.fixture
def sqlite_table(tmp_path: Path) -> Iterator[tuple[SourceTable, str]]:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    engine = create_engine(url)
    yield SourceTable(engine, random.Random(5)), url
    engine.dispose()


@pytest.fixture
def postgres_table(postgres_server: EmbeddedPostgres) -> Iterator[tuple[SourceTable, str]]:
    url = postgres_server.uri.replace("postgresql://", "postgresql+psycopg://", 1)
    engine = create_engine(url)
    table = SourceTable(engine, random.Random(6))
    yield table, url
    table.table.drop(engine)
    engine.dispose()


def test_a_polled_sqlite_table_reaches_both_indexes(tmp_path: Path, sqlite_table: tuple[SourceTable, str]) -> None:
    """Inserts, updates, soft and hard deletes, key changes and a truncate in an SQLite table,
    made while `lockstep run` polls it, end up in both indexes exactly as the table holds them."""
    table, url = sqlite_table
    model, waves = _table_history(seed=21, namespace="lite")
    port = free_port()
    config = _config(tmp_path, port, table.source_settings(url), {"path": str(tmp_path / "ledger.db")})
    ledger = SqliteLedger(tmp_path / "ledger.db")
    _run_table_waves(config, table, waves, ledger, f"http://127.0.0.1:{port}")
    ledger.close()
    assert table.hard_deletes and table.soft_deletes
    _assert_indexes_match(config, model)


def test_a_polled_postgres_table_reaches_both_indexes_with_the_postgres_ledger(
    tmp_path: Path, postgres_table: tuple[SourceTable, str], pg_schema: PgSchema
) -> None:
    """The same over a Postgres table, with the ledger in Postgres too: hard deletes are found
    by the reconciliation pass reading the Postgres ledger."""
    table, url = postgres_table
    model, waves = _table_history(seed=22, namespace="pgt")
    port = free_port()
    ledger_settings = {"kind": "postgres", "dsn": pg_schema.dsn, "schema": pg_schema.name}
    config = _config(tmp_path, port, table.source_settings(url), ledger_settings)
    ledger = PostgresLedger(pg_schema.dsn, schema=pg_schema.name)
    _run_table_waves(config, table, waves, ledger, f"http://127.0.0.1:{port}")
    ledger.close()
    assert table.hard_deletes and table.soft_deletes
    _assert_indexes_match(config, model)


# --- a folder ----------------------------------------------------------------------------------


def _folder_waves(rng: random.Random) -> list[dict[str, str | None]]:
    """Per wave, the files written (text) or removed (None)."""
    first = {f"f{i:02d}.txt": _paragraphs(f"f{i:02d}", 0, rng) for i in range(12)}
    first["sub/deep.md"] = "# Deep\n\n" + _paragraphs("deep", 0, rng)
    second: dict[str, str | None] = {name: _paragraphs(name, 1, rng) for name in ("f00.txt", "f01.txt", "f02.txt")}
    second |= {"f03.txt": None, "f04.txt": None, "new.txt": _paragraphs("new", 0, rng)}
    third: dict[str, str | None] = {"f03.txt": _paragraphs("f03", 2, rng), "f00.txt": None, "sub/deep.md": None}
    third["f05.txt"] = _paragraphs("f05", 2, rng)
    return [dict(first), second, third]


def _paragraphs(name: str, revision: int, rng: random.Random) -> str:
    return "\n\n".join(f"{name} paragraph {i} revision {revision} about refunds" for i in range(rng.randint(1, 4)))


def _folder_ledger_matches(ledger: SqliteLedger, files: dict[str, str | None]) -> bool:
    docs = ledger.get_docs(files)
    for path, text in files.items():
        doc = docs.get(path)
        if text is None:
            if doc is not None and not doc.deleted:
                return False
            continue
        metadata = {"path": path, "title": "Deep" if path.endswith(".md") else Path(path).stem}
        if doc is None or doc.deleted or doc.source_hash != document_hash(text, metadata):
            return False
    return True


def test_a_polled_folder_reaches_both_indexes(tmp_path: Path) -> None:
    """Files created, changed, removed and re-created while `lockstep run` polls the folder end up
    in both indexes as the folder holds them."""
    root = tmp_path / "docs"
    port = free_port()
    config = _config(tmp_path, port, {"kind": "folder", "path": str(root), "name": "folder"},
                     {"path": str(tmp_path / "ledger.db")})
    files: dict[str, str | None] = {}
    ledger = SqliteLedger(tmp_path / "ledger.db")
    proc = start_service(config)
    try:
        wait_for(lambda: ready(f"http://127.0.0.1:{port}"), "ready", proc)
        for wave in _folder_waves(random.Random(9)):
            for name, text in wave.items():
                _write(root / name, text)
            files |= wave
            wait_for(partial(_folder_ledger_matches, ledger, dict(files)), "the wave reached the ledger", proc)
    finally:
        err = stop_service(proc)
        ledger.close()
    assert proc.returncode == 0, err[-3000:]
    expected = {
        chunk_id(path, i): ExpectedChunk(chunk_id(path, i), content_hash(piece))
        for path, text in files.items() if text is not None
        for i, piece in enumerate(chunk_text(text, CHUNKING))
    }
    deleted = {path for path, text in files.items() if text is None}
    with runtime(load_settings(config)) as rt:
        violations = [
            *check_index("keyword", expected, deleted, list(rt.keyword.scan(with_text=True))),
            *check_index("vector", expected, deleted, list(rt.vector.scan(with_text=True))),
        ]
    assert violations == [], "\n".join(map(str, violations[:20]))


def _write(path: Path, text: str | None) -> None:
    if text is None:
        path.unlink()
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
