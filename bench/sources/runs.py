"""One measured run per source: its installation, how its events reach it, the run, its figures.

Every run writes a config of its own (index, collection, ledger), reads its source alone first
(``read_alone.py``), then runs ``lockstep run`` on it and checks both indexes against the
expected documents with ``coordinator.invariants.check_index`` (I1-I4).
"""

from __future__ import annotations

import argparse
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.sources.kafka import kafka_source, prepare_kafka
from bench.sources.postgres import create_table, insert_docs, pg_source, prime_slot, seed_doc
from bench.sources.read_alone import ReadAlone, alone_settings, read_alone
from bench.sources.scrape import Scrape, applied_when_all_read, scrape, steady_cpu_ms
from bench.sources.servers import Stores, Streams
from bench.sources.webhook import Poster, inbox_filler
from bench.streaming.metrics import write_s_mean
from bench.streaming.progress import say
from bench.streaming.service import STOP_TIMEOUT_S, Installation, Tuning, running, verify
from bench.streaming.throughput import steady_rate
from bench.streaming.workload import DIM, write_events
from chaos.servers import free_port
from coordinator.invariants import Violation
from lockstep.corpus import Doc
from lockstep.ops_http import EVENTS_PATH
from lockstep.settings import load_settings

SOURCES = ("jsonl", "kafka", "postgres", "webhook")
# Pause between runs so that the last run's Ray workers and stores have exited before the next
# run starts (as bench/streaming/ pauses between phases).
SETTLE_S = 5.0


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
    say(f"{source}, round {round_}: {rate:.1f} events/s over {steady_s:.1f} s, service process "
         f"{cpu_ms:.2f} ms CPU per event; verifying both indexes")  # fmt: skip
    violations = verify(inst, expected)
    time.sleep(SETTLE_S)
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
    say(f"jsonl, round {round_}: lockstep run over {len(plan.docs)} JSONL events")
    seen, wall_s = run_until_idle(inst)
    return finish("jsonl", round_, inst, plan.docs, plan.docs, seen, wall_s, "a file of all events", alone)


def measure_kafka(plan: Plan, round_: int) -> SourceRun:
    name, partitions = f"kafka_r{round_}", plan.args.kafka_partitions
    inst = plan.install(name, kafka_source(plan.streams, name))
    say(f"kafka, round {round_}: producing {len(plan.docs)} Debezium records into {partitions} partitions")
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
    say(
        f"postgres, round {round_}: creating the slot and checkpointing a snapshot of one row (lockstep sync)"
    )
    prime_slot(inst, dsn, name, extra)
    say(f"postgres, round {round_}: inserting {len(plan.docs)} rows, {rows_per_txn} per transaction")
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
    say(
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
