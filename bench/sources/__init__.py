"""Events/s from each change-stream source into both real stores, against the JSONL source in the same run.

    python -m bench.sources [--events 5000] [--rounds 2] [--shards 2] [--seed 7]

This module starts its own Tansu Kafka broker and embedded Postgres (``wal_level=logical``) for
the whole benchmark, and a fresh OpenSearch-API server and Milvus 2.3.5 server for every run;
it makes ``--events`` new documents of exactly ``CHUNKS_PER_DOC`` chunks (``bench.streaming``'s
workload: the same texts and metadata for every source), and for each source runs
``lockstep run -c CFG`` as a subprocess into a fresh index, collection and ledger:

- ``jsonl`` (the baseline): a file of all events, ``--exit-when-idle``.
- ``kafka``: one Debezium (Postgres connector) create per document in a topic of
  ``--kafka-partitions`` partitions, produced before the service starts; ``--exit-when-idle``.
- ``postgres``: logical replication (pgoutput). The slot is created and its snapshot (one seed
  row) checkpointed by a ``lockstep sync`` first, then the rows are inserted,
  ``--pg-rows-per-txn`` per transaction, so the measured run streams them from the slot;
  ``--exit-when-idle``.
- ``webhook``: the service runs in follow mode; once it is ready the events are POSTed
  (``lockstep.ops_http.post_events``, ``--post-batch-events`` per request) as fast as one client
  can, and the service is stopped (SIGTERM) once every event is applied.

The rate is ``bench.streaming``'s: ``/metrics`` (``lockstep_events_total{outcome="applied"}``)
polled, and the applied count between ``STEADY_FROM`` and ``STEADY_TO`` of the events, so Ray
start-up, the consumer group's join and the final drain are left out. Beside it, the CPU time
of the service's own process (where the source is read and decoded; the shards and index
writers are Ray workers) per event over the same window, which the other processes on a
shared machine disturb much less than a rate. Every source runs ``--rounds`` times, in
opposite orders in alternate rounds; its ratio is its mean rate over JSONL's, and the runs'
spread is printed as the noise. After each run both indexes are checked against the expected
documents with ``coordinator.invariants.check_index`` (I1-I4).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg
import yaml
from psycopg import sql

from adapters.sources.webhook import WebhookSource
from bench.incremental import machine
from bench.kafka_broker import KafkaRecord, TansuBroker, debezium_key, debezium_value, produce
from bench.results_doc import write_results
from bench.streaming import (
    APPLIED,
    CHUNKS_PER_DOC,
    DIM,
    METRICS_POLL_S,
    PARA_CHARS,
    RUN_TIMEOUT_S,
    STEADY_FROM,
    STEADY_TO,
    STOP_TIMEOUT_S,
    Installation,
    Sample,
    Service,
    Tuning,
    crossing,
    make_docs,
    running,
    steady_rate,
    verify,
    write_events,
    write_s_mean,
)
from chaos.servers import EmbeddedPostgres, OpenSearchApiServer, RealMilvusServer, free_port
from coordinator.events import ChangeEvent
from coordinator.invariants import Violation
from coordinator.ports import ChangeSource
from lockstep.bootstrap import build_ledger, build_source
from lockstep.corpus import Doc
from lockstep.logging import configure_logging
from lockstep.ops_http import EVENTS_PATH, post_events
from lockstep.settings import LedgerSettings, RunSettings, Settings, load_settings

DEFAULT_EVENTS = 5_000
DEFAULT_SEED = 7
# Every source runs this often, in opposite orders in alternate rounds: on a shared 2-core
# machine one run of each cannot tell a 20 % overhead from the machine's own swings.
DEFAULT_ROUNDS = 2
# The service's own default: what a deployment that sets nothing runs with.
DEFAULT_SHARDS = RunSettings().shards
DEFAULT_KAFKA_PARTITIONS = 4
# Small transactions, as an application writing rows one business change at a time would;
# each transaction is one version and one checkpoint position for the source.
DEFAULT_PG_ROWS_PER_TXN = 10
# Requests of 1,000 events (~1.7 MB): few enough round trips that one client outruns the service.
DEFAULT_POST_BATCH_EVENTS = 1_000
SOURCES = ("jsonl", "kafka", "postgres", "webhook")
# The goal: a source adapter may cost at most this fraction of JSONL's rate.
OVERHEAD_GOAL = 0.20
# The Debezium records' source.lsn (their versions): increasing, spaced as real LSNs would be.
KAFKA_FIRST_LSN = 1_000
KAFKA_LSN_STEP = 8
KAFKA_TABLE = "public.docs"
# The seed row that the priming `lockstep sync` snapshots, so the measured run streams.
PG_SEED_DOC_ID = "seed/000000"
# The priming `lockstep sync` and the slot's first snapshot take seconds; bound them anyway.
SYNC_TIMEOUT_S = 300.0
# Pause between runs so that the last run's Ray workers and stores have exited before the next
# run starts (as bench/streaming/ pauses between phases).
SETTLE_S = 5.0
VIOLATIONS_SHOWN_MAX = 10
DOCS_SECTION = "## Change-stream sources (`bench/sources.py`)"
RESULTS_BEGIN = "<!-- bench.sources results: begin (rewritten by `python -m bench.sources`) -->"
RESULTS_END = "<!-- bench.sources results: end -->"
LOCKSTEP = [sys.executable, "-m", "lockstep", "--log-level", "warning"]
# Events read by the service and not yet finished (the reader's lead over the shards).
UNFINISHED = "lockstep_unfinished_events"
# The checkout whose code the services run (the benchmark's own package is in it).
ROOT = Path(__file__).resolve().parents[2]
GIT_TIMEOUT_S = 10.0


# --- the servers ---------------------------------------------------------------------------------


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


# --- one installation per source -----------------------------------------------------------------


def install(work: Path, name: str, stores: Stores, source: dict[str, Any], shards: int,
            tuning: Tuning) -> Installation:  # fmt: skip
    """Write the config of a new installation: its own index, collection and ledger."""
    inst = Installation(name, work / name, free_port())
    inst.base.mkdir(parents=True)
    config = {
        "source": source,
        "keyword": {"kind": "opensearch", "url": stores.search_url, "index": f"src-{name}"},
        "vector": {"uri": stores.milvus_uri, "collection": f"src_{name}"},
        "ledger": {"kind": "sqlite", "path": str(inst.ledger)},
        "embedder": {"kind": "hashing", "dim": DIM},
        "run": {"shards": shards, "http_port": inst.port, **tuning.__dict__},
    }
    inst.config.write_text(yaml.safe_dump(config), encoding="utf-8")
    return inst


def event_dict(doc: Doc) -> dict[str, Any]:
    """The upsert creating ``doc`` in the JSONL event schema (the webhook's body schema too)."""
    return {
        "op": "upsert",
        "doc_id": doc.doc_id,
        "version": doc.version,
        "text": doc.text,
        "metadata": doc.metadata,
    }


# --- Kafka (Debezium) ----------------------------------------------------------------------------


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


# --- Postgres logical replication ----------------------------------------------------------------


def pg_source(streams: Streams, name: str) -> dict[str, Any]:
    return {
        "kind": "postgres_logical", "name": name, "dsn": streams.postgres.uri, "tables": [name],
        "slot": name, "publication": name, "text_column": "body", "metadata_column": "meta",
    }  # fmt: skip


def create_table(dsn: str, table: str) -> None:
    """A source table keyed by the document id, with the REPLICA IDENTITY FULL the source requires."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        name = sql.Identifier(table)
        conn.execute(sql.SQL("CREATE TABLE {} (id text PRIMARY KEY, body text, meta jsonb)").format(name))
        conn.execute(sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(name))


def insert_docs(dsn: str, table: str, docs: Sequence[Doc], rows_per_txn: int) -> None:
    """COPY the documents in, ``rows_per_txn`` per transaction."""
    copy = sql.SQL("COPY {} (id, body, meta) FROM STDIN").format(sql.Identifier(table))
    with psycopg.connect(dsn, autocommit=True) as conn:
        for start in range(0, len(docs), rows_per_txn):
            with conn.transaction(), conn.cursor().copy(copy) as out:
                for d in docs[start : start + rows_per_txn]:
                    out.write_row((d.doc_id, d.text, json.dumps(d.metadata)))


def prime_slot(inst: Installation, dsn: str, table: str, seed: Doc) -> None:
    """Create the slot and checkpoint its snapshot (of one seed row) with `lockstep sync`, so
    that the rows inserted afterwards come through logical replication, not a snapshot."""
    insert_docs(dsn, table, [seed], 1)
    done = subprocess.run(
        [*LOCKSTEP, "sync", "-c", str(inst.config)], capture_output=True, text=True, timeout=SYNC_TIMEOUT_S,
        stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"priming `lockstep sync` exited with {done.returncode}: {done.stderr[-2000:]}")


def seed_doc(docs: Sequence[Doc], seed: int) -> Doc:
    """A document like the others but outside the measured set (generated past its end)."""
    extra = make_docs(len(docs) + 1, seed)[-1]
    return Doc(PG_SEED_DOC_ID, extra.version, extra.paragraphs, extra.metadata)


# --- measuring one run ---------------------------------------------------------------------------


@dataclass
class Scrape:
    """What one run showed, in seconds since the service started: the applied count from
    /metrics, the service process's own CPU seconds at the same moments, and the last scrape."""

    applied: list[Sample] = field(default_factory=lambda: [(0.0, 0.0)])
    cpu_s: list[Sample] = field(default_factory=lambda: [(0.0, 0.0)])
    # (applied, read): events the service had read from its source (applied + unfinished) as the
    # applied count grew. A source that the shards wait for is read barely ahead of the apply.
    read: list[Sample] = field(default_factory=list)
    last: dict[str, float] = field(default_factory=dict)

    @property
    def applied_now(self) -> float:
        return self.applied[-1][1]


def scrape(service: Service, until: Callable[[Scrape], bool], check: Callable[[], None]) -> Scrape:
    """Scrape /metrics and the service process's CPU time until it exits or ``until`` holds."""
    seen = Scrape()
    process = psutil.Process(service.process.pid)
    deadline = service.started + RUN_TIMEOUT_S
    while service.process.poll() is None and not until(seen):
        check()
        if time.monotonic() > deadline:
            service.kill()
            raise RuntimeError(f"the run took longer than {RUN_TIMEOUT_S} s; see {service.inst.log}")
        metrics, cpu_s = service.metrics(), _cpu_s(process)
        if metrics is not None and APPLIED in metrics and cpu_s is not None:
            at = time.monotonic() - service.started
            seen.applied.append((at, metrics[APPLIED]))
            seen.cpu_s.append((at, cpu_s))
            seen.read.append((metrics[APPLIED], metrics[APPLIED] + metrics.get(UNFINISHED, 0.0)))
            seen.last = metrics
        time.sleep(METRICS_POLL_S)
    return seen


def _cpu_s(process: psutil.Process) -> float | None:
    """User + system CPU seconds of the service's own process (its Ray workers are not in it)."""
    try:
        times = process.cpu_times()
    except psutil.Error:
        return None
    return float(times.user + times.system)


def value_at(series: Sequence[Sample], at: float) -> float:
    """``series`` interpolated linearly at time ``at`` (within its range)."""
    for (t0, v0), (t1, v1) in itertools.pairwise(series):
        if t0 <= at <= t1:
            return v0 if t1 == t0 else v0 + (v1 - v0) * (at - t0) / (t1 - t0)
    raise ValueError(f"{at} is outside the scraped time range")


def steady_window(seen: Scrape, events: int) -> tuple[float, float]:
    return crossing(seen.applied, STEADY_FROM * events), crossing(seen.applied, STEADY_TO * events)


def steady_cpu_ms(seen: Scrape, events: int) -> float:
    """The service process's CPU milliseconds per event applied in the steady window."""
    start, end = steady_window(seen, events)
    used_s = value_at(seen.cpu_s, end) - value_at(seen.cpu_s, start)
    return 1000 * used_s / ((STEADY_TO - STEADY_FROM) * events)


def applied_when_all_read(seen: Scrape, events: int) -> float:
    """The share of the events applied when the service had read the last one from its source."""
    return next((applied for applied, read in seen.read if read >= events), float(events)) / events


@dataclass(frozen=True)
class ReadAlone:
    """One source's ``read()`` drained in this process with no service behind it: what the
    adapter itself costs (Postgres's own decoding runs in the server, outside this figure)."""

    events: int
    cpu_s: float
    wall_s: float
    # The webhook only: storing the request bodies in the inbox (the intake), before reading.
    intake_cpu_s: float = 0.0

    @property
    def cpu_ms_per_event(self) -> float:
        return 1000 * self.cpu_s / self.events

    @property
    def intake_cpu_ms_per_event(self) -> float:
        return 1000 * self.intake_cpu_s / self.events

    @property
    def per_s(self) -> float:
        return self.events / self.wall_s


def read_alone(
    settings: Settings, expected: int, fill: Callable[[ChangeSource], None] | None = None
) -> ReadAlone:
    """Build the source as the service would, optionally ``fill`` it (timed apart), and drain
    ``read()``; this process's CPU time and the wall time run from the first record to the last,
    so connecting and a consumer group's join are left out."""
    ledger = build_ledger(settings)
    try:
        source = build_source(settings, ledger)
        try:
            intake_cpu_s = 0.0 if fill is None else _cpu_of(lambda: fill(source))
            return _drain(source, expected, intake_cpu_s)
        finally:
            source.close()
    finally:
        ledger.close()


def _cpu_of(work: Callable[[], None]) -> float:
    """This process's CPU seconds spent in ``work``."""
    started = time.process_time()
    work()
    return time.process_time() - started


def _drain(source: ChangeSource, expected: int, intake_cpu_s: float) -> ReadAlone:
    records = iter(source.read())
    first = next(records)
    cpu_started, started = time.process_time(), time.perf_counter()
    rest = list(records)
    cpu_s, wall_s = time.process_time() - cpu_started, time.perf_counter() - started
    events = [r for r in [first, *rest] if isinstance(r, ChangeEvent)]
    if len(events) != 1 + len(rest) or len(events) != expected:
        raise RuntimeError(
            f"read alone: {len(events)} events of {1 + len(rest)} records, expected {expected}"
        )
    return ReadAlone(len(rest), cpu_s, wall_s, intake_cpu_s)


def alone_settings(inst: Installation, **source: Any) -> Settings:
    """The installation's settings on a throwaway ledger (and ``source`` keys changed), so that
    reading alone leaves the service's own ledger, inbox and consumer group untouched."""
    settings = load_settings(inst.config)
    ledger = inst.base / "alone" / "ledger.db"
    ledger.parent.mkdir(parents=True, exist_ok=True)
    assert settings.source is not None, "every installation has a source"
    return settings.model_copy(
        update={
            "ledger": LedgerSettings(path=str(ledger)),
            "source": settings.source.model_copy(update=source),
        }
    )


def inbox_filler(docs: Sequence[Doc], batch_events: int) -> Callable[[ChangeSource], None]:
    """Stores the events through the webhook's intake in requests of ``batch_events`` (the
    bodies are serialized here, before the intake is timed)."""
    bodies = [
        "".join(json.dumps(event_dict(d)) + "\n" for d in docs[i : i + batch_events]).encode()
        for i in range(0, len(docs), batch_events)
    ]

    def fill(source: ChangeSource) -> None:
        assert isinstance(source, WebhookSource), source
        intake = source.intake()
        stored = sum(intake.accept(body, "application/x-ndjson").accepted for body in bodies)
        assert stored == len(docs), f"the inbox stored {stored} of {len(docs)} events"

    return fill


@dataclass(frozen=True)
class SourceRun:
    """One ``lockstep run`` over one source's copy of the events."""

    source: str
    round: int
    events: int
    first_commit_s: float
    wall_s: float
    steady_s: float
    events_per_s: float
    cpu_ms_per_event: float
    applied_when_all_read: float
    write_s_mean: dict[str, float]
    violations: list[Violation]
    note: str
    alone: ReadAlone


def finish(source: str, round_: int, inst: Installation, docs: Sequence[Doc], expected: Sequence[Doc],
           seen: Scrape, wall_s: float, note: str, alone: ReadAlone) -> SourceRun:  # fmt: skip
    """The steady rate of a finished run, and both indexes checked against ``expected``."""
    rate, steady_s = steady_rate(seen.applied, len(docs))
    if seen.applied_now != len(docs):
        raise RuntimeError(
            f"{source}: {seen.applied_now:.0f} events applied, not {len(docs)}; see {inst.log}"
        )
    cpu_ms, all_read = steady_cpu_ms(seen, len(docs)), applied_when_all_read(seen, len(docs))
    _say(f"{source}, round {round_}: {rate:.1f} events/s over {steady_s:.1f} s, service process "
         f"{cpu_ms:.2f} ms CPU per event; verifying both indexes")  # fmt: skip
    violations = verify(inst, expected)
    _settle()
    first = next(t for t, v in seen.applied if v > 0)
    return SourceRun(source, round_, len(docs), first, wall_s, steady_s, rate, cpu_ms, all_read,
                     write_s_mean(seen.last), violations, note, alone)  # fmt: skip


def run_until_idle(inst: Installation) -> tuple[Scrape, float]:
    """``lockstep run --exit-when-idle``: what it showed, and its wall time."""
    with running(inst, exit_when_idle=True) as service:
        seen = scrape(service, lambda _seen: False, lambda: None)
        status = service.wait_exit(STOP_TIMEOUT_S)
        wall_s = time.monotonic() - service.started
    if status != 0:
        raise RuntimeError(f"lockstep run exited with {status}; see {inst.log}")
    return seen, wall_s


@dataclass(frozen=True)
class Plan:
    """One run's servers, and what every run of the benchmark shares."""

    work: Path
    streams: Streams
    stores: Stores
    docs: Sequence[Doc]
    shards: int
    tuning: Tuning
    args: argparse.Namespace

    def install(self, name: str, source: dict[str, Any]) -> Installation:
        return install(self.work, name, self.stores, source, self.shards, self.tuning)


def measure_jsonl(plan: Plan, round_: int) -> SourceRun:
    name = f"jsonl_r{round_}"
    inst = plan.install(
        name, {"kind": "jsonl", "path": str(plan.work / name / "events.jsonl"), "name": "bench"}
    )
    write_events(inst.events, plan.docs)
    alone = read_alone(alone_settings(inst), len(plan.docs))
    _say(f"jsonl, round {round_}: lockstep run over {len(plan.docs)} JSONL events")
    seen, wall_s = run_until_idle(inst)
    return finish("jsonl", round_, inst, plan.docs, plan.docs, seen, wall_s, "a file of all events", alone)


def measure_kafka(plan: Plan, round_: int) -> SourceRun:
    name, partitions = f"kafka_r{round_}", plan.args.kafka_partitions
    inst = plan.install(name, kafka_source(plan.streams, name))
    _say(f"kafka, round {round_}: producing {len(plan.docs)} Debezium records into {partitions} partitions")
    prepare_kafka(plan.streams, name, plan.docs, partitions)
    # Read alone in a consumer group of its own, so the service's group starts from the beginning.
    alone = read_alone(alone_settings(inst, group_id=f"{name}-alone"), len(plan.docs))
    seen, wall_s = run_until_idle(inst)
    note = f"Debezium creates in {partitions} partitions, produced beforehand"
    return finish("kafka", round_, inst, plan.docs, plan.docs, seen, wall_s, note, alone)


def measure_postgres(plan: Plan, round_: int) -> SourceRun:
    name, rows_per_txn = f"pglogical_r{round_}", plan.args.pg_rows_per_txn
    dsn = plan.streams.postgres.uri
    inst = plan.install(name, pg_source(plan.streams, name))
    create_table(dsn, name)
    extra = seed_doc(plan.docs, plan.args.seed)
    _say(
        f"postgres, round {round_}: creating the slot and checkpointing a snapshot of one row (lockstep sync)"
    )
    prime_slot(inst, dsn, name, extra)
    _say(f"postgres, round {round_}: inserting {len(plan.docs)} rows, {rows_per_txn} per transaction")
    insert_docs(dsn, name, plan.docs, rows_per_txn)
    # Read alone through the installation's own ledger (its checkpoint is what makes the source
    # stream from the slot); reading commits nothing, so the slot and the checkpoint stay put.
    alone = read_alone(load_settings(inst.config), len(plan.docs))
    seen, wall_s = run_until_idle(inst)
    note = f"rows inserted beforehand, {rows_per_txn} per transaction, streamed from the slot"
    return finish("postgres", round_, inst, plan.docs, [*plan.docs, extra], seen, wall_s, note, alone)


def measure_webhook(plan: Plan, round_: int) -> SourceRun:
    name, batch_events, token = f"webhook_r{round_}", plan.args.post_batch_events, secrets.token_hex(16)
    inst = plan.install(name, {"kind": "webhook", "name": name, "token": token})
    alone = read_alone(alone_settings(inst), len(plan.docs), inbox_filler(plan.docs, batch_events))
    _say(
        f"webhook, round {round_}: lockstep run, then POSTing {len(plan.docs)} events, {batch_events} a request"
    )
    with running(inst, exit_when_idle=False) as service:
        service.wait_ready()
        poster = Poster(f"http://127.0.0.1:{inst.port}{EVENTS_PATH}", token, plan.docs, batch_events)
        poster.start()
        seen = scrape(service, lambda s: s.applied_now >= len(plan.docs), poster.check)
        wall_s = time.monotonic() - service.started
        poster.join()
        note = poster.describe(seen, service.started)
        status = service.terminate()
    if status != 0:
        raise RuntimeError(f"lockstep run exited with {status} after SIGTERM; see {inst.log}")
    return finish("webhook", round_, inst, plan.docs, plan.docs, seen, wall_s, note, alone)


MEASURES: dict[str, Callable[[Plan, int], SourceRun]] = {
    "jsonl": measure_jsonl,
    "kafka": measure_kafka,
    "postgres": measure_postgres,
    "webhook": measure_webhook,
}


class Poster(threading.Thread):
    """POSTs every event once, as fast as one client can, and remembers when it started and ended."""

    def __init__(self, url: str, token: str, docs: Sequence[Doc], batch_events: int) -> None:
        super().__init__(name="poster", daemon=True)
        self.url, self.token, self.docs, self.batch_events = url, token, docs, batch_events
        self.started_at = self.ended_at = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        self.started_at = time.monotonic()
        try:
            summary = post_events(
                self.url, self.token, map(event_dict, self.docs), batch_events=self.batch_events
            )
            if summary.accepted != len(self.docs):
                raise RuntimeError(
                    f"the webhook accepted {summary.accepted} of {len(self.docs)} events: {summary}"
                )
        except BaseException as exc:  # handed to the main thread, which raises it
            self.error = exc
        finally:
            self.ended_at = time.monotonic()

    def check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"posting the events failed: {self.error}") from self.error

    def describe(self, seen: Scrape, service_started: float) -> str:
        """How fast the events went in, and how many the service had applied when they were in."""
        post_s = self.ended_at - self.started_at
        applied_then = max((v for t, v in seen.applied if t <= self.ended_at - service_started), default=0.0)
        return (f"POSTed once the service was ready: {len(self.docs) / post_s:.0f} events/s "
                f"({self.batch_events} per request, {post_s:.1f} s), {applied_then:.0f} applied by then")  # fmt: skip


