"""The version-stamped two-phase apply, run synchronously over batches of events.

For a batch of events:
1. bad records and events that cannot be embedded go to the dead-letter queue;
2. events are coalesced per document (latest version wins) and planned against the ledger;
3. vectors for new or changed chunk texts are obtained (cache first, model only on a miss);
4. *prepare*: every intent is written to the ledger durably;
5. *apply*: each side (keyword, vector) receives every intent it does not hold yet, with
   version stamps; a side's success is recorded in the ledger as soon as it returns;
6. *commit*: intents held by both sides become the documents' committed state.
A crash anywhere leaves intents in the ledger; ``recover()`` re-drives them before new work.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace

import structlog

from coordinator import crashpoints
from coordinator.chunking import ChunkingSettings
from coordinator.codec import encode_intent
from coordinator.errors import EmbedError, PermanentEmbedError, RefusedContent, StoreError
from coordinator.events import ChangeEvent, canonical_json, event_to_dict
from coordinator.model import DeadLetter, IndexedChunk
from coordinator.planner import Plan, PlanKind, event_hash, plan
from coordinator.ports import (
    BadRecord,
    ChunkWriter,
    Fence,
    HashedEmbedder,
    Intent,
    Ledger,
    SourceRecord,
    VectorWriter,
)
from coordinator.redact import redact
from coordinator.restore import committed_copies, event_of, plan_restore, touched_ids

KEYWORD = "keyword"
VECTOR = "vector"
SIDES = frozenset({KEYWORD, VECTOR})

# Events of intents prepared here and not yet committed, kept so that a document a store refuses
# is dead-lettered with its whole event. Bounded: an intent driven elsewhere (another writer of
# the ledger committed it) is never collected here, and its event ages out.
PENDING_EVENTS_MAX = 100_000

log = structlog.get_logger(__name__)


def _no_clock() -> float:
    return 0.0


@dataclass
class ApplyStats:
    """Counters of one run; ``sync`` prints them as its JSON summary."""

    events: int = 0
    applied_events: int = 0
    stale_events: int = 0
    conflict_events: int = 0
    coalesced_events: int = 0
    upserted_chunks: int = 0
    rewritten_chunks: int = 0
    deleted_chunks: int = 0
    skipped_chunks: int = 0
    embed_calls: int = 0
    cache_hits: int = 0
    dead_letters: int = 0
    recovered_intents: int = 0
    side_retries: dict[str, int] = field(default_factory=dict)
    side_seconds: dict[str, float] = field(default_factory=dict)
    side_writes: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, int]:
        """The integer counters (per-side figures are reported separately as metrics)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("side_")}


