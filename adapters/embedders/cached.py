"""An embedder wrapped in an embedding cache, and a bounded in-memory cache.

``CachedEmbedder.embed_hashed`` is what the apply path calls: chunks arrive with their content
hash (sha256 of the text), the cache answers what it already knows for this model, and only the
missing distinct texts go to the model — so identical chunks across documents are embedded once,
and an unchanged chunk is never embedded again while its vector is cached.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import structlog

from coordinator.errors import PermanentEmbedError
from coordinator.model import Vector
from coordinator.ports import Embedder, EmbeddingCache

log = structlog.get_logger(__name__)

# Misses go to the model in groups of at most this many texts, and each group is stored before
# the next is embedded, so that a failure part-way through keeps the work already done.
MISS_GROUP_TEXTS_MAX = 512


@runtime_checkable
class ArrayEmbedder(Protocol):
    """An embedder that also gives its vectors as one (n, dim) float32 array (the hashing
    embedder): the caches store those rows as they are, without converting each float."""

    def embed_array(self, texts: Sequence[str]) -> npt.NDArray[np.float32]: ...


class CachedEmbedder:
    """``inner`` behind ``cache``: implements the HashedEmbedder port (and Embedder).

    ``embed_calls`` is the number of texts actually sent to ``inner`` (after deduplication by
    hash); ``cache_hits`` is the number of distinct hashes per call (of ``lookup`` or
    ``embed_hashed``) answered by the cache. Both only grow.
    """

    def __init__(self, inner: Embedder, cache: EmbeddingCache) -> None:
        self.inner = inner
        self.cache = cache
        self.model_id = inner.model_id
        self.dim = inner.dim
        self.embed_calls = 0
        self.cache_hits = 0
        self._array_inner = inner if isinstance(inner, ArrayEmbedder) else None

    def __repr__(self) -> str:
        return f"CachedEmbedder({self.inner!r})"

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Uncached pass-through, so that a CachedEmbedder is itself an Embedder."""
        vectors = self.inner.embed(texts)
        self.embed_calls += len(texts)
        _check_vectors(vectors, len(texts), self.dim)
        return vectors

    def embed_hashed(self, items: Sequence[tuple[str, str]]) -> dict[str, list[float]]:
        """The vector of every (content_hash, text) item, keyed by hash.

        Raises ValueError if one hash comes with two different texts (a caller bug).
        """
        texts = _distinct_texts(items)
        result = self.lookup(texts.keys())
        misses = [(h, t) for h, t in texts.items() if h not in result]
        for start in range(0, len(misses), MISS_GROUP_TEXTS_MAX):
            result.update(self._embed_and_store(misses[start : start + MISS_GROUP_TEXTS_MAX]))
        log.debug("embed_hashed", model_id=self.model_id, distinct=len(texts),
                  cache_hits=len(result) - len(misses), embedded=len(misses))
        return result

    def lookup(self, hashes: Iterable[str]) -> dict[str, list[float]]:
        """Cached vectors of these hashes only; never calls the model."""
        wanted = dict.fromkeys(hashes)
        found = self.cache.get_many(self.model_id, wanted.keys())
        result = {h: list(v) for h, v in found.items() if h in wanted}
        self.cache_hits += len(result)
        return result

    def _embed_and_store(self, group: Sequence[tuple[str, str]]) -> dict[str, list[float]]:
        texts = [text for _, text in group]
        if self._array_inner is not None:
            # Rows of the float32 matrix go to the cache as they are; each is listed once, for
            # the caller. The values are the same as ``embed`` gives.
            matrix = self._array_inner.embed_array(texts)
            self.embed_calls += len(group)
            _check_vectors(matrix, len(group), self.dim)
            rows = {h: row for (h, _), row in zip(group, matrix, strict=True)}
            self.cache.put_many(self.model_id, rows)
            return {h: row.tolist() for h, row in rows.items()}
        vectors = self.inner.embed(texts)
        self.embed_calls += len(group)
        _check_vectors(vectors, len(group), self.dim)
        fresh = {h: vector for (h, _), vector in zip(group, vectors, strict=True)}
        self.cache.put_many(self.model_id, fresh)
        return fresh


