"""The planner: (event, ledger state) → what both indexes must do, and nothing more.

Pure functions only. For each chunk of the new text:
- same position, same hash, same metadata  → skip (no embed, no write);
- same position, same hash, new metadata   → rewrite (write again, zero embed calls);
- new position or different hash           → embed (when the hash has no cached vector) + write.
Chunks beyond the new chunk count are deleted; a delete event deletes every chunk and leaves a
tombstone. An event whose version is below the ledger's (tombstones included) is stale; one at
the ledger's very version is a duplicate (stale) when it says what the ledger recorded for that
version, and a *conflict* when it says something else: the source reused a version, and which of
the two is true cannot be known, so the later one goes to the dead-letter queue.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from coordinator.chunking import ChunkingSettings, chunk_id, chunk_text, content_hash
from coordinator.events import ChangeEvent, Op, canonical_json
from coordinator.model import ChunkDelete, ChunkState, DocState, IndexedChunk
from coordinator.ports import Intent


class PlanKind(enum.StrEnum):
    APPLY = "apply"
    # version ≤ the ledger's: a duplicate, a replay or a late older event; changes nothing.
    STALE = "stale"
    # version = the ledger's, with other content: the source reused a version (dead-lettered).
    CONFLICT = "conflict"


@dataclass(frozen=True)
class Plan:
    """What one event means for both indexes."""

    kind: PlanKind
    doc_id: str
    version: int
    embed: tuple[IndexedChunk, ...] = ()
    rewrite: tuple[IndexedChunk, ...] = ()
    deletes: tuple[ChunkDelete, ...] = ()
    skips: tuple[str, ...] = ()
    after: DocState | None = None

    @property
    def upserts(self) -> tuple[IndexedChunk, ...]:
        return self.embed + self.rewrite

    @property
    def has_writes(self) -> bool:
        return bool(self.embed or self.rewrite or self.deletes)

    def to_intent(self) -> Intent:
        assert self.kind is PlanKind.APPLY and self.after is not None, "only APPLY plans become intents"
        return Intent(self.doc_id, self.version, self.upserts, self.deletes, self.after)


def metadata_hash(metadata: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a document's metadata."""
    return content_hash(canonical_json(metadata))


def document_hash(text: str, metadata: Mapping[str, Any]) -> str:
    """sha256 over a document's text and metadata: how snapshot sources detect a change."""
    return content_hash(text + "\x00" + canonical_json(metadata))


def event_hash(event: ChangeEvent) -> str:
    """What the ledger records as a document's ``source_hash`` for this event ("" for a delete)."""
    if event.op is Op.DELETE:
        return ""
    assert event.text is not None, "validated upserts carry text"
    return document_hash(event.text, event.metadata)


def same_content(event: ChangeEvent, state: DocState) -> bool:
    """Whether ``event`` says what the ledger recorded at the same version: the same delete, or
    the same text and metadata. (A version whose write a store refused is recorded with the
    refused event's hash: a redelivery of it is a duplicate too.)"""
    if event.op is Op.DELETE:
        return state.deleted and not state.source_hash
    return state.source_hash == event_hash(event)


def plan(event: ChangeEvent, state: DocState | None, settings: ChunkingSettings) -> Plan:
    """Plan one event against the document's committed ledger state."""
    if state is not None and event.version < state.version:
        return Plan(PlanKind.STALE, event.doc_id, event.version)
    if state is not None and event.version == state.version:
        kind = PlanKind.STALE if same_content(event, state) else PlanKind.CONFLICT
        return Plan(kind, event.doc_id, event.version)
    if event.op is Op.DELETE:
        return _plan_delete(event, state)
    return _plan_upsert(event, state, settings)


def _plan_delete(event: ChangeEvent, state: DocState | None) -> Plan:
    deletes = tuple(ChunkDelete(c.chunk_id, event.version) for c in _live_chunks(state))
    after = DocState(event.doc_id, event.version, deleted=True)
    return Plan(PlanKind.APPLY, event.doc_id, event.version, deletes=deletes, after=after)


def _plan_upsert(event: ChangeEvent, state: DocState | None, settings: ChunkingSettings) -> Plan:
    assert event.text is not None, "validated upserts carry text"
    texts = chunk_text(event.text, settings)
    prior = {c.chunk_index: c for c in _live_chunks(state)}
    meta_hash = metadata_hash(event.metadata)
    meta_changed = state is None or state.deleted or state.metadata_hash != meta_hash
    embed: list[IndexedChunk] = []
    rewrite: list[IndexedChunk] = []
    skips: list[str] = []
    after_chunks: list[ChunkState] = []
    for index, text in enumerate(texts):
        chunk = _indexed(event, index, text)
        old = prior.get(index)
        if old is None or old.content_hash != chunk.content_hash:
            embed.append(chunk)
        elif meta_changed:
            rewrite.append(chunk)
        else:
            skips.append(chunk.chunk_id)
            after_chunks.append(old)
            continue
        after_chunks.append(ChunkState(chunk.chunk_id, index, chunk.content_hash, event.version))
    deletes = tuple(
        ChunkDelete(c.chunk_id, event.version) for i, c in sorted(prior.items()) if i >= len(texts)
    )
    after = DocState(
        event.doc_id,
        event.version,
        deleted=False,
        chunks=tuple(after_chunks),
        metadata_hash=meta_hash,
        source_hash=document_hash(event.text, event.metadata),
    )
    return Plan(
        PlanKind.APPLY,
        event.doc_id,
        event.version,
        tuple(embed),
        tuple(rewrite),
        deletes,
        tuple(skips),
        after,
    )


def _live_chunks(state: DocState | None) -> tuple[ChunkState, ...]:
    return () if state is None or state.deleted else state.chunks


def _indexed(event: ChangeEvent, index: int, text: str) -> IndexedChunk:
    return IndexedChunk(
        chunk_id=chunk_id(event.doc_id, index),
        doc_id=event.doc_id,
        chunk_index=index,
        text=text,
        content_hash=content_hash(text),
        version=event.version,
        metadata=dict(event.metadata),
    )
