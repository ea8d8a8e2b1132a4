"""The tests' Kafka fixtures: the session's Kafka-protocol broker, Debezium-shaped records to put
into it (both from ``bench.kafka_broker``, which the source benchmark shares), and committed
offsets to read back.

The broker is Tansu, in memory: one per session, started on first use on a free port. Tests use
topic and group names of their own. A broker that cannot start fails the tests that need it; it
is never a skip.

``produce_debezium_events`` fills a topic with N Debezium envelopes quickly (for benchmarks).
"""

from __future__ import annotations

import asyncio
import random
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.consumer import AIOKafkaConsumer
from aiokafka.partitioner import DefaultPartitioner

from bench.kafka_broker import (
    CLIENT_TIMEOUT_MS,
    KafkaRecord,
    TansuBroker,
    debezium_key,
    debezium_value,
    json_bytes,
    produce,
)
from coordinator.events import ChangeEvent, Op
from coordinator.model import DocState
from coordinator.ports import SourceRecord

__all__ = [
    "DebeziumRow",
    "GatedDocs",
    "KafkaRecord",
    "ProducedHistory",
    "TansuBroker",
    "committed_offsets",
    "debezium_key",
    "debezium_value",
    "kafka_broker",
    "produce",
    "produce_debezium_events",
]


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[TansuBroker]:
    """The session's Kafka-protocol broker (Tansu, in memory)."""
    workdir = Path(tempfile.mkdtemp(prefix="lockstep-tansu-"))
    broker = TansuBroker(workdir)
    try:
        broker.start()
    except (RuntimeError, OSError) as exc:
        pytest.fail(f"the Tansu broker did not start: {exc}", pytrace=False)
    try:
        yield broker
    finally:
        broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def _produce_batched(bootstrap: str, topic: str, records: list[KafkaRecord]) -> None:
    """Like ``bench.kafka_broker.produce``, with records packed into batches per partition by hand (keyed records
    land where the default partitioner puts them, in order): several times faster."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=CLIENT_TIMEOUT_MS)
    await producer.start()
    try:
        partitions = sorted(await producer.partitions_for(topic))
        by_partition: dict[int, list[KafkaRecord]] = {}
        for record in records:
            key = json_bytes(record.key)
            p = DefaultPartitioner()(key, partitions, partitions) if key is not None else random.choice(partitions)
            by_partition.setdefault(p, []).append(record)
        futures = []
        for p, items in by_partition.items():
            batch = producer.create_batch()
            for record in items:
                while batch.append(key=json_bytes(record.key), value=json_bytes(record.value), timestamp=None) is None:
                    futures.append(await producer.send_batch(batch, topic, partition=p))
                    batch = producer.create_batch()
            futures.append(await producer.send_batch(batch, topic, partition=p))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    """The group's committed offset per partition of ``topic`` (partitions without one are left out)."""
    return asyncio.run(_committed(bootstrap, group, topic, partitions))


async def _committed(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False, request_timeout_ms=CLIENT_TIMEOUT_MS
    )
    await consumer.start()
    try:
        out = {}
        for p in range(partitions):
            offset = await consumer.committed(TopicPartition(topic, p))
            if offset is not None:
                out[p] = int(offset)
        return out
    finally:
        await consumer.stop()


# --- bulk fill for benchmarks ------------------------------------------------------------------


@dataclass
class DebeziumRow:
    """The newest state of one row after ``produce_debezium_events`` (None text = deleted)."""

    doc_id: str
    lsn: int
    text: str | None


@dataclass
class ProducedHistory:
    """What ``produce_debezium_events`` wrote: counts and the newest state per document."""

    records: int
    last_lsn: int
    rows: dict[str, DebeziumRow] = field(default_factory=dict)


