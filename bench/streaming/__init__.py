"""The streaming service (``lockstep run``) against the raw-client ceiling, side by side in one run.

    python -m bench.streaming [--events 15000] [--shards 1,2,4] [--freshness-s 30] [--seed 7]

This package starts its own OpenSearch-API server and Milvus 2.3.5 server (``chaos/servers.py``),
generates documents of exactly ``CHUNKS_PER_DOC`` chunks (one event = one new document), and
measures, in one run:

1. *Raw-client ceiling*: the rows lockstep would write (chunk rows, hashing-embedder vectors
   computed beforehand) written straight through opensearch-py ``bulk`` (external versions) and
   pymilvus ``MilvusClient.upsert``, in the request sizes lockstep's shards send (one step of
   ``batch_docs_max`` documents). Each store alone, then both at once (as lockstep writes them).
   The slower store alone is measured again right before each lockstep run, because the same
   server's raw rate moves by a quarter from one measurement to the next: the ceiling is the
   median of those measurements of the slower store alone, in events/s, and each run is also
   compared with the raw measurement just before it.
2. *Sustained throughput*: ``lockstep run -c CFG --exit-when-idle`` as a real subprocess on a
   JSONL of ``--events`` events; the applied rate is taken from ``/metrics``
   (``lockstep_events_total{outcome="applied"}``, polled) between ``STEADY_FROM`` and
   ``STEADY_TO`` of the events, so Ray and actor start-up are left out. Repeated per shard count.
   Over the same window, the cores each part used (``bench/cpu.py``, from ``/proc``): each store
   server, the shard actors, the index writer actors, the service's driver, Ray's own processes,
   this harness, the rest of the machine, and what stayed idle.
3. *Freshness lag*: the service in follow mode, with events appended to its JSONL at
   ``FRESHNESS_LOAD`` of the best measured rate; each event's lag runs from the moment its line
   was flushed to the file until the ledger shows its version committed (polled from here).

Every lockstep installation gets its own index, collection and ledger and is checked against the
source with ``coordinator.invariants.check_index`` (I1-I4) when its run ends.

The modules, one concern each:

- ``cli.py``: the command line (``__main__.py`` runs it); ``phases.py``: the phases in order;
- ``workload.py``: the documents and their JSONL events;
- ``servers.py``: the two store servers, started and stopped;
- ``service.py``: one installation and its ``lockstep run`` subprocess; ``metrics.py``: its
  ``/metrics`` read as numbers;
- ``raw_writes.py``: the same rows written straight through the store clients; ``ceiling.py``:
  the raw-client ceiling; ``keyword_latency.py``: the keyword store alone, paced as the
  freshness run fed it;
- ``throughput.py``: sustained throughput; ``cpu_parts.py``: which process is which part of
  the CPU table;
- ``freshness.py``: the freshness lag;
- ``report.py``: the Markdown report and its block in docs/benchmarks.md;
- ``progress.py``: progress lines and the pause between phases.

The names below stay importable from ``bench.streaming`` itself: the workload, the service and
the steady-window rate that ``bench.sources`` shares, and the report test's renderers. They are
loaded from their modules on first use (as ``lockstep/__init__.py`` does): the modules import
one another, and an ``__init__`` that imported them would close a cycle.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.streaming.freshness import FreshnessRun, LagLog
    from bench.streaming.keyword_latency import StoreLatency
    from bench.streaming.metrics import APPLIED, write_s_mean
    from bench.streaming.report import _lag_windows, _store_latency
    from bench.streaming.service import (
        METRICS_POLL_S,
        STOP_TIMEOUT_S,
        Installation,
        Service,
        Tuning,
        running,
        verify,
    )
    from bench.streaming.throughput import (
        RUN_TIMEOUT_S,
        STEADY_FROM,
        STEADY_TO,
        Sample,
        crossing,
        steady_rate,
    )
    from bench.streaming.workload import CHUNKS_PER_DOC, DIM, PARA_CHARS, make_docs, write_events

_EXPORTS = {
    "FreshnessRun": "bench.streaming.freshness",
    "LagLog": "bench.streaming.freshness",
    "StoreLatency": "bench.streaming.keyword_latency",
    "APPLIED": "bench.streaming.metrics",
    "write_s_mean": "bench.streaming.metrics",
    # The report's test reads these two renderers directly.
    "_lag_windows": "bench.streaming.report",
    "_store_latency": "bench.streaming.report",
    "METRICS_POLL_S": "bench.streaming.service",
    "STOP_TIMEOUT_S": "bench.streaming.service",
    "Installation": "bench.streaming.service",
    "Service": "bench.streaming.service",
    "Tuning": "bench.streaming.service",
    "running": "bench.streaming.service",
    "verify": "bench.streaming.service",
    "RUN_TIMEOUT_S": "bench.streaming.throughput",
    "STEADY_FROM": "bench.streaming.throughput",
    "STEADY_TO": "bench.streaming.throughput",
    "Sample": "bench.streaming.throughput",
    "crossing": "bench.streaming.throughput",
    "steady_rate": "bench.streaming.throughput",
    "CHUNKS_PER_DOC": "bench.streaming.workload",
    "DIM": "bench.streaming.workload",
    "PARA_CHARS": "bench.streaming.workload",
    "make_docs": "bench.streaming.workload",
    "write_events": "bench.streaming.workload",
}

__all__ = [
    "APPLIED",
    "CHUNKS_PER_DOC",
    "DIM",
    "METRICS_POLL_S",
    "PARA_CHARS",
    "RUN_TIMEOUT_S",
    "STEADY_FROM",
    "STEADY_TO",
    "STOP_TIMEOUT_S",
    "FreshnessRun",
    "Installation",
    "LagLog",
    "Sample",
    "Service",
    "StoreLatency",
    "Tuning",
    "_lag_windows",
    "_store_latency",
    "crossing",
    "make_docs",
    "running",
    "steady_rate",
    "verify",
    "write_events",
    "write_s_mean",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bench.streaming' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
