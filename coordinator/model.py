"""Value objects shared by the planner, the ports and the adapters."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Vector = Sequence[float]


@dataclass(frozen=True)
class ChunkState:
    """What the ledger knows about one chunk: its position, text hash and written version."""

    chunk_id: str
    chunk_index: int
    content_hash: str
    version: int


@dataclass(frozen=True)
class DocState:
    """What the ledger knows about one document.

    ``version`` is the newest version applied (or tombstoned); ``deleted`` marks a tombstone,
    which is kept forever so that no older event can bring the document back.
    """

    doc_id: str
    version: int
    deleted: bool
    chunks: tuple[ChunkState, ...] = ()
    metadata_hash: str = ""
    source_hash: str = ""

    @property
    def live_chunk_ids(self) -> tuple[str, ...]:
        return tuple(c.chunk_id for c in self.chunks)


@dataclass(frozen=True)
class IndexedChunk:
    """One chunk as both indexes store it. ``vector`` is set only for the vector index."""

    chunk_id: str
    doc_id: str
    chunk_index: int
    text: str
    content_hash: str
    version: int
    metadata: Mapping[str, Any] = field(default_factory=dict)
    vector: Vector | None = None
    # A reconciler repair (coordinator/reconcile.py): a gated index also accepts it at a version
    # equal to the stored one (ES ``external_gte``), because the ledger is authoritative for what
    # that version holds. Live events never set it.
    overwrite_equal: bool = False


@dataclass(frozen=True)
class ChunkDelete:
    """Remove ``chunk_id``; ``version`` is strictly above any version it was written with."""

    chunk_id: str
    version: int
    # As on IndexedChunk: a reconciler's delete, accepted at a version equal to the stored one.
    overwrite_equal: bool = False


# The version of a stored entry that records none (foreign data only: every write of lockstep's
# carries one). Below every real version, so a delete at any version passes a gate over it.
NO_VERSION = -1


@dataclass(frozen=True)
class StoredChunk:
    """What an index returns when read by ID or scanned (no vector, no text unless asked).

    ``chunk_id`` and ``version`` are the store's own (ES ``_id`` and ``_version``, the Milvus
    primary key). ``foreign`` says why an entry cannot have been written by lockstep (a field
    missing or of the wrong type, a body contradicting the store's ID or version); the other
    fields then hold what could be read, with neutral values ("", -1, {}) for the rest.
    """

    chunk_id: str
    doc_id: str
    chunk_index: int
    content_hash: str
    version: int
    text: str | None = None
    metadata: Mapping[str, Any] | None = None
    foreign: str = ""


class ItemStatus(enum.StrEnum):
    """The outcome of one item of a bulk write."""

    APPLIED = "applied"
    # An equal or newer version is already there: success for an idempotent writer.
    SUPERSEDED = "superseded"
    # The store refused this item for good (mapping error, too large): goes to the DLQ.
    REJECTED = "rejected"


@dataclass(frozen=True)
class ItemResult:
    chunk_id: str
    status: ItemStatus
    reason: str = ""


@dataclass(frozen=True)
class WriteResult:
    """Per-item results of one bulk write; transient failures are raised, never returned."""

    items: tuple[ItemResult, ...] = ()

    def rejected(self) -> list[ItemResult]:
        return [i for i in self.items if i.status is ItemStatus.REJECTED]


@dataclass(frozen=True)
class SearchHit:
    chunk_id: str
    doc_id: str
    score: float
    text: str


@dataclass(frozen=True)
class DeadLetter:
    """An event that could not be applied, kept with the reason so nothing is silently lost."""

    source: str
    reason: str
    payload: str
    doc_id: str | None = None
    version: int | None = None
    attempts: int = 1
