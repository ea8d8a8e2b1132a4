"""KeywordIndex contract: one suite for every keyword adapter, against real stores.

Backends: Tantivy (a directory), OpenSearch (osmem-server, the OpenSearch API), Elasticsearch
(elasticsearch-py through the EsCompatProxy in front of osmem-server) and, only when
LOCKSTEP_TEST_ES_URL is set, a real Elasticsearch. Every test gets a fresh, uniquely named index.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog
import tantivy
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from opensearchpy import OpenSearch

from adapters.keyword._search_engine import RETRY_ATTEMPTS_MAX, SearchEngineIndex, stored_chunk
from adapters.keyword.elasticsearch import ElasticsearchKeywordIndex
from adapters.keyword.es_compat_proxy import EsCompatProxy, ProxyRequest, Reply
from adapters.keyword.opensearch import OpenSearchKeywordIndex
from adapters.keyword.settings import KeywordSettings
from adapters.keyword.tantivy_index import READER_RELOAD_S, TantivyKeywordIndex
from adapters.keyword.tantivy_index import alias_target as tantivy_alias_target
from adapters.keyword.tantivy_index import point_alias as tantivy_point_alias
from coordinator.errors import PermanentStoreError, TransientStoreError
from coordinator.fence import metadata_digest
from coordinator.model import NO_VERSION, ChunkDelete, IndexedChunk, ItemStatus, StoredChunk
from coordinator.ports import AliasedIndex, AliasedKeywordIndex, KeywordIndex, KeywordSearch
from tests.support.aliased_contract import check_aliased_index

APPLIED, SUPERSEDED, REJECTED = ItemStatus.APPLIED, ItemStatus.SUPERSEDED, ItemStatus.REJECTED

# More than one page for every scan implementation (Tantivy windows, PIT pages, scroll pages).
SCAN_CHUNKS = 2_500
# The raw clients that write foreign documents: a request's timeout, and the Tantivy writer's
# heap (tantivy needs at least 15 MB per indexing thread).
RAW_TIMEOUT_S = 30
RAW_TANTIVY_HEAP_BYTES = 16 * 1024 * 1024

MakeIndex = Callable[[str], AliasedKeywordIndex]

BACKENDS = [
    "tantivy",
    "opensearch",
    "elasticsearch",
    pytest.param("elasticsearch-real", marks=pytest.mark.elasticsearch_real),
]
ENGINES = BACKENDS[1:]


def unique_name() -> str:
    return f"kw-{uuid.uuid4().hex[:12]}"


def chunk(chunk_id: str, version: int, text: str = "alpha beta", **extra: Any) -> IndexedChunk:
    fields: dict[str, Any] = {
        "doc_id": chunk_id.split(":")[0],
        "chunk_index": 0,
        "content_hash": f"hash-{chunk_id}-{version}",
        "metadata": {"version": version},
    }
    return IndexedChunk(chunk_id=chunk_id, text=text, version=version, **(fields | extra))


def stored(c: IndexedChunk) -> StoredChunk:
    return StoredChunk(
        c.chunk_id, c.doc_id, c.chunk_index, c.content_hash, c.version, c.text, dict(c.metadata)
    )


def no_sleep(delay_s: float) -> None:
    """Retries in tests need not wait: the fault is scripted, not a server recovering."""


# --- backends ------------------------------------------------------------------------------


def engine_settings(request: pytest.FixtureRequest, backend: str, name: str) -> KeywordSettings:
    """Settings for a search-engine backend (starting its server through the fixtures)."""
    if backend == "opensearch":
        return KeywordSettings(
            kind="opensearch", url=request.getfixturevalue("opensearch_api_url"), index=name
        )
    if backend == "elasticsearch":
        proxy: EsCompatProxy = request.getfixturevalue("es_compat_proxy")
        return KeywordSettings(kind="elasticsearch", url=proxy.url, index=name)
    return KeywordSettings(kind="elasticsearch", url=request.getfixturevalue("real_es_url"), index=name)


def build_engine(settings: KeywordSettings, **kwargs: Any) -> SearchEngineIndex:
    if settings.kind == "opensearch":
        return OpenSearchKeywordIndex(settings, **kwargs)
    return ElasticsearchKeywordIndex(settings, **kwargs)


@pytest.fixture(params=BACKENDS)
def make_index(request: pytest.FixtureRequest, tmp_path: Path) -> MakeIndex:
    """Builds an adapter (not yet ensured) for the index of a given name, on one backend."""
    backend: str = request.param
    if backend == "tantivy":
        return lambda name: TantivyKeywordIndex(str(tmp_path / name), name)
    return lambda name: build_engine(engine_settings(request, backend, name))


@pytest.fixture
def index(make_index: MakeIndex) -> Iterator[KeywordIndex]:
    ix = make_index(unique_name())
    ix.ensure()
    yield ix
    ix.drop()
    ix.close()


# --- the contract --------------------------------------------------------------------------


def test_adapter_implements_the_port(index: KeywordIndex) -> None:
    """Every adapter is structurally a KeywordIndex."""
    assert isinstance(index, KeywordIndex)


def test_ensure_is_idempotent_and_keeps_data(index: KeywordIndex) -> None:
    """Calling ensure on an existing index neither fails nor loses what it holds."""
    c = chunk("d:0", 1)
    index.upsert([c])
    index.ensure()
    index.ensure()
    assert index.get(["d:0"]) == {"d:0": stored(c)}


def test_upsert_then_get_returns_exact_fields(index: KeywordIndex) -> None:
    """A written chunk reads back, in real time, with every field exactly as written."""
    c = chunk(
        "doc-1:3",
        7,
        text='Ünïcode text — with "quotes", tabs\tand\nnewlines 🎉',
        chunk_index=3,
        metadata={"title": "Straße", "tags": ["a", "b"], "nested": {"n": 1, "f": 0.5, "none": None}},
    )
    result = index.upsert([c])
    assert [(i.chunk_id, i.status) for i in result.items] == [("doc-1:3", APPLIED)]
    assert index.get(["doc-1:3", "absent"]) == {"doc-1:3": stored(c)}


def test_newer_version_overwrites(index: KeywordIndex) -> None:
    """An upsert with a higher version replaces the chunk."""
    index.upsert([chunk("d:0", 1, "old words")])
    newer = chunk("d:0", 2, "new words")
    assert index.upsert([newer]).items[0].status is APPLIED
    assert index.get(["d:0"]) == {"d:0": stored(newer)}


@pytest.mark.parametrize("version", [5, 4, 0])
def test_equal_or_older_upsert_is_superseded_and_changes_nothing(index: KeywordIndex, version: int) -> None:
    """An upsert whose version is not strictly above the stored one is SUPERSEDED and ignored."""
    current = chunk("d:0", 5, "current words")
    index.upsert([current])
    result = index.upsert([chunk("d:0", version, "stale words")])
    assert result.items[0].status is SUPERSEDED
    assert index.get(["d:0"]) == {"d:0": stored(current)}


def test_delete_with_higher_version_removes(index: KeywordIndex) -> None:
    """A delete above the stored version removes the chunk from every read."""
    index.upsert([chunk("d:0", 1, "unique zebra"), chunk("d:1", 1)])
    assert index.delete([ChunkDelete("d:0", 2)]).items[0].status is APPLIED
    assert index.get(["d:0"]) == {}
    assert index.count() == 1
    assert [c.chunk_id for c in index.scan()] == ["d:1"]
    assert index.search("zebra", 10) == []


@pytest.mark.parametrize("version", [3, 2])
def test_equal_or_older_delete_is_superseded_and_keeps_chunk(index: KeywordIndex, version: int) -> None:
    """A delete whose version is not above the stored one is SUPERSEDED and the chunk stays."""
    current = chunk("d:0", 3)
    index.upsert([current])
    assert index.delete([ChunkDelete("d:0", version)]).items[0].status is SUPERSEDED
    assert index.get(["d:0"]) == {"d:0": stored(current)}


def test_late_older_upsert_after_delete_is_superseded(index: KeywordIndex) -> None:
    """The delete's version is remembered, so an older upsert arriving later cannot resurrect it.

    (ES/OpenSearch remember it only for index.gc_deletes, 60 s by default; this test is quicker.)
    """
    index.upsert([chunk("d:0", 1)])
    index.delete([ChunkDelete("d:0", 3)])
    assert index.upsert([chunk("d:0", 2)]).items[0].status is SUPERSEDED
    assert index.upsert([chunk("d:0", 3)]).items[0].status is SUPERSEDED
    assert index.get(["d:0"]) == {}
    assert index.count() == 0
    newer = chunk("d:0", 4)
    assert index.upsert([newer]).items[0].status is APPLIED
    assert index.get(["d:0"]) == {"d:0": stored(newer)}


def test_delete_of_missing_id_is_applied_and_versioned(index: KeywordIndex) -> None:
    """Deleting a chunk that was never written succeeds and still blocks older upserts."""
    assert index.delete([ChunkDelete("ghost:0", 5)]).items[0].status is APPLIED
    assert index.upsert([chunk("ghost:0", 4)]).items[0].status is SUPERSEDED
    assert index.get(["ghost:0"]) == {}
    assert index.count() == 0


def test_results_follow_input_order_with_mixed_outcomes(index: KeywordIndex) -> None:
    """One call returns one result per item, in input order, each with its own outcome."""
    index.upsert([chunk("a:0", 5), chunk("b:0", 5)])
    result = index.upsert([chunk("c:0", 1), chunk("a:0", 4), chunk("b:0", 6)])
    assert [(i.chunk_id, i.status) for i in result.items] == [
        ("c:0", APPLIED),
        ("a:0", SUPERSEDED),
        ("b:0", APPLIED),
    ]
    deleted = index.delete([ChunkDelete("b:0", 6), ChunkDelete("a:0", 6)])
    assert [(i.chunk_id, i.status) for i in deleted.items] == [("b:0", SUPERSEDED), ("a:0", APPLIED)]


def test_rejected_items_surface_as_rejected_and_others_apply(index: KeywordIndex) -> None:
    """Items the store refuses for good come back REJECTED with a reason; the rest of the call applies.

    chunk_index above the mapping's integer range is refused by the engine itself (a per-item
    mapper error); an ID over 512 bytes would fail a whole _bulk request, so the adapters refuse it
    before sending. Tantivy refuses both the same way, so every backend accepts the same chunks.
    """
    good = chunk("ok:0", 1)
    too_big = chunk("big:0", 1, chunk_index=2**31)
    long_id = chunk("x" * 600, 1)
    result = index.upsert([too_big, good, long_id])
    assert [(i.chunk_id, i.status) for i in result.items] == [
        ("big:0", REJECTED),
        ("ok:0", APPLIED),
        ("x" * 600, REJECTED),
    ]
    assert all(i.reason for i in result.rejected())
    assert index.get(["ok:0", "big:0"]) == {"ok:0": stored(good)}
    assert index.delete([ChunkDelete("y" * 600, 1)]).items[0].status is REJECTED


def test_one_call_must_not_name_a_chunk_twice(index: KeywordIndex) -> None:
    """Two items for one chunk ID in a call is a caller bug and raises before anything is written."""
    with pytest.raises(ValueError, match="twice"):
        index.upsert([chunk("d:0", 1), chunk("d:0", 2)])
    assert index.get(["d:0"]) == {}


def test_scan_returns_every_live_chunk_exactly_once(index: KeywordIndex) -> None:
    """A scan over several pages yields each live chunk once, and no deleted one."""
    chunks = [
        chunk(f"doc{i // 5}:{i % 5}", 1, f"text number {i}", chunk_index=i % 5) for i in range(SCAN_CHUNKS)
    ]
    index.upsert(chunks)
    deleted = {c.chunk_id for c in chunks[::25]}
    index.delete([ChunkDelete(chunk_id, 2) for chunk_id in sorted(deleted)])
    live = {c.chunk_id: c for c in chunks if c.chunk_id not in deleted}

    scanned = list(index.scan())
    assert len(scanned) == len(live)
    assert {s.chunk_id: s for s in scanned} == {
        cid: StoredChunk(
            c.chunk_id, c.doc_id, c.chunk_index, c.content_hash, c.version, None, dict(c.metadata)
        )
        for cid, c in live.items()
    }
    with_text = {s.chunk_id: s.text for s in index.scan(with_text=True)}
    assert with_text == {cid: c.text for cid, c in live.items()}
    assert index.count() == len(live)


def test_count_follows_writes_and_deletes(index: KeywordIndex) -> None:
    """count is the number of live chunks right after each write, tombstones excluded."""
    assert index.count() == 0
    index.upsert([chunk(f"d:{i}", 1) for i in range(10)])
    assert index.count() == 10
    index.delete([ChunkDelete("d:0", 2), ChunkDelete("d:1", 2), ChunkDelete("missing:0", 2)])
    assert index.count() == 8
    index.upsert([chunk("d:2", 3)])
    assert index.count() == 8


def test_search_finds_by_keyword_with_bm25_ranking(index: KeywordIndex) -> None:
    """search returns the chunks matching a keyword, best first, with doc_id and text."""
    index.upsert(
        [
            chunk("a:0", 1, "the quick brown fox jumps over the lazy dog"),
            chunk("b:0", 1, "fox fox fox: a very foxy story"),
            chunk("c:0", 1, "nothing relevant here"),
        ]
    )
    hits = index.search("fox", 10)
    assert [h.chunk_id for h in hits] == ["b:0", "a:0"]
    assert hits[0].score >= hits[1].score > 0
    assert (hits[1].doc_id, hits[1].text) == ("a", "the quick brown fox jumps over the lazy dog")
    assert [h.chunk_id for h in index.search("Lazy Story", 1)] in (["a:0"], ["b:0"])
    assert index.search("absent", 10) == []
    assert index.search("", 10) == []


def test_read_path_hits_carry_what_the_fence_checks(index: KeywordIndex) -> None:
    """search_hits returns each hit's own version, chunk index and metadata as written (the
    metadata hashing to the same canonical digest), and never filters in the engine."""
    meta = {"lang": "ü", "n": 3, "ratio": 0.25, "tags": ["a", "b"], "deep": {"x": None}}
    index.upsert([chunk("a:0", 7, "the quick fox", chunk_index=2, metadata=meta), chunk("b:0", 1, "slow dog")])
    index.search("fox", 1)  # makes the writes visible to searches on every backend
    assert isinstance(index, KeywordSearch) and not index.filters_metadata
    [hit] = index.search_hits("fox", 10)
    assert (hit.chunk_id, hit.doc_id, hit.version, hit.chunk_index) == ("a:0", "a", 7, 2)
    assert dict(hit.metadata) == meta and metadata_digest(hit.metadata) == metadata_digest(meta)
    assert index.search_hits("fox", 10, where={"lang": "de"}) == [hit]
    assert index.search_hits("", 10) == []


def test_visible_reports_what_searches_see(index: KeywordIndex) -> None:
    """visible gives the version a search sees of each live chunk; deleted and unknown IDs are absent."""
    index.upsert([chunk("v:0", 3), chunk("v:1", 4), chunk("gone:0", 1)])
    index.delete([ChunkDelete("gone:0", 2)])
    index.search("alpha", 1)
    assert isinstance(index, KeywordSearch)
    assert index.visible(["v:0", "v:1", "gone:0", "never:0"]) == {"v:0": 3, "v:1": 4}
    index.upsert([chunk("v:0", 9)])
    index.search("alpha", 1)
    assert index.visible(["v:0"]) == {"v:0": 9}


def test_a_tantivy_reader_sees_another_writers_commits_within_its_reload_interval(tmp_path: Path) -> None:
    """A reader that never writes picks up another writer's commits on its own, within
    READER_RELOAD_S, without anyone refreshing it."""
    path = str(tmp_path / "shared")
    writer = TantivyKeywordIndex(path, "kw")
    writer.ensure()
    writer.upsert([chunk("w:0", 1, "first words")])
    reader = TantivyKeywordIndex(path, "kw")
    assert [h.chunk_id for h in reader.search_hits("first", 5)] == ["w:0"]
    writer.upsert([chunk("w:1", 1, "second words")])
    assert reader.visible(["w:1"]) == {}, "a reader reloads at most every READER_RELOAD_S"
    time.sleep(READER_RELOAD_S + 0.1)
    assert reader.visible(["w:1"]) == {"w:1": 1}
    assert [h.chunk_id for h in reader.search_hits("second", 5)] == ["w:1"]
    reader.close()
    writer.close()


def test_a_new_adapter_on_the_same_index_sees_the_data(make_index: MakeIndex) -> None:
    """Closing an adapter and opening another on the same index keeps chunks and tombstones."""
    name = unique_name()
    first = make_index(name)
    first.ensure()
    first.upsert([chunk("d:0", 1), chunk("d:1", 1)])
    first.delete([ChunkDelete("d:1", 5)])
    first.close()
    second = make_index(name)
    try:
        second.ensure()
        assert set(second.get(["d:0", "d:1"])) == {"d:0"}
        assert second.upsert([chunk("d:1", 4)]).items[0].status is SUPERSEDED
        assert second.count() == 1
    finally:
        second.drop()
        second.close()


# --- foreign data: documents another writer put in the index ------------------------------


def write_foreign_documents(request: pytest.FixtureRequest, index: KeywordIndex) -> dict[str, int]:
    """Two documents written with the raw client, not through lockstep; returns the version the
    engine holds for each. ``stray``'s body has no lockstep field but a text; ``d:chunk-1``'s
    body names another chunk_id and version 1, is held at version 7 and has a metadata array."""
    if isinstance(index, TantivyKeywordIndex):
        write_foreign_tantivy_documents(str(index.path))
        return {"stray": NO_VERSION, "d:chunk-1": 7}
    backend = request.node.callspec.params["make_index"]
    url = request.getfixturevalue("real_es_url" if backend == "elasticsearch-real" else "opensearch_api_url")
    client = OpenSearch(url, timeout=RAW_TIMEOUT_S)
    try:
        client.index(index=index.name, id="stray", body={"text": "written by hand"})
        body = {"chunk_id": "d:chunk-9", "doc_id": "d", "chunk_index": 1, "text": "by hand",
                "content_hash": "h", "version": 1, "metadata": [1]}  # fmt: skip
        client.index(index=index.name, id="d:chunk-1", body=body, version=7, version_type="external")
    finally:
        client.close()
    # Internal versioning starts a new document at _version 1.
    return {"stray": 1, "d:chunk-1": 7}


def write_foreign_tantivy_documents(path: str, *, without_id: bool = False) -> None:
    """The tantivy binding's version of the same two (``stray`` without version, seq or deleted
    flag), plus, if asked, one document that has no chunk_id at all."""
    raw = tantivy.Index.open(path)
    # The index's text field names this analyzer; any analyzer under that name lets us write.
    raw.register_tokenizer("lockstep_text", tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple()).build())
    writer = raw.writer(heap_size=RAW_TANTIVY_HEAP_BYTES, num_threads=1)
    stray = tantivy.Document()
    stray.add_text("chunk_id", "stray")
    stray.add_text("text", "written by hand")
    odd = tantivy.Document()
    odd.add_text("chunk_id", "d:chunk-1")
    odd.add_text("doc_id", "d")
    odd.add_integer("chunk_index", 1)
    odd.add_text("text", "by hand")
    odd.add_text("content_hash", "h")
    odd.add_integer("version", 7)
    odd.add_bytes("metadata", b"[1]")
    odd.add_boolean("deleted", False)
    odd.add_integer("seq", 5_000)
    nameless = tantivy.Document()
    nameless.add_text("text", "no id at all")
    for doc in (stray, odd, *((nameless,) if without_id else ())):
        writer.add_document(doc)
    writer.commit()
    writer.wait_merging_threads()


def test_foreign_documents_are_read_under_the_engines_id_and_version_and_deleted_at_it(
    request: pytest.FixtureRequest, make_index: MakeIndex
) -> None:
    """Documents another writer put in the index are read by scan, get, count and search without
    error, under the engine's own ID and version and marked foreign; a delete below that version
    is superseded, one at it (overwrite-equal, as reconcile sends) removes them."""
    name = unique_name()
    first = make_index(name)
    first.ensure()
    ours = chunk("d:chunk-0", 3)
    first.upsert([ours])
    first.close()
    versions = write_foreign_documents(request, first)
    index = make_index(name)
    try:
        index.ensure()
        scanned = {c.chunk_id: c for c in index.scan(with_text=True)}
        assert set(scanned) == {"d:chunk-0", "stray", "d:chunk-1"}
        assert scanned["d:chunk-0"] == stored(ours) and not scanned["d:chunk-0"].foreign
        assert {cid: scanned[cid].version for cid in versions} == versions
        assert all(scanned[cid].foreign for cid in versions), scanned
        assert index.get(["stray", "d:chunk-1", "d:chunk-0"]) == scanned
        assert {c.chunk_id for c in index.scan()} == set(scanned)
        assert index.count() == 3
        assert {h.chunk_id for h in index.search("hand", 10)} == {"stray", "d:chunk-1"}
        assert index.delete([ChunkDelete("d:chunk-1", 6)]).items[0].status is SUPERSEDED
        removed = index.delete(
            [ChunkDelete(cid, max(v, 0), overwrite_equal=True) for cid, v in versions.items()]
        )
        assert [i.status for i in removed.items] == [APPLIED, APPLIED]
        assert [c.chunk_id for c in index.scan()] == ["d:chunk-0"] and index.count() == 1
    finally:
        index.drop()
        index.close()


def test_a_tantivy_document_without_a_chunk_id_is_read_as_foreign_under_no_id(tmp_path: Path) -> None:
    """A Tantivy document with no chunk_id at all is scanned (not skipped, not a crash) as a
    foreign entry under the empty ID, which no write can address."""
    index = TantivyKeywordIndex(str(tmp_path / "kw"), "kw")
    index.ensure()
    index.upsert([chunk("d:chunk-0", 3)])
    index.close()
    write_foreign_tantivy_documents(str(tmp_path / "kw"), without_id=True)
    index = TantivyKeywordIndex(str(tmp_path / "kw"), "kw")
    try:
        scanned = list(index.scan(with_text=True))
        nameless = [c for c in scanned if not c.chunk_id]
        assert len(scanned) == 4 == index.count()
        assert len(nameless) == 1 and "chunk_id" in nameless[0].foreign
        assert nameless[0].text == "no id at all"
        assert index.delete([ChunkDelete("", 1)]).items[0].status is REJECTED
    finally:
        index.drop()
        index.close()


def test_a_hit_without_the_engines_version_is_an_error_not_a_foreign_document() -> None:
    """A hit lacking _version (an engine that ignored version: true) fails the read: read as a
    versionless foreign document, it would be deleted by reconcile."""
    body = {"chunk_id": "d:chunk-0", "doc_id": "d", "chunk_index": 0, "content_hash": "h", "version": 2}
    hit = {"_id": "d:chunk-0", "_source": body}
    assert stored_chunk(hit | {"_version": 2}, with_text=False, store="opensearch").foreign == ""
    assert "is not its _version 3" in stored_chunk(hit | {"_version": 3}, with_text=False, store="x").foreign
    with pytest.raises(PermanentStoreError, match="without its _version"):
        stored_chunk(hit, with_text=False, store="opensearch")


def test_tantivy_index_survives_a_process_restart(tmp_path: Path) -> None:
    """Data and tombstones committed by one process are read (and gate writes) in the next."""
    path = tmp_path / "kw"
    script = textwrap.dedent(
        f"""
        from adapters.keyword.tantivy_index import READER_RELOAD_S, TantivyKeywordIndex
        from coordinator.model import ChunkDelete, IndexedChunk
        ix = TantivyKeywordIndex({str(path)!r}, "kw")
        ix.ensure()
        ix.upsert([IndexedChunk("d:0", "d", 0, "persisted words", "h0", 3), IndexedChunk("d:1", "d", 1, "x", "h1", 3)])
        ix.delete([ChunkDelete("d:1", 4)])
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    index = TantivyKeywordIndex(str(path), "kw")
    index.ensure()
    assert index.get(["d:0", "d:1"]) == {
        "d:0": StoredChunk("d:0", "d", 0, "h0", 3, "persisted words", {}),
    }
    assert index.upsert([IndexedChunk("d:1", "d", 1, "x", "h1", 4)]).items[0].status is SUPERSEDED
    assert [h.chunk_id for h in index.search("persisted", 5)] == ["d:0"]
    index.close()


