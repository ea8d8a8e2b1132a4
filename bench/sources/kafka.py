"""The Kafka source: one Debezium (Postgres connector) create per document, produced beforehand."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bench.kafka_broker import KafkaRecord, debezium_key, debezium_value, produce
from bench.sources.servers import Streams
from lockstep.corpus import Doc

# The Debezium records' source.lsn (their versions): increasing, spaced as real LSNs would be.
KAFKA_FIRST_LSN = 1_000
KAFKA_LSN_STEP = 8
KAFKA_TABLE = "public.docs"


def kafka_source(streams: Streams, name: str) -> dict[str, Any]:
    """A Debezium mapping that turns each row back into exactly the JSONL event's document."""
    mapping = {"doc_id": "{id}", "text_columns": ["body"], "metadata_columns": ["title", "topic", "audience"]}
    return {
        "kind": "kafka", "name": name, "bootstrap_servers": [streams.broker.bootstrap], "topics": [name],
        "group_id": name, "tables": {KAFKA_TABLE: mapping},
    }  # fmt: skip


def debezium_records(docs: Sequence[Doc]) -> list[KafkaRecord]:
    """One Debezium create per document, keyed by its id, at increasing LSNs."""
    return [
        KafkaRecord(
            debezium_key({"id": d.doc_id}),
            debezium_value(
                "c",
                table=KAFKA_TABLE,
                lsn=KAFKA_FIRST_LSN + i * KAFKA_LSN_STEP,
                after={"id": d.doc_id, "body": d.text, **d.metadata},
            ),
        )
        for i, d in enumerate(docs)
    ]


def prepare_kafka(streams: Streams, topic: str, docs: Sequence[Doc], partitions: int) -> None:
    streams.broker.create_topic(topic, partitions)
    placed = produce(streams.broker.bootstrap, topic, debezium_records(docs))
    assert len(placed) == len(docs), f"produced {len(placed)} of {len(docs)} records"
