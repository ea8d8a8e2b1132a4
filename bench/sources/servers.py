"""The servers: the sources' own (Tansu, Postgres) for the whole benchmark, fresh stores per run."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.kafka_broker import TansuBroker
from chaos.servers import EmbeddedPostgres, OpenSearchApiServer, RealMilvusServer


@dataclass(frozen=True)
class Streams:
    """The sources' own servers, started once for the whole benchmark."""

    broker: TansuBroker
    postgres: EmbeddedPostgres


@dataclass(frozen=True)
class Stores:
    """The two indexes' servers of one run."""

    search_url: str
    milvus_uri: str


@contextmanager
def started_streams(work: Path) -> Iterator[Streams]:
    """A Tansu broker and a Postgres with logical replication."""
    (work / "tansu").mkdir(parents=True)
    broker = TansuBroker(work / "tansu")
    broker.start()
    try:
        with EmbeddedPostgres(work / "pgdata", logical_replication=True) as postgres:
            yield Streams(broker, postgres)
    finally:
        broker.stop()


@contextmanager
def started_stores(base: Path) -> Iterator[Stores]:
    """A fresh OpenSearch-API server and Milvus 2.3.5 for one run: every run starts from the same
    empty stores (the keyword server's batch writes grew 2-3x slower over a benchmark that reused
    one server for every run, which favoured the sources measured early)."""
    (base / "milvus").mkdir(parents=True)
    with (
        OpenSearchApiServer(log_path=base / "osmem.log") as search,
        RealMilvusServer(base / "milvus") as milvus,
    ):
        yield Stores(search.url, milvus.uri)
