"""The typed proxies to the index writer actors, each implementing its port whole.

Through a real local Ray and real embedded stores (a Tantivy directory and a milvus-lite file per
generation, opened by the writer actors alone): the shard actors' ``KeywordWriterProxy`` and
``VectorWriterProxy`` (ChunkWriter, VectorWriter) and the search path's ``VectorSearchProxy``
(VectorSearch) behave as the adapters behind them, address their own generation, and make one Ray
call per port call, so that the engine still writes a batch in one call per side. The writer
actor takes no string RPC.
"""

from __future__ import annotations

import ast
import hashlib
import random
import textwrap
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import ray

from adapters.embedders.cached import CachedEmbedder
from adapters.embedders.hashing import HashingEmbedder
from adapters.keyword.settings import KeywordSettings
from adapters.ledger.sqlite import SqliteEmbeddingCache, SqliteLedger
from adapters.vector.settings import VectorSettings
from coordinator.apply import KEYWORD, VECTOR, ApplyEngine
from coordinator.audit import Auditor
from coordinator.chunking import ChunkingSettings, chunk_id, chunk_text
from coordinator.events import ChangeEvent, Op
from coordinator.model import ChunkDelete, IndexedChunk, ItemStatus, StoredChunk, WriteResult
from coordinator.ports import ChunkIndex, ChunkWriter, VectorSearch, VectorWriter
from lockstep.ray_runtime import (
    IndexWriterActor,
    KeywordWriterProxy,
    VectorSearchProxy,
    VectorWriterProxy,
    WriterTarget,
    start_ray,
    stop_ray,
    writer_concurrency,
)
from lockstep.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DIM = 16
GENERATIONS = (1, 2)
MODEL_ID = HashingEmbedder(dim=DIM).model_id
CHUNKING = ChunkingSettings(max_chars=60)
# Starting a writer builds its clients and ensures its indexes (a new milvus-lite collection).
WRITER_START_TIMEOUT_S = 120.0
# A search of three chunks, queued behind nothing: generous on these 2-core machines.
SEARCH_TIMEOUT_S = 20.0
APPLIED, SUPERSEDED = ItemStatus.APPLIED, ItemStatus.SUPERSEDED


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    start_ray(None, num_cpus=2)
    yield
    stop_ray()


@dataclass
class Writers:
    """The two writer actors of one ``lockstep run``, over two live generations."""

    keyword: Any
    vector: Any


@pytest.fixture
def writers(local_ray: None, tmp_path: Path) -> Iterator[Writers]:
    targets = [
        WriterTarget(
            number,
            Settings(
                keyword=KeywordSettings(kind="tantivy", path=str(tmp_path / f"tantivy{number}")),
                vector=VectorSettings(uri=str(tmp_path / f"milvus{number}.db")),
            ),
            DIM,
            MODEL_ID,
        )
        for number in GENERATIONS
    ]
    handles = {
        side: IndexWriterActor.options(  # type: ignore[attr-defined]  # mypy does not apply class decorators
            max_concurrency=writer_concurrency(side, targets)
        ).remote(side, targets, "WARNING", None)
        for side in (KEYWORD, VECTOR)
    }
    built = ray.get([h.ready.remote() for h in handles.values()], timeout=WRITER_START_TIMEOUT_S)
    assert built == [list(GENERATIONS)] * 2, "every generation's client is built at start"
    yield Writers(handles[KEYWORD], handles[VECTOR])
    ray.get([h.close.remote() for h in handles.values()], timeout=WRITER_START_TIMEOUT_S)
    for handle in handles.values():
        ray.kill(handle)


