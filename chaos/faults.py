"""In-process fault injectors that wrap real collaborators (embedders, indexes).

Each injector is seeded and reports what it did (``injected``), so a test can assert that the
fault really happened instead of silently passing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from coordinator.errors import PermanentEmbedError, RefusedContent, TransientEmbedError, TransientStoreError
from coordinator.model import ChunkDelete, IndexedChunk, ItemResult, ItemStatus, StoredChunk, WriteResult
from coordinator.ports import ChunkIndex, Embedder

# Fault kinds a FaultyEmbedder can be armed with for a number of calls.
EMBED_TIMEOUT = "embed_timeout"
EMBED_5XX = "embed_5xx"
MALFORMED_VECTOR = "malformed_vector"
EMBED_ARMABLE = (EMBED_TIMEOUT, EMBED_5XX, MALFORMED_VECTOR)
# The kind a FaultyIndex reports a refused document under.
STORE_REFUSES_DOCUMENT = "store_refuses_document"


@dataclass
class FaultyEmbedder:
    """An Embedder that fails on purpose: while ``down``, on texts holding ``poison``, by
    returning vectors of the wrong dimension while ``malformed``, or for the next few calls it
    was armed for (``arm``: a timeout, an HTTP 5xx, a wrong-dimension vector).

    ``texts_embedded`` counts texts that got a well-formed vector: the chaos runner bounds it by
    the distinct chunk texts of the source."""

    inner: Embedder
    poison: str = "\x00POISON\x00"
    down: bool = False
    malformed: bool = False
    injected: Counter[str] = field(default_factory=Counter)
    armed: Counter[str] = field(default_factory=Counter)
    texts_embedded: int = 0

    def arm(self, kind: str, calls: int) -> None:
        """Fail the next ``calls`` calls with ``kind`` (one of EMBED_ARMABLE)."""
        if kind not in EMBED_ARMABLE:
            raise ValueError(f"unknown embedder fault {kind!r}")
        self.armed[kind] += calls

    def _take(self, kind: str) -> bool:
        if self.armed[kind] <= 0:
            return False
        self.armed[kind] -= 1
        self.injected[kind] += 1
        return True

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
        if self._take(EMBED_TIMEOUT):
            raise TransientEmbedError("embedder request timed out (injected)")
        if self._take(EMBED_5XX):
            raise TransientEmbedError("embedder answered HTTP 503 (injected)")
        vectors = self.inner.embed(texts)
        if self.malformed:
            self.injected["malformed_vector"] += 1
            raise PermanentEmbedError(f"malformed vector: expected {self.dim} floats (injected)")
        if self._take(MALFORMED_VECTOR):
            # A wrong dimension, returned as a real model would: the caller must notice.
            return [v[:-1] for v in vectors]
        self.texts_embedded += len(texts)
        return vectors


@dataclass
class FaultyIndex:
    """A ChunkIndex whose writes fail with a transient error while ``down``, or for the next
    few writes it was armed for (``arm``): ``down`` (refused before the write) or ``lost_ack``
    (the write is applied, then its answer is lost: a transient error the caller must retry).
    Armed faults are reported as ``{label}_{kind}``.

    With ``refuse`` set, every chunk whose metadata holds that key is refused for good, as a store
    whose mapping an operator made strict refuses a document: per item (REJECTED, the rest of the
    request applied), as ES/OpenSearch answer a ``_bulk``, or with ``refuse_whole_request`` the
    whole request (``RefusedContent``, nothing applied), as Milvus does. Reported as
    ``store_refuses_document``."""

    inner: Any
    down: bool = False
    injected: Counter[str] = field(default_factory=Counter)
    label: str = "index"
    armed: Counter[str] = field(default_factory=Counter)
    refuse: str | None = None
    refuse_whole_request: bool = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def arm(self, kind: str, writes: int) -> None:
        """Fail the next ``writes`` writes with ``kind`` ("down" or "lost_ack")."""
        if kind not in ("down", "lost_ack"):
            raise ValueError(f"unknown index fault {kind!r}")
        self.armed[kind] += writes

    def _take(self, kind: str) -> bool:
        if self.armed[kind] <= 0:
            return False
        self.armed[kind] -= 1
        self.injected[f"{self.label}_{kind}"] += 1
        return True

    def _check(self, what: str) -> None:
        if self.down:
            self.injected[f"{what}_while_down"] += 1
            raise TransientStoreError(f"{self.inner.name} unavailable (injected)", store=self.inner.name)
        if self._take("down"):
            raise TransientStoreError(f"{self.inner.name} refused the {what} (injected)", store=self.inner.name)

    def _lose_ack(self, what: str) -> None:
        if self._take("lost_ack"):
            raise TransientStoreError(
                f"{self.inner.name} applied the {what} but the answer was lost (injected)", store=self.inner.name
            )

    def upsert(self, chunks: Sequence[IndexedChunk]) -> WriteResult:
        self._check("upsert")
        refused = [c for c in chunks if self._refuses(c)]
        if refused:
            self.injected[STORE_REFUSES_DOCUMENT] += 1
            if self.refuse_whole_request:
                raise RefusedContent(f"{self.inner.name} refused a field of the request (injected)")
        taken = [c for c in chunks if not self._refuses(c)]
        result: WriteResult = self.inner.upsert(taken) if taken else WriteResult()
        self._lose_ack("upsert")
        rejected = (ItemResult(c.chunk_id, ItemStatus.REJECTED, "strict mapping (injected)") for c in refused)
        return WriteResult((*result.items, *rejected))

    def _refuses(self, chunk: IndexedChunk) -> bool:
        return self.refuse is not None and self.refuse in chunk.metadata

    def delete(self, deletes: Sequence[ChunkDelete]) -> WriteResult:
        self._check("delete")
        result: WriteResult = self.inner.delete(deletes)
        self._lose_ack("delete")
        return result

    def get(self, chunk_ids: Sequence[str]) -> dict[str, StoredChunk]:
        self._check("get")
        result: dict[str, StoredChunk] = self.inner.get(chunk_ids)
        return result

    def scan(self, *, with_text: bool = False) -> Iterator[StoredChunk]:
        inner: ChunkIndex = self.inner
        return inner.scan(with_text=with_text)
