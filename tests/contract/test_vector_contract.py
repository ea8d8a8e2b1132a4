"""VectorIndex contract: one suite run against every form of Milvus lockstep supports.

The backends are real: a milvus-lite file (in-process server), a ``milvus-lite server`` process and
the Milvus 2.3.5 standalone server (``tests.support.milvus_servers``). Each test gets a fresh,
uniquely named collection. Milvus 2.3.5 predates fixes for known store bugs; an assertion that can
fail because of one says so in its message, so that a store bug is never mistaken for ours.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import random
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from milvus_lite.server_manager import server_manager_instance
from pydantic import SecretStr
from pymilvus import DataType, MilvusClient
from structlog.testing import capture_logs

from adapters.vector.milvus import (
    PYMILVUS_CALL_LOGGER,
    SCAN_PAGE_ROWS_MAX,
    MilvusVectorIndex,
    QuietMissingAlias,
)
from adapters.vector.settings import VectorSettings
from coordinator.errors import ConfigError, PermanentStoreError, TransientStoreError
from coordinator.fence import metadata_digest
from coordinator.model import ChunkDelete, IndexedChunk, ItemStatus, StoredChunk
from coordinator.ports import AliasedIndex, VectorIndex
from tests.support.aliased_contract import check_aliased_index
from tests.support.milvus_servers import LiteServer, RealMilvus, free_port

DIM = 8
# Generous for a request on these 2-core machines, small enough that a hang fails the test fast.
REQUEST_TIMEOUT_S = 20.0
# The unreachable-server tests: every call must give up within this (plus a little slack).
UNREACHABLE_TIMEOUT_S = 2.0
UNREACHABLE_SLACK_S = 3.0
# Milvus 2.3.5 reloads its collections by itself after a crash, once the dead process's etcd
# session expires (common.session.ttl, 30 s).
RELOAD_AFTER_CRASH_DEADLINE_S = 120.0
RELOAD_POLL_INTERVAL_S = 1.0
# More rows than one query_iterator page, so a scan needs several.
SCAN_ROWS = 2_500
# Hypothesis budget per backend: each step costs a few Strong reads (~0.2 s each on 2.3.5).
MODEL_EXAMPLES_MAX = 4
MODEL_STEPS_MAX = 8

STORE_BUG_HINT = (
    " -- Milvus 2.3.5 predates the fixes for milvus#33015 (deleted rows reappear) and milvus#27515"
    " (count(*) wrong after repeated upserts): if the adapter sent the right requests, the store"
    " misbehaved"
)

# IDs whose characters the adapter must escape in expressions; "c','b" would delete "b" too if
# the IDs were pasted into pymilvus's unescaped ``ids=`` expression.
AWKWARD_IDS = ("a'b#0", 'c"d#0', "e\\f#0", "g\nh#0", "ü😀#0", "c','b#0")


@dataclass(frozen=True)
class Backend:
    name: str
    uri: str

    @property
    def is_real(self) -> bool:
        return self.name == "milvus-2.3.5"

    @property
    def bug_hint(self) -> str:
        return STORE_BUG_HINT if self.is_real else ""


@pytest.fixture(params=["lite-file", "lite-server", "milvus-2.3.5"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "lite-file":
        path = str(tmp_path / "milvus.db")
        yield Backend(request.param, path)
        server_manager_instance.release_server(path)
    elif request.param == "lite-server":
        server: LiteServer = request.getfixturevalue("lite_server")
        yield Backend(request.param, server.uri)
    else:
        real: RealMilvus = request.getfixturevalue("real_milvus")
        yield Backend(request.param, real.uri)


def _settings(uri: str, **overrides: Any) -> VectorSettings:
    values: dict[str, Any] = {
        "uri": uri,
        "collection": f"t_{uuid.uuid4().hex}",
        "request_timeout_s": REQUEST_TIMEOUT_S,
    }
    return VectorSettings(**(values | overrides))


@pytest.fixture
def index(backend: Backend) -> Iterator[MilvusVectorIndex]:
    idx = MilvusVectorIndex(_settings(backend.uri), dim=DIM)
    idx.ensure()
    yield idx
    idx.drop()
    idx.close()


@pytest.fixture
def raw(backend: Backend) -> Iterator[MilvusClient]:
    """A plain pymilvus client on the same backend, to look behind the adapter's back."""
    client = MilvusClient(uri=backend.uri, timeout=REQUEST_TIMEOUT_S, dedicated=True)
    yield client
    client.close()


def _vector(seed: str) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(0.1, 1.0) for _ in range(DIM)]


def _chunk(chunk_id: str, version: int = 1, *, vector: list[float] | None = None) -> IndexedChunk:
    text = f"text of {chunk_id} at v{version}"
    return IndexedChunk(
        chunk_id=chunk_id,
        doc_id=chunk_id.rsplit("#", 1)[0],
        chunk_index=version % 7,
        text=text,
        content_hash=hashlib.sha256(text.encode()).hexdigest(),
        version=version,
        metadata={"version": version, "tags": ["x", "ü"], "nested": {"ratio": 0.5}},
        vector=vector if vector is not None else _vector(f"{chunk_id}/{version}"),
    )


def _stored(chunk: IndexedChunk) -> StoredChunk:
    return StoredChunk(
        chunk_id=chunk.chunk_id,
        doc_id=chunk.doc_id,
        chunk_index=chunk.chunk_index,
        content_hash=chunk.content_hash,
        version=chunk.version,
        text=chunk.text,
        metadata=dict(chunk.metadata),
    )


