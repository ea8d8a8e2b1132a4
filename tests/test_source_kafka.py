"""The Debezium-over-Kafka source against a real Kafka-protocol broker (Tansu).

Source-level tests read with ``KafkaDebeziumSource`` and apply into a version-gated in-memory
ledger (``GatedDocs``); the chaos test and the end-to-end test apply into real stores (Tantivy
and a milvus-lite file) through ``lockstep sync``'s engine and through ``lockstep run``.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from structlog.testing import capture_logs

from adapters.ledger.sqlite import SqliteLedger
from adapters.sources.debezium import KafkaSourceSettings, TableMappingSettings
from adapters.sources.kafka import KafkaDebeziumSource
from chaos.stream import DELIVERY_FAULTS, StreamFaults, ensure_deleted_docs
from chaos.workload import CHUNKING, SourceModel, random_history
from coordinator.apply import ApplyEngine
from coordinator.chunking import ChunkingSettings, chunk_id, chunk_text, content_hash
from coordinator.events import ChangeEvent, Op
from coordinator.invariants import ExpectedChunk, check_index
from coordinator.ports import BadRecord, SourceRecord
from coordinator.sync import run_sync
from lockstep.bootstrap import build_source
from lockstep.runtime import runtime
from lockstep.settings import Settings, load_settings
from tests.support.kafka_servers import (
    GatedDocs,
    KafkaRecord,
    TansuBroker,
    committed_offsets,
    debezium_key,
    debezium_value,
    produce,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "debezium"
# A short session lets a group (re)form in about a second on Tansu; production keeps 10 s.
SESSION_S = 1.0
# How long a test waits for consumers to reach a state before failing.
WAIT_S = 60.0
LOCKSTEP = [sys.executable, "-m", "lockstep"]
RUN_TIMEOUT_S = 300
CUSTOMERS = {
    "public.customers": TableMappingSettings(
        doc_id="pg:{id}", text_columns=("first_name", "last_name"), metadata_columns=("email",)
    ),
    "inventory.customers": TableMappingSettings(doc_id="my:{id}", text_columns=("first_name", "last_name")),
}
NOTES = {"public.notes": TableMappingSettings(doc_id="notes:{id}", text_columns=("body",))}


def _topic(broker: TansuBroker, partitions: int) -> str:
    name = f"t-{uuid.uuid4().hex[:10]}"
    broker.create_topic(name, partitions)
    return name


def _settings(broker: TansuBroker, topic: str, **overrides: Any) -> KafkaSourceSettings:
    values: dict[str, Any] = {
        "bootstrap_servers": (broker.bootstrap,),
        "topics": (topic,),
        "group_id": f"g-{uuid.uuid4().hex[:10]}",
        "tables": CUSTOMERS | NOTES,
        "session_timeout_s": SESSION_S,
        "assignment_wait_s": WAIT_S,
        **overrides,
    }
    return KafkaSourceSettings(**values)


def _read_all(settings: KafkaSourceSettings, docs: GatedDocs) -> list[SourceRecord]:
    source = KafkaDebeziumSource(settings, docs, docs)
    try:
        return list(source.read())
    finally:
        source.close()


def _fixture(name: str, **source_overrides: Any) -> KafkaRecord:
    body = json.loads((FIXTURES / f"{name}.json").read_text())
    value = body["value"]
    if source_overrides:
        payload = value.get("payload", value)
        payload["source"] |= source_overrides
    return KafkaRecord(body["key"], value)


def _note(op: str, id_: int, lsn: int, body: str = "") -> KafkaRecord:
    after = None if op in ("d", "t") else {"id": id_, "body": body or f"note {id_} at {lsn}"}
    before = {"id": id_} if op == "d" else None
    key = None if op == "t" else debezium_key({"id": id_})
    return KafkaRecord(key, debezium_value(op, table="public.notes", lsn=lsn, after=after, before=before))


def _seq(record: SourceRecord) -> dict[str, Any]:
    assert record.position is not None
    decoded: dict[str, Any] = json.loads(record.position)
    return decoded


# --- documented events, order, offsets ----------------------------------------------------------


def test_documented_postgres_and_mysql_events_through_kafka(kafka_broker: TansuBroker) -> None:
    """Debezium's documented create/update/delete/tombstone events for Postgres and MySQL, with and
    without the schema wrapper, become upserts and deletes in order; tombstones are not data."""
    topic = _topic(kafka_broker, 1)
    records = [
        _fixture("postgres_create"),
        # The documentation gives the update the create's LSN; a real server's is later.
        _fixture("postgres_update", lsn=24023200),
        _fixture("mysql_create"),
        _fixture("mysql_update"),
        _fixture("postgres_delete"),
        _fixture("postgres_tombstone"),
        _fixture("mysql_delete"),
        _fixture("mysql_tombstone"),
    ]
    produce(kafka_broker.bootstrap, topic, records)
    docs = GatedDocs()
    out = _read_all(_settings(kafka_broker, topic), docs)
    assert [(r.op, r.doc_id, r.text) for r in out if isinstance(r, ChangeEvent)] == [
        (Op.UPSERT, "pg:1", "Anne\n\nKretchmar"),
        (Op.UPSERT, "pg:1", "Anne Marie\n\nKretchmar"),
        (Op.UPSERT, "my:1004", "Anne\n\nKretchmar"),
        (Op.UPSERT, "my:1004", "Anne Marie\n\nKretchmar"),
        (Op.DELETE, "pg:1", None),
        (Op.DELETE, "my:1004", None),
    ]
    assert [_seq(r)["offset"] for r in out] == [0, 1, 2, 3, 4, 6], "tombstones (offsets 5, 7) handed out"
    assert [_seq(r)["seq"] for r in out] == list(range(6))
    for record in out[:4]:
        docs.apply(record)
    assert docs.live() == {"pg:1": "Anne Marie\n\nKretchmar", "my:1004": "Anne Marie\n\nKretchmar"}
    for record in out[4:]:
        docs.apply(record)
    assert docs.live() == {}


def test_per_key_order_holds_across_partitions_and_the_newest_version_wins(kafka_broker: TansuBroker) -> None:
    """Thirty rows updated eight times each over three partitions: each row's versions arrive in
    increasing order and the final state is every row's last update."""
    topic = _topic(kafka_broker, 3)
    rng = random.Random(3)
    records, newest = [], {}
    for lsn in range(100, 100 + 30 * 8):
        row = rng.randrange(30)
        records.append(_note("u", row, lsn, f"row {row} at {lsn}"))
        newest[f"notes:{row}"] = f"row {row} at {lsn}"
    placed = produce(kafka_broker.bootstrap, topic, records)
    assert len({p for p, _ in placed}) == 3, "the keys must spread over every partition"
    docs = GatedDocs()
    out = _read_all(_settings(kafka_broker, topic), docs)
    seen: dict[str, list[int]] = {}
    for record in out:
        assert isinstance(record, ChangeEvent)
        seen.setdefault(record.doc_id, []).append(record.version)
        docs.apply(record)
    assert all(v == sorted(set(v)) for v in seen.values()), "a row's versions went back within its partition"
    assert docs.live() == newest and docs.stale == 0