class ApplyEngine:
    """Applies batches of change records to both indexes through the ledger (the ``Engine``
    port for one generation)."""

    def __init__(
        self,
        *,
        ledger: Ledger,
        keyword: ChunkWriter,
        vector: VectorWriter,
        embedder: HashedEmbedder,
        chunking: ChunkingSettings,
        source_name: str,
        crash: crashpoints.CrashHook = crashpoints.no_crash,
        clock: Callable[[], float] = _no_clock,
    ) -> None:
        self.ledger = ledger
        # A monotonic clock for per-index apply latency; the domain never reads time itself.
        self.clock = clock
        self.sides: dict[str, ChunkWriter] = {KEYWORD: keyword, VECTOR: vector}
        self.vector = vector
        self.embedder = embedder
        self.chunking = chunking
        self.source_name = source_name
        self.crash = crash
        self.stats = ApplyStats()
        # A shard may prepare its next batch while this one is driven: counters both touch
        # change under this lock (see ``_count``).
        self._stats_lock = threading.Lock()
        # One thread per side, so the keyword and vector writes of a batch run in parallel.
        self._pool = ThreadPoolExecutor(max_workers=len(SIDES), thread_name_prefix="lockstep-side")
        # (doc_id, version) -> event, for intents prepared here and not yet committed.
        self._events: OrderedDict[tuple[str, int], ChangeEvent] = OrderedDict()
        self._events_lock = threading.Lock()

    # --- entry points ----------------------------------------------------------------------

    def recover(self, fence: Fence | None = None, owns: Callable[[str], bool] | None = None) -> int:
        """Roll prepared intents forward (both sides, then commit); returns how many.

        ``owns`` limits recovery to some documents (a shard recovers only its own)."""
        intents = [i for i in self.pending() if owns is None or owns(i.doc_id)]
        if intents:
            log.info("recovering prepared intents", count=len(intents), phase="recover")
            self.drive(intents, fence)
            self.stats.recovered_intents += len(intents)
        return len(intents)

    def pending(self) -> list[Intent]:
        """Every prepared, not yet committed intent in this engine's ledger."""
        return self.ledger.pending()

    def apply(
        self, records: Sequence[SourceRecord], fence: Fence | None = None, *, skip_conflicts: bool = False
    ) -> list[str]:
        """Apply one batch of records; raises a transient error with nothing lost if a store fails.
        ``skip_conflicts``: documents another writer holds an intent for (or committed past) are
        left out instead of failing the batch; returns their doc_ids (else always empty)."""
        intents, skipped = self._prepare(records, fence, skip_conflicts)
        self.drive(intents, fence)
        return skipped

    def prepare(
        self, records: Sequence[SourceRecord], fence: Fence | None = None, *, skip_conflicts: bool = False
    ) -> list[Intent]:
        """Phase 1: dead-letter bad records, coalesce, plan, embed, and record intents durably.

        Returns the prepared intents; stale and coalesced events are counted and need nothing more."""
        return self._prepare(records, fence, skip_conflicts)[0]

    def prepare_some(
        self, records: Sequence[SourceRecord], fence: Fence | None = None
    ) -> tuple[list[Intent], list[str]]:
        """``prepare``, leaving out (and naming) the documents another writer holds an intent
        for or committed past meanwhile: the caller keeps those waiting and goes on with the rest."""
        return self._prepare(records, fence, True)

    def _prepare(
        self, records: Sequence[SourceRecord], fence: Fence | None, skip_conflicts: bool
    ) -> tuple[list[Intent], list[str]]:
        events = self._dead_letter_bad(records)
        self._count(events=len(records))
        latest = self._coalesce(events)
        plans = self._plan(latest)
        plans = self._embed(plans, {e.doc_id: e for e in latest})
        self.crash(crashpoints.AFTER_EMBED)
        self.stats.rewritten_chunks += sum(len(p.rewrite) for p in plans)
        intents = [p.to_intent() for p in plans]
        self._remember({e.doc_id: e for e in latest}, intents)
        skipped = self.ledger.prepare(intents, fence, skip_conflicts=skip_conflicts)
        self.crash(crashpoints.AFTER_PREPARE)
        if skipped:
            left_out = set(skipped)
            intents = [i for i in intents if i.doc_id not in left_out]
        return intents, skipped

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # --- planning --------------------------------------------------------------------------

    def _dead_letter_bad(self, records: Sequence[SourceRecord]) -> list[ChangeEvent]:
        bad = [r for r in records if isinstance(r, BadRecord)]
        if bad:
            self._dead_letter(
                DeadLetter(
                    self.source_name,
                    b.reason,
                    b.payload,
                    doc_id=b.doc_id,
                    position=b.position,
                    encoding=b.encoding,
                    truncated=b.truncated,
                )
                for b in bad
            )
        return [r for r in records if isinstance(r, ChangeEvent)]

    def _coalesce(self, events: Sequence[ChangeEvent]) -> list[ChangeEvent]:
        """Keep the newest event per document; older ones in the same batch are superseded. A
        second event at the same version with other content is a conflict (dead-lettered)."""
        latest: dict[str, ChangeEvent] = {}
        conflicts: list[ChangeEvent] = []
        for event in events:
            kept = latest.get(event.doc_id)
            if kept is None or event.version > kept.version:
                latest[event.doc_id] = event
            elif event.version == kept.version and event_hash(event) != event_hash(kept):
                conflicts.append(event)
        self._conflicts(conflicts)
        self.stats.coalesced_events += len(events) - len(latest) - len(conflicts)
        return list(latest.values())

    def _plan(self, events: Sequence[ChangeEvent]) -> list[Plan]:
        states = self.ledger.get_docs(e.doc_id for e in events)
        plans = [plan(e, states.get(e.doc_id), self.chunking) for e in events]
        self.stats.stale_events += sum(p.kind is PlanKind.STALE for p in plans)
        by_doc = {e.doc_id: e for e in events}
        self._conflicts([by_doc[p.doc_id] for p in plans if p.kind is PlanKind.CONFLICT])
        return [p for p in plans if p.kind is PlanKind.APPLY]

    def _conflicts(self, events: Sequence[ChangeEvent]) -> None:
        """Events reusing a version with other content: the first one stands, these are refused."""
        if not events:
            return
        self._count(conflict_events=len(events))
        self._dead_letter(
            _letter(
                self.source_name,
                e,
                f"conflict: version {e.version} of {e.doc_id!r} was already seen with other content "
                "(the source reused a version; the first one stands)",
            )
            for e in events
        )

    def _remember(self, events: dict[str, ChangeEvent], intents: Sequence[Intent]) -> None:
        with self._events_lock:
            for intent in intents:
                self._events[(intent.doc_id, intent.version)] = events[intent.doc_id]
            while len(self._events) > PENDING_EVENTS_MAX:
                self._events.popitem(last=False)

    def _forget(self, intents: Iterable[Intent]) -> list[ChangeEvent | None]:
        with self._events_lock:
            return [self._events.pop((i.doc_id, i.version), None) for i in intents]

    # --- embedding -------------------------------------------------------------------------

    def _embed(self, plans: list[Plan], events: dict[str, ChangeEvent]) -> list[Plan]:
        """Make sure every chunk to write has a cached vector; poison documents are dead-lettered."""
        try:
            self._cache_vectors([c for p in plans for c in p.upserts], _rewritten(plans))
            return plans
        except PermanentEmbedError:
            return [p for p in plans if self._embed_one(p, events[p.doc_id])]

    def _embed_one(self, p: Plan, event: ChangeEvent) -> bool:
        try:
            self._cache_vectors(list(p.upserts), _rewritten([p]))
            return True
        except PermanentEmbedError as exc:
            self._dead_letter([_letter(self.source_name, event, f"embedding failed: {exc}")])
            return False

    def _cache_vectors(self, chunks: Sequence[IndexedChunk], rewritten: set[str]) -> dict[str, list[float]]:
        """Vectors for chunks about to be prepared; counts model calls and cache hits.

        Only metadata-only rewrites (``rewritten``) may reuse the vector index's stored copy: a
        new or changed text cannot be there, so asking the index for it is a wasted round trip.
        """
        vectors, hits, embedded = self._vectors(chunks, lambda c: c.chunk_id in rewritten)
        self._count(embed_calls=embedded, cache_hits=hits)
        return vectors

    def _vectors(
        self, chunks: Sequence[IndexedChunk], may_be_stored: Callable[[IndexedChunk], bool] = lambda _c: True
    ) -> tuple[dict[str, list[float]], int, int]:
        """Vectors by content hash: cache, then the vector index's stored copy, then the model.

        Also returns how many distinct hashes the cache answered and how many texts went to the
        model: counted here from what was asked, not from the embedder's running totals, which
        another thread of this engine may move meanwhile."""
        vectors = self.embedder.lookup(c.content_hash for c in chunks)
        hits = len(vectors)
        missing = [c for c in chunks if c.content_hash not in vectors]
        embedded = 0
        if missing:
            stored = self._stored_vectors([c for c in missing if may_be_stored(c)])
            vectors |= stored
            todo = [(c.content_hash, c.text) for c in missing if c.content_hash not in stored]
            vectors |= self.embedder.embed_hashed(todo)
            embedded = len({h for h, _ in todo})
        return vectors, hits, embedded

    def _stored_vectors(self, chunks: Sequence[IndexedChunk]) -> dict[str, list[float]]:
        """Vectors the vector index already holds for these exact texts (same ID, same hash).

        A metadata-only rewrite whose vector fell out of the cache reuses the stored one; a chunk
        whose text changed must never inherit its old text's vector.
        """
        if not chunks:
            return {}
        try:
            held = self.vector.get([c.chunk_id for c in chunks])
        except StoreError as exc:
            # An unreachable vector index must not stop the keyword side: embed instead.
            if not exc.retriable:
                raise
            return {}
        # A row written behind lockstep's back (``foreign``) may carry any vector under a
        # matching hash field: never reused.
        same = [
            c
            for c in chunks
            if (s := held.get(c.chunk_id)) is not None and not s.foreign and s.content_hash == c.content_hash
        ]
        if not same:
            return {}
        try:
            fetched = self.vector.fetch_vectors([c.chunk_id for c in same])
        except StoreError as exc:
            if not exc.retriable:
                raise
            return {}
        return {c.content_hash: fetched[c.chunk_id] for c in same if c.chunk_id in fetched}

    # --- apply and commit ------------------------------------------------------------------

    def drive(self, intents: Sequence[Intent], fence: Fence | None = None) -> None:
        """Bring every intent to both sides in parallel, record each side's success as soon as it
        returns, then commit what both hold. If a side fails, the other side's progress is kept
        and the failure is raised: the intents stay prepared for the caller to retry.

        A document a store refuses for good is dead-lettered, and its intent replaced (in the
        same ledger transaction) by one that brings both indexes back to the document's committed
        state (``coordinator/restore.py``), driven here too: no ghost and no pending intent is
        left, and the rest of the batch commits as usual."""
        if not intents:
            return
        outcomes = list(
            self._pool.map(lambda side: self._apply_side(side, intents, fence), (KEYWORD, VECTOR))
        )
        refused = {d: r for refusals, _ in outcomes for d, r in refusals.items()}
        restores = self._refuse(intents, refused, fence)
        failures = [exc for _, exc in outcomes if exc is not None]
        if failures:
            raise failures[0]
        live = [i for i in intents if i.doc_id not in refused]
        committed = self.ledger.commit([(i.doc_id, i.version) for i in live], SIDES, fence)
        if committed != len(live):
            self._check_committed_elsewhere(live)
        self._count_committed([i for i in live if not i.restores])
        self._forget(live)
        self.crash(crashpoints.AFTER_COMMIT)
        self.drive(restores, fence)

    def _check_committed_elsewhere(self, intents: Sequence[Intent]) -> None:
        """Intents whose commit found no intent left were committed by another writer of this
        ledger (a rebuild's backfill and the live service share a new generation's ledger; a
        recovery may drive an intent its preparer is still driving). Anything else is a bug."""
        states = self.ledger.get_docs([i.doc_id for i in intents])
        lost = [
            f"{i.doc_id}@v{i.version}"
            for i in intents
            if (state := states.get(i.doc_id)) is None or state.version < i.version
        ]
        if lost:
            raise AssertionError(f"intents held by both sides but neither committed nor superseded: {lost[:10]}")

    def _apply_side(
        self, side: str, intents: Sequence[Intent], fence: Fence | None
    ) -> tuple[dict[str, str], Exception | None]:
        """Write one side; returns (rejected doc -> reason, transient failure or None)."""
        todo = [i for i in intents if side not in i.done]
        if not todo:
            return {}, None
        try:
            started = self.clock()
            refused = self._write_side(side, todo)
            self.stats.side_seconds[side] = self.stats.side_seconds.get(side, 0.0) + self.clock() - started
            self.stats.side_writes[side] = self.stats.side_writes.get(side, 0) + 1
            self.ledger.mark_done(
                side, [(i.doc_id, i.version) for i in todo if i.doc_id not in refused], fence
            )
        except (StoreError, EmbedError) as exc:
            if not exc.retriable:
                raise
            self.stats.side_retries[side] = self.stats.side_retries.get(side, 0) + 1
            log.warning(
                "side failed; intents stay prepared",
                side=side,
                intents=len(todo),
                error=str(exc),
                phase="apply",
            )
            return {}, exc
        self.crash(crashpoints.AFTER_KEYWORD_APPLY if side == KEYWORD else crashpoints.AFTER_VECTOR_APPLY)
        return refused, None

    def _write_side(self, side: str, todo: Sequence[Intent]) -> dict[str, str]:
        """Write one side; returns the documents it refused, with the reason. A request refused
        for its content as a whole is split in halves until the refused documents are found."""
        try:
            return self._write_requests(side, todo)
        except RefusedContent as exc:
            if len(todo) == 1:
                return {todo[0].doc_id: f"{side} index refused: {exc}"}
            half = len(todo) // 2
            return self._write_side(side, todo[:half]) | self._write_side(side, todo[half:])

    def _write_requests(self, side: str, todo: Sequence[Intent]) -> dict[str, str]:
        index = self.sides[side]
        upserts = [c for i in todo for c in i.upserts]
        if side == VECTOR and upserts:
            vectors, _, embedded = self._vectors(upserts)
            self._count(embed_calls=embedded)
            upserts = [replace(c, vector=vectors[c.content_hash]) for c in upserts]
        owner = {cid: i.doc_id for i in todo for cid in touched_ids(i)}
        results = index.upsert(upserts).rejected() if upserts else []
        # A document whose upserts this side refused gets none of its deletes either: the chunks
        # they would remove are the committed copies that its restore brings back from.
        refused = {owner[r.chunk_id] for r in results}
        deletes = [d for i in todo if i.doc_id not in refused for d in i.deletes]
        results += index.delete(deletes).rejected() if deletes else []
        return {owner[r.chunk_id]: f"{side} index refused {r.chunk_id!r}: {r.reason}" for r in results}

    def _refuse(self, intents: Sequence[Intent], reasons: dict[str, str], fence: Fence | None) -> list[Intent]:
        """Dead-letter the documents a side refused for good and replace their intents with ones
        restoring both sides (returned, to be driven). A restoring intent refused in turn is
        dropped, with an error: what it could not restore is left for ``reconcile``."""
        if not reasons:
            return []
        doomed = [i for i in intents if i.doc_id in reasons]
        failed = [i for i in doomed if i.restores]
        if failed:
            self.ledger.abort([(i.doc_id, i.version) for i in failed])
            for i in failed:
                log.error("could not restore a refused document; run `lockstep reconcile`",
                          doc_id=i.doc_id, version=i.version, reason=redact(reasons[i.doc_id]), phase="restore")
        refused = [i for i in doomed if not i.restores]
        if not refused:
            return []
        events = self._forget(refused)
        restores = self._restores(refused)
        self.ledger.replace_intents(restores, fence)
        self._dead_letter(self._refusal_letter(i, e, reasons[i.doc_id]) for i, e in zip(refused, events, strict=True))
        return restores

    def _restores(self, refused: Sequence[Intent]) -> list[Intent]:
        committed = self.ledger.get_docs(i.doc_id for i in refused)
        ids = [cid for i in refused for cid in touched_ids(i)]
        held = [self.sides[side].get(ids) for side in (KEYWORD, VECTOR)]
        restores: list[Intent] = []
        for intent in refused:
            state = committed.get(intent.doc_id)
            restore, missing = plan_restore(intent, state, committed_copies(state, held))
            if missing:
                log.error("no copy left of committed chunks of a refused document; run `lockstep reconcile`",
                          doc_id=intent.doc_id, version=intent.version, chunks=missing[:10], phase="restore")
            restores.append(restore)
        return restores

    def _refusal_letter(self, intent: Intent, event: ChangeEvent | None, reason: str) -> DeadLetter:
        event = event or event_of(intent, self.chunking)
        if event is not None:
            return _letter(self.source_name, event, reason)
        note = " (prepared before a restart: the letter holds the chunks it would have written)"
        return DeadLetter(
            self.source_name, reason + note, encode_intent(intent), doc_id=intent.doc_id, version=intent.version
        )

    def _count_committed(self, intents: Sequence[Intent]) -> None:
        self.stats.applied_events += len(intents)
        for i in intents:
            self.stats.upserted_chunks += len(i.upserts)
            self.stats.deleted_chunks += len(i.deletes)
            written = {c.chunk_id for c in i.upserts}
            self.stats.skipped_chunks += sum(c.chunk_id not in written for c in i.after.chunks)

    def dead_letter_event(self, event: ChangeEvent, reason: str, attempts: int) -> None:
        """Give up on one event (a poison document): it goes to the DLQ with its reason."""
        self._dead_letter([replace(_letter(self.source_name, event, reason), attempts=attempts)])
        self._count(events=1)

    def _count(self, **deltas: int) -> None:
        """Add to counters that a prepare and a drive running side by side may both change."""
        with self._stats_lock:
            for name, delta in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + delta)

    def _dead_letter(self, letters: Iterable[DeadLetter]) -> None:
        batch = [replace(letter, reason=redact(letter.reason)) for letter in letters]
        added = self.ledger.add_dead_letters(batch)
        self._count(dead_letters=len(added))
        for letter in added:
            log.warning(
                "dead-lettered",
                doc_id=letter.doc_id,
                version=letter.version,
                reason=letter.reason,
                phase="dead_letter",
            )


def _rewritten(plans: Sequence[Plan]) -> set[str]:
    return {c.chunk_id for p in plans for c in p.rewrite}


def _letter(source: str, event: ChangeEvent, reason: str) -> DeadLetter:
    """A dead letter holding the whole event (text and metadata) and where it came from."""
    return DeadLetter(
        source,
        reason,
        canonical_json(event_to_dict(event)),
        doc_id=event.doc_id,
        version=event.version,
        position=event.position,
    )