# --- aliases: each generation its own index, readers through an alias ---------------------

# More than one scan page on every backend (Tantivy windows and PIT/scroll pages of 1,000).
ALIAS_SCAN_CHUNKS = 1_100
# Alias switches while a reader keeps reading through the alias.
SWITCHES = 20
# How long the reader thread may take to notice the end of the switching.
READER_JOIN_TIMEOUT_S = 60.0


@dataclass
class Aliases:
    """One backend's alias operations by index name, through the AliasedIndex port.

    An alias is spelled as the store spells one: on Tantivy a file beside the index directories
    (``root / name``), whose targets are directory paths.
    """

    make_index: MakeIndex
    root: Path
    probe: AliasedKeywordIndex
    engine: SearchEngineIndex | None
    made: dict[str, AliasedKeywordIndex] = field(default_factory=dict)

    def physical(self, name: str) -> KeywordIndex:
        ix = self.make_index(name)
        ix.ensure()
        self.made[name] = ix
        return ix

    def spelled(self, alias: str) -> str:
        return str(self.root / alias) if self.engine is None else alias

    def point(self, alias: str, name: str) -> None:
        self.probe.point_alias(self.spelled(alias), self.made[name].physical_name)

    def target(self, alias: str) -> str | None:
        """The name of the index the alias points at (Tantivy: the directory's name)."""
        found = self.probe.alias_target(self.spelled(alias))
        names = {ix.physical_name: name for name, ix in self.made.items()}
        return None if found is None else names.get(found, found)

    def reader(self, alias: str) -> KeywordIndex:
        """An adapter that reads through the alias."""
        if self.engine is None:
            return TantivyKeywordIndex.open_alias(self.root / alias, alias)
        return self.make_index(alias)