def test_commit_stops_at_the_low_watermark_per_partition_and_a_restart_resumes_there(
    kafka_broker: TansuBroker,
) -> None:
    """Committing the position of record k commits, per partition, exactly the offsets of records
    up to k; a new consumer of the group then reads exactly the records after k again."""
    topic = _topic(kafka_broker, 3)
    produce(kafka_broker.bootstrap, topic, [_note("u", i % 17, 1000 + i) for i in range(90)])
    settings = _settings(kafka_broker, topic)
    docs = GatedDocs()
    source = KafkaDebeziumSource(settings, docs, docs)
    try:
        out = list(source.read())
        k = 40
        source.commit(out[k].position or "")
    finally:
        source.close()
    first = [_seq(r) for r in out]
    expected: dict[int, int] = {}
    for pos in first[: k + 1]:
        expected[pos["partition"]] = max(expected.get(pos["partition"], 0), pos["offset"] + 1)
    assert committed_offsets(kafka_broker.bootstrap, settings.group_id, topic, 3) == expected
    again = [_seq(r) for r in _read_all(settings, docs)]
    assert sorted((p["partition"], p["offset"]) for p in again) == sorted(
        (p["partition"], p["offset"]) for p in first[k + 1 :]
    )


def test_a_tombstone_is_committed_together_with_the_delete_before_it(kafka_broker: TansuBroker) -> None:
    """A tombstone is finished as soon as the records before it are: committing the delete commits
    the offset after its tombstone, so a restart does not read the tombstone again."""
    topic = _topic(kafka_broker, 1)
    produce(kafka_broker.bootstrap, topic, [_note("c", 1, 10), _note("d", 1, 20), KafkaRecord(debezium_key({"id": 1}), None)])
    settings = _settings(kafka_broker, topic)
    docs = GatedDocs()
    source = KafkaDebeziumSource(settings, docs, docs)
    try:
        out = list(source.read())
        assert [r.op for r in out if isinstance(r, ChangeEvent)] == [Op.UPSERT, Op.DELETE]
        source.commit(out[-1].position or "")
    finally:
        source.close()
    assert committed_offsets(kafka_broker.bootstrap, settings.group_id, topic, 1) == {0: 3}