def _entities(raw: MilvusClient, collection: str, expr: str = "") -> int:
    """Entities by count(*) (which, unlike a query, counts every entity of a primary key)."""
    [row] = raw.query(
        collection,
        filter=expr,
        output_fields=["count(*)"],
        consistency_level="Strong",
        timeout=REQUEST_TIMEOUT_S,
    )
    return int(row["count(*)"])


def _many(n: int) -> list[IndexedChunk]:
    return [_chunk(f"doc-{i:05d}#{i % 3}") for i in range(n)]


# --- the contract ------------------------------------------------------------------------------


def test_ensure_is_idempotent_and_creates_the_schema(index: MilvusVectorIndex, raw: MilvusClient) -> None:
    """ensure() twice leaves one loaded collection with the explicit schema and a COSINE index."""
    index.ensure()
    assert isinstance(index, VectorIndex)
    described = raw.describe_collection(index.name, timeout=REQUEST_TIMEOUT_S)
    fields = {f["name"]: f for f in described["fields"]}
    assert {name: f["type"] for name, f in fields.items()} == {
        "chunk_id": DataType.VARCHAR,
        "vector": DataType.FLOAT_VECTOR,
        "doc_id": DataType.VARCHAR,
        "chunk_index": DataType.INT64,
        "text": DataType.VARCHAR,
        "content_hash": DataType.VARCHAR,
        "version": DataType.INT64,
        "metadata": DataType.JSON,
    }
    assert fields["chunk_id"]["is_primary"] and int(fields["chunk_id"]["params"]["max_length"]) >= 600
    assert int(fields["vector"]["params"]["dim"]) == DIM
    assert int(fields["text"]["params"]["max_length"]) == 65_535
    assert raw.describe_index(index.name, "vector", timeout=REQUEST_TIMEOUT_S)["metric_type"] == "COSINE"
    assert str(raw.get_load_state(index.name, timeout=REQUEST_TIMEOUT_S)["state"]) == "Loaded"
    assert raw.list_collections(timeout=REQUEST_TIMEOUT_S).count(index.name) == 1


def test_ensure_refuses_a_collection_with_another_dimension(index: MilvusVectorIndex) -> None:
    """ensure() on an existing collection of another vector size raises PermanentStoreError."""
    other = MilvusVectorIndex(index.settings, dim=DIM + 1)
    try:
        with pytest.raises(PermanentStoreError, match="dim"):
            other.ensure()
    finally:
        other.close()


def test_upsert_then_get_returns_the_exact_fields(index: MilvusVectorIndex) -> None:
    """A Strong get right after an upsert returns every stored field exactly; absent IDs are left out."""
    chunks = [_chunk("doc-a#0", 3), _chunk("doc-a#1", 3), *(_chunk(i, 2) for i in AWKWARD_IDS)]
    result = index.upsert(chunks)
    assert [i.status for i in result.items] == [ItemStatus.APPLIED] * len(chunks)
    got = index.get([c.chunk_id for c in chunks] + ["absent#0"])
    assert got == {c.chunk_id: _stored(c) for c in chunks}


def test_reupsert_replaces_without_a_duplicate_entity(
    index: MilvusVectorIndex, raw: MilvusClient, backend: Backend
) -> None:
    """Upserting an ID again replaces its row: one entity, the newest fields, count stays 1."""
    for version in range(1, 6):
        index.upsert([_chunk("doc-r#0", version)])
    assert index.get(["doc-r#0"]) == {"doc-r#0": _stored(_chunk("doc-r#0", 5))}
    assert _entities(raw, index.name, 'chunk_id == "doc-r#0"') == 1, f"duplicate entity{backend.bug_hint}"
    assert index.count() == 1, f"count(*) after repeated upserts{backend.bug_hint}"


def test_a_batch_naming_an_id_twice_keeps_only_the_newest(
    index: MilvusVectorIndex, raw: MilvusClient, backend: Backend
) -> None:
    """One call naming an ID twice writes one entity, the highest version, and reports the other SUPERSEDED."""
    result = index.upsert([_chunk("doc-d#0", 7), _chunk("doc-d#0", 9), _chunk("doc-d#0", 8)])
    assert [i.status for i in result.items] == [
        ItemStatus.SUPERSEDED,
        ItemStatus.APPLIED,
        ItemStatus.SUPERSEDED,
    ]
    assert index.get(["doc-d#0"])["doc-d#0"].version == 9
    # Milvus 2.3.5 keeps both rows when one request names a key twice; the adapter must collapse.
    assert _entities(raw, index.name) == 1, f"entities of doc-d#0{backend.bug_hint}"


def test_delete_by_id_removes_exactly_those_ids(index: MilvusVectorIndex, backend: Backend) -> None:
    """delete removes the named IDs, even ones with quotes and backslashes, and nothing else."""
    keep = [_chunk("b#0"), _chunk("c#0"), _chunk("doc-k#0")]
    doomed = [_chunk(i) for i in AWKWARD_IDS]
    index.upsert(keep + doomed)
    result = index.delete([ChunkDelete(c.chunk_id, 2) for c in doomed] + [ChunkDelete("never-written#0", 2)])
    assert {i.status for i in result.items} == {ItemStatus.APPLIED}
    assert set(index.get([c.chunk_id for c in keep + doomed])) == {c.chunk_id for c in keep}, backend.bug_hint
    assert index.count() == len(keep), f"count(*) after deletes{backend.bug_hint}"


