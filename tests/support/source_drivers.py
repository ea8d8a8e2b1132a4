"""Drivers for the ChangeSource contract: each writes changes through one adapter's own medium.

A driver owns one adapter's medium (a JSONL file, a folder, a Postgres table read by watermark,
a Kafka topic of Debezium envelopes, a table behind a logical replication slot, a webhook inbox
fed over HTTP) and opens sources on it, always with the same configuration, so that two sources
it opens are "the same source" restarted. Writes return what the source must turn them into.

The ledger side every source needs (KnownDocs + CheckpointStore) is ``ContractLedger``: the
ledger's version gate and source hashes in dicts, so a test applies what it read as ``sync``
would and commits positions as ``sync`` does.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Protocol

import httpx
import psycopg
from prometheus_client import CollectorRegistry
from psycopg import sql
from psycopg.types.json import Jsonb
from pydantic import SecretStr

from adapters.sources.debezium import KafkaSourceSettings, TableMappingSettings
from adapters.sources.folder import FolderSource
from adapters.sources.jsonl import JsonlSource
from adapters.sources.kafka import KafkaDebeziumSource
from adapters.sources.pg_logical import PgLogicalSource, PgLogicalSourceSettings
from adapters.sources.sql_table import SqlTableSource
from adapters.sources.webhook import SqliteInbox, WebhookSource
from chaos.servers import EmbeddedPostgres
from coordinator.events import ChangeEvent, Op
from coordinator.model import DocState
from coordinator.planner import document_hash
from coordinator.ports import ChangeSource, SourceRecord
from lockstep.ops_http import EventsEndpoint, OpsServer
from tests.support.kafka_servers import (
    GatedDocs,
    KafkaRecord,
    TansuBroker,
    debezium_key,
    debezium_value,
    produce,
)

# Bounds every statement the drivers send to Postgres.
STATEMENT_TIMEOUT_MS = 30_000
# Bounds one POST to the webhook intake.
HTTP_TIMEOUT_S = 30.0
# A Kafka consumer group re-forms in about a second with this session on Tansu.
KAFKA_SESSION_S = 1.0
# How long a Kafka source may wait for the group to assign it the topic's partition.
KAFKA_ASSIGNMENT_WAIT_S = 60.0
# A token long enough for the intake (TOKEN_CHARS_MIN).
WEBHOOK_TOKEN = "contract-token-" + "t" * 24
# Watermark timestamps of the SQL table: one second apart, from here on.
SQL_T0 = datetime(2026, 1, 1, tzinfo=UTC)

Semantics = Literal["log", "snapshot"]


@dataclass(frozen=True)
class Written:
    """A change written to the medium, as the source must deliver it (text None: a delete)."""

    doc_id: str
    text: str | None
    metadata: Mapping[str, Any]

    @property
    def op(self) -> Op:
        return Op.DELETE if self.text is None else Op.UPSERT


@dataclass(frozen=True)
class BadWrite:
    """A record that cannot become a ChangeEvent: part of the reason the source must give, and
    the payload exactly (``payload``), or, for a row the source spells as JSON of its columns,
    strings that JSON must hold (``holds``)."""

    reason: str
    payload: str | None = None
    holds: tuple[str, ...] = ()


class SourceDriver(Protocol):
    """One adapter's medium, writable by the test, and sources opened on it.

    ``semantics``: "log" sources deliver every change written; "snapshot" sources (a folder, a
    table read by watermark) diff the current state against the ledger, so changes made between
    two reads arrive as their net effect. ``positioned``: records carry positions to commit
    (a folder's position is the ledger itself, so it has none).
    """

    kind: str
    semantics: Semantics
    positioned: bool

    def open(self) -> ChangeSource: ...

    def upsert(self, key: int, text: str, tag: str) -> Written: ...

    def delete(self, key: int) -> Written: ...

    def write_bad(self, key: int, tag: str) -> BadWrite: ...

    def close(self) -> None: ...


class ContractLedger(GatedDocs):
    """KnownDocs + CheckpointStore in dicts (``GatedDocs``'s), behind the ledger's version gate,
    with the source hashes a folder diffs against. Thread-safe (the Kafka source reads from its
    own thread)."""

    def apply_all(self, records: Iterable[SourceRecord]) -> None:
        """Apply every change event (bad records change nothing), keeping each document's hash."""
        for record in records:
            if isinstance(record, ChangeEvent):
                self._apply_hashed(record)

    def _apply_hashed(self, event: ChangeEvent) -> None:
        with self._lock:
            current = self.docs.get(event.doc_id)
            if current is not None and event.version <= current.version:
                return
            if event.op is Op.DELETE:
                self.docs[event.doc_id] = DocState(event.doc_id, event.version, deleted=True)
                return
            assert event.text is not None, "upserts carry text"
            source_hash = document_hash(event.text, event.metadata)
            self.docs[event.doc_id] = DocState(event.doc_id, event.version, False, source_hash=source_hash)


class _Versions:
    """The next version of each key, for media whose writer chooses versions (JSONL, webhook)."""

    def __init__(self) -> None:
        self._last: dict[int, int] = {}

    def next(self, key: int) -> int:
        self._last[key] = self._last.get(key, 0) + 1
        return self._last[key]


def _event_line(op: str, doc_id: str, version: int, text: str | None, tag: str | None) -> bytes:
    fields: dict[str, Any] = {"op": op, "doc_id": doc_id, "version": version}
    if text is not None:
        fields |= {"text": text, "metadata": {"tag": tag}}
    return json.dumps(fields).encode("utf-8")


# --- JSONL -----------------------------------------------------------------------------------------


class JsonlDriver:
    """Lines appended to one JSON Lines file."""

    kind = "jsonl"
    semantics: Semantics = "log"
    positioned = True

    def __init__(self, root: Path, ledger: ContractLedger) -> None:
        self.path = root / "events.jsonl"
        self.path.touch()
        self._ledger = ledger
        self._versions = _Versions()

    def open(self) -> JsonlSource:
        return JsonlSource(self.path, self._ledger)

    def upsert(self, key: int, text: str, tag: str) -> Written:
        doc_id = f"doc{key}"
        self._append(_event_line("upsert", doc_id, self._versions.next(key), text, tag))
        return Written(doc_id, text, {"tag": tag})

    def delete(self, key: int) -> Written:
        doc_id = f"doc{key}"
        self._append(_event_line("delete", doc_id, self._versions.next(key), None, None))
        return Written(doc_id, None, {})

    def write_bad(self, key: int, tag: str) -> BadWrite:
        line = json.dumps({"op": "upsert", "doc_id": f"doc{key}", "text": tag})
        self._append(line.encode("utf-8"))
        return BadWrite("missing version", payload=line)

    def close(self) -> None:
        """Nothing to release: each append opens and closes the file."""

    def _append(self, line: bytes) -> None:
        with self.path.open("ab") as handle:
            handle.write(line + b"\n")


# --- a folder --------------------------------------------------------------------------------------


class FolderDriver:
    """Markdown files written to and removed from one folder."""

    kind = "folder"
    semantics: Semantics = "snapshot"
    positioned = False

    def __init__(self, root: Path, ledger: ContractLedger) -> None:
        self.root = root / "docs"
        self.root.mkdir()
        self._ledger = ledger

    def open(self) -> FolderSource:
        return FolderSource(self.root, self._ledger)

    def upsert(self, key: int, text: str, tag: str) -> Written:
        body = f"# {tag}\n\n{text}\n"
        (self.root / f"doc{key}.md").write_text(body, encoding="utf-8")
        return Written(f"doc{key}.md", body, {"path": f"doc{key}.md", "title": tag})

    def delete(self, key: int) -> Written:
        (self.root / f"doc{key}.md").unlink()
        return Written(f"doc{key}.md", None, {})

    def write_bad(self, key: int, tag: str) -> BadWrite:
        path = self.root / f"doc{key}.md"
        path.write_bytes(tag.encode("utf-8") + b" \xff\xfe not UTF-8")
        # A file's record is its path: the file itself stays where it is, however large.
        return BadWrite("invalid UTF-8", payload=str(path))

    def close(self) -> None:
        """Nothing to release: the files are removed with the test's directory."""


# --- a SQL table read by (updated_at, id) watermark -----------------------------------------------


class SqlTableDriver:
    """Rows of one Postgres table; deletes are soft (deleted_at and updated_at set together)."""

    kind = "sql_table"
    semantics: Semantics = "snapshot"
    positioned = True

    def __init__(self, server: EmbeddedPostgres, ledger: ContractLedger) -> None:
        self.dsn = server.uri
        self.table = f"docs_{uuid.uuid4().hex[:10]}"
        self._ledger = ledger
        self._ticks = 0
        self._sql(
            "CREATE TABLE {} (id bigint PRIMARY KEY, text text, meta jsonb,"
            " updated_at timestamptz, deleted_at timestamptz)"
        )

    def open(self) -> SqlTableSource:
        url = self.dsn.replace("postgresql://", "postgresql+psycopg://", 1)
        return SqlTableSource(
            url, self.table, self._ledger, self._ledger, metadata_json_column="meta", deleted_at_column="deleted_at"
        )

    def upsert(self, key: int, text: str, tag: str) -> Written:
        self._sql(
            "INSERT INTO {} (id, text, meta, updated_at) VALUES (%s, %s, %s, %s) ON CONFLICT (id) DO UPDATE"
            " SET text = excluded.text, meta = excluded.meta, updated_at = excluded.updated_at, deleted_at = NULL",
            (key, text, Jsonb({"tag": tag}), self._tick()),
        )
        return Written(str(key), text, {"tag": tag})

    def delete(self, key: int) -> Written:
        now = self._tick()
        self._sql("UPDATE {} SET deleted_at = %s, updated_at = %s WHERE id = %s", (now, now, key))
        return Written(str(key), None, {})

    def write_bad(self, key: int, tag: str) -> BadWrite:
        self._sql(
            "INSERT INTO {} (id, text, meta, updated_at) VALUES (%s, NULL, %s, %s)",
            (key, Jsonb({"tag": tag}), self._tick()),
        )
        return BadWrite("text is NULL", holds=(tag,))

    def close(self) -> None:
        self._sql("DROP TABLE IF EXISTS {}")

    def _tick(self) -> datetime:
        self._ticks += 1
        return SQL_T0 + timedelta(seconds=self._ticks)

    def _sql(self, statement: str, params: tuple[Any, ...] = ()) -> None:
        with _connect(self.dsn) as conn:
            conn.execute(sql.SQL(statement).format(sql.Identifier(self.table)), params)


# --- Debezium envelopes on a Kafka topic -----------------------------------------------------------


class KafkaDriver:
    """Debezium (Postgres connector) envelopes of ``public.notes`` produced to a one-partition
    topic, at increasing LSNs; a delete is followed by its tombstone, as Debezium sends it."""

    kind = "kafka"
    semantics: Semantics = "log"
    positioned = True

    TABLE = "public.notes"

    def __init__(self, broker: TansuBroker, ledger: ContractLedger) -> None:
        self.broker = broker
        self.topic = f"contract-{uuid.uuid4().hex[:10]}"
        broker.create_topic(self.topic, 1)
        self.settings = KafkaSourceSettings(
            bootstrap_servers=(broker.bootstrap,),
            topics=(self.topic,),
            group_id=f"g-{self.topic}",
            tables={self.TABLE: TableMappingSettings(doc_id="notes:{id}", text_columns=("body",), metadata_columns=("tag",))},
            session_timeout_s=KAFKA_SESSION_S,
            assignment_wait_s=KAFKA_ASSIGNMENT_WAIT_S,
        )
        self._ledger = ledger
        self._lsn = 1_000
        self._live: set[int] = set()

    def open(self) -> KafkaDebeziumSource:
        return KafkaDebeziumSource(self.settings, self._ledger, self._ledger)

    def upsert(self, key: int, text: str, tag: str) -> Written:
        op = "u" if key in self._live else "c"
        self._live.add(key)
        after = {"id": key, "body": text, "tag": tag}
        self._produce(KafkaRecord(debezium_key({"id": key}), debezium_value(op, table=self.TABLE, lsn=self._next_lsn(), after=after)))
        return Written(f"notes:{key}", text, {"tag": tag})

    def delete(self, key: int) -> Written:
        self._live.discard(key)
        value = debezium_value("d", table=self.TABLE, lsn=self._next_lsn(), before={"id": key})
        self._produce(KafkaRecord(debezium_key({"id": key}), value), KafkaRecord(debezium_key({"id": key}), None))
        return Written(f"notes:{key}", None, {})

    def write_bad(self, key: int, tag: str) -> BadWrite:
        value = debezium_value("c", table=self.TABLE, lsn=self._next_lsn(), after={"id": key, "tag": tag})
        self._produce(KafkaRecord(debezium_key({"id": key}), value))
        # The value exactly as produced (kafka_servers.produce encodes compact JSON).
        return BadWrite("column 'body' missing", payload=json.dumps(value, separators=(",", ":")))

    def close(self) -> None:
        """Nothing to release: the broker lives for the session, the topic is this test's own."""

    def _next_lsn(self) -> int:
        self._lsn += 8
        return self._lsn

    def _produce(self, *records: KafkaRecord) -> None:
        produce(self.broker.bootstrap, self.topic, records)


# --- Postgres logical replication ------------------------------------------------------------------


class PgLogicalDriver:
    """Rows of one REPLICA IDENTITY FULL table, one transaction per write, read through a
    pgoutput slot of this test's own."""

    kind = "pg_logical"
    semantics: Semantics = "log"
    positioned = True

    def __init__(self, server: EmbeddedPostgres, ledger: ContractLedger) -> None:
        self.dsn = server.uri
        suffix = uuid.uuid4().hex[:10]
        self.table, self.slot, self.publication = f"kb_{suffix}", f"s_{suffix}", f"p_{suffix}"
        self._ledger = ledger
        self._sql("CREATE TABLE {} (id bigint PRIMARY KEY, body text, meta jsonb)")
        self._sql("ALTER TABLE {} REPLICA IDENTITY FULL")

    def open(self) -> PgLogicalSource:
        settings = PgLogicalSourceSettings(
            dsn=SecretStr(self.dsn),
            tables=(self.table,),
            name=f"postgres:{self.slot}",
            slot=self.slot,
            publication=self.publication,
            text_column="body",
            metadata_column="meta",
            poll_interval_s=0.05,
        )
        return PgLogicalSource(settings, self._ledger, self._ledger)

    def upsert(self, key: int, text: str, tag: str) -> Written:
        self._sql(
            "INSERT INTO {} (id, body, meta) VALUES (%s, %s, %s)"
            " ON CONFLICT (id) DO UPDATE SET body = excluded.body, meta = excluded.meta",
            (key, text, Jsonb({"tag": tag})),
        )
        return Written(str(key), text, {"tag": tag})

    def delete(self, key: int) -> Written:
        self._sql("DELETE FROM {} WHERE id = %s", (key,))
        return Written(str(key), None, {})

    def write_bad(self, key: int, tag: str) -> BadWrite:
        self._sql("INSERT INTO {} (id, body, meta) VALUES (%s, NULL, %s)", (key, Jsonb({"tag": tag})))
        return BadWrite("text is NULL", holds=(tag,))

    def close(self) -> None:
        with _connect(self.dsn) as conn:
            conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s", (self.slot,))
            conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(self.publication)))
        self._sql("DROP TABLE IF EXISTS {}")

    def _sql(self, statement: str, params: tuple[Any, ...] = ()) -> None:
        with _connect(self.dsn) as conn:
            conn.execute(sql.SQL(statement).format(sql.Identifier(self.table)), params)