# --- the report ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Results:
    events: int
    seed: int
    shards: int
    tuning: Tuning
    runs: list[SourceRun]
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]

    def of(self, source: str) -> list[SourceRun]:
        return [r for r in self.runs if r.source == source]

    def mean_per_s(self, source: str) -> float:
        return statistics.fmean(r.events_per_s for r in self.of(source))

    def mean_cpu_ms(self, source: str) -> float:
        return statistics.fmean(r.cpu_ms_per_event for r in self.of(source))

    def alone_cpu_ms(self, source: str) -> float:
        return statistics.fmean(r.alone.cpu_ms_per_event for r in self.of(source))

    def alone_per_s(self, source: str) -> float:
        return statistics.fmean(r.alone.per_s for r in self.of(source))

    def intake_cpu_ms(self, source: str) -> float:
        return statistics.fmean(r.alone.intake_cpu_ms_per_event for r in self.of(source))

    def spread(self, source: str) -> float:
        """How far apart a source's runs are, as a fraction of their mean (0 with one run)."""
        rates = [r.events_per_s for r in self.of(source)]
        return (max(rates) - min(rates)) / statistics.fmean(rates)

    def ratio(self, source: str) -> float:
        return self.mean_per_s(source) / self.mean_per_s("jsonl")

    def paired_ratios(self, source: str) -> list[float]:
        """The source's rate over JSONL's in the same round, round by round."""
        base = {r.round: r.events_per_s for r in self.of("jsonl")}
        return [r.events_per_s / base[r.round] for r in self.of(source)]

    @property
    def sources(self) -> list[str]:
        return list(dict.fromkeys(r.source for r in sorted(self.runs, key=lambda r: SOURCES.index(r.source))))