@pytest.fixture
def aliases(make_index: MakeIndex, tmp_path: Path) -> Iterator[Aliases]:
    probe = make_index(unique_name())
    engine = probe if isinstance(probe, SearchEngineIndex) else None
    ops = Aliases(make_index, tmp_path, probe, engine)
    yield ops
    for ix in ops.made.values():
        ix.drop()
        ix.close()
    probe.close()


def test_adapter_implements_the_aliased_index_port(aliases: Aliases) -> None:
    """Every keyword adapter keeps the AliasedIndex contract (tests/support/aliased_contract.py)."""
    first, second = (aliases.physical(unique_name()) for _ in range(2))
    assert isinstance(first, AliasedIndex) and isinstance(second, AliasedIndex)
    check_aliased_index(first, second, aliases.spelled(unique_name()))


def test_exists_follows_ensure_and_drop(make_index: MakeIndex) -> None:
    """exists() is False before ensure, True after it, and False again after drop."""
    ix = make_index(unique_name())
    assert ix.exists() is False  # type: ignore[attr-defined]  # not part of the KeywordIndex port
    ix.ensure()
    assert ix.exists() is True  # type: ignore[attr-defined]
    ix.drop()
    assert ix.exists() is False  # type: ignore[attr-defined]
    ix.close()