# --- webhook POSTs into the inbox ------------------------------------------------------------------


class WebhookDriver:
    """JSON lines POSTed over real HTTP to ``/events`` of an in-process ops server whose intake
    fills an SQLite inbox; sources are opened on the same inbox file with connections of their
    own (as the service's reader, or another process, would)."""

    kind = "webhook"
    semantics: Semantics = "log"
    positioned = True

    def __init__(self, root: Path, ledger: ContractLedger) -> None:
        self.inbox_path = root / "inbox.db"
        self._ledger = ledger
        self._versions = _Versions()
        self._receiver = WebhookSource(SqliteInbox(self.inbox_path), ledger)
        self._ops = OpsServer("127.0.0.1", 0, CollectorRegistry(), lambda: (True, []), events=True).start()
        endpoint = EventsEndpoint(self._receiver.intake(), SecretStr(WEBHOOK_TOKEN), 1024 * 1024, lambda: None)
        self._ops.attach_events(endpoint)
        self.url = f"http://127.0.0.1:{self._ops.port}/events"

    def open(self) -> WebhookSource:
        return WebhookSource(SqliteInbox(self.inbox_path), self._ledger)

    def upsert(self, key: int, text: str, tag: str) -> Written:
        doc_id = f"doc{key}"
        self._post(_event_line("upsert", doc_id, self._versions.next(key), text, tag), 202)
        return Written(doc_id, text, {"tag": tag})

    def delete(self, key: int) -> Written:
        doc_id = f"doc{key}"
        self._post(_event_line("delete", doc_id, self._versions.next(key), None, None), 202)
        return Written(doc_id, None, {})

    def write_bad(self, key: int, tag: str) -> BadWrite:
        line = json.dumps({"op": "upsert", "doc_id": f"doc{key}", "text": tag})
        self._post(line.encode("utf-8"), 422)
        return BadWrite("missing version", payload=line)

    def close(self) -> None:
        self._ops.stop()
        self._receiver.close()

    def _post(self, line: bytes, status: int) -> None:
        headers = {"Authorization": f"Bearer {WEBHOOK_TOKEN}", "Content-Type": "application/x-ndjson"}
        response = httpx.post(self.url, content=line + b"\n", headers=headers, timeout=HTTP_TIMEOUT_S)
        assert response.status_code == status, response.text


def _connect(dsn: str) -> psycopg.Connection[Any]:
    return psycopg.connect(dsn, autocommit=True, options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}")
