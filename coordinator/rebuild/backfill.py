"""The backfill: generation N's committed documents (tombstones too) copied into N+1, with a
resume point saved after every batch, and the tombstones N committed while the writers switched."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import structlog

from coordinator.batching import batched
from coordinator.errors import ConfigError
from coordinator.generations import Generation, GenState
from coordinator.ports import GenerationReader, GenerationRegistry, OpenedGeneration
from coordinator.rebuild.report import Progress, RebuildReport
from coordinator.rebuild.snapshot import SNAPSHOT_READ_DOCS, apply_skipping, snapshot_events

log = structlog.get_logger(__name__)

# The live service writes the new generation too: documents it holds an intent for are set
# aside and read again after this pause.
CONFLICT_PAUSE_S = 0.2
# Passes over the documents a backfill set aside because a live write of them was in flight.
DEFERRED_PASSES_MAX = 50


def _no_hook(_batches: int) -> None:
    return None


class Backfill:
    """Copies generation N (``reader``) into N+1 (``target``) through N+1's two-phase path."""

    def __init__(
        self,
        registry: GenerationRegistry,
        *,
        batch_docs: int,
        sleep: Callable[[float], None],
        batch_saved: Callable[[int], None] = _no_hook,
    ) -> None:
        """``batch_saved(n)`` runs once the n-th batch's resume point is saved (test only: the
        rebuild CLI's kill after a number of batches)."""
        self._registry = registry
        self._batch_docs = batch_docs
        self._sleep = sleep
        self._batch_saved = batch_saved

    def run(self, gen: Generation, reader: GenerationReader, target: OpenedGeneration, report: RebuildReport,
            progress: Progress) -> Generation:
        """Copy every document after ``gen``'s resume point; returns ``gen`` recorded as backfilled."""
        counts = reader.ledger.counts()
        total = counts["live_docs"] + counts["tombstones"]
        done = gen.backfilled_docs
        position = gen.backfill_position
        docs = (d for d in reader.ledger.iter_docs(include_deleted=True) if position is None or d.doc_id > position)
        progress(done, total)
        deferred: list[str] = []
        for batches, batch in enumerate(batched(docs, self._batch_docs), start=1):
            events = snapshot_events(batch, reader, report.unreadable_docs)
            deferred.extend(apply_skipping(target, events))
            done += len(batch)
            gen = replace(gen, backfill_position=batch[-1].doc_id, backfilled_docs=done)
            self._save(gen)
            report.backfilled_docs += len(batch)
            progress(done, total)
            self._batch_saved(batches)
        self.deferred(deferred, reader, target, report)
        gen = replace(gen, backfill_done=True)
        self._save(gen)
        log.info("backfill done", generation=gen.number, docs=done, unreadable=len(report.unreadable_docs))
        return gen

    def deferred(self, doc_ids: list[str], reader: GenerationReader, target: OpenedGeneration,
                 report: RebuildReport) -> None:
        """Copy the documents set aside because a live write of them was in flight, reading
        them again (the live write may have committed a newer version meanwhile). Whatever is
        still busy after DEFERRED_PASSES_MAX passes is left to the validating audit, which
        compares every document before any swap."""
        for _ in range(DEFERRED_PASSES_MAX):
            if not doc_ids:
                return
            self._sleep(CONFLICT_PAUSE_S)
            states = list(reader.ledger.get_docs(dict.fromkeys(doc_ids)).values())
            doc_ids = apply_skipping(target, snapshot_events(states, reader, report.unreadable_docs))
        if doc_ids:
            log.warning("documents still being written live after the backfill; validation checks them",
                        docs=len(doc_ids))

    def catch_up_tombstones(self, reader: GenerationReader, target: OpenedGeneration, report: RebuildReport) -> int:
        """Copy the tombstones generation N committed after the backfill passed them and before
        every writer wrote N+1 too. The validating audit cannot see those: a document deleted in
        N and unknown to N+1 holds nothing in either's indexes, yet without its tombstone N+1
        would take a late, older upsert of it. Once every writer writes both generations no new
        tombstone can miss N+1, so one pass after the switch is enough. It reads every document
        of N rather than those changed since the registration: commit times come from each
        writer's own clock, and a writer on another machine may lag this one. Returns how many."""
        copied = 0
        tombstones = (d for d in reader.ledger.iter_docs(include_deleted=True) if d.deleted)
        for batch in batched(tombstones, SNAPSHOT_READ_DOCS):
            ours = target.ledger.get_docs([d.doc_id for d in batch])
            missed = [d for d in batch if (have := ours.get(d.doc_id)) is None or have.version < d.version]
            if not missed:
                continue
            events = snapshot_events(missed, reader, report.unreadable_docs)
            self.deferred(apply_skipping(target, events), reader, target, report)
            copied += len(missed)
        if copied:
            log.info("tombstones generation N committed during the switch copied", docs=copied)
        return copied

    def _save(self, gen: Generation) -> None:
        """Record progress, unless the generation was aborted meanwhile (then stop)."""
        now = {g.number: g for g in self._registry.all()}.get(gen.number)
        if now is None or now.state is not GenState.BUILDING:
            raise ConfigError(f"generation {gen.number} is no longer being built ({now.state if now else 'gone'})")
        self._registry.put([replace(gen, state=now.state)])
