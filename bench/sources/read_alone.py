"""One source's ``read()`` drained in this process with no service behind it: the adapter's own cost."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.streaming.service import Installation
from coordinator.events import ChangeEvent
from coordinator.ports import ChangeSource
from lockstep.bootstrap import build_ledger, build_source
from lockstep.settings import LedgerSettings, Settings, load_settings


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