def produce_debezium_events(
    bootstrap_servers: str,
    topic: str,
    count: int,
    *,
    table: str = "public.docs",
    docs: int = 1_000,
    first_lsn: int = 1_000,
    delete_ratio: float = 0.05,
    with_schema: bool = False,
    seed: int = 0,
) -> ProducedHistory:
    """Produce exactly ``count`` records of ``table`` into an existing ``topic``: Debezium
    (Postgres-connector) creates, updates and deletes, each delete followed by its tombstone, of
    up to ``docs`` rows keyed by ``id`` (columns ``id``, ``title``, ``body``, ``lang``), at
    increasing LSNs, in batches (tens of thousands of records per second here). The mapping that
    reads them back is ``doc_id: "<table name>:{id}"``, ``text_columns: [title, body]``,
    ``metadata_columns: [lang]``. Returns the newest state of every row."""
    rng = random.Random(seed)
    prefix = table.rpartition(".")[2]
    history = ProducedHistory(records=0, last_lsn=first_lsn)
    records: list[KafkaRecord] = []
    lsn = first_lsn
    while len(records) < count:
        row_id = rng.randrange(docs)
        doc_id = f"{prefix}:{row_id}"
        live = doc_id in history.rows and history.rows[doc_id].text is not None
        lsn += rng.randint(1, 64)
        key = debezium_key({"id": row_id}, with_schema=with_schema)
        if live and rng.random() < delete_ratio and len(records) + 2 <= count:
            records.append(KafkaRecord(key, debezium_value("d", table=table, lsn=lsn, before={"id": row_id}, with_schema=with_schema)))
            records.append(KafkaRecord(key, None))
            history.rows[doc_id] = DebeziumRow(doc_id, lsn, None)
            continue
        row = {"id": row_id, "title": f"row {row_id} at {lsn}", "body": _body(rng, row_id, lsn), "lang": "en"}
        value = debezium_value("u" if live else "c", table=table, lsn=lsn, after=row, with_schema=with_schema)
        records.append(KafkaRecord(key, value))
        history.rows[doc_id] = DebeziumRow(doc_id, lsn, f"{row['title']}\n\n{row['body']}")
    asyncio.run(_produce_batched(bootstrap_servers, topic, records))
    history.records = len(records)
    history.last_lsn = lsn
    return history


def _body(rng: random.Random, row_id: int, lsn: int) -> str:
    words = ("refund", "invoice", "shipping", "account", "password", "order", "return", "warranty")
    paragraphs = rng.randint(1, 4)
    return "\n\n".join(
        " ".join(rng.choices(words, k=rng.randint(8, 30))) + f" ({row_id}/{lsn}/{p})" for p in range(paragraphs)
    )


# --- the ledger's read side, in memory -----------------------------------------------------------


class GatedDocs:
    """Documents applied behind the ledger's version gate, plus checkpoints: the KnownDocs and
    CheckpointStore a source needs, for tests of the source alone. Thread-safe."""

    def __init__(self) -> None:
        self.docs: dict[str, DocState] = {}
        self.texts: dict[str, str] = {}
        self.checkpoints: dict[str, str] = {}
        self.applied = 0
        self.stale = 0
        self._lock = threading.Lock()

    def get_docs(self, doc_ids: Iterable[str]) -> dict[str, DocState]:
        with self._lock:
            return {d: self.docs[d] for d in doc_ids if d in self.docs}

    def iter_docs(self, *, include_deleted: bool = False) -> Iterator[DocState]:
        with self._lock:
            states = [self.docs[d] for d in sorted(self.docs)]
        yield from (s for s in states if include_deleted or not s.deleted)

    def get_checkpoint(self, source: str) -> str | None:
        with self._lock:
            return self.checkpoints.get(source)

    def set_checkpoint(self, source: str, position: str) -> None:
        with self._lock:
            self.checkpoints[source] = position

    def apply(self, record: SourceRecord) -> bool:
        """Apply one event behind the gate; True if it changed the document."""
        assert isinstance(record, ChangeEvent), record
        with self._lock:
            current = self.docs.get(record.doc_id)
            if current is not None and record.version <= current.version:
                self.stale += 1
                return False
            self.docs[record.doc_id] = DocState(record.doc_id, record.version, record.op is Op.DELETE)
            self.texts[record.doc_id] = record.text or ""
            self.applied += 1
            return True

    def live(self) -> dict[str, str]:
        """doc_id -> text of every live document."""
        with self._lock:
            return {d: self.texts[d] for d, s in self.docs.items() if not s.deleted}