def test_alias_points_at_one_index_and_switches(aliases: Aliases) -> None:
    """An alias is absent until pointed; pointing is idempotent and moves it to exactly one index."""
    alias, first, second = unique_name(), unique_name(), unique_name()
    aliases.physical(first)
    aliases.physical(second)
    assert aliases.target(alias) is None
    aliases.point(alias, first)
    assert aliases.target(alias) == first
    aliases.point(alias, first)
    assert aliases.target(alias) == first
    aliases.point(alias, second)
    assert aliases.target(alias) == second


def test_reads_through_an_alias_see_the_index_it_points_at(aliases: Aliases) -> None:
    """get, count, search and a multi-page scan through the alias read the physical index behind it."""
    alias, first, second = unique_name(), unique_name(), unique_name()
    old = aliases.physical(first)
    chunks = [chunk(f"doc{i}:0", 1, f"words number {i}") for i in range(ALIAS_SCAN_CHUNKS)]
    old.upsert([*chunks, chunk("zebra:0", 1, "a lone zebra"), chunk("gone:0", 1)])
    old.delete([ChunkDelete("gone:0", 2)])
    new = aliases.physical(second)
    fresh = chunk("fresh:0", 1, "a new generation")
    new.upsert([fresh])
    aliases.point(alias, first)

    reader = aliases.reader(alias)
    assert reader.get(["doc7:0", "gone:0", "fresh:0"]) == {"doc7:0": stored(chunks[7])}
    assert reader.count() == ALIAS_SCAN_CHUNKS + 1
    assert [h.chunk_id for h in reader.search("zebra", 5)] == ["zebra:0"]
    assert sorted(c.chunk_id for c in reader.scan()) == sorted([c.chunk_id for c in chunks] + ["zebra:0"])

    aliases.point(alias, second)
    again = aliases.reader(alias)
    assert again.get(["doc7:0", "fresh:0"]) == {"fresh:0": stored(fresh)}
    assert [c.chunk_id for c in again.scan()] == ["fresh:0"]
    assert again.count() == 1
    if aliases.engine is None:
        # A Tantivy reader stays on the directory it opened, until it opens the alias again.
        assert reader.count() == ALIAS_SCAN_CHUNKS + 1
    else:
        # The engines resolve the alias on every request, so the same adapter follows the switch.
        assert reader.count() == 1
    reader.close()
    again.close()


