"""Waiting for the live writers (``lockstep run``, one-shot commands) announced in the registry:
until all of them write a new generation, or until none writes one being let go."""

from __future__ import annotations

from collections.abc import Callable

import structlog

from coordinator.errors import LockstepError
from coordinator.generations import lagging_writers, still_writing
from coordinator.ports import GenerationRegistry

log = structlog.get_logger(__name__)

# Validation starts only once every live writer (a `lockstep run`, a one-shot command) reports
# writing the new generation too: until then its commits reach generation N only, and a
# validation that read the source before them could swap to a generation that misses them
# (docs/rebuild.md, "Live writers"). Polled this often, for at most this long; then the rebuild
# stops, resumable, naming the writers it waited for.
WRITERS_POLL_S = 0.5
WRITERS_WAIT_MAX_S = 600.0


class WriterWait:
    """Polls the registry's writers every WRITERS_POLL_S, for at most WRITERS_WAIT_MAX_S."""

    def __init__(
        self, registry: GenerationRegistry, *, clock: Callable[[], float], sleep: Callable[[float], None]
    ) -> None:
        self._registry = registry
        self._clock = clock
        self._sleep = sleep

    def all_writing(self, number: int) -> list[str]:
        """Wait until every live writer writes generation ``number`` too; the writers seen, for
        the report."""
        deadline = self._clock() + WRITERS_WAIT_MAX_S
        logged: list[str] | None = None
        while True:
            writers = self._registry.writers()
            lagging = lagging_writers(writers, number)
            if not lagging:
                log.info("every live writer writes the new generation", generation=number, writers=sorted(writers))
                return sorted(writers)
            if self._clock() >= deadline:
                raise LockstepError(
                    f"after {WRITERS_WAIT_MAX_S:.0f} s these writers still do not write generation {number}: "
                    f"{', '.join(lagging)}; a `lockstep run` switches within seconds of a rebuild starting, a "
                    "one-shot command (sync, reconcile) writes its first set until it ends. Run the rebuild "
                    "again once they have: it resumes"
                )
            if lagging != logged:
                log.info("waiting for live writers to write the new generation", generation=number, lagging=lagging)
                logged = lagging
            self._sleep(WRITERS_POLL_S)

    def none_writing(self, number: int) -> None:
        """Wait until no live writer writes generation ``number`` any more."""
        deadline = self._clock() + WRITERS_WAIT_MAX_S
        logged: list[str] = []
        while writers := still_writing(self._registry.writers(), number):
            if self._clock() >= deadline:
                raise LockstepError(
                    f"after {WRITERS_WAIT_MAX_S:.0f} s these writers still write generation {number}: "
                    f"{', '.join(writers)}; it is no longer live, and `lockstep gc` drops it once they stopped"
                )
            if writers != logged:
                log.info("waiting for live writers to stop writing the generation", generation=number, writers=writers)
                logged = writers
            self._sleep(WRITERS_POLL_S)