def report(r: Results) -> str:
    """Everything measured, as Markdown."""
    others = [s for s in r.sources if s != "jsonl"]
    return "\n".join([
        f"### Change-stream sources vs the JSONL source (seed {r.seed})",
        "",
        machine(),
        f"- lockstep code: {code_revision()}",
        f"- load average (1/5/15 min) before: {_load(r.load_before)}; after: {_load(r.load_after)}",
        "- stores: OpenSearch-API server (osmem-server) + Milvus 2.3.5 server, SQLite ledger; sources: Tansu "
        "(Kafka API), embedded PostgreSQL 18 (pgoutput), the service's own `POST /events`",
        f"- workload per run: {r.events} upsert events of new documents, {CHUNKS_PER_DOC} chunks each "
        f"(~{PARA_CHARS} characters each), the same texts and metadata for every source, hashing embedder ({DIM} dims)",
        f"- {len({run.round for run in r.runs})} round(s), sources in opposite orders in alternate rounds; "
        f"service settings: run.shards={r.shards}, {r.tuning.describe()}",
        "",
        f"| source | events/s, steady {STEADY_FROM:.0%} to {STEADY_TO:.0%}, per round | mean | ratio to JSONL "
        "(per round) | overhead | service process CPU per event | source alone: CPU per event | "
        "source alone: events/s |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
        *(_summary_row(r, source) for source in r.sources),
        "",
        "| round | source | events/s | CPU per event | applied when the last event was read | first commit | end | "
        "mean batch write keyword / vector | how the events arrived |",
        "|--:|---|--:|--:|--:|--:|--:|--:|---|",
        *(_run_row(run) for run in r.runs),
        "",
        _noise_line(r),
        _fed_line(r),
        *(_verdict_line(r, source) for source in others),
        *(f"- after {run.source} (round {run.round}): {_check(run.violations)}" for run in r.runs),
    ])  # fmt: skip