def test_scan_streams_every_chunk_once_over_several_pages(index: MilvusVectorIndex, backend: Backend) -> None:
    """scan yields each of 2,500 chunks exactly once (several iterator pages), agreeing with count,
    with its metadata (every check compares it) but not its text."""
    assert SCAN_ROWS > 2 * SCAN_PAGE_ROWS_MAX
    chunks = _many(SCAN_ROWS)
    index.upsert(chunks)
    with capture_logs() as logs:
        scanned = list(index.scan())
    assert [e for e in logs if e["log_level"] == "warning"] == [], "the iterator disagreed with count(*)"
    assert sorted(c.chunk_id for c in scanned) == sorted(c.chunk_id for c in chunks)
    assert index.count() == SCAN_ROWS, f"count(*){backend.bug_hint}"
    assert {c.chunk_id: c for c in scanned} == {
        c.chunk_id: StoredChunk(c.chunk_id, c.doc_id, c.chunk_index, c.content_hash, c.version,
                                metadata=dict(c.metadata))
        for c in chunks
    }


def test_range_scan_fallback_returns_the_same_set(index: MilvusVectorIndex) -> None:
    """The primary-key range scan yields every chunk once, in key order, like the iterator scan."""
    chunks = _many(SCAN_ROWS) + [_chunk(i) for i in AWKWARD_IDS]
    index.upsert(chunks)
    # Pages of 1,000 force the full ranges to be split several times over 2,506 rows.
    ranged = list(index.range_scan(with_text=True, page_rows=1_000))
    assert [c.chunk_id for c in ranged] == sorted(c.chunk_id for c in chunks)
    assert {c.chunk_id: c for c in ranged} == {c.chunk_id: _stored(c) for c in chunks}


DISAGREEMENT_WARNINGS = ["query_iterator disagrees with count(*)", "range scan disagrees with count(*) too"]


class _GappyIterator(MilvusVectorIndex):
    """The adapter, but its query_iterator loses its first page (the gap of milvus#52055)."""

    def _iterate(self, fields: Sequence[str]) -> Iterator[dict[str, Any]]:
        return itertools.islice(super()._iterate(fields), SCAN_PAGE_ROWS_MAX, None)


def test_scan_recovers_rows_the_iterator_missed(index: MilvusVectorIndex) -> None:
    """When the iterator's rows disagree with count(*), scan finds the missing ones by key ranges."""
    chunks = _many(SCAN_ROWS)
    index.upsert(chunks)
    gappy = _GappyIterator(index.settings, dim=DIM)
    try:
        with capture_logs() as logs:
            scanned = [c.chunk_id for c in gappy.scan()]
    finally:
        gappy.close()
    assert sorted(scanned) == sorted(c.chunk_id for c in chunks)
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
        "query_iterator disagrees with count(*)"
    ]


def test_fetch_vectors_round_trips_the_stored_vectors(index: MilvusVectorIndex) -> None:
    """fetch_vectors returns each stored vector (float32-equal to what was written); absent IDs are left out."""
    chunks = [_chunk(f"doc-v{i}#0") for i in range(5)]
    index.upsert(chunks)
    fetched = index.fetch_vectors([c.chunk_id for c in chunks] + ["absent#0"])
    assert set(fetched) == {c.chunk_id for c in chunks}
    for c in chunks:
        assert fetched[c.chunk_id] == pytest.approx(c.vector, rel=1e-6)


def test_search_returns_the_nearest_chunks(index: MilvusVectorIndex) -> None:
    """search ranks the chunk whose vector points the query's way first, with its doc_id and text."""
    basis = [[1.0 if d == i else 0.01 for d in range(DIM)] for i in range(DIM)]
    chunks = [_chunk(f"doc-s{i}#0", vector=basis[i]) for i in range(DIM)]
    index.upsert(chunks)
    hits = index.search(basis[3], 3)
    assert len(hits) == 3
    assert (hits[0].chunk_id, hits[0].doc_id, hits[0].text) == ("doc-s3#0", "doc-s3", chunks[3].text)
    assert hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert hits[0].score >= hits[1].score >= hits[2].score


def test_read_path_hits_carry_what_the_fence_checks(index: MilvusVectorIndex) -> None:
    """search_hits returns each hit's version, chunk index and metadata exactly as written, at
    Bounded and at Strong consistency, and the metadata round-trips to the same canonical hash."""
    basis = [[1.0 if d == i else 0.01 for d in range(DIM)] for i in range(DIM)]
    chunks = [_chunk(f"doc-r{i}#0", version=10 + i, vector=basis[i]) for i in range(DIM)]
    index.upsert(chunks)
    for strong in (True, False):
        hits = _eventually(lambda s=strong: index.search_hits(basis[2], 2, strong=s), len(chunks))
        top = hits[0]
        assert (top.chunk_id, top.version, top.chunk_index) == ("doc-r2#0", 12, 12 % 7)
        assert top.text == chunks[2].text and dict(top.metadata) == dict(chunks[2].metadata)
        assert metadata_digest(top.metadata) == metadata_digest(chunks[2].metadata)


