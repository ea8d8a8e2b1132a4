"""The rebuild's operations: run (begin or resume, backfill, switch, validate, compare, swap),
swap, rollback, abort and gc, over the registry and the generations' stores."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import structlog

from coordinator.crashpoints import CrashHook, no_crash
from coordinator.errors import ConfigError
from coordinator.generations import (
    LET_GO_STATES,
    Generation,
    GenerationSpec,
    GenState,
    active,
    building,
    expired,
    next_number,
    rollback_target,
    start_building,
    swapped,
)
from coordinator.ports import GenerationReader, GenerationRegistry, GenerationStores, OpenedGeneration
from coordinator.rebuild.backfill import Backfill
from coordinator.rebuild.queries import compare_queries
from coordinator.rebuild.report import Progress, RebuildReport, no_progress
from coordinator.rebuild.validate import Validation
from coordinator.rebuild.writers import WriterWait

log = structlog.get_logger(__name__)


def _no_hook(_batches: int) -> None:
    return None


@dataclass(frozen=True)
class RebuildOptions:
    """``batch_docs``: documents per backfill batch (one resume point each); ``queries``: reads
    the query set compared on both generations once validation passed (None: none configured);
    ``queries_k``: hits per query compared."""

    batch_docs: int
    queries_k: int
    queries: Callable[[], Sequence[str] | None]


class Rebuild:
    """One ``lockstep rebuild`` (or ``--rollback`` / ``--abort``, or ``lockstep gc``) run."""

    def __init__(
        self,
        registry: GenerationRegistry,
        stores: GenerationStores,
        options: RebuildOptions,
        *,
        clock: Callable[[], float],
        sleep: Callable[[float], None],
        unix_now: Callable[[], float],
        crash: CrashHook = no_crash,
        batch_saved: Callable[[int], None] = _no_hook,
    ) -> None:
        """``clock`` and ``sleep`` time every wait of the rebuild (the chaos suite runs it on
        simulated time, stepping the live service while it waits); ``unix_now`` stamps the
        registry's records; ``crash`` is passed to the new generation's engine and ledger (test
        only: the chaos suite's crash points); ``batch_saved(n)`` runs once the n-th backfill
        batch is saved (test only: a kill mid-backfill)."""
        self.registry = registry
        self._stores = stores
        self._options = options
        self._clock = clock
        self._unix_now = unix_now
        self._crash = crash
        self._backfill = Backfill(registry, batch_docs=options.batch_docs, sleep=sleep, batch_saved=batch_saved)
        self._validation = Validation(stores, clock=clock, sleep=sleep)
        self._writers = WriterWait(registry, clock=clock, sleep=sleep)

    def generations(self) -> list[Generation]:
        return self.registry.all()

    # --- start / resume -----------------------------------------------------------------------

    def begin(self, spec: GenerationSpec) -> Generation:
        """Register generation N+1, or return the one being built if it has the same identity."""
        gens = self.registry.all()
        current = building(gens)
        if current is not None:
            if not spec.built(current):
                raise ConfigError(
                    f"generation {current.number} is being built with {current.model_id} / "
                    f"{current.chunking.fingerprint}; finish it with those options or `lockstep rebuild --abort`"
                )
            log.info("resuming rebuild", generation=current.number, position=current.backfill_position)
            return current
        act = active(gens)
        if spec.built(act):
            raise ConfigError(
                f"generation {act.number} already uses {act.model_id} / {spec.chunking.fingerprint}: nothing to rebuild"
            )
        number = next_number(gens)
        candidate = spec.generation(number, self._stores.physical_names(number), self._unix_now())
        gen = start_building(gens, candidate)
        self.registry.put([gen])
        log.info("generation registered", generation=gen.number, model=gen.model_id, chunking=gen.chunking.fingerprint,
                 keyword_index=gen.keyword_index, collection=gen.vector_collection)
        return gen

    def run(self, spec: GenerationSpec, *, swap: bool = True, progress: Progress = no_progress) -> RebuildReport:
        """Build the generation ``spec`` describes (or resume it), validate it, and swap the
        readers' aliases to it if ``swap``."""
        gen = self.begin(spec)
        act = active(self.registry.all())
        report = RebuildReport(generation=gen.number, previous=act.number, resumed_from=gen.backfill_position)
        with self._stores.reading(act) as reader, self._stores.writing(gen, self._crash) as target:
            # Intents a killed rebuild left prepared are driven first (the service may be driving
            # some of them too; both writes carry the same versions).
            target.engine.recover()
            gen = self._build(gen, reader, target, report, progress)
            # Chunk embeddings only (the query set's own embeddings come after).
            report.embed_calls = target.embedder.embed_calls
            report.cache_hits = target.embedder.cache_hits
            report.query_overlap = self._compare_queries(act, reader, target)
            if swap:
                report.swap = self._swap_to(gen, target)
        return report

    def _build(self, gen: Generation, reader: GenerationReader, target: OpenedGeneration, report: RebuildReport,
               progress: Progress) -> Generation:
        """Backfill, wait for the writers to switch, catch up tombstones, validate."""
        with self._timed(report, "backfill"):
            if not gen.backfill_done:
                gen = self._backfill.run(gen, reader, target, report, progress)
        with self._timed(report, "writers_switch"):
            report.live_writers = self._writers.all_writing(gen.number)
        report.tombstones_caught_up = self._backfill.catch_up_tombstones(reader, target, report)
        with self._timed(report, "validate"):
            self._validation.run(gen, reader, target, report)
        return gen

    @contextmanager
    def _timed(self, report: RebuildReport, step: str) -> Iterator[None]:
        """Record how long ``step`` took in ``report.seconds`` (when it did not raise)."""
        started = self._clock()
        yield
        report.seconds[step] = round(self._clock() - started, 3)

    def _compare_queries(self, act: Generation, reader: GenerationReader, target: OpenedGeneration) -> dict[str, Any]:
        """Run the configured query set on both generations; report how much their results agree."""
        queries = self._options.queries()
        if queries is None:
            return {}
        with self._stores.searching(act) as old_vector:
            return compare_queries(queries, self._options.queries_k, reader, old_vector, target)

    # --- swap, rollback, abort, gc ----------------------------------------------------------------

    def _swap_to(self, gen: Generation, parts: OpenedGeneration) -> dict[str, Any]:
        switch = self._stores.point_aliases(parts)
        gens = self.registry.all()
        self.registry.put(swapped(gens, gen.number, self._unix_now(), switch))
        log.info("swapped", to=gen.number, keyword_at=switch["keyword_switched_at"],
                 vector_at=switch["vector_switched_at"])
        return switch

    def swap(self, number: int) -> dict[str, Any]:
        gens = {g.number: g for g in self.registry.all()}
        gen = gens.get(number)
        if gen is None:
            raise ConfigError(f"no generation {number}")
        if gen.state is GenState.BUILDING and not gen.backfill_done:
            raise ConfigError(f"generation {number} is still being backfilled")
        with self._stores.writing(gen, no_crash) as parts:
            return self._swap_to(gen, parts)

    def rollback(self) -> dict[str, Any]:
        """Point readers back at the standby generation that was active most recently."""
        return self.swap(rollback_target(self.registry.all()).number)

    def abort(self) -> int:
        """Give up the generation being built: no writer writes it any more, then its stores go."""
        gen = building(self.registry.all())
        if gen is None:
            raise ConfigError("no generation is being built")
        self._drop(replace(gen, state=GenState.ABORTED, retired_at=self._unix_now()))
        return gen.number

    def gc(self, *, now: float, retention_s: float) -> list[int]:
        """Drop the standby generations older than ``retention_s`` at ``now`` (Unix seconds),
        and those let go whose stores are still to drop; returns their numbers."""
        dropped = []
        for gen in expired(self.registry.all(), now, retention_s):
            self._drop(gen if gen.state in LET_GO_STATES else replace(gen, state=GenState.RETIRED))
            dropped.append(gen.number)
            log.info("generation dropped", generation=gen.number)
        return dropped

    def _drop(self, gen: Generation) -> None:
        """Record ``gen`` as let go (no longer live), wait until no live writer writes it, then
        drop its stores and record it dropped. Dropping sooner would pull the stores from under a
        running ``lockstep run`` that still writes it until its next registry poll: its writes
        there would fail for good and its drain before switching would never end."""
        self.registry.put([gen])
        self._writers.none_writing(gen.number)
        self._stores.drop(gen)
        self.registry.put([replace(gen, state=GenState.DROPPED)])