def test_readers_never_see_zero_or_two_indexes_during_switches(aliases: Aliases) -> None:
    """While the alias flips between two indexes, every read through it sees exactly one of them."""
    alias, first, second = unique_name(), unique_name(), unique_name()
    aliases.physical(first).upsert([chunk(f"a{i}:0", 1) for i in range(3)])
    aliases.physical(second).upsert([chunk(f"b{i}:0", 1) for i in range(5)])
    aliases.point(alias, first)
    seen: list[int] = []
    done = threading.Event()

    def read_until_done() -> None:
        while not done.is_set():
            reader = aliases.reader(alias)
            seen.append(reader.count())
            reader.close()

    thread = threading.Thread(target=read_until_done, daemon=True)
    thread.start()
    try:
        for n in range(SWITCHES):
            aliases.point(alias, second if n % 2 == 0 else first)
    finally:
        done.set()
        thread.join(READER_JOIN_TIMEOUT_S)
    assert not thread.is_alive(), "the reader thread hung"
    assert seen, "the reader never read, so this test proved nothing"
    assert set(seen) <= {3, 5}


def test_alias_target_refuses_a_concrete_index(aliases: Aliases) -> None:
    """Asking for the target of a name that is a concrete index (or index directory) is an error."""
    name = unique_name()
    aliases.physical(name)
    with pytest.raises(PermanentStoreError, match="not an alias"):
        aliases.target(name)