def test_read_path_filters_on_metadata_in_the_engine(index: MilvusVectorIndex) -> None:
    """A where filter is pushed down: only chunks whose metadata holds every key/value come back."""
    basis = [[1.0 if d == i else 0.01 for d in range(DIM)] for i in range(DIM)]
    chunks = [
        IndexedChunk(f"doc-f{i}#0", f"doc-f{i}", 0, f"t{i}", f"h{i}", 1, {"lang": "en" if i % 2 else 'de"x', "n": i,
                     "ok": i < 4}, basis[i])
        for i in range(DIM)
    ]
    index.upsert(chunks)
    assert index.filters_metadata
    english = index.search_hits(basis[0], DIM, where={"lang": "en"}, strong=True)
    assert sorted(h.chunk_id for h in english) == [f"doc-f{i}#0" for i in range(DIM) if i % 2]
    quoted = index.search_hits(basis[0], DIM, where={"lang": 'de"x', "ok": True}, strong=True)
    assert sorted(h.chunk_id for h in quoted) == ["doc-f0#0", "doc-f2#0"]
    assert [h.chunk_id for h in index.search_hits(basis[5], DIM, where={"n": 5}, strong=True)] == ["doc-f5#0"]


def _eventually(search: Any, expected: int) -> list[Any]:
    """A Bounded read may lag a write by the server's staleness: ask again until it sees them all."""
    deadline = time.monotonic() + REQUEST_TIMEOUT_S
    while True:
        hits: list[Any] = search()
        if len(hits) >= min(expected, 2) or time.monotonic() > deadline:
            return hits
        time.sleep(0.2)


def test_unstorable_chunks_are_rejected_alone(index: MilvusVectorIndex) -> None:
    """Chunks Milvus would refuse are REJECTED with a reason, and the rest of the call is applied."""
    good = _chunk("doc-g#0")
    bad = [
        _chunk("doc-b#0", vector=[1.0] * (DIM - 1)),
        _chunk("doc-b#1", vector=[0.0] * DIM),
        IndexedChunk("doc-b#2", "doc-b", 2, "x" * 70_000, "h", 1, {}, _vector("t")),
        IndexedChunk("doc-b#3", "doc-b", 3, "x", "h", 1, {"bad": float("nan")}, _vector("m")),
        IndexedChunk("doc-\x00#4", "doc-b", 4, "x", "h", 1, {}, _vector("n")),
        _chunk("doc-b#5", vector=[float("nan"), *[1.0] * (DIM - 1)]),
        _chunk("doc-b#6", vector=[1e39] * DIM),  # finite as a double, infinite as Milvus's float32
    ]
    result = index.upsert([good, *bad])
    assert result.items[0].status is ItemStatus.APPLIED
    assert [i.status for i in result.items[1:]] == [ItemStatus.REJECTED] * len(bad)
    assert all(i.reason for i in result.rejected())
    assert set(index.get([good.chunk_id, *(c.chunk_id for c in bad)])) == {good.chunk_id}


def test_unstorable_vectors_of_the_right_shape_are_rejected_alone(index: MilvusVectorIndex) -> None:
    """Vectors of the right length are checked together in one pass: the all-zero, NaN and
    beyond-float32 ones are REJECTED with their reasons, the others applied, in one call."""
    good = [_chunk("doc-v#0"), _chunk("doc-v#4")]
    bad = [
        _chunk("doc-v#1", vector=[0.0] * DIM),
        _chunk("doc-v#2", vector=[*[0.5] * (DIM - 1), float("nan")]),
        _chunk("doc-v#3", vector=[*[0.5] * (DIM - 1), 1e39]),
    ]
    result = index.upsert([good[0], *bad, good[1]])
    assert [i.status for i in result.items] == [ItemStatus.APPLIED, *[ItemStatus.REJECTED] * 3, ItemStatus.APPLIED]
    assert [i.reason for i in result.items[1:4]] == [
        "vector is all zeros (no cosine similarity)",
        "vector has a NaN or infinite component",
        "vector has a NaN or infinite component",
    ]
    assert set(index.get([c.chunk_id for c in good + bad])) == {c.chunk_id for c in good}


def test_duplicate_ids_reports_keys_held_by_several_entities(
    index: MilvusVectorIndex, raw: MilvusClient, backend: Backend
) -> None:
    """duplicate_ids finds every key with more than one entity; scan still yields such a key once."""
    chunks = _many(30)
    index.upsert(chunks)
    # A raw insert of an existing key: Milvus 2.3.5 stores a second entity (milvus#37389), while
    # milvus-lite replaces the row. The adapter itself never inserts.
    twin = _chunk(chunks[7].chunk_id, 2)
    row = {k: v for k, v in asdict(twin).items() if k != "overwrite_equal"}  # not a stored field
    raw.insert(index.name, [row], timeout=REQUEST_TIMEOUT_S)
    entities = _entities(raw, index.name, f'chunk_id == "{twin.chunk_id}"')
    expected = {twin.chunk_id: entities} if entities > 1 else {}
    assert (entities > 1) == backend.is_real, "which store keeps duplicates on insert changed"
    assert index.duplicate_ids(page_rows=8) == expected
    with capture_logs() as logs:
        scanned = sorted(c.chunk_id for c in index.scan())
    assert scanned == sorted(c.chunk_id for c in chunks)
    # count(*) counts both entities, so the scan notices and double-checks by key ranges.
    warnings = [e["event"] for e in logs if e["log_level"] == "warning"]
    assert warnings == (DISAGREEMENT_WARNINGS if expected else [])