# --- truncates, key changes, bad input -----------------------------------------------------------


def test_a_truncate_deletes_committed_in_flight_and_later_older_rows_of_its_table(kafka_broker: TansuBroker) -> None:
    """A truncate deletes the table's rows already committed and those read but not yet committed;
    an older row of the table read after it (a late partition, a redelivery after a restart) is
    deleted too; rows created after it and other tables stay."""
    topic = _topic(kafka_broker, 1)
    records = [_note("c", i, 100 + i) for i in range(1, 11)]
    records += [KafkaRecord(debezium_key({"id": 5}), debezium_value("c", table="public.customers", lsn=150, after={"id": 5, "first_name": "Kim", "last_name": "Lee", "email": "k@x"}))]
    records += [_note("t", 0, 200), _note("c", 11, 210), _note("u", 3, 120)]
    produce(kafka_broker.bootstrap, topic, records)
    settings = _settings(kafka_broker, topic)
    docs = GatedDocs()
    source = KafkaDebeziumSource(settings, docs, docs)
    try:
        stream = source.read()
        for _ in range(5):  # notes 1-5 are applied and committed; 6-10 are read, not applied
            record = next(stream)
            docs.apply(record)
            source.commit(record.position or "")
        in_flight = [next(stream) for _ in range(6)]
        rest = list(stream)
        for record in [*in_flight, *rest]:
            docs.apply(record)
        source.commit(rest[-1].position or "")
    finally:
        source.close()
    truncate_deletes = [r for r in rest if isinstance(r, ChangeEvent) and r.op is Op.DELETE and r.version == 400]
    assert sorted(r.doc_id for r in truncate_deletes) == sorted(f"notes:{i}" for i in range(1, 11))
    late = rest[-1]
    assert isinstance(late, ChangeEvent) and (late.op, late.doc_id) == (Op.DELETE, "notes:3")
    assert docs.live() == {"pg:5": "Kim\n\nLee", "notes:11": "note 11 at 210"}
    produce(kafka_broker.bootstrap, topic, [_note("u", 7, 130)])
    redelivered = _read_all(settings, docs)
    assert [(r.op, r.doc_id) for r in redelivered if isinstance(r, ChangeEvent)] == [(Op.DELETE, "notes:7")]


def test_a_primary_key_change_ends_with_only_the_new_key(kafka_broker: TansuBroker) -> None:
    """A key change arrives as delete(old) + tombstone + create(new) with Debezium's key headers;
    only the new key's document is left, with the row's text."""
    topic = _topic(kafka_broker, 3)
    old_key, new_key = debezium_key({"id": 7}, with_schema=True), debezium_key({"id": 8}, with_schema=True)
    records = [
        _note("c", 7, 10, "the row"),
        _note("u", 7, 20, "the row, edited"),
        KafkaRecord(old_key, _note("d", 7, 30).value, headers=(("__debezium.newkey", json.dumps(new_key).encode()),)),
        KafkaRecord(old_key, None),
        KafkaRecord(new_key, _note("c", 8, 30, "the row, edited").value, headers=(("__debezium.oldkey", json.dumps(old_key).encode()),)),
    ]
    produce(kafka_broker.bootstrap, topic, records)
    docs = GatedDocs()
    for record in _read_all(_settings(kafka_broker, topic), docs):
        docs.apply(record)
    assert docs.live() == {"notes:8": "the row, edited"}
    assert docs.docs["notes:7"].deleted