@pytest.mark.parametrize("backend", ENGINES)
def test_alias_on_two_indexes_is_an_error_that_point_alias_repairs(
    backend: str, request: pytest.FixtureRequest
) -> None:
    """alias_target refuses an alias held by two indexes; point_alias leaves it on one."""
    engine = build_engine(engine_settings(request, backend, unique_name()))
    first, second = (build_engine(engine_settings(request, backend, unique_name())) for _ in range(2))
    alias = unique_name()
    try:
        for ix in (first, second):
            ix.ensure()
        # Set up behind the adapter's back: point_alias itself never leaves two holders.
        engine._wire_update_aliases(
            [{"add": {"index": first.name, "alias": alias}}, {"add": {"index": second.name, "alias": alias}}]
        )
        with pytest.raises(PermanentStoreError, match="2 indexes"):
            engine.alias_target(alias)
        engine.point_alias(alias, second.name)
        assert engine.alias_target(alias) == second.name
    finally:
        for ix in (first, second):
            ix.drop()
            ix.close()
        engine.close()


class RecordingProxy(EsCompatProxy):
    """The compat proxy, recording the method and path of every request it forwards."""

    def __init__(self, upstream_url: str) -> None:
        super().__init__(upstream_url)
        self.requests: list[tuple[str, str]] = []

    def before_upstream(self, request: ProxyRequest) -> Reply | None:
        self.requests.append((request.method, request.path.split("?")[0]))
        return None


@pytest.mark.parametrize("kind", ["opensearch", "elasticsearch"])
def test_point_alias_switches_with_one_aliases_request(kind: str, opensearch_api_url: str) -> None:
    """Creating and moving an alias each take exactly one POST /_aliases; re-pointing takes none."""
    with RecordingProxy(opensearch_api_url) as proxy:
        names = [unique_name() for _ in range(2)]
        indexes = [build_engine(KeywordSettings(kind=kind, url=proxy.url, index=n)) for n in names]  # type: ignore[arg-type]
        alias = unique_name()
        try:
            for ix in indexes:
                ix.ensure()
            switches = []
            for target in (names[0], names[1], names[1]):
                proxy.requests.clear()
                indexes[0].point_alias(alias, target)
                switches.append(proxy.requests.count(("POST", "/_aliases")))
            assert switches == [1, 1, 0]
            assert indexes[0].alias_target(alias) == names[1]
        finally:
            for ix in indexes:
                ix.drop()
                ix.close()


