"""The search use case's own logic (legs, fence, fusion, degradation, token waits) over in-memory
stand-ins for the ports; the real engines are in tests/test_search.py."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import pytest

from coordinator.chunking import content_hash
from coordinator.consistency import ConsistencyToken
from coordinator.errors import ConsistencyTimeout, InvalidSearch, SearchUnavailable, TransientStoreError
from coordinator.events import canonical_json
from coordinator.model import ChunkState, DocState, SearchHit, Vector
from coordinator.ports import MetadataFilter
from coordinator.search import Mode, SearchParams, SearchRequest, SearchService


def doc(doc_id: str, version: int, texts: Sequence[str], deleted: bool = False, **metadata: object) -> DocState:
    chunks = tuple(ChunkState(f"{doc_id}:chunk-{i}", i, content_hash(t), version) for i, t in enumerate(texts))
    return DocState(doc_id, version, deleted, chunks, content_hash(canonical_json(metadata)))


def hit(doc_id: str, index: int, version: int, text: str, **metadata: object) -> SearchHit:
    return SearchHit(f"{doc_id}:chunk-{index}", doc_id, 1.0, text, version, index, metadata)


class Ledger:
    def __init__(self, docs: Mapping[str, DocState]) -> None:
        self.docs = dict(docs)
        self.reads = 0

    def get_docs(self, doc_ids: Iterable[str]) -> dict[str, DocState]:
        self.reads += 1
        return {d: self.docs[d] for d in doc_ids if d in self.docs}

    def get_checkpoint(self, source: str) -> str | None:
        return "42" if source == "hook" else None


class Keyword:
    name = "keyword"
    filters_metadata = False

    def __init__(self, hits: list[SearchHit], seen: dict[str, int] | None = None) -> None:
        self.hits = hits
        self.seen = seen or {}
        self.error: Exception | None = None

    def search_hits(
        self, query: str, k: int, *, where: MetadataFilter | None = None, timeout_s: float | None = None
    ) -> list[SearchHit]:
        if self.error is not None:
            raise self.error
        return self.hits[:k]

    def visible(self, chunk_ids: Sequence[str]) -> dict[str, int]:
        if self.error is not None:
            raise self.error
        return {c: self.seen[c] for c in chunk_ids if c in self.seen}

    def close(self) -> None:
        return None


class Vector_:
    name = "vector"
    dim = 2
    filters_metadata = True

    def __init__(self, hits: list[SearchHit]) -> None:
        self.hits = hits
        self.calls: list[tuple[MetadataFilter | None, bool]] = []
        self.error: Exception | None = None

    def search_hits(
        self,
        vector: Vector,
        k: int,
        *,
        where: MetadataFilter | None = None,
        strong: bool = False,
        timeout_s: float | None = None,
    ) -> list[SearchHit]:
        self.calls.append((where, strong))
        if self.error is not None:
            raise self.error
        return self.hits[:k]

    def close(self) -> None:
        return None


class Embedder:
    model_id = "fake"
    dim = 2
    embed_calls = 0
    cache_hits = 0

    def embed_hashed(self, items: Sequence[tuple[str, str]]) -> dict[str, list[float]]:
        return {h: [1.0, 0.0] for h, _ in items}

    def lookup(self, hashes: Iterable[str]) -> dict[str, list[float]]:
        return {}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def service(ledger: Ledger, keyword: Keyword, vector: Vector_, clock: Clock | None = None, **params: float) -> SearchService:
    clock = clock or Clock()
    return SearchService(
        ledger=ledger, keyword=keyword, vector=vector, embedder=Embedder(), params=SearchParams(**params),  # type: ignore[arg-type]
        clock=clock, sleep=clock.sleep, sources=["hook", "other"],
    )


A = doc("a", 2, ["alpha one", "alpha two"], lang="en")
B = doc("b", 1, ["beta"], lang="de")


def test_hybrid_fuses_served_hits_and_reports_what_the_fence_dropped() -> None:
    """Hits the ledger committed are fused by rank; an uncommitted and a deleted one are counted, not served."""
    ledger = Ledger({"a": A, "b": B, "gone": doc("gone", 3, [], deleted=True)})
    keyword = Keyword([hit("a", 0, 3, "alpha one", lang="en"), hit("a", 1, 2, "alpha two", lang="en"),
                       hit("gone", 0, 2, "x")])
    vector = Vector_([hit("b", 0, 1, "beta", lang="de"), hit("a", 1, 2, "alpha two", lang="en")])
    result = service(ledger, keyword, vector).search(SearchRequest("alpha", k=5))
    assert [h.chunk_id for h in result.hits] == ["a:chunk-1", "b:chunk-0"]
    assert dict(result.hits[0].ranks) == {"keyword": 1, "vector": 2}
    assert result.hits[0].score == pytest.approx(1 / 61 + 1 / 62)
    assert result.fenced == {"deleted": 1, "uncommitted": 1}
    assert result.checkpoints == {"hook": "42"} and not result.degraded
    assert ledger.reads == 1, "one batched ledger read per query"
    assert (result.legs["keyword"].hits, result.legs["keyword"].served) == (3, 1)


def test_a_filter_is_pushed_down_where_possible_and_applied_after_the_fence_everywhere() -> None:
    """The vector leg gets the filter; the keyword leg's hits are filtered after the fence, before ranking."""
    ledger = Ledger({"a": A, "b": B})
    keyword = Keyword([hit("b", 0, 1, "beta", lang="de"), hit("a", 0, 2, "alpha one", lang="en")])
    vector = Vector_([hit("a", 1, 2, "alpha two", lang="en")])
    result = service(ledger, keyword, vector).search(SearchRequest("x", where={"lang": "en"}))
    assert vector.calls == [({"lang": "en"}, False)]
    assert [h.chunk_id for h in result.hits] == ["a:chunk-0", "a:chunk-1"]
    assert result.hits[0].ranks == {"keyword": 1}, "ranks count the filtered leg's remaining hits"
    assert result.filtered == 1