def test_bad_records_carry_their_reason_and_reading_goes_on(kafka_broker: TansuBroker) -> None:
    """Unparseable values, unmapped tables and unavailable TOAST values become BadRecords with a
    reason and a position; the good records around them are read."""
    topic = _topic(kafka_broker, 1)
    toast = debezium_value("u", table="public.notes", lsn=12, after={"id": 2, "body": "__debezium_unavailable_value"})
    records = [
        _note("c", 1, 10),
        KafkaRecord({"id": 9}, None),
        KafkaRecord(None, {"ddl": "ALTER TABLE notes ADD lang text", "databaseName": "app"}),
        KafkaRecord(None, debezium_value("c", table="public.orders", lsn=11, after={"id": 1})),
        KafkaRecord(debezium_key({"id": 2}), toast),
        _note("c", 3, 13),
    ]
    produce(kafka_broker.bootstrap, topic, records)
    docs = GatedDocs()
    out = _read_all(_settings(kafka_broker, topic), docs)
    assert [type(r).__name__ for r in out] == ["ChangeEvent", "BadRecord", "BadRecord", "BadRecord", "ChangeEvent"]
    reasons = [r.reason for r in out if isinstance(r, BadRecord)]
    assert "not a Debezium change event" in reasons[0]
    assert "no mapping for table public.orders" in reasons[1]
    assert "unchanged TOAST value" in reasons[2] and out[3].doc_id == "notes:2"
    assert [_seq(r)["offset"] for r in out] == [0, 2, 3, 4, 5], "the tombstone at offset 1 is not data"


# --- rebalances -----------------------------------------------------------------------------------


