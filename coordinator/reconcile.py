"""The reconciler: turns a full audit into repairs, applied through the ledgered, versioned apply path.

Order of work:

1. *ledger drift* (a listable source disagrees with the ledger) is repaired by re-driving the
   source's current state as an ordinary ``ChangeEvent`` through ``ApplyEngine.apply``: the
   planner embeds only changed texts and writes what changed, exactly as a live event would.
   The event's version is the source's when it is above the ledger's, else the ledger's + 1
   (what a folder source does anyway); a document gone from the source is deleted at the
   ledger's version + 1 (what ``SqlTableSource.reconcile_ids`` does);
2. the affected documents are read again (real-time ``get``), and every remaining index finding
   becomes one repair *intent* per document, prepared in the ledger and driven by
   ``ApplyEngine.drive``, the same two-phase path (prepare, both sides, mark, commit) that live
   events take and that ``recover()`` re-drives after a crash. Missing and stale chunks (stale
   metadata included) are rewritten from the source's text and metadata (pure streams: from
   whichever index still holds a text that hashes to the ledger's hash with metadata that digests
   to the ledger's metadata digest, never a foreign entry's); vectors come from the embedding cache,
   else the vector index's stored copy of that very hash, and the model is called only when
   neither has it (a text that did not change, as in a metadata repair, is never embedded
   again). Ghosts, orphans and foreign entries outside the reference are deleted by ID
   (a foreign entry under a reference chunk's ID is rewritten, like a stale one; one with no ID
   at all cannot be addressed and is reported unrepairable); duplicated Milvus keys are deleted
   and rewritten in a second round
   (a side applies an intent's upserts before its deletes, so the two cannot share one intent).
   A side that already holds everything an intent asks is marked done before the intent is
   driven, so a healthy side is not rewritten;
3. the repaired documents are read back ("pair assertions"); a chunk a gated index still refused
   is escalated (below), at most ``REPAIR_ESCALATIONS_MAX`` times.

Nothing that exists at the source is ever deleted: deletes target only IDs outside the
reference (which, after step 1, equals the source), plus duplicated keys that are rewritten.
Work is rate-limited to ``REPAIR_OPS_PER_S`` chunk writes per second and capped by ``max_ops``.

Versions of repairs (the design choice). ES/OpenSearch external versioning (and the Tantivy
adapter's own gate) rejects a write whose version equals the stored one, so a chunk whose text
was corrupted *at the ledger's version v* cannot be rewritten at v with ``external``. Writing at
v+1 would work once, but then the next real event at v+1 is refused by the index (409, counted as
"superseded", i.e. silently lost); and bumping the ledger to v+1 would make the ledger drop that
real event as stale. Either breaks pure event streams whose versions are dense integers. So:

- A repair rewrites, at version v, exactly what the ledger records for version v, with
  ``overwrite_equal=True`` (ES ``version_type=external_gte``; Tantivy gates with ``>=``; Milvus
  has no gate). ``external_gte`` can lose data only when two *different* contents share a version;
  here the ledger is authoritative for what version v holds, so rewriting it at v loses nothing,
  and a newer live write (v+1) still wins over a late repair. Future events at v+1 pass both the
  ledger's gate and the index's, untouched by the repair.
- Ghost, orphan and foreign deletes use the highest version the keyword index holds for that ID
  (or the ledger's, if higher), again with ``overwrite_equal``: "a version above any seen" short
  of claiming a version no live event has had yet. That version is the store's own (ES
  ``_version``, the Tantivy adapter's stored version), never a version claimed by a stored body.
  Milvus versions are ignored there, because Milvus gates nothing.
- The repair intent itself needs a version above the committed one to pass the ledger's gate
  (``prepare``) and to lock the document against a concurrent intent: it uses v+1 *as the
  intent's key only*; its ``after`` state keeps the document at version v, so the committed
  version, and the gate for future real events, are unchanged. (Only the per-side ``applied``
  high-water mark records v+1.)
- Escalation: when an index holds a *newer* version than the ledger (a write behind lockstep's
  back, or an invisible delete tombstone, e.g. an unversioned DELETE leaves one at v+1), nothing
  at or below that version can land in that index anyway. The repair then writes above it, at
  ``max(ledger, keyword) + 1``, and raises the ledger's document version to match, so that such
  events are visibly counted as stale by the planner rather than silently superseded in one
  index. This is logged as a warning per document; it is the only case in which a repair moves
  the ledger's version.

Run ``reconcile`` while no sync applies the same documents (a pending repair intent makes a
concurrent ``prepare`` of that document fail), e.g. between sync runs or with shard ownership.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from coordinator.apply import KEYWORD, VECTOR, ApplyEngine
from coordinator.audit import (
    INDEXES,
    Auditor,
    AuditResult,
    DocView,
    RefChunk,
    classify,
    doc_of,
    has_ledger_drift,
    ledger_chunks,
    source_chunks,
    stale_reason,
)
from coordinator.batching import batched
from coordinator.chunking import ChunkingSettings, chunk_text, content_hash
from coordinator.events import ChangeEvent, Op
from coordinator.invariants import metadata_digest
from coordinator.model import ChunkDelete, ChunkState, DocState, IndexedChunk, StoredChunk
from coordinator.ports import ChunkIndex, Intent, Ledger

log = structlog.get_logger(__name__)

# Chunk writes (upserts + deletes, per index) per second. A reconcile shares both stores with
# live sync traffic; 500/s repairs 0.1 % of a million chunks in seconds without crowding it out.
REPAIR_OPS_PER_S = 500.0
# Documents per prepare/drive round trip: one ledger transaction and one bulk write per side.
REPAIR_BATCH_DOCS = 100
# How often a chunk that a gated index still refuses after a repair is retried at a higher version.
REPAIR_ESCALATIONS_MAX = 3
# Chunk IDs per real-time read when fetching index copies of texts.
COPY_IDS_PER_READ_MAX = 1000
# Why a chunk could not be repaired.
NO_TEXT = "no copy of its text with the document's metadata"
NO_ID = "an entry without an ID: no write can address it; remove it with the store's own tools"


@dataclass(frozen=True)
class DocRepair:
    """One document's repair intent; ``rewrites`` follow in a second round (duplicated keys)."""

    doc_id: str
    version: int
    upserts: tuple[IndexedChunk, ...]
    deletes: tuple[ChunkDelete, ...]
    rewrites: tuple[IndexedChunk, ...]
    after: DocState
    sides: frozenset[str]
    bumped: bool = False

    @property
    def ops(self) -> int:
        return len(self.sides) * (len(self.upserts) + len(self.deletes) + len(self.rewrites))

    def intent(self) -> Intent:
        return Intent(self.doc_id, self.version, self.upserts, self.deletes, self.after)

    def rewrite_intent(self) -> Intent:
        return Intent(self.doc_id, self.after.version + 1, self.rewrites, (), self.after)

    def as_json(self) -> dict[str, Any]:
        return {
            "doc_id": self.doc_id,
            "sides": sorted(self.sides),
            "upserts": [{"chunk_id": c.chunk_id, "version": c.version} for c in self.upserts],
            "deletes": [{"chunk_id": d.chunk_id, "version": d.version} for d in self.deletes],
            "rewrites": [{"chunk_id": c.chunk_id, "version": c.version} for c in self.rewrites],
            "ledger_version": self.after.version,
            "raises_ledger_version": self.bumped,
        }


