"""The benchmark's phases in order, against one pair of servers: the raw ceiling, a throughput
run per shard count (each after the slower store alone again), the freshness run, and the
keyword store alone fed as the freshness run fed it."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path

from bench.streaming.ceiling import measure_ceiling, measure_slower_again
from bench.streaming.freshness import FRESHNESS_LOAD, FreshnessRun, measure_freshness
from bench.streaming.keyword_latency import StoreLatency, keyword_latency_raw
from bench.streaming.raw_writes import chunk_rows
from bench.streaming.report import Results
from bench.streaming.servers import STORES, Servers, started_servers
from bench.streaming.service import Tuning
from bench.streaming.throughput import measure_throughput
from bench.streaming.workload import CHUNKS_PER_DOC, make_docs
from coordinator.chunking import ChunkingSettings
from lockstep.corpus import Doc


def run_all(work: Path, args: argparse.Namespace, tuning: Tuning) -> tuple[Results, str]:
    """Start both servers; ceiling, throughput per shard count, freshness; stop the servers."""
    load_before = os.getloadavg()
    docs = make_docs(args.events, args.seed)
    rows = chunk_rows(docs, ChunkingSettings())
    with started_servers(work) as servers:
        ceiling = measure_ceiling(servers.url, servers.uri, rows, tuning.batch_docs_max * CHUNKS_PER_DOC)
        runs = []
        for n in args.shards:
            raw_before = measure_slower_again(servers.url, servers.uri, rows, ceiling)
            run = measure_throughput(work, servers.addresses, docs, n, tuning, servers.parts)
            runs.append(replace(run, raw_before=raw_before))
        ceiling = replace(ceiling, again=tuple(r.raw_before for r in runs if r.raw_before is not None))
        best = max(runs, key=lambda r: r.events_per_s)
        rate = FRESHNESS_LOAD * best.events_per_s
        fresh_docs = make_docs(max(1, round(rate * args.freshness_s)), args.seed + 1)
        freshness = measure_freshness(work, servers.addresses, fresh_docs, best.shards, rate, tuning)
        keyword_latency = keyword_alone_as_fed(servers, fresh_docs, freshness)
    results = Results(
        args.events, args.seed, tuning, ceiling, runs, freshness, load_before, os.getloadavg(), keyword_latency
    )
    return results, STORES


def keyword_alone_as_fed(servers: Servers, fresh_docs: list[Doc], freshness: FreshnessRun) -> StoreLatency | None:
    """The keyword store alone, fed the freshness run's own rows in its request size and rate
    (None if that run made no keyword write)."""
    writes = freshness.writes.get("keyword", 0)
    if writes <= 0:
        return None
    size = max(1, round(CHUNKS_PER_DOC * freshness.appended / writes))
    fresh_rows = chunk_rows(fresh_docs, ChunkingSettings())  # the very rows it wrote
    return keyword_latency_raw(
        servers.url, servers.uri, fresh_rows, size, min(writes, len(fresh_rows) // size),
        writes / freshness.append_s,
    )  # fmt: skip
