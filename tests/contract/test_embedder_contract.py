"""Embedder contract: the same suite for every embedder adapter, and the HashedEmbedder contract
for the cache wrapper.

The adapters: the hashing embedder; all-MiniLM-L6-v2 in-process (the bundled offline model, the
``local-model`` extra: missing, it fails, never skips); the OpenAI-compatible HTTP client against
a real local server speaking the embeddings API (``tests/support/embed_server.py``); and the
cache wrapper, once over the hashing embedder with the production cache (memory front over the
SQLite ledger's table; the float32 array path) and once over the HTTP client with the bounded
memory cache (the list path). What the model really receives is counted outside the wrapper
(texts the HTTP server answered, texts handed to the hashing embedder), so the wrapper's own
counters are checked against it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

import adapters.embedders
from adapters.embedders.cached import CachedEmbedder, MemoryEmbeddingCache, TieredEmbeddingCache
from adapters.embedders.hashing import HashingEmbedder
from adapters.embedders.openai_http import OpenAIEmbedder
from adapters.embedders.sentence_transformer import SentenceTransformerEmbedder
from adapters.ledger.sqlite import SqliteEmbeddingCache, SqliteLedger
from coordinator.chunking import content_hash
from coordinator.ports import Embedder, HashedEmbedder
from tests.support.embed_server import MODEL, EmbedServer

DIM = 384
# Bounds of every HTTP call; the server is local and the batches small.
REQUEST_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 5.0
# Vectors computed twice must agree this closely (a local model may batch in another order).
SAME_ATOL = 1e-5
# Vectors of two different texts must differ at least this much somewhere.
DIFFERENT_MIN = 1e-3
# Holds every vector these tests make.
CACHE_ENTRIES_MAX = 10_000
PUNCTUATION_ONLY = "!!! ??? ..."
# More texts than one request or forward pass takes (32 for both), so order holds across batches.
TEXTS = [
    "",
    "The quick brown fox jumps over the lazy dog.",
    "Kafka consumers commit offsets after processing a batch.",
    "Ünïcödé straße — naïve café!",
    PUNCTUATION_ONLY,
    "x" * 3000,
    *(f"chunk number {i} about topic {i % 7}" for i in range(40)),
]
ADAPTERS = ["hashing", "sentence_transformer", "openai_http", "cached_hashing", "cached_openai"]
# The module of adapters/embedders/ each adapter comes from (the completeness test holds this).
MODULE_OF = {
    "hashing": "hashing",
    "sentence_transformer": "sentence_transformer",
    "openai_http": "openai_http",
    "cached_hashing": "cached",
    "cached_openai": "cached",
}
HASHED_ADAPTERS = ["cached_hashing", "cached_openai"]


class CountingHashingEmbedder:
    """A real HashingEmbedder that counts the texts it is handed, through either of its methods
    (the cache wrapper uses ``embed_array`` when the inner embedder has it)."""

    def __init__(self) -> None:
        self.inner = HashingEmbedder(dim=DIM)
        self.model_id, self.dim = self.inner.model_id, self.inner.dim
        self.texts = 0

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        self.texts += len(texts)
        return self.inner.embed(texts)

    def embed_array(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        self.texts += len(texts)
        return self.inner.embed_array(texts)


@dataclass
class Adapter:
    """One adapter under test, a way to build another with the same configuration, and (where it
    can be observed outside the adapter) how many texts its model has received so far.

    ``words_only``: the model behind it is the hashing embedder, which by design sees only the
    lower-cased words of a text (a bag of word and n-gram features), so texts with the same words
    share a vector and every text without a word gets one fixed vector.
    """

    embedder: Embedder
    again: Callable[[], Embedder]
    model_texts: Callable[[], int] | None = None
    words_only: bool = True


@pytest.fixture(scope="module")
def local_model() -> SentenceTransformerEmbedder:
    """The bundled all-MiniLM-L6-v2, loaded once for the module."""
    return SentenceTransformerEmbedder()


def _http(server: EmbedServer) -> OpenAIEmbedder:
    return OpenAIEmbedder(server.url, MODEL, DIM, timeout_s=REQUEST_TIMEOUT_S, connect_timeout_s=CONNECT_TIMEOUT_S)


def _answered(server: EmbedServer) -> Callable[[], int]:
    return lambda: sum(r.batch_size for r in server.requests if r.status == 200)


def _build(kind: str, request: pytest.FixtureRequest, tmp_path: Path, closers: list[Callable[[], None]]) -> Adapter:
    """The adapter of ``kind``; its servers and files are requested lazily and closed by ``closers``."""
    if kind == "hashing":
        return Adapter(HashingEmbedder(dim=DIM), lambda: HashingEmbedder(dim=DIM))
    if kind == "sentence_transformer":
        return Adapter(request.getfixturevalue("local_model"), SentenceTransformerEmbedder, words_only=False)
    server: EmbedServer = request.getfixturevalue("embed_server")
    if kind == "openai_http":
        client = _http(server)
        closers.append(client.close)
        return Adapter(client, lambda: _http(server), _answered(server))
    if kind == "cached_hashing":
        ledger = SqliteLedger(tmp_path / "ledger.db")
        closers.append(ledger.close)
        inner = CountingHashingEmbedder()
        cache = TieredEmbeddingCache(SqliteEmbeddingCache(ledger), front_entries_max=CACHE_ENTRIES_MAX)
        return Adapter(CachedEmbedder(inner, cache), lambda: CachedEmbedder(HashingEmbedder(dim=DIM), cache), lambda: inner.texts)
    if kind == "cached_openai":
        client = _http(server)
        closers.append(client.close)
        cached = CachedEmbedder(client, MemoryEmbeddingCache(CACHE_ENTRIES_MAX))
        return Adapter(cached, lambda: CachedEmbedder(_http(server), MemoryEmbeddingCache(CACHE_ENTRIES_MAX)), _answered(server))
    raise AssertionError(f"no embedder {kind}")


@pytest.fixture(params=ADAPTERS)
def adapter(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Adapter]:
    closers: list[Callable[[], None]] = []
    yield _build(request.param, request, tmp_path, closers)
    for close in closers:
        close()


@pytest.fixture(params=HASHED_ADAPTERS)
def hashed(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Adapter]:
    closers: list[Callable[[], None]] = []
    made = _build(request.param, request, tmp_path, closers)
    assert made.model_texts is not None, "a hashed adapter's model calls must be observable"
    yield made
    for close in closers:
        close()


def _close_enough(a: Sequence[float], b: Sequence[float]) -> bool:
    return bool(np.allclose(a, b, rtol=0.0, atol=SAME_ATOL))


def _close(embedder: Embedder) -> None:
    """Release the HTTP connections of an embedder built by ``again``."""
    inner = embedder.inner if isinstance(embedder, CachedEmbedder) else embedder
    if isinstance(inner, OpenAIEmbedder):
        inner.close()


def _items(texts: Sequence[str]) -> list[tuple[str, str]]:
    return [(content_hash(t), t) for t in texts]


# --- the Embedder port ----------------------------------------------------------------------------


def test_one_vector_of_length_dim_per_text_in_order(adapter: Adapter) -> None:
    """embed gives one finite vector of length ``dim`` per text, across batch boundaries, each
    the vector its text gets alone (so the order is the input's)."""
    embedder = adapter.embedder
    vectors = embedder.embed(TEXTS)
    assert len(vectors) == len(TEXTS)
    matrix = np.asarray(vectors, dtype=np.float64)
    assert matrix.shape == (len(TEXTS), embedder.dim) and np.isfinite(matrix).all()
    for i in (0, 3, 5, 33, len(TEXTS) - 1):
        [alone] = embedder.embed([TEXTS[i]])
        assert _close_enough(alone, vectors[i]), f"text {i} came back in another place"


def test_the_same_text_gives_the_same_vector(adapter: Adapter) -> None:
    """A text repeated in one call, embedded again, or embedded by a second instance with the
    same configuration, gets the same vector."""
    first = adapter.embedder.embed(["repeat me", "something else", "repeat me"])
    assert _close_enough(first[0], first[2])
    assert _close_enough(adapter.embedder.embed(["repeat me"])[0], first[0])
    other = adapter.again()
    try:
        assert _close_enough(other.embed(["repeat me"])[0], first[0])
    finally:
        _close(other)


def test_different_texts_give_different_vectors(adapter: Adapter) -> None:
    """No two of a set of texts with different words share a vector."""
    texts = [t for t in TEXTS[:12] if t != PUNCTUATION_ONLY]
    vectors = np.asarray(adapter.embedder.embed(texts), dtype=np.float64)
    for i in range(len(texts)):
        for j in range(i + 1, len(texts)):
            gap = float(np.max(np.abs(vectors[i] - vectors[j])))
            assert gap > DIFFERENT_MIN, f"{texts[i][:30]!r} and {texts[j][:30]!r} got one vector"


def test_texts_with_the_same_words_share_a_vector_only_in_a_words_only_space(adapter: Adapter) -> None:
    """The hashing space (directly, over HTTP or cached) gives texts differing only in case and
    punctuation one vector, and all wordless texts another; the language model tells them apart."""
    empty, punctuation, title, lower = adapter.embedder.embed(["", PUNCTUATION_ONLY, "Hello, World!", "hello world"])
    assert _close_enough(empty, punctuation) is adapter.words_only
    assert _close_enough(title, lower) is adapter.words_only
    assert not _close_enough(empty, lower)


def test_no_texts_give_no_vectors_without_asking_the_model(adapter: Adapter) -> None:
    """embed([]) is [] and, where the model's traffic can be seen, sends it nothing."""
    before = adapter.model_texts() if adapter.model_texts is not None else None
    assert adapter.embedder.embed([]) == []
    if adapter.model_texts is not None:
        assert adapter.model_texts() == before


def test_model_id_and_dim_are_stable_and_describe_the_vectors(adapter: Adapter) -> None:
    """``model_id`` is a non-empty string, equal for another instance of the same configuration
    (it is the embedding cache's key), and ``dim`` is the length of every vector."""
    embedder = adapter.embedder
    assert isinstance(embedder, Embedder)
    assert isinstance(embedder.model_id, str) and embedder.model_id.strip()
    assert isinstance(embedder.dim, int) and embedder.dim == DIM
    other = adapter.again()
    try:
        assert (other.model_id, other.dim) == (embedder.model_id, embedder.dim)
    finally:
        _close(other)


# --- the HashedEmbedder port (the cache wrapper) ----------------------------------------------------


def test_identical_texts_are_embedded_once_and_then_served_from_the_cache(hashed: Adapter) -> None:
    """Duplicates in one call reach the model once; a second call reaches it not at all; the
    vectors are the model's; ``embed_calls`` counts texts sent, ``cache_hits`` hashes answered."""
    embedder = hashed.embedder
    assert isinstance(embedder, HashedEmbedder) and hashed.model_texts is not None
    items = _items(["alpha", "beta", "alpha", "gamma", "beta"])
    sent, calls, hits = hashed.model_texts(), embedder.embed_calls, embedder.cache_hits
    first = embedder.embed_hashed(items)
    assert hashed.model_texts() - sent == 3 and embedder.embed_calls - calls == 3
    assert embedder.cache_hits == hits
    expected = dict(zip((h for h, _ in _items(["alpha", "beta", "gamma"])), embedder.embed(["alpha", "beta", "gamma"]), strict=True))
    assert first.keys() == expected.keys()
    assert all(_close_enough(first[h], expected[h]) for h in expected)
    sent, calls = hashed.model_texts(), embedder.embed_calls
    second = embedder.embed_hashed(items)
    assert second == first
    assert (hashed.model_texts(), embedder.embed_calls) == (sent, calls), "a cached text reached the model"
    assert embedder.cache_hits - hits == 3


def test_lookup_answers_from_the_cache_only_and_never_calls_the_model(hashed: Adapter) -> None:
    """lookup of unknown hashes is empty; after embedding, it answers the known hash (counted once
    however often it is asked) and leaves out the unknown, and the model is never called."""
    embedder = hashed.embedder
    assert isinstance(embedder, HashedEmbedder) and hashed.model_texts is not None
    known, unknown = content_hash("known text"), content_hash("never embedded")
    sent, calls, hits = hashed.model_texts(), embedder.embed_calls, embedder.cache_hits
    assert embedder.lookup([unknown]) == {}
    assert (hashed.model_texts(), embedder.embed_calls, embedder.cache_hits) == (sent, calls, hits)
    stored = embedder.embed_hashed([(known, "known text")])
    sent, calls, hits = hashed.model_texts(), embedder.embed_calls, embedder.cache_hits
    assert embedder.lookup([known, known, unknown]) == stored
    assert (hashed.model_texts(), embedder.embed_calls) == (sent, calls), "lookup called the model"
    assert embedder.cache_hits - hits == 1


# --- coverage of the suite ------------------------------------------------------------------------


def test_every_embedder_adapter_is_in_the_suite() -> None:
    """Every module of adapters/embedders/ has an adapter here (the cache wrapper twice); the
    settings module holds the adapters' settings, no adapter."""
    modules = {p.stem for p in Path(adapters.embedders.__file__).parent.glob("*.py")} - {"__init__", "settings"}
    assert set(MODULE_OF) == set(ADAPTERS)
    assert set(MODULE_OF.values()) == modules
