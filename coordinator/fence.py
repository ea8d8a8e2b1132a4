"""The read path's fence: a hit is served only if the ledger says it is committed as it reads.

Anything can write an index (a half-applied two-phase write, a store bug that brings a deleted
row back, another program), so nothing a hit carries is trusted but what can be checked against
the ledger's committed state of its document:

- the document is known and live (not a tombstone);
- the hit's chunk index is within the document's chunk count, and its chunk ID is the one the
  ledger records at that index;
- the hit's version is the version the ledger committed for that chunk (a higher one is a
  prepared, uncommitted write; a lower one is an older version an index still holds);
- the text being served hashes to the committed ``content_hash`` at that index (the stored
  ``content_hash`` field is not looked at), and the metadata being served to the committed
  ``metadata_hash``.

Because every hit of one response is checked against one ledger read, the hits served for a
document all belong to one committed version of it. Pure functions only.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from coordinator.chunking import content_hash
from coordinator.events import canonical_json
from coordinator.model import ChunkState, DocState, SearchHit
from coordinator.ports import MetadataFilter


class FenceReason(enum.StrEnum):
    """Why a hit was not served."""

    # The ledger has committed nothing of this document: its first version is still only
    # prepared, or it was never written through lockstep.
    UNKNOWN = "unknown"
    # The document's committed state is a tombstone.
    DELETED = "deleted"
    # The chunk index is at or past the document's committed chunk count (a shrink), or the
    # hit's chunk ID is not the one committed at its index.
    PAST_END = "past_end"
    # The hit's version is above the committed one: prepared, not (yet) committed.
    UNCOMMITTED = "uncommitted"
    # The hit's version is below the committed one: an index still holds an older version.
    STALE = "stale"
    # The text (or metadata) served does not hash to what the ledger committed.
    HASH = "hash"


@dataclass(frozen=True)
class FenceResult:
    """The hits that may be served, in their original order, and why each other one was not."""

    served: tuple[SearchHit, ...]
    fenced: Counter[FenceReason]


def fence(hits: Sequence[SearchHit], committed: Mapping[str, DocState]) -> FenceResult:
    """Check each hit against ``committed`` (one ledger read of every hit's document)."""
    served: list[SearchHit] = []
    fenced: Counter[FenceReason] = Counter()
    digests = _MetadataDigests()
    for hit in hits:
        reason = why_fenced(hit, committed.get(hit.doc_id), digests)
        if reason is None:
            served.append(hit)
        else:
            fenced[reason] += 1
    return FenceResult(tuple(served), fenced)


def why_fenced(hit: SearchHit, state: DocState | None, digests: _MetadataDigests | None = None) -> FenceReason | None:
    """The reason ``hit`` must not be served, or None when it is exactly what the ledger committed."""
    if state is None:
        return FenceReason.UNKNOWN
    if state.deleted:
        return FenceReason.DELETED
    chunk = _committed_chunk(state, hit.chunk_index)
    if chunk is None or chunk.chunk_id != hit.chunk_id:
        return FenceReason.PAST_END
    if hit.version > chunk.version:
        return FenceReason.UNCOMMITTED
    if hit.version < chunk.version:
        return FenceReason.STALE
    digest = (digests or _MetadataDigests()).of(hit)
    if content_hash(hit.text) != chunk.content_hash or digest != state.metadata_hash:
        return FenceReason.HASH
    return None


def _committed_chunk(state: DocState, index: int) -> ChunkState | None:
    # The ledger keeps a document's chunks densely by position (coordinator/codec.py).
    if not 0 <= index < len(state.chunks):
        return None
    chunk = state.chunks[index]
    return chunk if chunk.chunk_index == index else None


class _MetadataDigests:
    """Metadata digests of one fence pass: the hits of one document usually carry the same
    metadata, whose canonical JSON is then computed once. Reused only for metadata of exactly
    the same JSON (types included: ``1``, ``1.0`` and ``true`` spell differently)."""

    def __init__(self) -> None:
        self._by_doc: dict[str, tuple[Mapping[str, Any], str]] = {}

    def of(self, hit: SearchHit) -> str:
        known = self._by_doc.get(hit.doc_id)
        if known is not None and _same_json_value(known[0], hit.metadata):
            return known[1]
        digest = metadata_digest(hit.metadata)
        self._by_doc[hit.doc_id] = (hit.metadata, digest)
        return digest


def _same_json_value(a: Any, b: Any) -> bool:
    """Equality that keeps JSON's types apart (Python's ``==`` takes ``True`` for ``1``)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, Mapping):
        return a.keys() == b.keys() and all(_same_json_value(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same_json_value(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def metadata_digest(metadata: Mapping[str, Any]) -> str:
    """The ledger's ``metadata_hash`` of these metadata (sha256 of their canonical JSON)."""
    try:
        return content_hash(canonical_json(metadata))
    except (TypeError, ValueError):
        return ""


def matches(metadata: Mapping[str, Any], where: MetadataFilter) -> bool:
    """Whether ``metadata`` holds every key of ``where`` with an equal value of the same JSON type
    (``true`` is not ``1``; ``1`` and ``1.0`` are the same number)."""
    return all(key in metadata and _same_json(metadata[key], value) for key, value in where.items())


def _same_json(held: Any, wanted: Any) -> bool:
    if isinstance(held, bool) or isinstance(wanted, bool):
        return isinstance(held, bool) and isinstance(wanted, bool) and held == wanted
    numbers = (int, float)
    if isinstance(held, numbers) or isinstance(wanted, numbers):
        return isinstance(held, numbers) and isinstance(wanted, numbers) and held == wanted
    return bool(type(held) is type(wanted) and held == wanted)
