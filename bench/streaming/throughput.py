"""Sustained throughput: ``lockstep run --exit-when-idle`` over a whole JSONL, its steady rate.

The applied rate is taken from ``/metrics`` (``lockstep_events_total{outcome="applied"}``,
polled) between ``STEADY_FROM`` and ``STEADY_TO`` of the events, so Ray and actor start-up are
left out. Over the same window, the cores each part of the machine used (``cpu_parts.py``).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench import cpu
from bench.streaming.cpu_parts import classifier, window_cores
from bench.streaming.metrics import APPLIED, write_s_mean
from bench.streaming.progress import say, settle
from bench.streaming.raw_writes import StoreRate
from bench.streaming.service import METRICS_POLL_S, STOP_TIMEOUT_S, Service, Tuning, install, running, verify
from bench.streaming.workload import CHUNKS_PER_DOC, write_events
from coordinator.invariants import Violation
from lockstep.corpus import Doc

# The steady-state window, as fractions of the events applied: before it Ray and the actors
# start and the pipeline fills; after it the last shards drain alone.
STEADY_FROM = 0.10
STEADY_TO = 0.90
# Bound on one throughput run, so a stuck run fails instead of hanging the benchmark.
RUN_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class ThroughputRun:
    """One ``lockstep run --exit-when-idle`` over the whole JSONL."""

    shards: int
    events: int
    ready_s: float
    wall_s: float
    steady_s: float
    events_per_s: float
    write_s_mean: dict[str, float]
    violations: list[Violation]
    # Cores per part of the machine over the steady window (see cpu_parts.py); empty if the window
    # held fewer than two snapshots.
    cpu_cores: dict[str, float] = field(default_factory=dict)
    # The slower store alone, measured by the raw client right before this run.
    raw_before: StoreRate | None = None

    def paired_ratio(self) -> float | None:
        """This run's rate over the raw rate measured just before it."""
        if self.raw_before is None:
            return None
        return self.events_per_s / (self.raw_before.rows_per_s / CHUNKS_PER_DOC)


Sample = tuple[float, float]


def crossing(samples: Sequence[Sample], level: float) -> float:
    """When the applied count first reached ``level``, interpolated between two samples."""
    for (t0, v0), (t1, v1) in itertools.pairwise(samples):
        if v0 < level <= v1:
            return t0 + (t1 - t0) * (level - v0) / (v1 - v0)
    raise ValueError(f"the applied count never crossed {level}")


def steady_window(samples: Sequence[Sample], events: int) -> tuple[float, float]:
    """When STEADY_FROM and STEADY_TO of ``events`` had been applied."""
    return crossing(samples, STEADY_FROM * events), crossing(samples, STEADY_TO * events)


def steady_rate(samples: Sequence[Sample], events: int) -> tuple[float, float]:
    """Events/s between STEADY_FROM and STEADY_TO of ``events`` applied, and that window's length."""
    start, end = steady_window(samples, events)
    return (STEADY_TO - STEADY_FROM) * events / (end - start), end - start


def scrape_until_exit(
    service: Service, classify: cpu.Classifier
) -> tuple[list[Sample], list[tuple[float, cpu.CpuSnapshot]], dict[str, float], int]:
    """Scrape /metrics until the process exits: the applied counts, a CPU snapshot per scrape,
    the last scrape, the exit status."""
    samples: list[Sample] = [(0.0, 0.0)]
    snapshots: list[tuple[float, cpu.CpuSnapshot]] = []
    last: dict[str, float] = {}
    deadline = service.started + RUN_TIMEOUT_S
    while service.process.poll() is None:
        if time.monotonic() > deadline:
            service.kill()
            raise RuntimeError(f"the run took longer than {RUN_TIMEOUT_S} s; see {service.inst.log}")
        metrics = service.metrics()
        if metrics is not None and APPLIED in metrics:
            samples.append((time.monotonic() - service.started, metrics[APPLIED]))
            last = metrics
        snap = cpu.snapshot(classify)
        snapshots.append((snap.at - service.started, snap))
        time.sleep(METRICS_POLL_S)
    return samples, snapshots, last, service.wait_exit(STOP_TIMEOUT_S)


def measure_throughput(work: Path, servers: tuple[str, str], docs: Sequence[Doc], shards: int,
                       tuning: Tuning, stores: dict[int, str]) -> ThroughputRun:  # fmt: skip
    """``lockstep run --exit-when-idle`` on all ``docs``; the steady-state applied rate and the
    cores each part of the machine used meanwhile (``stores``: server pid -> part)."""
    inst = install(work, f"s{shards}", *servers, shards, tuning)
    write_events(inst.events, docs)
    say(f"lockstep run, {shards} shard(s), {len(docs)} events")
    with running(inst, exit_when_idle=True) as service:
        samples, snapshots, last, status = scrape_until_exit(service, classifier(stores, service.process.pid))
        wall_s = time.monotonic() - service.started
    if status != 0:
        raise RuntimeError(f"lockstep run exited with {status}; see {inst.log}")
    first = next(t for t, v in samples if v > 0)
    rate, steady_s = steady_rate(samples, len(docs))
    cores = window_cores(snapshots, *steady_window(samples, len(docs)))
    say(f"{shards} shard(s): {rate:.1f} events/s over {steady_s:.1f} s; verifying both indexes")
    violations = verify(inst, docs)
    settle()
    return ThroughputRun(shards, len(docs), first, wall_s, steady_s, rate, write_s_mean(last), violations, cores)
