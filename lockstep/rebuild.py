"""``lockstep rebuild``: build generation N+1 next to the live one, validate it, swap aliases.

1. *Register* generation N+1 as ``building`` in the registry. From then on every live write
   (``lockstep run`` and ``lockstep sync``) goes through the two-phase path of both generations.
2. *Backfill* N+1 from generation N: the ledger's committed version of every document (and
   every tombstone, so no late event can resurrect a deleted document in N+1), with the text put
   back together from N's keyword index (the chunker is lossless) and checked against the
   ledger's source hash. The resume point is saved after every batch: a restarted rebuild goes
   on from there, and what N+1 already holds is skipped by its own version gate.
3. *Validate*: a full audit of N+1 against the source (when the source can list its current
   state) or against generation N; findings are repaired through N+1's engine and audited again.
   The swap happens only on a clean audit. The configured query set runs against both
   generations and the overlap of their results is reported.
4. *Swap*: one ``_aliases`` request and one ``alter_alias``, then the registry; N becomes a
   standby that stays in step until ``lockstep gc`` drops it after the retention period.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog

from coordinator.audit import Auditor, AuditResult, has_ledger_drift
from coordinator.batching import batched
from coordinator.chunking import ChunkingSettings
from coordinator.crashpoints import CrashHook, no_crash
from coordinator.errors import ConfigError, IntentConflict, LockstepError
from coordinator.events import ChangeEvent, Op
from coordinator.generations import (
    LET_GO_STATES,
    Generation,
    GenState,
    active,
    building,
    expired,
    lagging_writers,
    next_number,
    reassemble,
    rollback_target,
    start_building,
    still_writing,
    swapped,
)
from coordinator.model import DocState
from coordinator.planner import document_hash
from coordinator.ports import KeywordIndex, ListableSource
from coordinator.reconcile import RateLimiter, Reconciler
from lockstep.audit_cli import LISTABLE_SOURCE_KINDS
from lockstep.bootstrap import (
    AnyLedger,
    GenerationParts,
    build_embedder,
    build_generation,
    build_keyword,
    build_ledger,
    build_source,
    build_vector,
    generation_embedder_settings,
    keyword_settings,
    vector_settings,
)
from lockstep.generation_parts import (
    drop_generation_stores,
    load_generations,
    new_generation,
    point_aliases,
)
from lockstep.settings import EmbedderSettings, Settings

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
# The live service writes the new generation too: documents it holds an intent for are set
# aside and read again after this pause.
CONFLICT_PAUSE_S = 0.2
# Validation starts only once every live writer (a `lockstep run`, a one-shot command) reports
# writing the new generation too: until then its commits reach generation N only, and a
# validation that read the source before them could swap to a generation that misses them
# (docs/rebuild.md, "Live writers"). Polled this often, for at most this long; then the rebuild
# stops, resumable, naming the writers it waited for.
WRITERS_POLL_S = 0.5
WRITERS_WAIT_MAX_S = 600.0
# Documents whose texts one read of generation N's keyword index fetches (a snapshot read).
SNAPSHOT_READ_DOCS = 200
# Passes over the documents a backfill set aside because a live write of them was in flight.
DEFERRED_PASSES_MAX = 50

Progress = Callable[[int, int], None]


def _no_progress(_done: int, _total: int) -> None:
    return None


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


@dataclass
class RebuildReport:
    generation: int
    previous: int
    backfilled_docs: int = 0
    resumed_from: str | None = None
    unreadable_docs: list[str] = field(default_factory=list)
    embed_calls: int = 0
    cache_hits: int = 0
    reference: str = ""
    audit_rounds: list[dict[str, Any]] = field(default_factory=list)
    query_overlap: dict[str, Any] = field(default_factory=dict)
    swap: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    live_writers: list[str] = field(default_factory=list)
    tombstones_caught_up: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "previous": self.previous,
            "backfilled_docs": self.backfilled_docs,
            "resumed_from": self.resumed_from,
            "unreadable_docs": self.unreadable_docs[:20],
            "unreadable_count": len(self.unreadable_docs),
            "embed_calls": self.embed_calls,
            "cache_hits": self.cache_hits,
            "reference": self.reference,
            "audit_rounds": self.audit_rounds,
            "query_overlap": self.query_overlap,
            "swap": self.swap,
            "seconds": self.seconds,
            "live_writers": self.live_writers,
            "tombstones_caught_up": self.tombstones_caught_up,
        }


@dataclass
class _Reader:
    """Generation N as the backfill reads it: its ledger and its keyword index (never its
    vector collection, which a running service may hold open)."""

    generation: Generation
    ledger: AnyLedger
    keyword: KeywordIndex

    def close(self, home: AnyLedger) -> None:
        self.keyword.close()
        if self.ledger is not home:
            self.ledger.close()


class GenerationSnapshot:
    """Generation N's documents as a listable source: the reference when the real source
    (an event stream) cannot list its current state."""

    def __init__(self, reader: _Reader, unreadable: list[str]) -> None:
        self._reader = reader
        self._unreadable = unreadable

    def iter_current(self) -> Iterator[_Doc]:
        yield from self._docs(self._reader.ledger.iter_docs())

    def get_current(self, doc_ids: Sequence[str]) -> Iterator[_Doc]:
        """Only these documents: a recheck of a few must not read all of generation N again."""
        yield from self._docs(iter(self._reader.ledger.get_docs(doc_ids).values()))

    def _docs(self, states: Iterator[DocState]) -> Iterator[_Doc]:
        for batch in batched(states, SNAPSHOT_READ_DOCS):
            for event in snapshot_events(batch, self._reader, self._unreadable):
                if event.op is Op.UPSERT:
                    yield _Doc(event.doc_id, event.version, event.text or "", dict(event.metadata))


@dataclass(frozen=True)
class _Doc:
    doc_id: str
    version: int
    text: str
    metadata: dict[str, Any]


def snapshot_events(states: Sequence[DocState], reader: _Reader, unreadable: list[str]) -> list[ChangeEvent]:
    """Each document's committed state as an event: deletes for tombstones, upserts whose text
    is reassembled from the keyword index and matches the ledger's source hash."""
    wanted = [cid for s in states if not s.deleted for cid in s.live_chunk_ids]
    stored = reader.keyword.get(wanted) if wanted else {}
    events = []
    for state in states:
        if state.deleted:
            events.append(ChangeEvent(Op.DELETE, state.doc_id, state.version))
            continue
        chunks = [stored.get(cid) for cid in state.live_chunk_ids]
        texts = [c.text for c in chunks if c is not None and c.text is not None]
        if len(texts) != len(chunks) or not chunks:
            unreadable.append(state.doc_id)
            continue
        first = chunks[0]
        assert first is not None, "every chunk of the document was read (checked above)"
        metadata = dict(first.metadata or {})
        text = reassemble(texts, reader.generation.chunking)
        if document_hash(text, metadata) != state.source_hash:
            unreadable.append(state.doc_id)
            continue
        events.append(ChangeEvent(Op.UPSERT, state.doc_id, state.version, text, metadata))
    return events