def _summary_row(r: Results, source: str) -> str:
    rates = " / ".join(f"{run.events_per_s:.1f}" for run in r.of(source))
    paired = " / ".join(f"{x:.2f}" for x in r.paired_ratios(source))
    overhead = "" if source == "jsonl" else f"{1 - r.ratio(source):.0%}"
    cpu = f"{r.mean_cpu_ms(source):.2f} ms"
    if source != "jsonl":
        cpu += f" ({r.mean_cpu_ms(source) - r.mean_cpu_ms('jsonl'):+.2f} ms)"
    alone = f"{r.alone_cpu_ms(source):.3f} ms"
    if r.intake_cpu_ms(source):
        alone += f" (+ {r.intake_cpu_ms(source):.3f} ms intake)"
    return (f"| {source} | {rates} | {r.mean_per_s(source):.1f} | {r.ratio(source):.2f} ({paired}) | "
            f"{overhead} | {cpu} | {alone} | {r.alone_per_s(source):.0f} |")  # fmt: skip


def _run_row(run: SourceRun) -> str:
    w = run.write_s_mean
    return (f"| {run.round} | {run.source} | {run.events_per_s:.1f} | {run.cpu_ms_per_event:.2f} ms | "
            f"{run.applied_when_all_read:.0%} | {run.first_commit_s:.1f} s | {run.wall_s:.1f} s | {w['keyword']:.2f} s / {w['vector']:.2f} s | "
            f"{run.note} |")  # fmt: skip


