"""The rebuild's waits for live writers run on the clock and sleep they are given."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters.ledger.registry import registry_for
from adapters.ledger.sqlite import SqliteLedger
from coordinator.errors import LockstepError
from coordinator.rebuild.writers import WRITERS_POLL_S, WRITERS_WAIT_MAX_S, WriterWait

# Longer than any of these tests: an announcement must not expire on the wall clock meanwhile.
ANNOUNCEMENT_TTL_S = 3600.0


class _SimTime:
    """A clock that moves only when slept on."""

    def __init__(self) -> None:
        self.now_s = 0.0
        self.sleeps = 0

    def clock(self) -> float:
        return self.now_s

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.now_s += seconds


def test_a_drop_gives_up_after_its_limit_while_a_writer_still_writes_the_generation(tmp_path: Path) -> None:
    """A writer that never lets generation 2 go stops the wait after WRITERS_WAIT_MAX_S of the
    injected clock, polling every WRITERS_POLL_S, and the error names the writer."""
    ledger = SqliteLedger(tmp_path / "ledger.db")
    try:
        registry = registry_for(ledger)
        registry.announce("stuck-service", [1, 2], ANNOUNCEMENT_TTL_S)
        sim = _SimTime()
        with pytest.raises(LockstepError, match="stuck-service"):
            WriterWait(registry, clock=sim.clock, sleep=sim.sleep).none_writing(2)
    finally:
        ledger.close()
    assert sim.now_s == pytest.approx(WRITERS_WAIT_MAX_S)
    assert sim.sleeps == round(WRITERS_WAIT_MAX_S / WRITERS_POLL_S)


def test_validation_waits_until_every_writer_writes_the_new_generation(tmp_path: Path) -> None:
    """The wait returns, with every writer seen, at the first poll after the last writer switched."""
    ledger = SqliteLedger(tmp_path / "ledger.db")
    try:
        registry = registry_for(ledger)
        registry.announce("old-service", [1], ANNOUNCEMENT_TTL_S)
        registry.announce("switched", [1, 2], ANNOUNCEMENT_TTL_S)
        sim = _SimTime()

        def sleep(seconds: float) -> None:
            sim.sleep(seconds)
            if sim.sleeps == 3:
                registry.announce("old-service", [1, 2], ANNOUNCEMENT_TTL_S)

        seen = WriterWait(registry, clock=sim.clock, sleep=sleep).all_writing(2)
    finally:
        ledger.close()
    assert seen == ["old-service", "switched"]
    assert sim.sleeps == 3
