"""The read use case: consistent hybrid search over both indexes, fenced by the ledger.

One search:
1. with a consistency token, waits (at most ``consistency_wait_s``) until every change the token
   covers is committed and visible to the keyword engine's searches (``coordinator/consistency.py``);
   past that, ConsistencyTimeout lists what is still pending and nothing is answered;
2. runs the keyword leg (BM25 on the text) and the vector leg (the query embedded through the
   cache, then nearest neighbours) in parallel, each asking for ``window`` hits, each bounded by
   ``leg_timeout_s``; a metadata filter is pushed down to an engine that can filter;
3. reads the ledger once for every candidate's document and serves only the hits it committed
   (``coordinator/fence.py``), counting the others by reason;
4. filters by metadata (where the engine could not), ranks each leg's served hits from 1 and
   fuses them with reciprocal rank fusion (``coordinator/fusion.py``);
5. returns chunks, or documents (best chunk, with its siblings' ranks).

An index that fails (down, too slow) in a hybrid search leaves the other leg's answer, marked
``degraded`` with the failed leg's reason; unless the caller required both legs, or the only leg
asked for failed: then SearchUnavailable. Nothing here reads the clock or sleeps on its own:
both are injected.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import structlog

from coordinator.chunking import content_hash
from coordinator.consistency import ConsistencyToken, Pending, not_committed, not_visible
from coordinator.errors import (
    ConsistencyTimeout,
    EmbedError,
    InvalidSearch,
    SearchUnavailable,
    StoreError,
)
from coordinator.fence import fence, matches
from coordinator.fusion import RRF_K_DEFAULT, Fused, rrf
from coordinator.model import SearchHit
from coordinator.ports import CommittedState, HashedEmbedder, KeywordSearch, MetadataFilter, VectorSearch

log = structlog.get_logger(__name__)

KEYWORD = "keyword"
VECTOR = "vector"

# Hits each leg asks its engine for, by default: the same window on both engines.
WINDOW_DEFAULT = 50
# The most hits (or documents) one search returns, and the largest window a leg may ask for.
K_MAX = 1000
WINDOW_MAX = 10_000
# A search's legs run on a shared pool of this many threads (two per search in flight).
LEG_THREADS_MAX = 32
# A leg is given up this long after its own timeout, if its engine call has not returned (a
# client that does not honour its timeout must not hold the answer).
LEG_GRACE_S = 1.0
# How long a search with a consistency token waits for its changes, by default and at most.
CONSISTENCY_WAIT_S_DEFAULT = 10.0
CONSISTENCY_WAIT_S_MAX = 300.0
# The first pause between two looks at a token's pending changes, doubled up to the second.
CONSISTENCY_POLL_S = 0.02
CONSISTENCY_POLL_MAX_S = 0.5
# A query longer than this is refused (an embedding model truncates far earlier anyway).
QUERY_CHARS_MAX = 10_000
# Pending changes a ConsistencyTimeout lists (it says how many there are in all).
PENDING_LISTED_MAX = 20


class Mode(enum.StrEnum):
    HYBRID = "hybrid"
    KEYWORD = "keyword"
    VECTOR = "vector"


LEGS_OF = {Mode.HYBRID: (KEYWORD, VECTOR), Mode.KEYWORD: (KEYWORD,), Mode.VECTOR: (VECTOR,)}


@dataclass(frozen=True)
class SearchParams:
    """How searches are run (``search`` in the settings)."""

    window: int = WINDOW_DEFAULT
    rrf_k: int = RRF_K_DEFAULT
    keyword_weight: float = 1.0
    vector_weight: float = 1.0
    leg_timeout_s: float = 5.0
    consistency_wait_s: float = CONSISTENCY_WAIT_S_DEFAULT

    @property
    def weights(self) -> dict[str, float]:
        return {KEYWORD: self.keyword_weight, VECTOR: self.vector_weight}


@dataclass(frozen=True)
class SearchRequest:
    query: str
    k: int = 10
    mode: Mode = Mode.HYBRID
    where: MetadataFilter = field(default_factory=dict)
    per_doc: bool = False
    consistent_with: ConsistencyToken | None = None
    # Fail (SearchUnavailable) rather than answer from one leg when the other cannot be searched.
    require_both: bool = False


@dataclass(frozen=True)
class Hit:
    """A served chunk: committed as it reads. ``ranks``: its rank in each leg that found it."""

    chunk_id: str
    doc_id: str
    chunk_index: int
    version: int
    score: float
    ranks: Mapping[str, int]
    text: str
    metadata: Mapping[str, Any]


@dataclass(frozen=True)
class DocHit:
    """A served document: its best chunk (whose score is the document's) and the other chunks
    of it that were found, best first."""

    doc_id: str
    score: float
    best: Hit
    siblings: tuple[Hit, ...]


@dataclass(frozen=True)
class LegReport:
    """What one leg did: ``status`` is ok, failed or off (not asked for)."""

    status: str
    hits: int = 0
    served: int = 0
    error: str = ""


@dataclass(frozen=True)
class SearchResult:
    hits: tuple[Hit, ...]
    docs: tuple[DocHit, ...]
    # Hits not served, by reason (coordinator.fence.FenceReason), and filtered out by metadata.
    fenced: Mapping[str, int]
    filtered: int
    legs: Mapping[str, LegReport]
    # True when a leg the mode asks for failed and the answer comes from the other alone.
    degraded: bool
    # Each configured source's checkpoint, read before the fence's ledger read: every change up
    # to there is committed, and the hits served are the committed state at a later moment.
    checkpoints: Mapping[str, str]
    waited_s: float
    fenced_check: bool = True


@dataclass
class _Leg:
    hits: list[SearchHit] = field(default_factory=list)
    error: str = ""


class SearchService:
    """Searches through both indexes, fenced by ``ledger``; safe to call from many threads."""

    def __init__(
        self,
        *,
        ledger: CommittedState,
        keyword: KeywordSearch,
        vector: VectorSearch,
        embedder: HashedEmbedder,
        params: SearchParams,
        clock: Callable[[], float],
        sleep: Callable[[float], None],
        sources: Sequence[str] = (),
        fenced: bool = True,
    ) -> None:
        """``sources``: whose checkpoints a result reports. ``fenced=False`` is a test-only
        switch that serves whatever the indexes return, to show that the tests catch it."""
        self.ledger = ledger
        self.keyword = keyword
        self.vector = vector
        self.embedder = embedder
        self.params = params
        self.clock = clock
        self.sleep = sleep
        self.sources = tuple(sources)
        self.fenced = fenced
        self._pool = ThreadPoolExecutor(max_workers=LEG_THREADS_MAX, thread_name_prefix="lockstep-search")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def search(self, request: SearchRequest) -> SearchResult:
        check_request(request, self.params)
        legs_wanted = LEGS_OF[request.mode]
        waited_s, keyword_down = self._wait(request, legs_wanted)
        legs = self._run_legs(request, legs_wanted, keyword_down)
        degraded = self._check_legs(request, legs)
        checkpoints = self._checkpoints()
        candidates = [h for leg in legs.values() for h in leg.hits]
        served, fenced = self._fence(candidates)
        return self._result(request, legs, served, fenced, degraded, checkpoints, waited_s)

    # --- read-your-writes ------------------------------------------------------------------

    def _wait(self, request: SearchRequest, legs: Sequence[str]) -> tuple[float, str]:
        """Wait for the token's changes; returns the time waited and, when the keyword index
        could not be asked whether they are visible, why (its leg then counts as failed)."""
        token = request.consistent_with
        if token is None:
            return 0.0, ""
        started = self.clock()
        deadline = started + self.params.consistency_wait_s
        pause = CONSISTENCY_POLL_S
        keyword: KeywordSearch | None = self.keyword if KEYWORD in legs else None
        down = ""
        while True:
            pending, down = self._pending(request, token, keyword, down)
            if down:
                keyword = None
            if not pending:
                return self.clock() - started, down
            now = self.clock()
            if now >= deadline:
                raise _timeout(pending, self.params.consistency_wait_s)
            self.sleep(min(pause, deadline - now))
            pause = min(pause * 2, CONSISTENCY_POLL_MAX_S)

    def _pending(
        self, request: SearchRequest, token: ConsistencyToken, keyword: KeywordSearch | None, down: str
    ) -> tuple[list[Pending], str]:
        """The token's changes still pending, and why the keyword index cannot be asked (if so)."""
        try:
            committed = self.ledger.get_docs(doc_id for doc_id, _ in token.docs)
        except StoreError as exc:
            raise SearchUnavailable(f"cannot read the ledger for the consistency token: {exc}") from exc
        pending = not_committed(token, committed)
        if pending or keyword is None:
            return pending, down
        try:
            return not_visible(token, committed, keyword), down
        except StoreError as exc:
            if not _may_degrade(request):
                raise SearchUnavailable(f"keyword index: {exc}") from exc
            return [], f"keyword index: {exc}"

    # --- the legs --------------------------------------------------------------------------

    def _run_legs(self, request: SearchRequest, legs: Sequence[str], keyword_down: str) -> dict[str, _Leg]:
        window = max(self.params.window, request.k)
        calls = {
            KEYWORD: lambda: self._keyword_hits(request, window),
            VECTOR: lambda: self._vector_hits(request, window),
        }
        futures: dict[str, Future[list[SearchHit]]] = {
            leg: self._pool.submit(calls[leg]) for leg in legs if not (leg == KEYWORD and keyword_down)
        }
        outcome = {leg: self._collect(leg, future) for leg, future in futures.items()}
        if keyword_down:
            outcome[KEYWORD] = _Leg(error=keyword_down)
        return outcome

    def _keyword_hits(self, request: SearchRequest, window: int) -> list[SearchHit]:
        where = request.where if self.keyword.filters_metadata and request.where else None
        return self.keyword.search_hits(request.query, window, where=where, timeout_s=self.params.leg_timeout_s)

    def _vector_hits(self, request: SearchRequest, window: int) -> list[SearchHit]:
        digest = content_hash(request.query)
        vector = self.embedder.embed_hashed([(digest, request.query)])[digest]
        where = request.where if self.vector.filters_metadata and request.where else None
        return self.vector.search_hits(
            vector,
            window,
            where=where,
            strong=request.consistent_with is not None,
            timeout_s=self.params.leg_timeout_s,
        )

    def _collect(self, leg: str, future: Future[list[SearchHit]]) -> _Leg:
        try:
            return _Leg(hits=future.result(timeout=self.params.leg_timeout_s + LEG_GRACE_S))
        except FutureTimeout:
            future.cancel()
            return _Leg(error=f"{leg} index: no answer within {self.params.leg_timeout_s:g} s")
        except (StoreError, EmbedError) as exc:
            return _Leg(error=f"{leg} index: {exc}")

    def _check_legs(self, request: SearchRequest, legs: Mapping[str, _Leg]) -> bool:
        """Whether the answer is degraded; SearchUnavailable when it cannot be given at all."""
        failed = {name: leg.error for name, leg in legs.items() if leg.error}
        if not failed:
            return False
        for name, error in failed.items():
            log.warning("search leg failed", leg=name, error=error)
        if len(failed) == len(legs) or not _may_degrade(request):
            raise SearchUnavailable("; ".join(failed.values()))
        return True

    def _checkpoints(self) -> dict[str, str]:
        found = {name: self.ledger.get_checkpoint(name) for name in self.sources}
        return {name: position for name, position in found.items() if position is not None}

    # --- fence, filter, fuse ---------------------------------------------------------------

    def _fence(self, candidates: Sequence[SearchHit]) -> tuple[list[SearchHit], dict[str, int]]:
        if not self.fenced:
            return list(candidates), {}
        committed = self.ledger.get_docs({h.doc_id for h in candidates})
        result = fence(candidates, committed)
        return list(result.served), {str(reason): n for reason, n in sorted(result.fenced.items())}

    def _result(
        self,
        request: SearchRequest,
        legs: Mapping[str, _Leg],
        served: Sequence[SearchHit],
        fenced: dict[str, int],
        degraded: bool,
        checkpoints: dict[str, str],
        waited_s: float,
    ) -> SearchResult:
        kept = {id(h) for h in served if not request.where or matches(h.metadata, request.where)}
        ranked = {name: _served_ids(leg.hits, kept) for name, leg in legs.items() if not leg.error}
        fused = rrf(ranked, k=self.params.rrf_k, weights=self.params.weights)
        first = _first_served(legs, kept)
        # Per document, every fused chunk may be some document's sibling; otherwise k suffice.
        hits = [_hit(f, first[f.chunk_id]) for f in (fused if request.per_doc else fused[: request.k])]
        docs = collapse(hits) if request.per_doc else []
        return SearchResult(
            hits=tuple(d.best for d in docs[: request.k]) if request.per_doc else tuple(hits[: request.k]),
            docs=tuple(docs[: request.k]),
            fenced=fenced,
            filtered=len(served) - len(kept),
            legs=_reports(request, legs, kept),
            degraded=degraded,
            checkpoints=checkpoints,
            waited_s=waited_s,
            fenced_check=self.fenced,
        )


def check_request(request: SearchRequest, params: SearchParams) -> None:
    """InvalidSearch for a request that no index could answer."""
    if not request.query.strip():
        raise InvalidSearch("the query is empty")
    if len(request.query) > QUERY_CHARS_MAX:
        raise InvalidSearch(f"the query is longer than {QUERY_CHARS_MAX} characters")
    if not 1 <= request.k <= K_MAX:
        raise InvalidSearch(f"k must be within 1..{K_MAX}, got {request.k}")
    if not 1 <= max(params.window, request.k) <= WINDOW_MAX:
        raise InvalidSearch(f"the window must be within 1..{WINDOW_MAX}")
    if request.require_both and request.mode is not Mode.HYBRID:
        raise InvalidSearch("require_both only applies to the hybrid mode")


def collapse(hits: Sequence[Hit]) -> list[DocHit]:
    """Group fused chunks (best first) by document: each document's first chunk is its best,
    documents ordered by it."""
    groups: dict[str, list[Hit]] = {}
    for hit in hits:
        groups.setdefault(hit.doc_id, []).append(hit)
    return [DocHit(doc_id, group[0].score, group[0], tuple(group[1:])) for doc_id, group in groups.items()]


def _may_degrade(request: SearchRequest) -> bool:
    return request.mode is Mode.HYBRID and not request.require_both


def _served_ids(hits: Sequence[SearchHit], kept: set[int]) -> list[str]:
    return [h.chunk_id for h in hits if id(h) in kept]


def _first_served(legs: Mapping[str, _Leg], kept: set[int]) -> dict[str, SearchHit]:
    """The first served hit of each chunk, keyword leg first (all are the committed content)."""
    first: dict[str, SearchHit] = {}
    for name in (KEYWORD, VECTOR):
        for hit in legs[name].hits if name in legs else []:
            if id(hit) in kept:
                first.setdefault(hit.chunk_id, hit)
    return first


def _hit(fused: Fused, hit: SearchHit) -> Hit:
    return Hit(
        chunk_id=fused.chunk_id,
        doc_id=hit.doc_id,
        chunk_index=hit.chunk_index,
        version=hit.version,
        score=fused.score,
        ranks=fused.ranks,
        text=hit.text,
        metadata=hit.metadata,
    )


def _reports(request: SearchRequest, legs: Mapping[str, _Leg], kept: set[int]) -> dict[str, LegReport]:
    reports = {name: LegReport("off") for name in (KEYWORD, VECTOR)}
    for name, leg in legs.items():
        status = "failed" if leg.error else "ok"
        served = sum(id(h) in kept for h in leg.hits)
        reports[name] = LegReport(status, len(leg.hits), served, leg.error)
    return reports


def _timeout(pending: Sequence[Pending], wait_s: float) -> ConsistencyTimeout:
    listed = tuple((p.doc_id, p.version, p.why) for p in pending[:PENDING_LISTED_MAX])
    shown = ", ".join(f"{d}@v{v} ({why})" for d, v, why in listed)
    more = f" and {len(pending) - len(listed)} more" if len(pending) > len(listed) else ""
    return ConsistencyTimeout(
        f"{len(pending)} change(s) of the consistency token not committed and visible after {wait_s:g} s: "
        f"{shown}{more}",
        pending=listed,
    )