def test_tantivy_alias_file_is_small_relative_and_replaced_whole(tmp_path: Path) -> None:
    """The alias file names its target relative to itself (so the data directory can move) and
    switching leaves no temporary file behind."""
    data = tmp_path / "data"
    for name in ("gen-1", "gen-2"):
        TantivyKeywordIndex(str(data / name), name).ensure()
    alias = data / "kw.live"
    for _ in range(3):
        tantivy_point_alias(alias, data / "gen-1")
        tantivy_point_alias(alias, data / "gen-2")
    assert sorted(p.name for p in data.iterdir()) == ["gen-1", "gen-2", "kw.live"]
    assert json.loads(alias.read_text())["target"] == "gen-2"
    moved = tmp_path / "moved"
    os.rename(data, moved)
    assert tantivy_alias_target(moved / "kw.live") == str(moved / "gen-2")
    assert TantivyKeywordIndex.open_alias(moved / "kw.live", "kw").count() == 0


def test_tantivy_alias_refuses_what_is_not_an_alias_or_an_index(tmp_path: Path) -> None:
    """A missing alias opens nothing, a foreign file is not an alias, and an alias needs an index."""
    with pytest.raises(PermanentStoreError, match="no tantivy alias"):
        TantivyKeywordIndex.open_alias(tmp_path / "missing.live", "kw")
    foreign = tmp_path / "foreign.live"
    foreign.write_text("not json")
    with pytest.raises(PermanentStoreError, match="not a lockstep alias file"):
        tantivy_alias_target(foreign)
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(PermanentStoreError, match="no tantivy index"):
        tantivy_point_alias(tmp_path / "kw.live", tmp_path / "empty-dir")
    assert tantivy_alias_target(tmp_path / "kw.live") is None


# --- the model check -----------------------------------------------------------------------

CHUNK_IDS = st.sampled_from(["a:0", "a:1", "b:0", "c:0"])
VERSIONS = st.integers(min_value=0, max_value=6)
WORDS = st.lists(st.sampled_from(["red", "green", "blue", "violet"]), min_size=1, max_size=3).map(" ".join)


def test_random_versioned_writes_agree_with_a_highest_version_wins_model(make_index: MakeIndex) -> None:
    """Random upserts, deletes, batches and reopens leave the index equal to a plain-dict model."""

    class VersionedIndexMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.name = unique_name()
            self.index = make_index(self.name)
            self.index.ensure()
            # chunk_id -> (highest version seen, the chunk if that version is live)
            self.model: dict[str, tuple[int, IndexedChunk | None]] = {}

        def expected(self, chunk_id: str, version: int) -> ItemStatus:
            known = self.model.get(chunk_id)
            return APPLIED if known is None or version > known[0] else SUPERSEDED

        @rule(chunk_id=CHUNK_IDS, version=VERSIONS, text=WORDS)
        def upsert(self, chunk_id: str, version: int, text: str) -> None:
            c = chunk(chunk_id, version, text)
            status = self.expected(chunk_id, version)
            assert self.index.upsert([c]).items[0].status is status
            if status is APPLIED:
                self.model[chunk_id] = (version, c)

        @rule(chunk_id=CHUNK_IDS, version=VERSIONS)
        def delete(self, chunk_id: str, version: int) -> None:
            status = self.expected(chunk_id, version)
            assert self.index.delete([ChunkDelete(chunk_id, version)]).items[0].status is status
            if status is APPLIED:
                self.model[chunk_id] = (version, None)

        @rule(batch=st.dictionaries(CHUNK_IDS, st.tuples(VERSIONS, WORDS), min_size=1, max_size=4))
        def upsert_batch(self, batch: dict[str, tuple[int, str]]) -> None:
            chunks = [chunk(cid, version, text) for cid, (version, text) in batch.items()]
            statuses = [self.expected(c.chunk_id, c.version) for c in chunks]
            assert [i.status for i in self.index.upsert(chunks).items] == statuses
            for c, status in zip(chunks, statuses, strict=True):
                if status is APPLIED:
                    self.model[c.chunk_id] = (c.version, c)

        @rule()
        def reopen(self) -> None:
            self.index.close()
            self.index = make_index(self.name)
            self.index.ensure()

        @rule()
        def scan_agrees(self) -> None:
            assert sorted(c.chunk_id for c in self.index.scan()) == sorted(self.live())

        @invariant()
        def reads_agree(self) -> None:
            assert self.index.get(["a:0", "a:1", "b:0", "c:0"]) == {
                cid: stored(c) for cid, c in self.live().items()
            }
            assert self.index.count() == len(self.live())

        def live(self) -> dict[str, IndexedChunk]:
            return {cid: c for cid, (_, c) in self.model.items() if c is not None}

        def teardown(self) -> None:
            self.index.drop()
            self.index.close()

    run_state_machine_as_test(
        VersionedIndexMachine,
        settings=hypothesis_settings(max_examples=40, stateful_step_count=20, deadline=None),
    )


# --- search engines only: errors, retries, credentials -------------------------------------


class FaultProxy(EsCompatProxy):
    """The compat proxy with scripted faults on _bulk: throttling before, lost answers after."""

    def __init__(self, upstream_url: str, *, throttled: int = 0, lost_answers: int = 0) -> None:
        super().__init__(upstream_url)
        self.throttled = throttled
        self.lost_answers = lost_answers
        self.authorizations: list[str] = []

    def before_upstream(self, request: ProxyRequest) -> Reply | None:
        self.authorizations += [v for k, v in request.headers if k.lower() == "authorization"]
        if "_bulk" in request.path and self.throttled > 0:
            self.throttled -= 1
            return Reply(429, b'{"error":{"type":"es_rejected_execution_exception","reason":"queue full"}}')
        return None

    def after_upstream(self, request: ProxyRequest, status: int) -> Reply | None:
        if "_bulk" in request.path and self.lost_answers > 0:
            self.lost_answers -= 1
            return Reply(503, b'{"error":{"type":"unavailable","reason":"answer lost on the way"}}')
        return None