def _noise_line(r: Results) -> str:
    if len(r.of("jsonl")) < 2:
        return "- noise: one round only, so no run-to-run figure: use `--rounds 2` or more before believing a ratio"
    spreads = ", ".join(f"{s} {r.spread(s):.0%}" for s in r.sources)
    return (f"- noise: the same source's runs differ by up to (max - min) / mean = {spreads}; the JSONL "
            "baseline's spread is the run's own noise floor for every ratio")  # fmt: skip


def _fed_line(r: Results) -> str:
    late = [x for x in r.runs if x.applied_when_all_read > STEADY_FROM]
    if not late:
        worst = max(x.applied_when_all_read for x in r.runs)
        return (f"- every service had read all the events of its source before the steady window began (by "
                f"{worst:.0%} applied at the latest): no measured rate was limited by reading its source")  # fmt: skip
    runs = ", ".join(f"{x.source} (round {x.round}) at {x.applied_when_all_read:.0%} applied" for x in late)
    return (f"- still reading its source inside the steady window (full mailboxes hold the reader back too: "
            f"compare with JSONL): {runs}")  # fmt: skip


def _verdict_line(r: Results, source: str) -> str:
    overhead = 1 - r.ratio(source)
    verdict = f"goal ≤ {OVERHEAD_GOAL:.0%} met" if overhead <= OVERHEAD_GOAL else "goal NOT met"
    extra_ms = r.alone_cpu_ms(source) + r.intake_cpu_ms(source) - r.alone_cpu_ms("jsonl")
    share = extra_ms * r.mean_per_s("jsonl") / 1000
    return (f"- {source}: {r.mean_per_s(source):.1f} / {r.mean_per_s('jsonl'):.1f} = **{r.ratio(source):.2f}** "
            f"of JSONL's rate, overhead {overhead:.0%} ({verdict}). The adapter alone costs {extra_ms:+.3f} ms "
            f"CPU per event beyond JSONL's: at JSONL's mean rate, {share:.1%} of one core")  # fmt: skip


