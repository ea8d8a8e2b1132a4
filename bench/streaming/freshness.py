"""Freshness lag: the service in follow mode, fed events at a steady rate; each event's lag.

Events are appended to the service's JSONL at ``FRESHNESS_LOAD`` of the best measured rate; each
event's lag runs from the moment its line was flushed to the file until the ledger shows its
version committed (polled from here, every ``LEDGER_POLL_S``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from adapters.ledger.sqlite import SqliteLedger
from bench.streaming.metrics import histogram_quantile_le, write_s_mean, writes_made
from bench.streaming.progress import say
from bench.streaming.service import Tuning, install, running, verify
from bench.streaming.workload import event_line
from coordinator.invariants import Violation
from lockstep.corpus import Doc

# The freshness run appends at this fraction of the best sustained rate measured.
FRESHNESS_LOAD = 0.5
# The freshness report shows the lag per window of this many seconds of appends.
LAG_WINDOW_S = 5.0
# The appender writes (and flushes) whole lines this often, keeping to the target rate.
APPEND_TICK_S = 0.02
# The ledger is asked for committed versions this often: it bounds the lag's measurement error.
LEDGER_POLL_S = 0.05
# Bound on waiting for the last appended events to commit, so a stuck run fails instead of hanging.
DRAIN_TIMEOUT_S = 120.0


@dataclass
class LagLog:
    """Append and commit times per document, shared by the appender and the ledger poller."""

    appended: dict[str, float] = field(default_factory=dict)
    committed: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def uncommitted(self) -> list[str]:
        with self.lock:
            return [d for d in self.appended if d not in self.committed]

    def lags_s(self) -> list[float]:
        return sorted(self.committed[d] - self.appended[d] for d in self.committed)

    def timeline(self) -> list[tuple[float, float]]:
        """(seconds from the first append, lag) of every committed event, in append order."""
        if not self.appended:
            return []
        first = min(self.appended.values())
        return sorted((self.appended[d] - first, self.committed[d] - self.appended[d]) for d in self.committed)


@dataclass(frozen=True)
class FreshnessRun:
    shards: int
    target_per_s: float
    appended: int
    append_s: float
    lags_s: list[float]
    service_p50_le_s: float
    service_p99_le_s: float
    violations: list[Violation]
    # (seconds from the first append, lag) per event: where in the run the slow ones were.
    timeline: list[tuple[float, float]] = field(default_factory=list)
    # Per index: batch writes made, and their mean duration as the shards time it.
    writes: dict[str, int] = field(default_factory=dict)
    write_s_mean: dict[str, float] = field(default_factory=dict)

    def percentile_s(self, q: float) -> float:
        return percentile(self.lags_s, q)

    def windows(self, width_s: float = LAG_WINDOW_S) -> list[tuple[float, list[float]]]:
        """The lags of the events appended in each ``width_s`` window (start, sorted lags)."""
        out: dict[int, list[float]] = {}
        for at, lag in self.timeline:
            out.setdefault(int(at // width_s), []).append(lag)
        return [(k * width_s, sorted(v)) for k, v in sorted(out.items())]


def percentile(ordered: Sequence[float], q: float) -> float:
    """The value at rank ``q`` of ``ordered`` values, rounding up (0.5 gives the upper median)."""
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def append_paced(path: Path, docs: Sequence[Doc], rate_per_s: float, log: LagLog) -> float:
    """Append one line per document at ``rate_per_s``, flushing every APPEND_TICK_S; returns the duration."""
    started = time.monotonic()
    written = 0
    with path.open("a", encoding="utf-8") as out:
        while written < len(docs):
            due = min(len(docs), int((time.monotonic() - started) * rate_per_s) + 1)
            batch = docs[written:due]
            out.writelines(event_line(d) for d in batch)
            out.flush()
            now = time.monotonic()
            with log.lock:
                log.appended.update((d.doc_id, now) for d in batch)
            written = due
            time.sleep(APPEND_TICK_S)
    return time.monotonic() - started


def poll_commits(ledger_path: Path, log: LagLog, stop: threading.Event) -> None:
    """Record when each appended document's version first shows as committed in the ledger."""
    ledger = SqliteLedger(ledger_path)
    try:
        while not stop.wait(LEDGER_POLL_S):
            pending = log.uncommitted()
            if not pending:
                continue
            states = ledger.get_docs(pending)
            now = time.monotonic()
            with log.lock:
                log.committed.update((d, now) for d in states if states[d].version >= 1)
    finally:
        ledger.close()


def wait_all_committed(log: LagLog, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while log.uncommitted():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(log.uncommitted())} events not committed within {timeout_s} s")
        time.sleep(LEDGER_POLL_S)


def measure_freshness(work: Path, servers: tuple[str, str], docs: Sequence[Doc], shards: int,
                      rate_per_s: float, tuning: Tuning) -> FreshnessRun:  # fmt: skip
    """The service in follow mode, fed at ``rate_per_s``; per-event lag from append to commit."""
    inst = install(work, "fresh", *servers, shards, tuning)
    inst.events.touch()
    log, stop = LagLog(), threading.Event()
    say(f"freshness: {shards} shard(s), {len(docs)} events appended at {rate_per_s:.1f}/s")
    with running(inst, exit_when_idle=False) as service:
        service.wait_ready()
        poller = threading.Thread(target=poll_commits, args=(inst.ledger, log, stop), daemon=True)
        poller.start()
        try:
            append_s = append_paced(inst.events, docs, rate_per_s, log)
            wait_all_committed(log, DRAIN_TIMEOUT_S)
        finally:
            stop.set()
            poller.join()
        metrics = service.metrics() or {}
        status = service.terminate()
    if status != 0:
        raise RuntimeError(f"lockstep run exited with {status} after SIGTERM; see {inst.log}")
    lag = "lockstep_freshness_lag_seconds"
    violations = verify(inst, docs)
    return FreshnessRun(
        shards, rate_per_s, len(docs), append_s, log.lags_s(),
        histogram_quantile_le(metrics, lag, 0.5), histogram_quantile_le(metrics, lag, 0.99), violations,
        log.timeline(), writes_made(metrics), write_s_mean(metrics),
    )  # fmt: skip


