"""A search service that stays on the active generation: what ``lockstep serve``, ``lockstep
run`` and the Python API hold for as long as they live.

After a blue-green swap (docs/rebuild.md) the readers' aliases point at the new generation at
once, but the fence must read that generation's ledger: every ``GENERATION_CHECK_S`` the
registry is read, and a change of the active generation opens a new runtime for it. The one it
replaces is closed a swap later (a search may still be running on it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

from adapters.ledger.registry import registry_for
from coordinator.errors import LockstepError
from coordinator.search import SearchRequest, SearchResult
from lockstep.runtime import SearchRuntime, active_generation

log = structlog.get_logger(__name__)

# How often the generation registry is read for a swap (as ``lockstep run`` does).
GENERATION_CHECK_S = 2.0


class FollowingSearch:
    """Searches on the active generation's runtime, re-opened after a swap; thread-safe."""

    def __init__(self, open_runtime: Callable[[], SearchRuntime], *, clock: Callable[[], float] = time.monotonic) -> None:
        self._open = open_runtime
        self._clock = clock
        self._lock = threading.Lock()
        self._runtime = open_runtime()
        self._retired: SearchRuntime | None = None
        self._checked_at = clock()

    @property
    def generation(self) -> int:
        return self._runtime.generation

    def search(self, request: SearchRequest) -> tuple[SearchResult, int]:
        """The result and the generation it was read from."""
        runtime = self._current()
        return runtime.service.search(request), runtime.generation

    def close(self) -> None:
        with self._lock:
            if self._retired is not None:
                self._retired.close()
            self._runtime.close()

    def _current(self) -> SearchRuntime:
        with self._lock:
            now = self._clock()
            if now - self._checked_at >= GENERATION_CHECK_S:
                self._checked_at = now
                self._follow()
            return self._runtime

    def _follow(self) -> None:
        try:
            active = active_generation(registry_for(self._runtime.home).all()).number
            if active == self._runtime.generation:
                return
            fresh = self._open()
        except LockstepError as exc:
            log.warning("cannot follow the active generation; searching the one opened", error=str(exc))
            return
        log.info("search follows a swap", before=self._runtime.generation, after=fresh.generation)
        if self._retired is not None:
            self._retired.close()
        self._retired, self._runtime = self._runtime, fresh