class CountingHandle:
    """A real actor handle that counts the Ray calls made through it, per actor method."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.calls: Counter[str] = Counter()

    def __getattr__(self, method: str) -> SimpleNamespace:
        remote: Callable[..., Any] = getattr(self.handle, method).remote

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[method] += 1
            return remote(*args, **kwargs)

        return SimpleNamespace(remote=counted)


def _chunk(cid: str, version: int, *, lang: str = "en", vector: list[float] | None = None) -> IndexedChunk:
    text = f"text of {cid} at v{version}"
    return IndexedChunk(
        chunk_id=cid,
        doc_id=cid.rsplit("#", 1)[0],
        chunk_index=int(cid.rsplit("#", 1)[1]),
        text=text,
        content_hash=hashlib.sha256(text.encode()).hexdigest(),
        version=version,
        metadata={"lang": lang},
        vector=vector,
    )


def _stored(c: IndexedChunk) -> StoredChunk:
    return StoredChunk(c.chunk_id, c.doc_id, c.chunk_index, c.content_hash, c.version, c.text, dict(c.metadata))


def _vector(seed: str) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(0.1, 1.0) for _ in range(DIM)]


def _statuses(result: WriteResult) -> list[ItemStatus]:
    return [i.status for i in result.items]


def test_each_proxy_implements_its_port_and_claims_no_more(writers: Writers) -> None:
    """The keyword and vector proxies are ChunkWriter and VectorWriter, the search proxy a
    VectorSearch; none claims the whole ChunkIndex (a scan, count or drop it could not honour)."""
    keyword = KeywordWriterProxy(writers.keyword, 1)
    vector = VectorWriterProxy(writers.vector, 1)
    search = VectorSearchProxy(writers.vector, 1, DIM)
    assert isinstance(keyword, ChunkWriter) and not isinstance(keyword, VectorWriter)
    assert isinstance(vector, VectorWriter)
    assert isinstance(search, VectorSearch) and search.dim == DIM and search.filters_metadata
    for proxy in (keyword, vector, search):
        assert not isinstance(proxy, ChunkIndex), f"{type(proxy).__name__} claims a whole ChunkIndex"


def test_keyword_writes_through_the_proxy_keep_the_version_gate(writers: Writers) -> None:
    """Through the writer, a Tantivy index applies a write, refuses an older version as
    SUPERSEDED, reads back exactly what it holds, and deletes at a newer version."""
    keyword = KeywordWriterProxy(writers.keyword, 1)
    chunk = _chunk("d1#0", 2)
    assert _statuses(keyword.upsert([chunk])) == [APPLIED]
    assert keyword.get(["d1#0", "absent#0"]) == {"d1#0": _stored(chunk)}
    assert _statuses(keyword.upsert([replace(chunk, version=1, text="older")])) == [SUPERSEDED]
    assert keyword.get(["d1#0"]) == {"d1#0": _stored(chunk)}
    assert _statuses(keyword.delete([ChunkDelete("d1#0", 3)])) == [APPLIED]
    assert keyword.get(["d1#0"]) == {}


def test_vector_writes_and_stored_vectors_through_the_proxy(writers: Writers) -> None:
    """Through the writer, a milvus-lite collection stores chunks with their vectors, gives both
    back by chunk ID, and deletes exactly the chunks named."""
    vector = VectorWriterProxy(writers.vector, 1)
    chunks = [_chunk(f"d{i}#0", 1, vector=_vector(f"d{i}")) for i in range(3)]
    assert _statuses(vector.upsert(chunks)) == [APPLIED] * 3
    assert vector.get([c.chunk_id for c in chunks]) == {c.chunk_id: _stored(c) for c in chunks}
    fetched = vector.fetch_vectors(["d0#0", "d2#0", "absent#0"])
    assert set(fetched) == {"d0#0", "d2#0"}
    for cid, seed in (("d0#0", "d0"), ("d2#0", "d2")):
        assert fetched[cid] == pytest.approx(_vector(seed), rel=1e-6), "a stored vector comes back as written"
    assert _statuses(vector.delete([ChunkDelete("d1#0", 2)])) == [APPLIED]
    assert set(vector.get([c.chunk_id for c in chunks])) == {"d0#0", "d2#0"}


def test_each_proxy_addresses_its_own_generation(writers: Writers) -> None:
    """One writer holds every live generation's index: what a generation-2 proxy writes, a
    generation-2 proxy reads back and a generation-1 proxy does not see."""
    chunk = _chunk("g#0", 1, vector=_vector("g"))
    KeywordWriterProxy(writers.keyword, 2).upsert([chunk])
    VectorWriterProxy(writers.vector, 2).upsert([chunk])
    for number, expected in ((1, {}), (2, {"g#0": _stored(chunk)})):
        assert KeywordWriterProxy(writers.keyword, number).get(["g#0"]) == expected, f"keyword, generation {number}"
        assert VectorWriterProxy(writers.vector, number).get(["g#0"]) == expected, f"vector, generation {number}"
    assert VectorSearchProxy(writers.vector, 1, DIM).search_hits(_vector("g"), 3, strong=True) == []


def test_search_through_the_writer_finds_the_nearest_and_pushes_filters_down(writers: Writers) -> None:
    """The search proxy's hits are the adapter's: nearest first, with version, chunk index and
    metadata, and ``where`` filters in the store (k covers every chunk, so nothing else could)."""
    chunks = [
        _chunk("a#0", 4, lang="en", vector=_vector("a")),
        _chunk("b#1", 5, lang="de", vector=_vector("b")),
        _chunk("c#2", 6, lang="de", vector=_vector("c")),
    ]
    VectorWriterProxy(writers.vector, 1).upsert(chunks)
    search = VectorSearchProxy(writers.vector, 1, DIM)
    hits = search.search_hits(_vector("b"), 3, strong=True, timeout_s=SEARCH_TIMEOUT_S)
    assert len(hits) == 3 and hits[0].chunk_id == "b#1"
    assert (hits[0].version, hits[0].chunk_index, dict(hits[0].metadata)) == (5, 1, {"lang": "de"})
    filtered = search.search_hits(_vector("a"), 3, where={"lang": "de"}, strong=True)
    assert sorted(h.chunk_id for h in filtered) == ["b#1", "c#2"]


def _text(doc_id: str, version: int, paragraphs: int) -> str:
    return "\n\n".join(f"{doc_id} v{version} paragraph {p} says a thing." for p in range(paragraphs))


def test_the_engine_writes_a_batch_in_one_call_per_side_and_the_audit_probes_through_the_proxies(
    writers: Writers, tmp_path: Path
) -> None:
    """ApplyEngine over the proxies: a batch of documents costs one upsert call per side, a
    batch that also shrinks them one upsert and one delete call per side; both indexes then hold
    the committed state, which an audit probing through the proxies confirms, while a full
    audit (it streams whole indexes) is refused by type."""
    ledger = SqliteLedger(tmp_path / "ledger.db")
    keyword, vector = CountingHandle(writers.keyword), CountingHandle(writers.vector)
    engine = ApplyEngine(
        ledger=ledger,
        keyword=KeywordWriterProxy(keyword, 1),
        vector=VectorWriterProxy(vector, 1),
        embedder=CachedEmbedder(HashingEmbedder(dim=DIM), SqliteEmbeddingCache(ledger)),
        chunking=CHUNKING,
        source_name="test",
    )
    docs = [f"doc{i}" for i in range(4)]
    assert len(chunk_text(_text("doc0", 1, 3), CHUNKING)) > len(chunk_text(_text("doc0", 2, 1), CHUNKING))
    try:
        engine.apply([ChangeEvent(Op.UPSERT, d, 1, _text(d, 1, 3), {}) for d in docs])
        assert (keyword.calls, vector.calls) == (Counter(upsert=1), Counter(upsert=1))
        engine.apply([ChangeEvent(Op.UPSERT, d, 2, _text(d, 2, 1), {}) for d in docs])
        assert (keyword.calls, vector.calls) == (Counter(upsert=2, delete=1), Counter(upsert=2, delete=1))
        assert ledger.pending() == []
        expected = {
            chunk_id(d, i): 2 for d in docs for i, _ in enumerate(chunk_text(_text(d, 2, 1), CHUNKING))
        }
        probed = [chunk_id(d, i) for d in docs for i in range(3)]
        for proxy in (KeywordWriterProxy(writers.keyword, 1), VectorWriterProxy(writers.vector, 1)):
            assert {cid: c.version for cid, c in proxy.get(probed).items()} == expected, proxy.name
        auditor = Auditor(
            ledger=ledger,
            keyword=KeywordWriterProxy(writers.keyword, 1),
            vector=VectorWriterProxy(writers.vector, 1),
            source=None,
            chunking=CHUNKING,
            reference_name="ledger",
        )
        assert auditor.recheck(docs).findings == []
        with pytest.raises(TypeError, match="read by chunk ID only"):
            auditor.full()
    finally:
        engine.close()
        ledger.close()


def _string_dispatch(source: str) -> list[int]:
    """Lines that call ``getattr`` with a computed attribute name (a method chosen by a string)."""
    return [
        node.lineno
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "getattr"
        and not (len(node.args) >= 2 and isinstance(node.args[1], ast.Constant))
    ]


def _variadic_methods(source: str, class_name: str) -> list[str]:
    [cls] = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == class_name]
    return [
        f.name for f in cls.body if isinstance(f, ast.FunctionDef) and (f.args.vararg or f.args.kwarg)
    ]


def test_the_writer_actor_takes_no_string_rpc() -> None:
    """ray_runtime.py dispatches no method by name, and every method of the writer actor names
    its parameters (the check finds the string RPC it replaced)."""
    old = textwrap.dedent("""
        class IndexWriterActor:
            def call(self, generation, method, *args, **kwargs):
                return getattr(self._index(generation), method)(*args, **kwargs)
    """)
    assert _string_dispatch(old) == [4] and _variadic_methods(old, "IndexWriterActor") == ["call"]
    source = (ROOT / "lockstep" / "ray_runtime.py").read_text()
    assert _string_dispatch(source) == []
    assert _variadic_methods(source, "IndexWriterActor") == []
