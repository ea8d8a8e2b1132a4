"""In-process fault injectors that wrap real collaborators (embedders, indexes).

Each injector is seeded and reports what it did (``injected``), so a test can assert that the
fault really happened instead of silently passing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from coordinator.errors import PermanentEmbedError, TransientEmbedError, TransientStoreError
from coordinator.model import ChunkDelete, IndexedChunk, StoredChunk, WriteResult
from coordinator.ports import ChunkIndex, Embedder


@dataclass
class FaultyEmbedder:
    """An Embedder that fails on purpose: while ``down``, on texts holding ``poison``, or by
    returning vectors of the wrong dimension while ``malformed``."""

    inner: Embedder
    poison: str = "\x00POISON\x00"
    down: bool = False
    malformed: bool = False
    injected: Counter[str] = field(default_factory=Counter)

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    @property
    def dim(self) -> int:
        return self.inner.dim

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if self.down:
            self.injected["embedder_down"] += 1
            raise TransientEmbedError("embedder unavailable (injected)")
        if any(self.poison in t for t in texts):
            self.injected["poison_document"] += 1
            raise TransientEmbedError("embedder timed out on this input (injected poison)")
        vectors = self.inner.embed(texts)
        if self.malformed:
            self.injected["malformed_vector"] += 1
            raise PermanentEmbedError(f"malformed vector: expected {self.dim} floats (injected)")
        return vectors


@dataclass
class FaultyIndex:
    """A ChunkIndex whose writes fail with a transient error while ``down``."""

    inner: Any
    down: bool = False
    injected: Counter[str] = field(default_factory=Counter)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _check(self, what: str) -> None:
        if self.down:
            self.injected[f"{what}_while_down"] += 1
            raise TransientStoreError(f"{self.inner.name} unavailable (injected)", store=self.inner.name)

    def upsert(self, chunks: Sequence[IndexedChunk]) -> WriteResult:
        self._check("upsert")
        result: WriteResult = self.inner.upsert(chunks)
        return result

    def delete(self, deletes: Sequence[ChunkDelete]) -> WriteResult:
        self._check("delete")
        result: WriteResult = self.inner.delete(deletes)
        return result

    def get(self, chunk_ids: Sequence[str]) -> dict[str, StoredChunk]:
        self._check("get")
        result: dict[str, StoredChunk] = self.inner.get(chunk_ids)
        return result

    def scan(self, *, with_text: bool = False) -> Iterator[StoredChunk]:
        inner: ChunkIndex = self.inner
        return inner.scan(with_text=with_text)
