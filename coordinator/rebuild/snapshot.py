"""Generation N's committed documents as events and as a listable source: what the backfill
copies into N+1, and the reference validation compares N+1 with when the source cannot list
its current state."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from coordinator.batching import batched
from coordinator.events import ChangeEvent, Op
from coordinator.generations import reassemble
from coordinator.model import DocState
from coordinator.planner import document_hash
from coordinator.ports import GenerationReader, OpenedGeneration

# Documents whose texts one read of generation N's keyword index fetches (a snapshot read).
SNAPSHOT_READ_DOCS = 200


@dataclass(frozen=True)
class SnapshotDoc:
    doc_id: str
    version: int
    text: str
    metadata: dict[str, Any]


class GenerationSnapshot:
    """Generation N's documents as a listable source: the reference when the real source
    (an event stream) cannot list its current state."""

    def __init__(self, reader: GenerationReader, unreadable: list[str]) -> None:
        self._reader = reader
        self._unreadable = unreadable

    def iter_current(self) -> Iterator[SnapshotDoc]:
        yield from self._docs(self._reader.ledger.iter_docs())

    def get_current(self, doc_ids: Sequence[str]) -> Iterator[SnapshotDoc]:
        """Only these documents: a recheck of a few must not read all of generation N again."""
        yield from self._docs(iter(self._reader.ledger.get_docs(doc_ids).values()))

    def _docs(self, states: Iterator[DocState]) -> Iterator[SnapshotDoc]:
        for batch in batched(states, SNAPSHOT_READ_DOCS):
            for event in snapshot_events(batch, self._reader, self._unreadable):
                if event.op is Op.UPSERT:
                    yield SnapshotDoc(event.doc_id, event.version, event.text or "", dict(event.metadata))


def snapshot_events(
    states: Sequence[DocState], reader: GenerationReader, unreadable: list[str]
) -> list[ChangeEvent]:
    """Each document's committed state as an event: deletes for tombstones, upserts whose text
    is reassembled from the keyword index and matches the ledger's source hash. A document whose
    text cannot be read back so goes to ``unreadable`` instead."""
    wanted = [cid for s in states if not s.deleted for cid in s.live_chunk_ids]
    stored = reader.keyword.get(wanted) if wanted else {}
    events = []
    for state in states:
        if state.deleted:
            events.append(ChangeEvent(Op.DELETE, state.doc_id, state.version))
            continue
        chunks = [stored.get(cid) for cid in state.live_chunk_ids]
        texts = [c.text for c in chunks if c is not None and c.text is not None]
        if len(texts) != len(chunks) or not chunks:
            unreadable.append(state.doc_id)
            continue
        first = chunks[0]
        assert first is not None, "every chunk of the document was read (checked above)"
        metadata = dict(first.metadata or {})
        text = reassemble(texts, reader.generation.chunking)
        if document_hash(text, metadata) != state.source_hash:
            unreadable.append(state.doc_id)
            continue
        events.append(ChangeEvent(Op.UPSERT, state.doc_id, state.version, text, metadata))
    return events


def apply_skipping(target: OpenedGeneration, events: Sequence[ChangeEvent]) -> list[str]:
    """Apply through the new generation's two-phase path. A document the live service has an
    intent in flight for, or has committed past our version, is left out rather than waited
    for, so a busy document never holds up a whole batch; returns those doc_ids, for the caller
    to read and try again once the live write committed (or for validation to find)."""
    if not events:
        return []
    return target.engine.apply(events, skip_conflicts=True)
