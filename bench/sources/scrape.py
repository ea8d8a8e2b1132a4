"""What one run showed, scraped while it ran: the applied count, the service process's own CPU
time, how far ahead the service read its source; and the figures of its steady window."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import psutil

from bench.streaming.metrics import APPLIED
from bench.streaming.service import METRICS_POLL_S, Service
from bench.streaming.throughput import RUN_TIMEOUT_S, STEADY_FROM, STEADY_TO, Sample, crossing

# Events read by the service and not yet finished (the reader's lead over the shards).
UNFINISHED = "lockstep_unfinished_events"


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
