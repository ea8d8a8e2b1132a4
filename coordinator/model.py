"""Value objects shared by the planner, the ports and the adapters."""

from __future__ import annotations

import base64
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
    """One hit of an index's search, as the index holds it (nothing here is trusted yet).

    ``version`` is the store's version of the chunk (ES ``_version``, the Milvus ``version``
    field, Tantivy's stored one), ``chunk_index`` its position in its document; the read path's
    fence (``coordinator/fence.py``) checks both, and the text's hash, against the ledger."""

    chunk_id: str
    doc_id: str
    score: float
    text: str
    version: int = NO_VERSION
    chunk_index: int = -1
    metadata: Mapping[str, Any] = field(default_factory=dict)


class PayloadEncoding(enum.StrEnum):
    """How a dead letter's ``payload`` spells the original record."""

    # The record's text as it was (valid UTF-8 without NUL).
    TEXT = "text"
    # The record's exact bytes, base64: it was not valid UTF-8, or held NUL or lone surrogates.
    BASE64 = "base64"


@dataclass(frozen=True)
class Attempt:
    """A later attempt at a dead letter (a replay): when, and why it failed again."""

    at: float
    reason: str


@dataclass(frozen=True)
class DeadLetter:
    """An event or record that could not be applied, kept whole with the reason, so nothing is
    silently lost.

    ``payload`` is the original record: the source's bytes for a record that never became an
    event (``encoding`` says how they are spelled), the event in the JSONL schema for one that
    did (text and metadata included). ``reason`` is the first reason, ``history`` every later
    attempt's; ``position`` is where the record sits in its source, when the source has one.
    ``truncated`` marks a record longer than any valid event, of which only the start is kept.
    """

    source: str
    reason: str
    payload: str
    doc_id: str | None = None
    version: int | None = None
    attempts: int = 1
    position: str | None = None
    encoding: PayloadEncoding = PayloadEncoding.TEXT
    truncated: bool = False
    history: tuple[Attempt, ...] = ()

    def record_bytes(self) -> bytes:
        """The original record's bytes."""
        return record_bytes(self.payload, self.encoding)


def spell_record(raw: bytes | str, bytes_max: int) -> tuple[str, PayloadEncoding, bool]:
    """How a dead letter stores a source record exactly: (payload, encoding, truncated).

    Text that is valid UTF-8 without NUL is kept as text; anything else (undecodable bytes, NUL,
    lone surrogates) as base64 of its exact bytes, so that nothing is ever decoded lossily. Only
    a record longer than ``bytes_max`` (longer than any valid event) is cut to its first bytes.
    """
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    truncated = len(data) > bytes_max
    data = data[:bytes_max] if truncated else data
    if b"\x00" not in data:
        try:
            return data.decode("utf-8"), PayloadEncoding.TEXT, truncated
        except UnicodeDecodeError:
            pass
    return base64.b64encode(data).decode("ascii"), PayloadEncoding.BASE64, truncated


def record_bytes(payload: str, encoding: PayloadEncoding) -> bytes:
    """The exact bytes of a record spelled by ``spell_record``."""
    if encoding is PayloadEncoding.BASE64:
        return base64.b64decode(payload)
    return payload.encode("utf-8")