def code_revision() -> str:
    """The commit of ``ROOT`` and the tracked files changed since, as the services run it."""
    try:
        rev = _git("rev-parse", "--short", "HEAD").strip()
        changed = [line[3:] for line in _git("status", "--porcelain", "--untracked-files=no").splitlines()]
    except (OSError, subprocess.SubprocessError):
        return f"{ROOT} (not a git checkout)"
    return f"commit {rev}" + (f", with uncommitted changes to {', '.join(changed)}" if changed else "")


def _git(*args: str) -> str:
    done = subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=True
    )
    return done.stdout


def _load(load: tuple[float, float, float]) -> str:
    return " / ".join(f"{x:.2f}" for x in load)


def _check(violations: list[Violation]) -> str:
    if not violations:
        return "both indexes equal the expected documents (I1-I4 hold on every chunk)"
    shown = "; ".join(str(v) for v in violations[:VIOLATIONS_SHOWN_MAX])
    return f"**{len(violations)} violations**: {shown}"


def write_docs(path: Path, command: str, markdown: str) -> None:
    write_results(path, command, markdown, section=DOCS_SECTION, begin=RESULTS_BEGIN, end=RESULTS_END)


def _say(message: str) -> None:
    print(f"-- {message}", file=sys.stderr, flush=True)