@dataclass
class ReconcileSummary:
    """What a reconcile did (or, in a dry run, would do)."""

    dry_run: bool
    audit: dict[str, Any]
    redrives: list[dict[str, Any]] = field(default_factory=list)
    repairs: list[dict[str, Any]] = field(default_factory=list)
    unrepairable: list[dict[str, str]] = field(default_factory=list)
    ops: int = 0
    skipped_for_budget: int = 0
    escalations: int = 0
    remaining: int = 0
    embed_calls: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "schema_version": 1,
            "dry_run": self.dry_run,
            "audit": self.audit,
            "redrives": self.redrives,
            "repairs": self.repairs,
            "unrepairable": self.unrepairable,
            "ops": self.ops,
            "skipped_for_budget": self.skipped_for_budget,
            "escalations": self.escalations,
            "remaining_findings": self.remaining,
            "embed_calls": self.embed_calls,
        }


class RateLimiter:
    """Spaces work so that no more than ``ops_per_s`` operations start per second on average."""

    def __init__(
        self,
        ops_per_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if ops_per_s <= 0:
            raise ValueError("ops_per_s must be positive")
        self._interval_s = 1.0 / ops_per_s
        self._clock = clock
        self._sleep = sleep
        self._next_s: float | None = None

    def acquire(self, ops: int) -> None:
        """Wait until ``ops`` more operations fit under the rate, then account for them."""
        now = self._clock()
        start = now if self._next_s is None else max(self._next_s, now)
        if start > now:
            self._sleep(start - now)
        self._next_s = start + ops * self._interval_s


# --- planning (pure) ---------------------------------------------------------------------------


def redrive_event(view: DocView) -> ChangeEvent:
    """The event that brings the ledger (and through it both indexes) in line with the source."""
    state = view.ledger
    floor = 0 if state is None else state.version + 1
    if view.source is None:
        return ChangeEvent(Op.DELETE, view.doc_id, floor)
    version = max(view.source.version, floor)
    return ChangeEvent(Op.UPSERT, view.doc_id, version, view.source.text, dict(view.source.metadata))


def plan_repair(
    view: DocView, texts: Mapping[str, StoredChunk], *, escalate: bool = False
) -> tuple[DocRepair | None, list[tuple[str, str]]]:
    """The repair intent for one document whose ledger is the reference, and the chunks that
    cannot be repaired, each with why (no copy of their text anywhere, no ID to address them
    by). ``texts`` maps chunk IDs to copies whose text hashes to the reference's hash (from the
    source or an index)."""
    state = view.ledger
    ref = ledger_chunks(state)
    base = 0 if state is None else state.version
    bad = {cid for side in INDEXES for cid in _bad_chunks(view, side, ref)}
    dups = set(view.duplicates) & ref.keys()
    outside = {cid for side in INDEXES for cid in view.side(side).keys() - ref.keys()} | (
        set(view.duplicates) - ref.keys()
    )
    nameless: list[tuple[str, str]] = [(cid, NO_ID) for cid in sorted(outside) if not cid]
    extra = outside - {""}
    if not (bad or dups or extra):
        return None, nameless
    unrepairable = sorted(cid for cid in bad | dups if cid not in texts)
    writes = {cid: _write_version(view, ref[cid], base, escalate) for cid in (bad | dups) - set(unrepairable)}
    deletes = {cid: _delete_version(view, cid, base, escalate) for cid in extra | (dups - set(unrepairable))}
    after = _after(view.doc_id, state, writes, deletes)
    upserts = tuple(_chunk(texts[cid], ref[cid], v) for cid, v in sorted(writes.items()) if cid not in dups)
    rewrites = tuple(_chunk(texts[cid], ref[cid], v) for cid, v in sorted(writes.items()) if cid in dups)
    repair = DocRepair(
        view.doc_id,
        max(base + 1, after.version),
        upserts,
        tuple(ChunkDelete(cid, v, overwrite_equal=True) for cid, v in sorted(deletes.items())),
        rewrites,
        after,
        _sides_needing(view, ref, writes, extra),
        bumped=after.version > base,
    )
    return repair, [(cid, NO_TEXT) for cid in unrepairable] + nameless


def _bad_chunks(view: DocView, side: str, ref: Mapping[str, RefChunk]) -> set[str]:
    held = view.side(side)
    return {cid for cid, r in ref.items() if cid not in held or stale_reason(r, held[cid])}


def _keyword_version(view: DocView, cid: str) -> int:
    held = view.keyword.get(cid)
    return -1 if held is None else held.version


def _write_version(view: DocView, ref: RefChunk, base: int, escalate: bool) -> int:
    assert ref.version is not None, "ledger chunks carry versions"
    version = max(ref.version, _keyword_version(view, ref.chunk_id))
    return max(version, base) + 1 if escalate else version


def _delete_version(view: DocView, cid: str, base: int, escalate: bool) -> int:
    version = max(base, _keyword_version(view, cid))
    return version + 1 if escalate else version


def _after(
    doc_id: str, state: DocState | None, writes: Mapping[str, int], deletes: Mapping[str, int]
) -> DocState:
    """The ledger state after the repair: written chunks at their write versions, the document at
    least as new as anything the repair wrote to a gated index."""
    top = max([*writes.values(), *deletes.values(), 0 if state is None else state.version])
    if state is None:
        return DocState(doc_id, top, deleted=True)
    chunks = tuple(
        ChunkState(c.chunk_id, c.chunk_index, c.content_hash, writes.get(c.chunk_id, c.version))
        for c in (() if state.deleted else state.chunks)
    )
    return replace(state, version=max(state.version, top), chunks=chunks)


def _chunk(copy: StoredChunk, ref: RefChunk, version: int) -> IndexedChunk:
    assert copy.text is not None and content_hash(copy.text) == ref.content_hash, "copies are verified"
    return IndexedChunk(
        chunk_id=ref.chunk_id,
        doc_id=doc_of(ref.chunk_id),
        chunk_index=ref.chunk_index,
        text=copy.text,
        content_hash=ref.content_hash,
        version=version,
        metadata=dict(copy.metadata or {}),
        overwrite_equal=True,
    )


def _sides_needing(
    view: DocView, ref: Mapping[str, RefChunk], writes: Mapping[str, int], extra: Iterable[str]
) -> frozenset[str]:
    """Sides lacking a planned write (at its exact version), holding a chunk outside the
    reference, or (the vector side) holding a duplicated key; a side that already matches
    everything is left alone."""
    needing = set()
    for side in INDEXES:
        held = view.side(side)
        for cid, version in writes.items():
            want = replace(ref[cid], version=version)
            if (
                cid not in held
                or stale_reason(want, held[cid])
                or (side == VECTOR and cid in view.duplicates)
            ):
                needing.add(side)
        if any(cid in held for cid in extra):
            needing.add(side)
    return frozenset(needing)


def source_copies(view: DocView, chunking: ChunkingSettings) -> dict[str, StoredChunk]:
    """Chunk texts cut from the source's current text (only when the ledger agrees with it)."""
    if view.source is None or has_ledger_drift(view):
        return {}
    ref = source_chunks(view.source, chunking)
    texts = chunk_text(view.source.text, chunking)
    meta = dict(view.source.metadata)
    return {
        cid: StoredChunk(cid, view.doc_id, r.chunk_index, r.content_hash, 0, texts[r.chunk_index], meta)
        for cid, r in ref.items()
    }


# --- running -------------------------------------------------------------------------------------


class Reconciler:
    """Runs an audit and repairs what it found, through the ledger and the apply engine."""

    def __init__(
        self,
        *,
        auditor: Auditor,
        engine: ApplyEngine,
        ledger: Ledger,
        keyword: ChunkIndex,
        vector: ChunkIndex,
        chunking: ChunkingSettings,
        limiter: RateLimiter,
    ) -> None:
        self.auditor = auditor
        self.engine = engine
        self.ledger = ledger
        self.indexes: dict[str, ChunkIndex] = {KEYWORD: keyword, VECTOR: vector}
        self.chunking = chunking
        self.limiter = limiter

    def run(self, *, dry_run: bool, max_ops: int | None) -> ReconcileSummary:
        result = self.auditor.full()
        summary = ReconcileSummary(dry_run, result.report.as_json())
        if result.report.clean:
            return summary
        if dry_run:
            return self._dry_run(result, summary)
        budget = _Budget(max_ops)
        views = self._redrive(result.views, summary, budget)
        self._repair_rounds(views, summary, budget)
        summary.embed_calls = self.engine.stats.embed_calls
        return summary

    def _dry_run(self, result: AuditResult, summary: ReconcileSummary) -> ReconcileSummary:
        drifted = [v for v in result.views.values() if has_ledger_drift(v)]
        summary.redrives = [_event_json(redrive_event(v)) for v in drifted]
        rest = {d: v for d, v in result.views.items() if not has_ledger_drift(v)}
        for repair, missing in self._plan(rest, escalate=False):
            summary.unrepairable += _unrepairable_json(missing)
            if repair is not None:
                summary.repairs.append(repair.as_json())
                summary.ops += repair.ops
        summary.remaining = len(result.findings)
        return summary

    # --- step 1: ledger drift --------------------------------------------------------------

    def _redrive(
        self, views: dict[str, DocView], summary: ReconcileSummary, budget: _Budget
    ) -> dict[str, DocView]:
        events = [redrive_event(v) for v in views.values() if has_ledger_drift(v)]
        for batch in batched(events, REPAIR_BATCH_DOCS):
            ops = sum(_event_ops(e, views[e.doc_id], self.chunking) for e in batch)
            if not budget.take(ops):
                summary.skipped_for_budget += len(batch)
                continue
            self.limiter.acquire(ops)
            self.engine.apply(batch)
            summary.redrives += [_event_json(e) for e in batch]
            summary.ops += ops
        return self._reread(views)

    def _reread(self, views: Mapping[str, DocView]) -> dict[str, DocView]:
        """Fresh views of these documents. What a read by ID cannot see is carried over:
        duplicated keys, and entries without any ID (no repair can touch them anyway)."""
        known = [cid for v in views.values() for side in INDEXES for cid in v.side(side)]
        fresh = self.auditor.probe(
            sorted(views), [*known, *(c for v in views.values() for c in v.duplicates)]
        )
        for doc_id, view in fresh.items():
            old = views.get(doc_id)
            view.duplicates = dict(old.duplicates) if old is not None else {}
            for side in INDEXES:
                if old is not None and "" in old.side(side):
                    view.side(side)[""] = old.side(side)[""]
        return fresh

    # --- step 2 and 3: index repairs ---------------------------------------------------------

    def _repair_rounds(self, views: dict[str, DocView], summary: ReconcileSummary, budget: _Budget) -> None:
        for attempt in range(REPAIR_ESCALATIONS_MAX + 1):
            repairs = self._apply_repairs(views, summary, budget, escalate=attempt > 0)
            if not repairs:
                break
            views = self._reread({r.doc_id: _without_duplicates(views[r.doc_id]) for r in repairs})
            views = {d: v for d, v in views.items() if classify(v, self.chunking)}
            if not views:
                break
            summary.escalations += 1
            log.warning("repairs did not stick, escalating", documents=len(views), attempt=attempt + 1)
        summary.remaining = sum(len(classify(v, self.chunking)) for v in views.values())

    def _apply_repairs(
        self, views: dict[str, DocView], summary: ReconcileSummary, budget: _Budget, *, escalate: bool
    ) -> list[DocRepair]:
        planned = self._plan(views, escalate=escalate)
        done: list[DocRepair] = []
        for batch in batched(planned, REPAIR_BATCH_DOCS):
            # The first round names what cannot be repaired; an escalated round plans the same
            # documents again and would name the same chunks once more.
            if not escalate:
                for _, missing in batch:
                    summary.unrepairable += _unrepairable_json(missing)
            repairs = [r for r, _ in batch if r is not None]
            if not repairs:
                continue
            ops = sum(r.ops for r in repairs)
            if not budget.take(ops):
                summary.skipped_for_budget += len(repairs)
                continue
            self.limiter.acquire(ops)
            self._drive(repairs)
            summary.repairs += [r.as_json() for r in repairs]
            summary.ops += ops
            done += repairs
        return done

    def _plan(
        self, views: Mapping[str, DocView], *, escalate: bool
    ) -> list[tuple[DocRepair | None, list[tuple[str, str]]]]:
        # A document whose ledger still disagrees with the source (its re-drive did not fit the
        # budget) has no trustworthy reference yet.
        settled = [v for v in views.values() if not has_ledger_drift(v)]
        texts = self._texts(settled)
        planned = [plan_repair(v, texts, escalate=escalate) for v in settled]
        out = [(r, missing) for r, missing in planned if r is not None or missing]
        for repair in (r for r, _ in out if r is not None):
            self._assert_keeps_source(views[repair.doc_id], repair)
            if repair.bumped:
                log.warning(
                    "repair raises the ledger version",
                    doc_id=repair.doc_id,
                    version=repair.after.version,
                    reason="an index holds this document's chunks at or above the ledger's version",
                )
        return out

    def _assert_keeps_source(self, view: DocView, repair: DocRepair) -> None:
        """Never delete what exists at the source (duplicated keys are deleted to be rewritten)."""
        if view.source is None:
            return
        at_source = set(source_chunks(view.source, self.chunking))
        rewritten = {c.chunk_id for c in repair.rewrites}
        doomed = {d.chunk_id for d in repair.deletes} - rewritten
        assert not doomed & at_source, (
            f"a repair would delete chunks that exist at the source: {doomed & at_source}"
        )

    def _drive(self, repairs: Sequence[DocRepair]) -> None:
        self._prepare_and_drive([(r, r.intent()) for r in repairs])
        rewrites = [(r, r.rewrite_intent()) for r in repairs if r.rewrites]
        self._prepare_and_drive(rewrites)

    def _prepare_and_drive(self, pairs: Sequence[tuple[DocRepair, Intent]]) -> None:
        """The live path: prepare durably, mark the sides that need nothing, drive, commit."""
        if not pairs:
            return
        intents = [i for _, i in pairs]
        self.ledger.prepare(intents)
        for side in INDEXES:
            healthy = [(i.doc_id, i.version) for r, i in pairs if side not in r.sides]
            if healthy:
                self.ledger.mark_done(side, healthy)
        ready = [replace(i, done=frozenset(s for s in INDEXES if s not in r.sides)) for r, i in pairs]
        self.engine.drive(ready)

    def _texts(self, views: Iterable[DocView]) -> dict[str, StoredChunk]:
        """Verified texts for every chunk a repair may write: the source's, else an index's copy."""
        views = list(views)
        texts: dict[str, StoredChunk] = {}
        for view in views:
            texts |= source_copies(view, self.chunking)
        wanted = {cid: ref for v in views for cid, ref in ledger_chunks(v.ledger).items()}
        need = sorted(cid for cid in wanted if cid not in texts)
        for side in INDEXES:
            for part in batched(need, COPY_IDS_PER_READ_MAX):
                for cid, copy in self.indexes[side].get(part).items():
                    if cid not in texts and _verified(copy, wanted[cid]):
                        texts[cid] = copy
            need = [cid for cid in need if cid not in texts]
        return texts


@dataclass
class _Budget:
    """The ``--max-ops`` cap: work is taken whole per batch while it fits."""

    max_ops: int | None
    used: int = 0

    def take(self, ops: int) -> bool:
        if self.max_ops is not None and self.used + ops > self.max_ops:
            return False
        self.used += ops
        return True


def _verified(copy: StoredChunk, want: RefChunk) -> bool:
    """A copy fit to rewrite a chunk from: lockstep wrote it (another writer's copy may carry
    metadata that is not the document's), its text hashes to the reference's hash and its
    metadata digests to the reference's (the index whose metadata was edited is repaired from
    the other one's copy)."""
    if copy.foreign or copy.text is None or content_hash(copy.text) != want.content_hash:
        return False
    return want.metadata_digest is None or metadata_digest(copy.metadata or {}) == want.metadata_digest


def _unrepairable_json(missing: Iterable[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"chunk_id": cid, "reason": reason} for cid, reason in missing]


def _without_duplicates(view: DocView) -> DocView:
    """Duplicated keys are collapsed in the repair round itself; read-backs cannot see them."""
    return replace(view, duplicates={})


def _event_ops(event: ChangeEvent, view: DocView, chunking: ChunkingSettings) -> int:
    if event.op is Op.DELETE:
        return len(INDEXES) * max(1, len(ledger_chunks(view.ledger)))
    assert event.text is not None, "upserts carry text"
    return len(INDEXES) * len(chunk_text(event.text, chunking))


def _event_json(event: ChangeEvent) -> dict[str, Any]:
    return {"doc_id": event.doc_id, "op": event.op.value, "version": event.version}


