"""When a store refuses a document halfway through a two-phase apply: the intent that brings both
indexes back to the document's committed state. Pure functions; ``ApplyEngine`` drives the result.

A refused intent may have reached one index already (the other refused it), so the chunks it
touched are rewritten, on both sides, as the ledger last committed them, or deleted if they
were not part of it. The side that took the refused version holds it now, so the restoring
writes carry that version with ``overwrite_equal`` (ES ``external_gte``; Tantivy gates with
``>=``; Milvus has no gate): the same argument as the reconciler's repairs, since the ledger is
authoritative for what the document holds. The version is thereby *consumed*: the ledger
records the committed content at the refused version, with the refused event's hash as its
``source_hash``, so that a redelivery of the refused event is a duplicate (not a new dead
letter each time), an older event is stale, and a newer one applies as usual.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

from coordinator.chunking import ChunkingSettings, content_hash
from coordinator.events import ChangeEvent, Op
from coordinator.model import ChunkDelete, ChunkState, DocState, IndexedChunk, StoredChunk
from coordinator.planner import metadata_hash
from coordinator.ports import Intent


def touched_ids(intent: Intent) -> list[str]:
    """Every chunk ID an intent writes or deletes."""
    return [c.chunk_id for c in intent.upserts] + [d.chunk_id for d in intent.deletes]


def committed_copies(
    committed: DocState | None, held: Iterable[Mapping[str, StoredChunk]]
) -> dict[str, StoredChunk]:
    """Copies, among the chunks the indexes hold (``held``, one mapping per index), of the
    committed chunks: text and metadata must hash to what the ledger committed."""
    if committed is None or committed.deleted:
        return {}
    wanted = {c.chunk_id: c.content_hash for c in committed.chunks}
    copies: dict[str, StoredChunk] = {}
    for index in held:
        for cid, copy in index.items():
            if cid in copies or cid not in wanted or copy.text is None or copy.foreign:
                continue
            if content_hash(copy.text) == wanted[cid] and metadata_hash(copy.metadata or {}) == committed.metadata_hash:
                copies[cid] = copy
    return copies


def plan_restore(
    refused: Intent, committed: DocState | None, copies: Mapping[str, StoredChunk]
) -> tuple[Intent, list[str]]:
    """The intent replacing ``refused`` (same doc and version) and the chunk IDs it cannot bring
    back (no copy of their committed text is left in either index: ``reconcile`` reports them)."""
    version = refused.version
    live = {c.chunk_id: c for c in _live(committed)}
    upserts: list[IndexedChunk] = []
    deletes: list[ChunkDelete] = []
    missing: list[str] = []
    for cid in dict.fromkeys(touched_ids(refused)):
        old = live.get(cid)
        if old is None:
            deletes.append(ChunkDelete(cid, version, overwrite_equal=True))
        elif cid in copies:
            upserts.append(_rewrite(refused.doc_id, old, copies[cid], version))
        else:
            missing.append(cid)
    restored = {c.chunk_id for c in upserts}
    # The refused intent's ``after`` carries the refused event's hash (its ``source_hash``).
    after = _after(refused.doc_id, committed, version, restored, refused.after.source_hash)
    intent = Intent(refused.doc_id, version, tuple(upserts), tuple(deletes), after, restores=True)
    return intent, missing


def _live(state: DocState | None) -> tuple[ChunkState, ...]:
    return () if state is None or state.deleted else state.chunks


def _rewrite(doc_id: str, old: ChunkState, copy: StoredChunk, version: int) -> IndexedChunk:
    assert copy.text is not None, "copies carry their text"
    return IndexedChunk(
        chunk_id=old.chunk_id,
        doc_id=doc_id,
        chunk_index=old.chunk_index,
        text=copy.text,
        content_hash=old.content_hash,
        version=version,
        metadata=dict(copy.metadata or {}),
        overwrite_equal=True,
    )


def _after(
    doc_id: str, committed: DocState | None, version: int, restored: set[str], refused_hash: str
) -> DocState:
    if committed is None or committed.deleted:
        return DocState(doc_id, version, deleted=True, source_hash=refused_hash)
    chunks = tuple(replace(c, version=version) if c.chunk_id in restored else c for c in committed.chunks)
    return replace(committed, version=version, chunks=chunks, source_hash=refused_hash)


def event_of(intent: Intent, chunking: ChunkingSettings) -> ChangeEvent | None:
    """The event an intent was planned from, when the intent alone holds all of it: a delete,
    or an upsert that writes every chunk of a losslessly cut text. None otherwise."""
    if intent.after.deleted:
        return ChangeEvent(Op.DELETE, intent.doc_id, intent.version)
    written = sorted(intent.upserts, key=lambda c: c.chunk_index)
    if chunking.overlap_chars or [c.chunk_index for c in written] != list(range(len(intent.after.chunks))):
        return None
    if not written and intent.after.metadata_hash != metadata_hash({}):
        return None
    metadata = dict(written[0].metadata) if written else {}
    return ChangeEvent(Op.UPSERT, intent.doc_id, intent.version, "".join(c.text for c in written), metadata)