def _settle() -> None:
    time.sleep(SETTLE_S)


# --- entry point ---------------------------------------------------------------------------------


def schedule(sources: Sequence[str], rounds: int) -> list[tuple[int, str]]:
    """(round, source) in run order: JSONL and the chosen sources each round, the order reversed
    every other round, so that a machine getting busier or quieter favours no source."""
    order = ["jsonl", *(s for s in sources if s != "jsonl")]
    return [(r, s) for r in range(1, rounds + 1) for s in (order if r % 2 else order[::-1])]


def measure(work: Path, args: argparse.Namespace, tuning: Tuning) -> Results:
    """Start the sources' servers, then run each source, round after round, on fresh stores."""
    load_before = os.getloadavg()
    docs = make_docs(args.events, args.seed)
    _say("starting Tansu and Postgres")
    runs = []
    with started_streams(work) as streams:
        for round_, source in schedule(args.sources, args.rounds):
            _say(f"{source}, round {round_}: starting a fresh OpenSearch-API server and Milvus 2.3.5")
            with started_stores(work / f"stores_{source}_r{round_}") as stores:
                plan = Plan(work, streams, stores, docs, args.shards, tuning, args)
                runs.append(MEASURES[source](plan, round_))
    return Results(args.events, args.seed, args.shards, tuning, runs, load_before, os.getloadavg())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = RunSettings()
    parser = argparse.ArgumentParser(prog="python -m bench.sources", description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=DEFAULT_EVENTS, help="events per run")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="runs of every source")
    parser.add_argument("--shards", type=int, default=DEFAULT_SHARDS, help="run.shards of every service")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="corpus seed")
    parser.add_argument("--sources", type=_sources, default=SOURCES,
                        help="comma-separated, from jsonl,kafka,postgres,webhook (JSONL always runs)")  # fmt: skip
    parser.add_argument("--kafka-partitions", type=int, default=DEFAULT_KAFKA_PARTITIONS)
    parser.add_argument("--pg-rows-per-txn", type=int, default=DEFAULT_PG_ROWS_PER_TXN)
    parser.add_argument("--post-batch-events", type=int, default=DEFAULT_POST_BATCH_EVENTS)
    parser.add_argument("--batch-docs-max", type=int, default=defaults.batch_docs_max)
    parser.add_argument("--offer-batch-max", type=int, default=defaults.offer_batch_max)
    parser.add_argument("--mailbox-docs-max", type=int, default=defaults.mailbox_docs_max)
    parser.add_argument("--audit-interval-s", type=float, default=0.0,
                        help="continuous audit in the service (0: off, as bench/streaming/ runs it)")  # fmt: skip
    parser.add_argument("--docs-file", type=Path, default=Path("docs/benchmarks.md"),
                        help="the results go between this file's bench.sources markers")  # fmt: skip
    parser.add_argument("--no-docs-file", action="store_true", help="print only")
    return parser.parse_args(argv)


def _sources(text: str) -> tuple[str, ...]:
    chosen = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = set(chosen) - set(SOURCES)
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown sources {sorted(unknown)}; choose from {','.join(SOURCES)}"
        )
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    """Run everything; print the Markdown report; exit 1 if an index disagrees with its source."""
    args = parse_args(argv)
    configure_logging("warning")
    tuning = Tuning(args.batch_docs_max, args.offer_batch_max, args.mailbox_docs_max, args.audit_interval_s)
    with tempfile.TemporaryDirectory(prefix="lockstep-bench-sources-") as tmp:
        results = measure(Path(tmp), args, tuning)
    markdown = report(results)
    print(markdown, flush=True)
    if not args.no_docs_file:
        command = "python -m bench.sources " + " ".join(argv if argv is not None else sys.argv[1:])
        write_docs(args.docs_file, command.strip(), markdown)
    return 0 if all(not run.violations for run in results.runs) else 1