class MemoryEmbeddingCache:
    """A least-recently-used cache of at most ``max_entries`` vectors, in process memory.

    Thread-safe; a lookup counts as a use. Vectors are copied in and out, so callers cannot
    change what is cached.
    """

    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], tuple[float, ...]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get_many(self, model_id: str, hashes: Iterable[str]) -> dict[str, list[float]]:
        found: dict[str, list[float]] = {}
        with self._lock:
            for h in hashes:
                vector = self._entries.get((model_id, h))
                if vector is not None:
                    self._entries.move_to_end((model_id, h))
                    found[h] = list(vector)
        return found

    def put_many(self, model_id: str, vectors: Mapping[str, Vector]) -> None:
        with self._lock:
            for h, vector in vectors.items():
                self._entries[(model_id, h)] = tuple(float(x) for x in vector)
                self._entries.move_to_end((model_id, h))
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)


class TieredEmbeddingCache:
    """A bounded in-memory front over a durable cache (the ledger's table).

    A (model, hash) key names one vector forever, so the front is never stale. The apply path
    reads every vector twice in a row (to prepare the intent, then to write the vector index)
    and the front answers the second read without a database round trip. Vectors are kept as
    float32, exactly as the durable cache stores and returns them, so a vector is the same
    whichever tier answers.
    """

    def __init__(self, durable: EmbeddingCache, *, front_entries_max: int) -> None:
        if front_entries_max < 1:
            raise ValueError("front_entries_max must be at least 1")
        self.durable = durable
        self.front_entries_max = front_entries_max
        self._front: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get_many(self, model_id: str, hashes: Iterable[str]) -> dict[str, list[float]]:
        wanted = list(dict.fromkeys(hashes))
        found: dict[str, list[float]] = {}
        with self._lock:
            for h in wanted:
                vector = self._front.get((model_id, h))
                if vector is not None:
                    self._front.move_to_end((model_id, h))
                    found[h] = vector.tolist()
        rest = [h for h in wanted if h not in found]
        if rest:
            stored = self.durable.get_many(model_id, rest)
            self._remember(model_id, stored)
            found.update(stored)
        return found

    def put_many(self, model_id: str, vectors: Mapping[str, Vector]) -> None:
        self.durable.put_many(model_id, vectors)
        self._remember(model_id, vectors)

    def __len__(self) -> int:
        return len(self._front)

    def _remember(self, model_id: str, vectors: Mapping[str, Vector]) -> None:
        with self._lock:
            for h, vector in vectors.items():
                # A copy: a row of a caller's matrix must not keep the whole matrix alive.
                self._front[(model_id, h)] = np.array(vector, dtype=np.float32)
                self._front.move_to_end((model_id, h))
            while len(self._front) > self.front_entries_max:
                self._front.popitem(last=False)


class ReadThroughCache:
    """A cache for query vectors: reads a durable cache (a query that is also a chunk's text is
    never embedded again), keeps what it embeds in a bounded memory of its own, and writes
    nothing durable: a search must not change the ledger, and a read replica may not be allowed
    to."""

    def __init__(self, durable: EmbeddingCache, *, memory_entries_max: int) -> None:
        self.durable = durable
        self.memory = MemoryEmbeddingCache(memory_entries_max)

    def get_many(self, model_id: str, hashes: Iterable[str]) -> dict[str, list[float]]:
        wanted = list(dict.fromkeys(hashes))
        found = self.memory.get_many(model_id, wanted)
        rest = [h for h in wanted if h not in found]
        if rest:
            found.update(self.durable.get_many(model_id, rest))
        return found

    def put_many(self, model_id: str, vectors: Mapping[str, Vector]) -> None:
        self.memory.put_many(model_id, vectors)


def _distinct_texts(items: Sequence[tuple[str, str]]) -> dict[str, str]:
    """hash -> text, first occurrence order; a hash seen with two texts is a caller bug."""
    texts: dict[str, str] = {}
    for h, text in items:
        known = texts.setdefault(h, text)
        if known != text:
            raise ValueError(f"content hash {h} given for two different texts")
    return texts


def _check_vectors(vectors: Sequence[Sequence[float]] | npt.NDArray[np.float32], count: int, dim: int) -> None:
    """The inner embedder kept its contract: one vector per text, each of length ``dim``."""
    if len(vectors) != count:
        raise PermanentEmbedError(f"embedder returned {len(vectors)} vectors for {count} texts")
    if any(len(v) != dim for v in vectors):
        raise PermanentEmbedError(f"embedder returned a malformed vector (expected {dim} floats)")