class _Consumer:
    """A consumer of the group on a thread: reads, applies into the shared GatedDocs, and commits
    each record after applying it (or never, to play a consumer whose work is stuck)."""

    def __init__(self, name: str, settings: KafkaSourceSettings, docs: GatedDocs, *, commits: bool, pace_s: float) -> None:
        self.name = name
        self.source = KafkaDebeziumSource(settings, docs, docs, name=f"kafka-{name}")
        self.docs = docs
        self.commits = commits
        self.pace_s = pace_s
        self.seen: list[tuple[int, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"consumer-{name}", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            for record in self.source.follow(self.stop.is_set):
                pos = _seq(record)
                self.seen.append((pos["partition"], pos["offset"]))
                self.docs.apply(record)
                if self.commits:
                    self.source.commit(record.position or "")
                time.sleep(self.pace_s)
        except BaseException as exc:  # surfaced by the test, which joins the thread
            self.error = exc

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(WAIT_S)
        self.source.close()
        assert self.error is None, self.error


def _wait(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("in_time", [True, False], ids=["in-flight-commits-before-revoke", "grace-expires-redelivered"])
def test_a_rebalance_with_two_consumers_revokes_cleanly(kafka_broker: TansuBroker, in_time: bool) -> None:
    """A second consumer joins mid-stream. When the first one's in-flight work commits within the
    grace, the revocation waits for it and commits it: no record is read twice. When it does not,
    the revocation gives up after revoke_grace_s, the records come again and are deduplicated.
    Either way both consumers end with partitions and the documents equal the newest rows."""
    topic = _topic(kafka_broker, 4)
    rng = random.Random(11)
    records, newest = [], {}
    for lsn in range(1000, 1400):
        row = rng.randrange(40)
        records.append(_note("u", row, lsn, f"row {row} at {lsn}"))
        newest[f"notes:{row}"] = f"row {row} at {lsn}"
    produce(kafka_broker.bootstrap, topic, records)
    settings = _settings(kafka_broker, topic, revoke_grace_s=5.0 if in_time else 0.5)
    docs = GatedDocs()
    with capture_logs() as logs:
        a = _Consumer("a", settings, docs, commits=in_time, pace_s=0.01)
        a.thread.start()
        _wait(lambda: len(a.seen) >= 60, "the first consumer to be mid-stream")
        b = _Consumer("b", settings, docs, commits=True, pace_s=0.0)
        b.thread.start()
        _wait(lambda: len(set(a.seen) | set(b.seen)) == len(records), "both consumers to read every record")
        while_both = list(logs)
        a.finish()
        b.finish()
    revoked = [e for e in while_both if e["event"] == "partitions revoked" and e["source"] == "kafka-a"]
    assert revoked, "the first consumer's partitions were never revoked"
    held = {
        e["source"]: set(e["partitions"]) for e in while_both if e["event"] == "partitions assigned"
    }
    assert held["kafka-a"] and held["kafka-b"] and held["kafka-a"].isdisjoint(held["kafka-b"]), held
    assert held["kafka-a"] | held["kafka-b"] == {f"{topic}:{p}" for p in range(4)}
    assert b.seen, "the second consumer got no records"
    deliveries = Counter(a.seen + b.seen)
    if in_time:
        assert revoked[0]["unfinished"] == 0
        assert max(deliveries.values()) == 1, "a record was read twice although its work committed in time"
    else:
        assert revoked[0]["unfinished"] > 0
        assert max(deliveries.values()) > 1, "nothing was redelivered although nothing was committed"
    assert docs.live() == newest


# --- the chaos suite's event-stream faults, into real stores ------------------------------------


def _chaos_stream(seed: int) -> tuple[list[KafkaRecord], dict[str, str | None], Counter[str]]:
    """A seeded chaos history (pk change and truncate included) with every delivery fault of the
    chaos suite, as Debezium records of tables public.t0/public.t1; and the newest text of every
    document (None = deleted). A model document lives in a table: its doc_id is ``t0:<id>``."""
    rng = random.Random(seed)
    model = SourceModel(namespace=f"k{seed:x}")
    streams = StreamFaults(random.Random(seed + 1))
    random_history(model, rng, rng.randint(120, 160))
    ensure_deleted_docs(model, rng)
    before_pk = len(model.history)
    streams.pk_change(model)
    pk_pair = model.history[before_pk:]
    before_truncate = len(model.history)
    streams.truncate(model)
    truncated = model.history[before_truncate:]
    deliveries = list(model.history)
    for fault in DELIVERY_FAULTS.values():
        deliveries = fault(streams, deliveries)
    encoded, newest = _encode_history(model.history, pk_pair, truncated)
    records = [r for event in deliveries for r in encoded[id(event)]]
    return records, newest, streams.injected


def _encode_history(
    history: list[ChangeEvent], pk_pair: list[ChangeEvent], truncated: list[ChangeEvent]
) -> tuple[dict[int, list[KafkaRecord]], dict[str, str | None]]:
    table_of: dict[str, str] = {}
    live: set[str] = set()
    encoded: dict[int, list[KafkaRecord]] = {}
    newest: dict[str, str | None] = {}
    lsns = {id(e): 1000 + 10 * i for i, e in enumerate(history)}
    if pk_pair:
        lsns[id(pk_pair[1])] = lsns[id(pk_pair[0])]  # Debezium gives both halves the UPDATE's LSN
    for event in history:
        lsn, key = lsns[id(event)], debezium_key({"id": event.doc_id})
        if event.op is Op.UPSERT:
            table = table_of[event.doc_id] = str(event.metadata["table"])
            row = {"id": event.doc_id, "body": event.text, "rev": event.metadata["rev"]}
            op = "u" if event.doc_id in live else "c"
            encoded[id(event)] = [KafkaRecord(key, debezium_value(op, table=f"public.{table}", lsn=lsn, after=row))]
            live.add(event.doc_id)
            newest[f"{table}:{event.doc_id}"] = event.text
            continue
        table = table_of[event.doc_id]
        live.discard(event.doc_id)
        newest[f"{table}:{event.doc_id}"] = None
        delete = debezium_value("d", table=f"public.{table}", lsn=lsn, before={"id": event.doc_id})
        encoded[id(event)] = [KafkaRecord(key, delete), KafkaRecord(key, None)]
    for event in truncated:
        encoded[id(event)] = []
    if truncated:
        table = table_of[truncated[0].doc_id]
        t = debezium_value("t", table=f"public.{table}", lsn=lsns[id(truncated[-1])])
        encoded[id(truncated[0])] = [KafkaRecord(None, t)]
    return encoded, newest


def _expected(newest: dict[str, str | None], chunking: ChunkingSettings) -> tuple[dict[str, ExpectedChunk], set[str]]:
    expected = {
        chunk_id(d, i): ExpectedChunk(chunk_id(d, i), content_hash(piece))
        for d, text in newest.items()
        if text is not None
        for i, piece in enumerate(chunk_text(text, chunking))
    }
    return expected, {d for d, text in newest.items() if text is None}


CHAOS_TABLES = {
    f"public.{t}": {"doc_id": f"{t}:{{id}}", "text_columns": ["body"], "metadata_columns": ["rev"]} for t in ("t0", "t1")
}


def _store_config(tmp_path: Path, source: dict[str, Any], **run: Any) -> dict[str, Any]:
    return {
        "source": source,
        "keyword": {"kind": "tantivy", "path": str(tmp_path / "tantivy")},
        "vector": {"uri": str(tmp_path / "milvus.db")},
        "ledger": {"path": str(tmp_path / "ledger.db")},
        "embedder": {"kind": "hashing", "dim": 32},
        "chunking": {"max_chars": CHUNKING.max_chars},
        "run": {"shards": 2, "http_port": 0, "batch_docs_max": 25, "audit_interval_s": 0, **run},
    }


def _assert_converged(settings: Settings, newest: dict[str, str | None]) -> None:
    expected, deleted = _expected(newest, CHUNKING)
    with runtime(settings) as rt:
        violations = [
            *check_index("keyword", expected, deleted, list(rt.keyword.scan())),
            *check_index("vector", expected, deleted, list(rt.vector.scan())),
        ]
        counts = rt.ledger.counts()
    assert violations == [], "\n".join(map(str, violations[:20]))
    assert counts["pending_intents"] == 0 and counts["dead_letters"] == 0, counts


@pytest.mark.parametrize("seed", [5, 17, 29])
def test_a_chaos_history_with_every_stream_fault_converges_in_both_indexes(
    kafka_broker: TansuBroker, tmp_path: Path, seed: int
) -> None:
    """The chaos suite's seeded history (creates, updates, deletes, re-creates, a key change, a
    truncate) delivered with every delivery fault (reorder, duplicate, delay, drop-redeliver,
    replay, delete-before-create, late upsert) as Debezium records over three partitions:
    Tantivy and milvus-lite end equal to the model, nothing pending, nothing dead-lettered."""
    records, newest, injected = _chaos_stream(seed)
    assert all(injected[kind] > 0 for kind in (*DELIVERY_FAULTS, "pk_change", "truncate")), injected
    topic = _topic(kafka_broker, 3)
    produce(kafka_broker.bootstrap, topic, records)
    source = {"kind": "kafka", "bootstrap_servers": [kafka_broker.bootstrap], "topics": [topic],
              "group_id": f"chaos-{seed}-{uuid.uuid4().hex[:6]}", "tables": CHAOS_TABLES, "session_timeout_s": SESSION_S}
    settings = Settings(**_store_config(tmp_path, source))
    with runtime(settings) as rt:
        kafka = build_source(settings, rt.ledger)
        assert isinstance(rt.engine, ApplyEngine), "one generation, one engine"
        try:
            stats = run_sync(kafka, rt.engine, batch_events=40)
        finally:
            kafka.close()
    assert stats.stale_events + stats.coalesced_events > 0, "the duplicated deliveries were not deduplicated"
    _assert_converged(settings, newest)


# --- end to end: lockstep run, killed mid-stream ----------------------------------------------------


def _articles(ids: range, lsn: int, version: int) -> Iterator[KafkaRecord]:
    for i in ids:
        body = "\n\n".join(f"article {i} v{version} paragraph {p} on refunds and invoices" for p in range(1 + i % 4))
        row = {"id": i, "title": f"Article {i}", "body": body, "lang": "en"}
        yield KafkaRecord(debezium_key({"id": i}), debezium_value("c" if version == 1 else "u", table="public.articles", lsn=lsn + i, after=row))


def _article_text(i: int, version: int) -> str:
    body = "\n\n".join(f"article {i} v{version} paragraph {p} on refunds and invoices" for p in range(1 + i % 4))
    return f"Article {i}\n\n{body}"


def _signal_tree(pid: int, sig: int) -> None:
    root = psutil.Process(pid)
    for proc in [*root.children(recursive=True), root]:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            continue


def test_lockstep_run_killed_mid_stream_and_restarted_converges(kafka_broker: TansuBroker, tmp_path: Path) -> None:
    """`lockstep run` with the Kafka source into Tantivy + milvus-lite is SIGKILLed mid-stream;
    more changes (updates, deletes with tombstones, a key change, a truncate) arrive; a restart
    resumes from the committed offsets, the redelivered records are deduplicated, and both
    indexes equal the source."""
    topic = _topic(kafka_broker, 2)
    group = f"run-{uuid.uuid4().hex[:8]}"
    tables = {
        "public.articles": {"doc_id": "article:{id}", "text_columns": ["title", "body"], "metadata_columns": ["lang"]},
        "public.notes": {"doc_id": "notes:{id}", "text_columns": ["body"]},
    }
    source = {"kind": "kafka", "bootstrap_servers": [kafka_broker.bootstrap], "topics": [topic], "group_id": group,
              "tables": tables, "session_timeout_s": SESSION_S}
    config = tmp_path / "lockstep.yaml"
    config.write_text(yaml.safe_dump(_store_config(tmp_path, source, batch_docs_max=10)))
    first = list(_articles(range(400), 10_000, 1)) + [_note("c", i, 20_000 + i) for i in range(30)]
    produce(kafka_broker.bootstrap, topic, first)
    proc = subprocess.Popen([*LOCKSTEP, "run", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True, text=True)
    try:
        ledger = SqliteLedger(tmp_path / "ledger.db")
        _wait(lambda: sum(committed_offsets(kafka_broker.bootstrap, group, topic, 2).values()) > 0, "a first commit")
        _signal_tree(proc.pid, signal.SIGKILL)
        proc.wait(timeout=RUN_TIMEOUT_S)
        at_kill = sum(committed_offsets(kafka_broker.bootstrap, group, topic, 2).values())
        applied_at_kill = ledger.counts()["live_docs"]
        ledger.close()
    finally:
        if proc.poll() is None:
            _signal_tree(proc.pid, signal.SIGKILL)
            proc.wait()
    assert 0 < at_kill < len(first), f"not killed mid-stream: {at_kill} of {len(first)} offsets committed"
    second = list(_articles(range(0, 400, 3), 30_000, 2))
    second += [KafkaRecord(debezium_key({"id": i}), debezium_value("d", table="public.articles", lsn=40_000 + i, before={"id": i})) for i in range(1, 400, 7)]
    second += [KafkaRecord(debezium_key({"id": i}), None) for i in range(1, 400, 7)]
    second += [KafkaRecord(debezium_key({"id": 2}), debezium_value("d", table="public.articles", lsn=50_000, before={"id": 2})),
               KafkaRecord(debezium_key({"id": 2}), None),
               KafkaRecord(debezium_key({"id": 1000}), debezium_value("c", table="public.articles", lsn=50_000, after={"id": 1000, "title": "Moved", "body": "moved body", "lang": "en"})),
               _note("t", 0, 60_000), _note("c", 99, 60_001, "after the truncate")]
    produce(kafka_broker.bootstrap, topic, second)
    restarted = subprocess.run([*LOCKSTEP, "run", "-c", str(config), "--exit-when-idle"], capture_output=True, text=True,
                               timeout=RUN_TIMEOUT_S, check=False, stdin=subprocess.DEVNULL, start_new_session=True)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    newest: dict[str, str | None] = {f"article:{i}": _article_text(i, 2 if i % 3 == 0 else 1) for i in range(400)}
    newest |= {f"article:{i}": None for i in range(1, 400, 7)} | {"article:2": None, "article:1000": "Moved\n\nmoved body"}
    newest |= {f"notes:{i}": None for i in range(30)} | {"notes:99": "after the truncate"}
    _assert_converged(load_settings(config), newest)
    assert applied_at_kill > 0