def test_per_document_results_keep_the_best_chunk_and_its_siblings() -> None:
    """Collapsed per document: the best chunk leads, the document's other chunks follow with their ranks."""
    ledger = Ledger({"a": A, "b": B})
    keyword = Keyword([hit("a", 0, 2, "alpha one", lang="en"), hit("b", 0, 1, "beta", lang="de"),
                       hit("a", 1, 2, "alpha two", lang="en")])
    result = service(ledger, keyword, Vector_([])).search(SearchRequest("x", k=1, per_doc=True, mode=Mode.KEYWORD))
    assert [(d.doc_id, d.best.chunk_id) for d in result.docs] == [("a", "a:chunk-0")]
    assert [(s.chunk_id, dict(s.ranks)) for s in result.docs[0].siblings] == [("a:chunk-1", {"keyword": 3})]
    assert [h.chunk_id for h in result.hits] == ["a:chunk-0"]


def test_a_failed_leg_degrades_hybrid_unless_both_are_required() -> None:
    """One leg down: the other answers, marked degraded; with require_both, or in that leg's own mode, it fails."""
    ledger = Ledger({"a": A})
    keyword = Keyword([hit("a", 0, 2, "alpha one", lang="en")])
    vector = Vector_([])
    vector.error = TransientStoreError("milvus down", store="milvus")
    search = service(ledger, keyword, vector)
    result = search.search(SearchRequest("x"))
    assert result.degraded and result.legs["vector"].status == "failed"
    assert "milvus down" in result.legs["vector"].error
    assert [h.chunk_id for h in result.hits] == ["a:chunk-0"]
    with pytest.raises(SearchUnavailable, match="milvus down"):
        search.search(SearchRequest("x", require_both=True))
    with pytest.raises(SearchUnavailable):
        search.search(SearchRequest("x", mode=Mode.VECTOR))
    keyword.error = TransientStoreError("keyword down", store="opensearch")
    with pytest.raises(SearchUnavailable, match="keyword down"):
        search.search(SearchRequest("x"))


def test_a_token_waits_for_commit_and_visibility_then_reads_the_vector_leg_strongly() -> None:
    """With a token, the search waits until its change is committed and visible to keyword searches."""
    clock = Clock()
    ledger = Ledger({"a": doc("a", 1, ["alpha one", "alpha two"], lang="en")})
    keyword = Keyword([hit("a", 0, 2, "alpha one", lang="en")], seen={"a:chunk-0": 1, "a:chunk-1": 1})
    vector = Vector_([])
    search = service(ledger, keyword, vector, clock, consistency_wait_s=5.0)
    token = ConsistencyToken.of([("a", 2)])

    def commit_later(seconds: float) -> None:
        clock.now += seconds
        if clock.now >= 1.0:
            ledger.docs["a"] = A
        if clock.now >= 2.0:
            keyword.seen = {"a:chunk-0": 2, "a:chunk-1": 2}

    search.sleep = commit_later
    result = search.search(SearchRequest("alpha", consistent_with=token))
    assert 2.0 <= result.waited_s < 3.0
    assert vector.calls == [(None, True)]
    assert [h.chunk_id for h in result.hits] == ["a:chunk-0"]


def test_a_token_that_never_arrives_times_out_listing_what_is_pending() -> None:
    """Past consistency_wait_s, ConsistencyTimeout names each pending change; nothing is answered."""
    clock = Clock()
    search = service(Ledger({"a": A}), Keyword([]), Vector_([]), clock, consistency_wait_s=3.0)
    token = ConsistencyToken.of([("a", 2), ("late", 7)])
    with pytest.raises(ConsistencyTimeout) as caught:
        search.search(SearchRequest("alpha", consistent_with=token))
    assert caught.value.pending == (("late", 7, "not committed yet"),)
    assert 3.0 <= clock.now < 3.6


def test_requests_no_index_could_answer_are_refused() -> None:
    """An empty query, k out of range and require_both outside hybrid are InvalidSearch."""
    search = service(Ledger({}), Keyword([]), Vector_([]))
    for request in (SearchRequest("  "), SearchRequest("x", k=0), SearchRequest("x", mode=Mode.KEYWORD, require_both=True)):
        with pytest.raises(InvalidSearch):
            search.search(request)