def test_rows_written_behind_the_adapters_back_are_read_under_their_primary_keys(
    index: MilvusVectorIndex, raw: MilvusClient, backend: Backend
) -> None:
    """Rows another writer inserted (a primary key that is no chunk ID with an empty text, a doc_id
    and a negative version of its own, a JSON metadata that is no object where the store takes
    one) are read by scan, range scan, get and count under their primary keys, never a crash; a
    metadata that is no object marks its row foreign; delete by primary key removes them."""
    ours = _chunk("d:chunk-0")
    index.upsert([ours])
    # Milvus 2.3.5 refuses a JSON field that is not an object; milvus-lite stores any JSON.
    odd_metadata: Any = {"by": "hand"} if backend.is_real else [1, 2]
    base = {"vector": _vector("foreign"), "chunk_index": 0, "content_hash": "h"}
    rows = [
        base | {"chunk_id": "stray", "doc_id": "stray", "text": "", "version": 0, "metadata": {}},
        base | {"chunk_id": "d:chunk-1", "doc_id": "else", "text": "by hand", "version": -3,
                "metadata": odd_metadata},
    ]  # fmt: skip
    raw.insert(index.name, rows, timeout=REQUEST_TIMEOUT_S)
    scanned = {c.chunk_id: c for c in index.scan(with_text=True)}
    assert set(scanned) == {"d:chunk-0", "stray", "d:chunk-1"}
    assert scanned["d:chunk-0"] == _stored(ours)
    assert (scanned["stray"].text, scanned["stray"].foreign) == ("", "")
    odd = scanned["d:chunk-1"]
    assert (odd.doc_id, odd.version, odd.metadata) == ("else", -3, {} if not backend.is_real else odd_metadata)
    assert bool(odd.foreign) == (not backend.is_real), odd
    assert index.get(["d:chunk-0", "stray", "d:chunk-1"]) == scanned
    assert {c.chunk_id for c in index.range_scan(with_text=True)} == set(scanned) == {
        c.chunk_id for c in index.scan()
    }  # fmt: skip
    assert index.count() == 3
    index.delete([ChunkDelete("stray", 0), ChunkDelete("d:chunk-1", 0)])
    assert [c.chunk_id for c in index.scan()] == ["d:chunk-0"] and index.count() == 1


