"""Validation: a full audit of generation N+1 against its reference, repaired and rechecked in
rounds until it comes clean (or stops making progress); no swap happens without a clean audit."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import structlog

from coordinator.audit import Auditor, AuditResult, has_ledger_drift
from coordinator.errors import IntentConflict, LockstepError
from coordinator.events import ChangeEvent, Op
from coordinator.generations import Generation
from coordinator.ports import (
    GenerationReader,
    GenerationStores,
    Ledger,
    ListableSource,
    OpenedGeneration,
)
from coordinator.rebuild.report import RebuildReport
from coordinator.rebuild.snapshot import GenerationSnapshot, apply_skipping
from coordinator.reconcile import RateLimiter, Reconciler

log = structlog.get_logger(__name__)

# Repairs per second while validating the new generation (nobody reads it yet: go fast).
VALIDATE_REPAIR_OPS_PER_S = 5000.0
# Audit-and-repair rounds before the rebuild gives up on a generation that will not come clean:
# it goes on while rounds make progress (under live writes each round finds a fraction of the
# last one's documents: measured 2422, 725, 257, 72, 20 at 79 edits/s), and stops after
# VALIDATE_STALLED_ROUNDS_MAX rounds in a row that found no fewer documents than the best round
# so far, or after VALIDATE_ROUNDS_MAX rounds in all.
VALIDATE_ROUNDS_MAX = 20
VALIDATE_STALLED_ROUNDS_MAX = 3
# Between rounds, live writes in flight get at least VALIDATE_SETTLE_S to reach both
# generations, and, while a write of a document to recheck that was in flight when the round
# ended is still prepared in either generation, up to VALIDATE_SETTLE_MAX_S (polled every
# VALIDATE_SETTLE_S).
VALIDATE_SETTLE_S = 2.0
VALIDATE_SETTLE_MAX_S = 120.0


def keep_validating(found: Sequence[int]) -> bool:
    """Whether another audit-and-repair round is worth it, given how many documents each round
    so far found different: yes until VALIDATE_ROUNDS_MAX rounds, or until the last
    VALIDATE_STALLED_ROUNDS_MAX rounds each found no fewer than the best round before them."""
    if len(found) >= VALIDATE_ROUNDS_MAX:
        return False
    if len(found) <= VALIDATE_STALLED_ROUNDS_MAX:
        return True
    best_before = min(found[:-VALIDATE_STALLED_ROUNDS_MAX])
    return any(n < best_before for n in found[-VALIDATE_STALLED_ROUNDS_MAX:])


def settle(
    doc_ids: Sequence[str],
    ledgers: Sequence[Ledger],
    *,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
) -> None:
    """Wait until the live writes of these documents that are in flight now (an intent
    prepared but not committed, in any of ``ledgers``: both generations') have landed: such a
    document is on its way, not drift, and a recheck made before it lands would only find it
    again. Only the writes in flight now are waited for (a document edited again meanwhile must
    not hold the settle up), for at least VALIDATE_SETTLE_S and at most VALIDATE_SETTLE_MAX_S."""
    wanted = set(doc_ids)

    def in_flight() -> set[tuple[str, int]]:
        return {(i.doc_id, i.version) for ledger in ledgers for i in ledger.pending() if i.doc_id in wanted}

    waiting = in_flight()
    deadline = clock() + VALIDATE_SETTLE_MAX_S
    while True:
        sleep(VALIDATE_SETTLE_S)
        waiting &= in_flight()
        if not waiting:
            return
        if clock() >= deadline:
            log.warning("live writes still in flight after the settle limit; rechecking anyway",
                        docs=len(waiting), limit_s=VALIDATE_SETTLE_MAX_S)
            return


class Validation:
    """Audits generation N+1 against its reference and repairs it, round after round."""

    def __init__(
        self, stores: GenerationStores, *, clock: Callable[[], float], sleep: Callable[[float], None]
    ) -> None:
        self._stores = stores
        self._clock = clock
        self._sleep = sleep

    def run(self, gen: Generation, reader: GenerationReader, target: OpenedGeneration, report: RebuildReport) -> None:
        """A full audit of the new generation against its reference; documents that differ are
        given the reference's state (never an older version than the new generation holds: a
        live write may simply not have reached the reference yet) and probed again. Raises
        LockstepError if the generation does not come clean."""
        with self._reference(reader, report) as reference:
            auditor = Auditor(
                ledger=target.ledger,
                keyword=target.keyword,
                vector=target.vector,
                source=reference,
                chunking=gen.chunking,
                reference_name=report.reference,
            )
            exact = isinstance(reference, GenerationSnapshot)
            found: list[int] = []
            result = self._rounds(auditor, gen, reader, target, report, exact=exact, found=found)
        if result is None:
            return
        report.audit_rounds.append(_round(result))
        if not result.report.clean:
            raise LockstepError(
                f"generation {gen.number} is still not clean after {len(found)} rounds of repair (documents "
                f"found per round: {found}); not swapping (see the audit rounds in the report)"
            )

    def _rounds(self, auditor: Auditor, gen: Generation, reader: GenerationReader, target: OpenedGeneration,
                report: RebuildReport, *, exact: bool, found: list[int]) -> AuditResult | None:
        """Audit-and-repair rounds while ``keep_validating(found)``, each recorded in ``report``:
        None once one came clean, else the last result (not recorded yet)."""
        result = auditor.full()
        while keep_validating(found):
            report.audit_rounds.append(_round(result))
            if result.report.clean:
                return None
            log.warning("new generation differs from its reference", generation=gen.number,
                        counts=result.report.as_json()["counts"])
            docs = sorted({f.doc_id for f in result.findings})
            found.append(len(docs))
            _repair(result, reader, target, exact=exact, unreadable=report.unreadable_docs)
            settle(docs, [reader.ledger, target.ledger], clock=self._clock, sleep=self._sleep)
            result = auditor.recheck(docs)
            if not result.report.clean and not any(has_ledger_drift(v) for v in result.views.values()):
                # Only index-level findings are left: the reconciler's repairs (from the
                # new generation's own ledger) fix those.
                _reconcile(auditor, target, gen)
                result = auditor.recheck(docs)
        return result

    @contextmanager
    def _reference(self, reader: GenerationReader, report: RebuildReport) -> Iterator[ListableSource]:
        """The source itself when it can list its current state, else generation N."""
        with self._stores.listing_source(reader) as listed:
            if listed is not None:
                name, source = listed
                report.reference = f"source {name}"
                yield source
                return
        report.reference = f"generation {reader.generation.number}"
        yield GenerationSnapshot(reader, [])


def _round(result: AuditResult) -> dict[str, Any]:
    return {"mode": result.report.mode, "clean": result.report.clean, "counts": result.report.as_json()["counts"]}


def _reconcile(auditor: Auditor, target: OpenedGeneration, gen: Generation) -> None:
    """Repair index-level findings through the new generation's own ledger. A document a
    live write holds an intent for meanwhile is on its way, not drift: the reconciler stops
    there, and the next round's recheck sees the document as the live write left it."""
    try:
        Reconciler(
            auditor=auditor,
            engine=target.engine,
            ledger=target.ledger,
            keyword=target.keyword,
            vector=target.vector,
            chunking=gen.chunking,
            limiter=RateLimiter(VALIDATE_REPAIR_OPS_PER_S),
        ).run(dry_run=False, max_ops=None)
    except IntentConflict as exc:
        log.info("a live write holds a document to repair; the next round checks it again", error=str(exc))