@pytest.fixture(params=["opensearch", "elasticsearch"])
def faulty(request: pytest.FixtureRequest, opensearch_api_url: str) -> Iterator[tuple[FaultProxy, str]]:
    """A FaultProxy in front of the OpenSearch-API server, and which client to drive through it."""
    with FaultProxy(opensearch_api_url) as proxy:
        yield proxy, request.param


def engine_through(proxy: FaultProxy, kind: str, sleeps: list[float], **settings: Any) -> SearchEngineIndex:
    ks = KeywordSettings(kind=kind, url=proxy.url, index=unique_name(), **settings)  # type: ignore[arg-type]
    engine = build_engine(ks, sleep=sleeps.append)
    engine.ensure()
    return engine


def test_throttled_bulk_is_retried_with_growing_backoff(faulty: tuple[FaultProxy, str]) -> None:
    """Whole-request 429s are retried with exponential backoff until the write goes through."""
    proxy, kind = faulty
    sleeps: list[float] = []
    engine = engine_through(proxy, kind, sleeps)
    proxy.throttled = 2
    assert engine.upsert([chunk("d:0", 1)]).items[0].status is APPLIED
    assert sleeps == [0.1, 0.2]
    engine.drop()
    engine.close()


def test_persistent_throttling_raises_transient_error_after_bounded_attempts(
    faulty: tuple[FaultProxy, str],
) -> None:
    """A store that keeps answering 429 makes the write raise TransientStoreError, not hang."""
    proxy, kind = faulty
    sleeps: list[float] = []
    engine = engine_through(proxy, kind, sleeps)
    proxy.throttled = 1_000
    with pytest.raises(TransientStoreError, match="es_rejected_execution_exception"):
        engine.upsert([chunk("d:0", 1)])
    assert len(sleeps) == RETRY_ATTEMPTS_MAX - 1
    proxy.throttled = 0
    engine.drop()
    engine.close()


def test_lost_answer_is_retried_and_reported_as_success(faulty: tuple[FaultProxy, str]) -> None:
    """A write applied by the store whose answer was lost is re-sent and comes back SUPERSEDED."""
    proxy, kind = faulty
    engine = engine_through(proxy, kind, [])
    proxy.lost_answers = 1
    c = chunk("d:0", 1)
    assert engine.upsert([c]).items[0].status is SUPERSEDED
    assert engine.get(["d:0"]) == {"d:0": stored(c)}
    engine.drop()
    engine.close()


@pytest.mark.parametrize("kind", ["opensearch", "elasticsearch"])
def test_unreachable_store_raises_transient_error(kind: str) -> None:
    """Connection failures are retried a bounded number of times, then raised as transient."""
    sleeps: list[float] = []
    # Port 9 (discard) has no listener here: every connection attempt is refused at once.
    dead = KeywordSettings(kind=kind, url="http://127.0.0.1:9", index=unique_name(), request_timeout_s=2)  # type: ignore[arg-type]
    engine = build_engine(dead, sleep=sleeps.append)
    with pytest.raises(TransientStoreError):
        engine.count()
    assert len(sleeps) == RETRY_ATTEMPTS_MAX - 1
    engine.close()


@pytest.mark.parametrize("backend", ENGINES)
def test_invalid_index_is_a_permanent_error(backend: str, request: pytest.FixtureRequest) -> None:
    """A request the store refuses as malformed raises PermanentStoreError, without retrying."""
    sleeps: list[float] = []
    engine = build_engine(engine_settings(request, backend, "Upper-Case-Is-Invalid"), sleep=sleeps.append)
    with pytest.raises(PermanentStoreError, match="invalid_index_name_exception"):
        engine.ensure()
    assert sleeps == []
    engine.close()


@pytest.mark.parametrize("auth", ["basic", "api_key"])
def test_credentials_never_reach_logs_or_repr(
    faulty: tuple[FaultProxy, str], auth: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Passwords and API keys are sent to the store but never appear in logs, errors or repr."""
    proxy, kind = faulty
    password, api_key = f"pw-{uuid.uuid4().hex}", f"key-{uuid.uuid4().hex}"
    secrets = [password, api_key, base64.b64encode(f"lockstep:{password}".encode()).decode()]
    creds = {"username": "lockstep", "password": password} if auth == "basic" else {"api_key": api_key}
    caplog.set_level(logging.DEBUG)
    for logger in ("elastic_transport", "elasticsearch", "opensearch", "opensearchpy", "urllib3"):
        caplog.set_level(logging.DEBUG, logger=logger)

    with structlog.testing.capture_logs() as events:
        engine = engine_through(proxy, kind, [], **creds)
        engine.upsert([chunk("d:0", 1), chunk("big:0", 1, chunk_index=2**31)])
        engine.get(["d:0"])
        engine.search("alpha", 5)
        list(engine.scan())
        settings = KeywordSettings(kind=kind, url=proxy.url, index="Bad-Name", **creds)  # type: ignore[arg-type]
        invalid = build_engine(settings)
        with pytest.raises(PermanentStoreError) as failure:
            invalid.ensure()
        invalid.close()
        engine.drop()
        engine.close()

    assert proxy.authorizations, "the credentials were never sent, so this test proved nothing"
    records = repr([r.__dict__ for r in caplog.records])
    settings_shown = [repr(settings), str(settings), settings.model_dump_json()]
    seen = "\n".join([caplog.text, records, repr(events), str(failure.value), *settings_shown])
    for secret in secrets:
        assert secret not in seen