def test_random_upserts_and_deletes_agree_with_a_dict(index: MilvusVectorIndex, backend: Backend) -> None:
    """Random upsert/delete sequences (versions rising, as the ledger gates them) match a plain dict."""
    pool = ("p#0", "p#1", "q#0", *AWKWARD_IDS[:3])
    versions = itertools.count(1)

    class Model(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            index.delete([ChunkDelete(i, next(versions)) for i in pool])
            self.model: dict[str, StoredChunk] = {}

        @rule(ids=st.lists(st.sampled_from(pool), min_size=1, max_size=4))
        def upsert(self, ids: list[str]) -> None:
            chunks = [_chunk(i, next(versions)) for i in ids]
            index.upsert(chunks)
            self.model |= {c.chunk_id: _stored(c) for c in chunks}

        @rule(ids=st.lists(st.sampled_from(pool), min_size=1, max_size=3))
        def delete(self, ids: list[str]) -> None:
            index.delete([ChunkDelete(i, next(versions)) for i in ids])
            for i in ids:
                self.model.pop(i, None)

        @invariant()
        def agrees(self) -> None:
            assert index.get(pool) == self.model, f"get disagrees with the model{backend.bug_hint}"
            assert index.count() == len(self.model), f"count(*) disagrees with the model{backend.bug_hint}"

    run_state_machine_as_test(
        Model,
        settings=settings(
            max_examples=MODEL_EXAMPLES_MAX,
            stateful_step_count=MODEL_STEPS_MAX,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


# --- aliases: each generation its own collection, readers through an alias -----------------


@pytest.fixture
def generations(backend: Backend, raw: MilvusClient) -> Iterator[list[MilvusVectorIndex]]:
    """Two ensured collections on the backend; aliases made on them are dropped afterwards."""
    made = [MilvusVectorIndex(_settings(backend.uri), dim=DIM) for _ in range(2)]
    for idx in made:
        idx.ensure()
    yield made
    for idx in made:
        for alias in raw.list_aliases(idx.name, timeout=REQUEST_TIMEOUT_S)["aliases"]:
            raw.drop_alias(alias, timeout=REQUEST_TIMEOUT_S)
        idx.drop()
        idx.close()


def test_adapter_implements_the_aliased_index_port(generations: list[MilvusVectorIndex]) -> None:
    """The Milvus adapter keeps the AliasedIndex contract (tests/support/aliased_contract.py)."""
    first, second = generations
    assert isinstance(first, AliasedIndex)
    check_aliased_index(first, second, f"a_{uuid.uuid4().hex}")


def test_alias_points_at_one_collection_and_reads_follow_it(generations: list[MilvusVectorIndex]) -> None:
    """point_alias creates, then moves the alias; get, count, search and scan through it read its target."""
    first, second = generations
    old = [_chunk(f"old-{i}#0") for i in range(3)]
    new = _chunk("new#0")
    first.upsert(old)
    second.upsert([new])
    alias = f"a_{uuid.uuid4().hex}"
    assert first.alias_target(alias) is None
    first.point_alias(alias, first.name)
    first.point_alias(alias, first.name)
    assert first.alias_target(alias) == first.name

    reader = MilvusVectorIndex(first.settings.model_copy(update={"collection": alias}), dim=DIM)
    try:
        reader.ensure()
        assert reader.get([c.chunk_id for c in old] + [new.chunk_id]) == {c.chunk_id: _stored(c) for c in old}
        assert reader.count() == len(old)
        assert [h.chunk_id for h in reader.search(old[1].vector or [], 1)] == [old[1].chunk_id]
        assert sorted(c.chunk_id for c in reader.scan()) == sorted(c.chunk_id for c in old)

        first.point_alias(alias, second.name)
        assert first.alias_target(alias) == second.name
        assert reader.get([c.chunk_id for c in old] + [new.chunk_id]) == {new.chunk_id: _stored(new)}
        assert reader.count() == 1
        assert [c.chunk_id for c in reader.scan()] == [new.chunk_id]
    finally:
        reader.close()


def test_alias_target_refuses_a_collection_name(index: MilvusVectorIndex) -> None:
    """A collection's own name is not an alias: asking for its target is an error, not None."""
    with pytest.raises(PermanentStoreError, match="is a collection, not an alias"):
        index.alias_target(index.name)


def test_a_missing_alias_is_answered_without_an_error_in_the_log(
    index: MilvusVectorIndex, caplog: pytest.LogCaptureFixture
) -> None:
    """pymilvus logs every failed call at ERROR, with a traceback. An alias that does not exist
    yet (every first start asks) is an expected answer, None: nothing reaches the log."""
    with caplog.at_level(logging.DEBUG):
        assert index.alias_target(f"a_{uuid.uuid4().hex}") is None
    assert [r.getMessage()[:120] for r in caplog.records if r.levelno >= logging.ERROR] == []


@pytest.mark.parametrize(
    ("message", "kept"),
    [
        ("RPC error: [describe_alias], <MilvusException: (code=100, message=alias 'x_live' does not exist)>", False),
        ("RPC error: [describe_alias], <MilvusException: (code=1600, message=alias not found[alias=x])>", False),
        ("RPC error: [describe_alias], <MilvusException: (code=2, message=Fail connecting to server)>", True),
        ("RPC error: [search], <MilvusException: (code=1600, message=alias not found[alias=x])>", True),
        ("Unexpected error: [describe_alias], boom\nTraceback:\nalias not found", True),
    ],
)
def test_only_the_missing_alias_record_of_pymilvus_is_dropped(message: str, kept: bool) -> None:
    record = logging.LogRecord(PYMILVUS_CALL_LOGGER, logging.ERROR, __file__, 1, message, None, None)
    assert QuietMissingAlias().filter(record) is kept


# --- the model guard ---------------------------------------------------------------------------

# A ConfigError of the model guard names the recorded model first, then the adapter's.
BOTH_MODELS = r"'model-a'.*'model-b'"


def test_a_collection_refuses_an_embedder_of_another_model(backend: Backend) -> None:
    """A collection created for model A records it; an adapter for model B (or another dim) raises
    ConfigError naming both, on ensure and on a first write, and writes nothing."""
    vector_settings = _settings(backend.uri)
    owner = MilvusVectorIndex(vector_settings, dim=DIM, model_id="model-a")
    owner.ensure()
    owner.upsert([_chunk("doc-m#0")])
    others = [
        MilvusVectorIndex(vector_settings, dim=DIM, model_id="model-b"),
        MilvusVectorIndex(vector_settings, dim=DIM, model_id="model-b"),
        MilvusVectorIndex(vector_settings, dim=DIM + 1, model_id="model-a"),
    ]
    try:
        assert owner.recorded_model() == "model-a"
        with pytest.raises(ConfigError, match=BOTH_MODELS):
            others[0].ensure()
        with pytest.raises(ConfigError, match=BOTH_MODELS):
            others[1].upsert([_chunk("doc-m#1", 2)])
        with pytest.raises(ConfigError, match="'model-b'"):
            others[1].delete([ChunkDelete("doc-m#0", 2)])
        with pytest.raises(ConfigError, match=f"dim {DIM}.*dim {DIM + 1}"):
            others[2].ensure()
        assert owner.get(["doc-m#0", "doc-m#1"]) == {"doc-m#0": _stored(_chunk("doc-m#0"))}
        same = MilvusVectorIndex(vector_settings, dim=DIM, model_id="model-a")
        unnamed = MilvusVectorIndex(vector_settings, dim=DIM)
        for accepted in (same, unnamed):
            accepted.ensure()
            accepted.close()
    finally:
        for idx in others:
            idx.close()
        owner.drop()
        owner.close()


def test_the_model_guard_works_through_an_alias(backend: Backend, raw: MilvusClient) -> None:
    """An adapter on an alias checks the model recorded with the collection the alias points at."""
    recorded = MilvusVectorIndex(_settings(backend.uri), dim=DIM, model_id="model-a")
    recorded.ensure()
    alias = f"a_{uuid.uuid4().hex}"
    recorded.point_alias(alias, recorded.name)
    through_alias = MilvusVectorIndex(
        recorded.settings.model_copy(update={"collection": alias}), dim=DIM, model_id="model-b"
    )
    try:
        assert through_alias.recorded_model() == "model-a"
        with pytest.raises(ConfigError, match=BOTH_MODELS):
            through_alias.upsert([_chunk("doc-m#0")])
        assert recorded.count() == 0
    finally:
        through_alias.close()
        raw.drop_alias(alias, timeout=REQUEST_TIMEOUT_S)
        recorded.drop()
        recorded.close()


def test_a_collection_without_a_record_is_accepted_and_left_unrecorded(index: MilvusVectorIndex) -> None:
    """A collection created without a model id (as before the guard existed) takes any model's writes."""
    assert index.recorded_model() is None
    later = MilvusVectorIndex(index.settings, dim=DIM, model_id="model-z")
    try:
        later.ensure()
        later.upsert([_chunk("doc-u#0")])
        assert later.recorded_model() is None
        assert index.count() == 1
    finally:
        later.close()


def test_the_model_record_survives_reopening_a_lite_file(tmp_path: Path) -> None:
    """The recorded model is read back from a milvus-lite file after its server was released."""
    path = str(tmp_path / "milvus.db")
    vector_settings = _settings(path)
    first = MilvusVectorIndex(vector_settings, dim=DIM, model_id="model-a")
    first.ensure()
    first.close()
    server_manager_instance.release_server(path)
    again = MilvusVectorIndex(vector_settings, dim=DIM, model_id="model-b")
    try:
        assert again.recorded_model() == "model-a"
        with pytest.raises(ConfigError, match=BOTH_MODELS):
            again.ensure()
    finally:
        again.close()
        server_manager_instance.release_server(path)


SECRET_TOKEN = "tok-5ecret-Zq81"
SECRET_PASSWORD = "pw-5ecret-Xk27"


def test_credentials_never_reach_logs(
    backend: Backend, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    """Token and password appear in no log record (pymilvus at DEBUG included), output or repr."""
    with_token = _settings(backend.uri, token=SecretStr(SECRET_TOKEN))
    with_password = _settings(backend.uri, user="root", password=SecretStr(SECRET_PASSWORD))
    unreachable = _settings(
        f"http://127.0.0.1:{free_port()}",
        token=SecretStr(SECRET_TOKEN),
        request_timeout_s=UNREACHABLE_TIMEOUT_S,
        connect_timeout_s=UNREACHABLE_TIMEOUT_S,
    )
    with _all_logs_at_debug(caplog), capture_logs() as events:
        _exercise(with_token)
        _exercise(with_password)
        with pytest.raises(TransientStoreError) as failure:
            MilvusVectorIndex(unreachable, dim=DIM).ensure()
    out, err = capfd.readouterr()
    texts = [caplog.text, out, err, repr(events), str(failure.value), repr(failure.value.__cause__)]
    texts += [repr(s) for s in (with_token, with_password)] + [str(s) for s in (with_token, with_password)]
    for text in texts:
        assert SECRET_TOKEN not in text and SECRET_PASSWORD not in text
    assert caplog.records, "nothing was logged: the capture is not wired to pymilvus's loggers"


def _exercise(vector_settings: VectorSettings) -> None:
    idx = MilvusVectorIndex(vector_settings, dim=DIM)
    try:
        idx.ensure()
        idx.upsert([_chunk("doc-c#0")])
        assert set(idx.get(["doc-c#0"])) == {"doc-c#0"}
        assert [c.chunk_id for c in idx.scan()] == ["doc-c#0"]
        idx.search(_vector("q"), 1)
        idx.delete([ChunkDelete("doc-c#0", 2)])
        idx.drop()
    finally:
        idx.close()


# pymilvus's loggers do not propagate to the root logger, so they are attached to caplog one by one.
LOGGER_NAMES = ("", "pymilvus", "pymilvus.milvus_client", "grpc", "milvus_lite")


@contextmanager
def _all_logs_at_debug(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Route the root logger and pymilvus's own loggers into caplog at DEBUG."""
    loggers = [logging.getLogger(name) for name in LOGGER_NAMES]
    levels = [logger.level for logger in loggers]
    for logger in loggers[1:]:
        logger.addHandler(caplog.handler)
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        for logger in loggers[1:]:
            logger.removeHandler(caplog.handler)


# --- faults: unreachable, stopped and crashed servers ------------------------------------------


def _unreachable_index(uri: str) -> MilvusVectorIndex:
    return MilvusVectorIndex(
        _settings(uri, request_timeout_s=UNREACHABLE_TIMEOUT_S, connect_timeout_s=UNREACHABLE_TIMEOUT_S),
        dim=DIM,
    )


def test_a_closed_port_raises_transient_at_once() -> None:
    """Nothing listening on the port: ensure() raises TransientStoreError within the timeout."""
    idx = _unreachable_index(f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(TransientStoreError, match="connect"):
        idx.ensure()
    assert time.monotonic() - started < UNREACHABLE_TIMEOUT_S + UNREACHABLE_SLACK_S


def test_a_server_that_never_answers_raises_transient_within_the_timeout() -> None:
    """A port that accepts connections but never speaks gRPC cannot hang a call past its timeout."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        idx = _unreachable_index(f"http://127.0.0.1:{silent.getsockname()[1]}")
        started = time.monotonic()
        with pytest.raises(TransientStoreError):
            idx.count()
        elapsed_s = time.monotonic() - started
    assert elapsed_s < UNREACHABLE_TIMEOUT_S + UNREACHABLE_SLACK_S


def test_a_stopped_lite_server_raises_transient(tmp_path: Path) -> None:
    """Once the milvus-lite server process is gone, writes and reads raise TransientStoreError promptly."""
    server = LiteServer(tmp_path / "data")
    server.start()
    idx = _unreachable_index(server.uri)
    try:
        idx.ensure()
        idx.upsert([_chunk("doc-x#0")])
    finally:
        server.stop()
    for call in (lambda: idx.upsert([_chunk("doc-x#0", 2)]), idx.count, lambda: list(idx.scan())):
        started = time.monotonic()
        with pytest.raises(TransientStoreError):
            call()
        assert time.monotonic() - started < UNREACHABLE_TIMEOUT_S + UNREACHABLE_SLACK_S
    idx.close()


def test_a_reopened_lite_file_is_loaded_and_keeps_its_data(tmp_path: Path) -> None:
    """After the in-process server of a .db file is released, ensure() reloads it and the data is there."""
    path = str(tmp_path / "nested" / "milvus.db")
    vector_settings = _settings(path)
    first = MilvusVectorIndex(vector_settings, dim=DIM)
    first.ensure()
    first.upsert([_chunk("doc-o#0"), _chunk("doc-o#1")])
    first.delete([ChunkDelete("doc-o#1", 2)])
    first.close()
    server_manager_instance.release_server(path)
    again = MilvusVectorIndex(vector_settings, dim=DIM)
    try:
        again.ensure()
        assert again.get(["doc-o#0", "doc-o#1"]) == {"doc-o#0": _stored(_chunk("doc-o#0"))}
        assert again.count() == 1
    finally:
        again.close()
        server_manager_instance.release_server(path)


def test_real_server_survives_kill9_and_restart(real_milvus: RealMilvus) -> None:
    """kill -9 of Milvus 2.3.5: calls raise TransientStoreError, and after a restart the data is intact."""
    idx = MilvusVectorIndex(_settings(real_milvus.uri), dim=DIM)
    idx.ensure()
    chunks = _many(50)
    idx.upsert(chunks)
    idx.delete([ChunkDelete(chunks[0].chunk_id, 2)])
    probe = _unreachable_index(real_milvus.uri)
    real_milvus.kill9()
    try:
        started = time.monotonic()
        with pytest.raises(TransientStoreError):
            probe.count()
        assert time.monotonic() - started < UNREACHABLE_TIMEOUT_S + UNREACHABLE_SLACK_S
    finally:
        probe.close()
        real_milvus.start()
    _wait_until_readable(idx)
    idx.ensure()
    expected = {c.chunk_id for c in chunks[1:]}
    assert idx.count() == len(expected), f"count(*) after kill -9 and restart{STORE_BUG_HINT}"
    assert {c.chunk_id for c in idx.scan()} == expected, f"chunks after kill -9 and restart{STORE_BUG_HINT}"
    idx.drop()
    idx.close()


def _wait_until_readable(idx: MilvusVectorIndex) -> None:
    """Poll count() until the restarted server has reloaded the collection; only transient errors allowed."""
    deadline = time.monotonic() + RELOAD_AFTER_CRASH_DEADLINE_S
    while True:
        try:
            idx.count()
            return
        except TransientStoreError:
            if time.monotonic() > deadline:
                raise
            time.sleep(RELOAD_POLL_INTERVAL_S)


def test_a_released_collection_is_loaded_again_on_use(index: MilvusVectorIndex, raw: MilvusClient) -> None:
    """After the collection is released (as after a server restart), reads load it and succeed."""
    chunks = _many(5)
    index.upsert(chunks)
    raw.release_collection(index.name, timeout=REQUEST_TIMEOUT_S)
    assert sorted(index.get([c.chunk_id for c in chunks])) == sorted(c.chunk_id for c in chunks)



def test_an_alias_left_dangling_by_a_dropped_collection_is_pointed_again(backend: Backend, raw: MilvusClient) -> None:
    """A collection dropped behind lockstep's back (Milvus 2.3 keeps its alias, dangling) does
    not stop the alias from being pointed at a new collection."""
    first = MilvusVectorIndex(_settings(backend.uri), dim=DIM)
    second = MilvusVectorIndex(_settings(backend.uri), dim=DIM)
    first.ensure()
    second.ensure()
    alias = f"{first.name}_alias"
    try:
        first.point_alias(alias, first.name)
        try:
            raw.drop_collection(first.name)  # behind the adapter's back
        except Exception:  # a server that refuses keeps the alias valid: drop it properly
            first.drop()
        second.point_alias(alias, second.name)
        assert second.alias_target(alias) == second.name
        # Reads through the alias reach the new collection.
        second.upsert([_chunk("d#0")])
        through = MilvusVectorIndex(_settings(backend.uri, collection=alias), dim=DIM)
        try:
            assert set(through.get(["d#0"])) == {"d#0"}
        finally:
            through.close()
    finally:
        raw.drop_alias(alias)
        second.drop()
        first.close()
        second.close()


def test_a_connect_refused_at_once_is_tried_again_and_a_timed_out_one_is_not(
    lite_server: LiteServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A handshake refused with a transient status is retried against the real server (the
    refusal is injected once in front of the real client: the GOAWAY "too many pings" that
    milvus-lite's server sends takes minutes of idle keepalives to provoke); one that used up
    the connect timeout on a server that never answers is reported without a second attempt."""
    from pymilvus import MilvusException

    from adapters.vector import milvus as milvus_module

    real_client = milvus_module._client
    calls: list[str] = []

    def refused_once(settings: VectorSettings) -> MilvusClient:
        calls.append(settings.uri)
        if len(calls) == 1:
            raise MilvusException(code=2, message="Fail connecting to server: Too many pings")
        return real_client(settings)

    monkeypatch.setattr(milvus_module, "_client", refused_once)
    idx = MilvusVectorIndex(_settings(lite_server.uri), dim=DIM)
    try:
        idx.ensure()
        idx.upsert([_chunk("retry#0")])
        assert set(idx.get(["retry#0"])) == {"retry#0"}
        assert len(calls) == 2
    finally:
        idx.drop()
        idx.close()

    # A real server that accepts connections but never speaks gRPC: the connect uses up its
    # timeout, and is not tried again.
    slow_calls: list[str] = []

    def counted(settings: VectorSettings) -> MilvusClient:
        slow_calls.append(settings.uri)
        return real_client(settings)

    monkeypatch.setattr(milvus_module, "_client", counted)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        slow = _unreachable_index(f"http://127.0.0.1:{silent.getsockname()[1]}")
        with pytest.raises(TransientStoreError, match="connect failed"):
            slow.ensure()
    assert len(slow_calls) == 1