class Rebuild:
    """One ``lockstep rebuild`` (or ``--rollback`` / ``--abort``) run."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        crash: CrashHook = no_crash,
    ) -> None:
        """``clock`` and ``sleep`` time every wait of the rebuild (the chaos suite runs it on
        simulated time, stepping the live service while it waits); ``crash`` is passed to the
        new generation's engine and ledger (test only: the chaos suite's crash points)."""
        self.settings = settings
        self._clock = clock
        self._sleep = sleep
        self._crash = crash
        # Test only: a real SIGKILL of this process after this many saved backfill batches.
        self.crash_after_batches: int | None = None
        self.home = build_ledger(settings)
        try:
            self.configured = build_embedder(settings.embedder)
            self.registry, _ = load_generations(settings, self.home, self.configured)
        except BaseException:
            self.home.close()
            raise

    def close(self) -> None:
        self.home.close()

    def generations(self) -> list[Generation]:
        return self.registry.all()

    # --- start / resume -----------------------------------------------------------------------

    def begin(self, embedder: EmbedderSettings, chunking: ChunkingSettings) -> Generation:
        """Register generation N+1, or return the one being built if it has the same identity."""
        gens = self.registry.all()
        inner = build_embedder(embedder)
        current = building(gens)
        if current is not None:
            if (current.model_id, current.dim, current.chunking) != (inner.model_id, inner.dim, chunking):
                raise ConfigError(
                    f"generation {current.number} is being built with {current.model_id} / "
                    f"{current.chunking.fingerprint}; finish it with those options or `lockstep rebuild --abort`"
                )
            log.info("resuming rebuild", generation=current.number, position=current.backfill_position)
            return current
        act = active(gens)
        if (act.model_id, act.dim, act.chunking) == (inner.model_id, inner.dim, chunking):
            raise ConfigError(
                f"generation {act.number} already uses {act.model_id} / {chunking.fingerprint}: nothing to rebuild"
            )
        candidate = new_generation(self.settings, next_number(gens), embedder, inner, chunking, time.time())
        gen = start_building(gens, candidate)
        self.registry.put([gen])
        log.info("generation registered", generation=gen.number, model=gen.model_id, chunking=gen.chunking.fingerprint,
                 keyword_index=gen.keyword_index, collection=gen.vector_collection)
        return gen

    def run(self, embedder: EmbedderSettings, chunking: ChunkingSettings, *, swap: bool = True,
            progress: Progress = _no_progress) -> RebuildReport:
        gen = self.begin(embedder, chunking)
        act = active(self.registry.all())
        report = RebuildReport(generation=gen.number, previous=act.number, resumed_from=gen.backfill_position)
        reader = self._reader(act)
        target = build_generation(self.settings, gen, self.home, source_name=self._source_name(), crash=self._crash)
        try:
            # Intents a killed rebuild left prepared are driven first (the service may be driving
            # some of them too; both writes carry the same versions).
            target.engine.recover()
            started = self._clock()
            if not gen.backfill_done:
                gen = self._backfill(gen, reader, target, report, progress)
            report.seconds["backfill"] = round(self._clock() - started, 3)
            started = self._clock()
            report.live_writers = self._await_writers(gen)
            report.seconds["writers_switch"] = round(self._clock() - started, 3)
            report.tombstones_caught_up = self._catch_up_tombstones(reader, target, report)
            started = self._clock()
            self._validate(gen, reader, target, report)
            report.seconds["validate"] = round(self._clock() - started, 3)
            # Chunk embeddings only (the query set's own embeddings come after).
            report.embed_calls = target.embedder.embed_calls
            report.cache_hits = target.embedder.cache_hits
            report.query_overlap = self._compare_queries(act, reader, target)
            if swap:
                report.swap = self._swap_to(gen, target)
        finally:
            target.close(keep_ledger=target.ledger is self.home)
            reader.close(self.home)
        return report

    def _await_writers(self, gen: Generation) -> list[str]:
        """Wait until every live writer writes ``gen`` too; the writers seen, for the report."""
        deadline = self._clock() + WRITERS_WAIT_MAX_S
        logged: list[str] | None = None
        while True:
            writers = self.registry.writers()
            lagging = lagging_writers(writers, gen.number)
            if not lagging:
                log.info("every live writer writes the new generation", generation=gen.number, writers=sorted(writers))
                return sorted(writers)
            if self._clock() >= deadline:
                raise LockstepError(
                    f"after {WRITERS_WAIT_MAX_S:.0f} s these writers still do not write generation {gen.number}: "
                    f"{', '.join(lagging)}; a `lockstep run` switches within seconds of a rebuild starting, a "
                    "one-shot command (sync, reconcile) writes its first set until it ends. Run the rebuild "
                    "again once they have: it resumes"
                )
            if lagging != logged:
                log.info("waiting for live writers to write the new generation", generation=gen.number, lagging=lagging)
                logged = lagging
            self._sleep(WRITERS_POLL_S)

    def _source_name(self) -> str:
        return self.settings.source.name if self.settings.source else "api"

    def _reader(self, gen: Generation) -> _Reader:
        ledger = self.home if gen.number == 1 else build_ledger(self.settings, generation=gen.number)
        return _Reader(gen, ledger, build_keyword(keyword_settings(self.settings, gen)))

    # --- backfill -----------------------------------------------------------------------------

    def _backfill(self, gen: Generation, reader: _Reader, target: GenerationParts, report: RebuildReport,
                  progress: Progress) -> Generation:
        counts = reader.ledger.counts()
        total = counts["live_docs"] + counts["tombstones"]
        done = gen.backfilled_docs
        position = gen.backfill_position
        docs = (d for d in reader.ledger.iter_docs(include_deleted=True) if position is None or d.doc_id > position)
        progress(done, total)
        deferred: list[str] = []
        for batches, batch in enumerate(batched(docs, self.settings.rebuild.batch_docs), start=1):
            events = snapshot_events(batch, reader, report.unreadable_docs)
            deferred.extend(_apply(target, events))
            done += len(batch)
            gen = replace(gen, backfill_position=batch[-1].doc_id, backfilled_docs=done)
            self._save(gen)
            report.backfilled_docs += len(batch)
            progress(done, total)
            if self.crash_after_batches is not None and batches >= self.crash_after_batches:
                os.kill(os.getpid(), signal.SIGKILL)
        self._backfill_deferred(deferred, reader, target, report)
        gen = replace(gen, backfill_done=True)
        self._save(gen)
        log.info("backfill done", generation=gen.number, docs=done, unreadable=len(report.unreadable_docs))
        return gen

    def _backfill_deferred(self, doc_ids: list[str], reader: _Reader, target: GenerationParts,
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
            doc_ids = _apply(target, snapshot_events(states, reader, report.unreadable_docs))
        if doc_ids:
            log.warning("documents still being written live after the backfill; validation checks them",
                        docs=len(doc_ids))

    def _catch_up_tombstones(self, reader: _Reader, target: GenerationParts, report: RebuildReport) -> int:
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
            self._backfill_deferred(_apply(target, events), reader, target, report)
            copied += len(missed)
        if copied:
            log.info("tombstones generation N committed during the switch copied", docs=copied)
        return copied

    def _save(self, gen: Generation) -> None:
        """Record progress, unless the generation was aborted meanwhile (then stop)."""
        now = {g.number: g for g in self.registry.all()}.get(gen.number)
        if now is None or now.state is not GenState.BUILDING:
            raise ConfigError(f"generation {gen.number} is no longer being built ({now.state if now else 'gone'})")
        self.registry.put([replace(gen, state=now.state)])

    # --- validate -----------------------------------------------------------------------------

    def _validate(self, gen: Generation, reader: _Reader, target: GenerationParts, report: RebuildReport) -> None:
        """A full audit of the new generation against its reference; documents that differ are
        given the reference's state (never an older version than the new generation holds: a
        live write may simply not have reached the reference yet) and probed again."""
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
            result = auditor.full()
            found: list[int] = []
            while keep_validating(found):
                counts = result.report.as_json()["counts"]
                report.audit_rounds.append({"mode": result.report.mode, "clean": result.report.clean, "counts": counts})
                if result.report.clean:
                    return
                log.warning("new generation differs from its reference", generation=gen.number, counts=counts)
                docs = sorted({f.doc_id for f in result.findings})
                found.append(len(docs))
                self._repair(result, reader, target, exact=exact, unreadable=report.unreadable_docs)
                self._settle(docs, reader, target, clock=self._clock, sleep=self._sleep)
                result = auditor.recheck(docs)
                if not result.report.clean and not any(has_ledger_drift(v) for v in result.views.values()):
                    # Only index-level findings are left: the reconciler's repairs (from the
                    # new generation's own ledger) fix those.
                    self._reconcile(auditor, target, gen)
                    result = auditor.recheck(docs)
        report.audit_rounds.append({"mode": result.report.mode, "clean": result.report.clean,
                                    "counts": result.report.as_json()["counts"]})
        if not result.report.clean:
            raise LockstepError(
                f"generation {gen.number} is still not clean after {len(found)} rounds of repair (documents "
                f"found per round: {found}); not swapping (see the audit rounds in the report)"
            )

    @staticmethod
    def _reconcile(auditor: Auditor, target: GenerationParts, gen: Generation) -> None:
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

    @staticmethod
    def _settle(
        doc_ids: Sequence[str],
        reader: _Reader,
        target: GenerationParts,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """Wait until the live writes of these documents that are in flight now (an intent
        prepared but not committed, in either generation) have landed: such a document is on its
        way, not drift, and a recheck made before it lands would only find it again. Only the
        writes in flight now are waited for (a document edited again meanwhile must not hold the
        settle up), for at least VALIDATE_SETTLE_S and at most VALIDATE_SETTLE_MAX_S."""
        wanted = set(doc_ids)

        def in_flight() -> set[tuple[str, int]]:
            return {
                (i.doc_id, i.version)
                for ledger in (reader.ledger, target.ledger)
                for i in ledger.pending()
                if i.doc_id in wanted
            }

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

    def _repair(
        self, result: AuditResult, reader: _Reader, target: GenerationParts, *, exact: bool, unreadable: list[str]
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
                events.append(ChangeEvent(Op.UPSERT, view.doc_id, version, view.source.text,
                                          dict(view.source.metadata)))
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
            _apply(target, events)

    class _RefCtx:
        def __init__(self, reference: ListableSource, close: Callable[[], None]) -> None:
            self.reference, self._close = reference, close

        def __enter__(self) -> ListableSource:
            return self.reference

        def __exit__(self, *exc: object) -> None:
            self._close()

    def _reference(self, reader: _Reader, report: RebuildReport) -> Rebuild._RefCtx:
        """The source itself when it can list its current state, else generation N."""
        if self.settings.source is not None and self.settings.source.kind in LISTABLE_SOURCE_KINDS:
            source = build_source(self.settings, reader.ledger)
            if isinstance(source, ListableSource):
                report.reference = f"source {self.settings.source.name}"
                return Rebuild._RefCtx(source, source.close)
            source.close()
        report.reference = f"generation {reader.generation.number}"
        return Rebuild._RefCtx(GenerationSnapshot(reader, []), lambda: None)

    # --- queries --------------------------------------------------------------------------------

    def _compare_queries(self, act: Generation, reader: _Reader, target: GenerationParts) -> dict[str, Any]:
        """Run the configured query set on both generations; report how much their results agree."""
        path = self.settings.rebuild.queries_path
        if not path:
            return {}
        queries = [q.strip() for q in Path(path).read_text(encoding="utf-8").splitlines() if q.strip()]
        k = self.settings.rebuild.queries_k
        old_embedder = build_embedder(generation_embedder_settings(self.settings, act))
        old_vector = build_vector(vector_settings(self.settings, act), dim=act.dim)
        per_query = []
        try:
            for query in queries:
                kw = _overlap(_docs(reader.keyword.search(query, k)), _docs(target.keyword.search(query, k)))
                vec = _overlap(
                    _docs(old_vector.search(old_embedder.embed([query])[0], k)),
                    _docs(target.vector.search(target.embedder.embed([query])[0], k)),
                )
                per_query.append({"query": query, "keyword_overlap": kw, "vector_overlap": vec})
        finally:
            old_vector.close()
        return {"k": k, "queries": len(per_query), "keyword_overlap_mean": _mean(per_query, "keyword_overlap"),
                "vector_overlap_mean": _mean(per_query, "vector_overlap"), "per_query": per_query}

    # --- swap, rollback, abort, gc ----------------------------------------------------------------

    def _swap_to(self, gen: Generation, parts: GenerationParts) -> dict[str, Any]:
        switch = point_aliases(self.settings, parts)
        gens = self.registry.all()
        self.registry.put(swapped(gens, gen.number, time.time(), switch))
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
        parts = build_generation(self.settings, gen, self.home, source_name=self._source_name())
        try:
            return self._swap_to(gen, parts)
        finally:
            parts.close(keep_ledger=parts.ledger is self.home)

    def rollback(self) -> dict[str, Any]:
        """Point readers back at the standby generation that was active most recently."""
        return self.swap(rollback_target(self.registry.all()).number)

    def abort(self) -> int:
        """Give up the generation being built: no writer writes it any more, then its stores go."""
        gen = building(self.registry.all())
        if gen is None:
            raise ConfigError("no generation is being built")
        self._drop(replace(gen, state=GenState.ABORTED, retired_at=time.time()))
        return gen.number

    def gc(self, *, now: float, retention_s: float) -> list[int]:
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
        self._await_writers_gone(gen.number)
        drop_generation_stores(self.settings, gen)
        self.registry.put([replace(gen, state=GenState.DROPPED)])

    def _await_writers_gone(self, number: int) -> None:
        deadline = self._clock() + WRITERS_WAIT_MAX_S
        logged: list[str] = []
        while writers := still_writing(self.registry.writers(), number):
            if self._clock() >= deadline:
                raise LockstepError(
                    f"after {WRITERS_WAIT_MAX_S:.0f} s these writers still write generation {number}: "
                    f"{', '.join(writers)}; it is no longer live, and `lockstep gc` drops it once they stopped"
                )
            if writers != logged:
                log.info("waiting for live writers to stop writing the generation", generation=number, writers=writers)
                logged = writers
            self._sleep(WRITERS_POLL_S)


def _apply(target: GenerationParts, events: Sequence[ChangeEvent]) -> list[str]:
    """Apply through the new generation's two-phase path. A document the live service has an
    intent in flight for, or has committed past our version, is left out rather than waited
    for, so a busy document never holds up a whole batch; returns those doc_ids, for the caller
    to read and try again once the live write committed (or for validation to find)."""
    if not events:
        return []
    return target.engine.apply(events, skip_conflicts=True)


def _docs(hits: Sequence[Any]) -> list[str]:
    out: list[str] = []
    for hit in hits:
        if hit.doc_id not in out:
            out.append(hit.doc_id)
    return out


def _mean(rows: Sequence[dict[str, Any]], key: str) -> float | None:
    return round(sum(float(r[key]) for r in rows) / len(rows), 3) if rows else None


def _overlap(a: list[str], b: list[str]) -> float:
    if not a and not b:
        return 1.0
    return round(len(set(a) & set(b)) / max(len(set(a)), len(set(b))), 3)