def _repair(
    result: AuditResult, reader: GenerationReader, target: OpenedGeneration, *, exact: bool, unreadable: list[str]
) -> None:
    """Bring documents whose new-generation ledger disagrees with the reference in line."""
    views = [v for v in result.views.values() if has_ledger_drift(v)]
    known = reader.ledger.get_docs([v.doc_id for v in views]) if exact else {}
    events = []
    for view in views:
        ours = view.ledger.version if view.ledger is not None else 0
        if view.source is not None:
            version = view.source.version if exact else max(view.source.version, ours + 1)
            if exact and version < ours:
                continue  # the new generation is ahead: a live write the reference will get
            events.append(ChangeEvent(Op.UPSERT, view.doc_id, version, view.source.text, dict(view.source.metadata)))
        else:
            was = known.get(view.doc_id)
            if exact and was is not None and not was.deleted:
                # Live in generation N, but its text could not be read back there: that is
                # drift in N (`lockstep reconcile` repairs it), not a reason to delete.
                if view.doc_id not in unreadable:
                    unreadable.append(view.doc_id)
                continue
            version = was.version if was is not None else ours + 1
            if exact and version < ours:
                continue
            events.append(ChangeEvent(Op.DELETE, view.doc_id, version))
    if events:
        apply_skipping(target, events)
