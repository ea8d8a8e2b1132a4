"""Planted bugs: deliberately broken collaborators that prove the chaos suite has teeth.

Switched on only by the runner's ``planted_bug`` parameter (``lockstep chaos run --plant-bug``),
never by lockstep itself: nothing in ``coordinator/`` or ``lockstep/`` knows about them. Each is
named after the guarantee it breaks and is one small wrapper around a port (an index, the
ledger) or a subclass of the real object that overrides one step of it (the engine, the shard
worker, the low watermark); everything else runs as shipped. ``Plant.caught_by`` lists the
violations that report it (patterns over the violation lines), which its test in
``tests/test_chaos_planted.py`` demands from the CI smoke's plan.

| planted bug | the guarantee it breaks |
|---|---|
| keyword-drops-deletes | a delete reaches the keyword index |
| vector-drops-deletes | a delete reaches the vector index |
| version-gate-off | an older event never overwrites a newer one |
| watermark-skips-uncommitted | the checkpoint never passes an unfinished event (nothing read is lost in a crash) |
| tombstone-forgotten | a deleted document stays deleted (old upserts cannot resurrect it) |
| metadata-one-index | a metadata-only change reaches both indexes |
| coalescing-keeps-older | coalescing keeps the newest event of a document |
| recovery-keyword-only | recovery re-drives prepared intents on both sides |
| shrink-keeps-last-chunk | a shrinking document loses every chunk beyond its new count |
| fence-ignored | a fenced (old-epoch) owner can neither prepare nor commit |
| refusal-not-restored | a document a store refuses is rolled back in both indexes |
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, replace
from typing import Any

from coordinator.apply import VECTOR, ApplyEngine
from coordinator.events import ChangeEvent
from coordinator.model import ChunkDelete, IndexedChunk, ItemResult, ItemStatus, WriteResult
from coordinator.planner import Plan
from coordinator.ports import Fence, Intent, SourceRecord
from coordinator.shard import Envelope, ShardWorker
from coordinator.watermark import LowWatermark

Wrap = Callable[[Any], Any]


def _same(collaborator: Any) -> Any:
    return collaborator


# --- wrappers around ports -------------------------------------------------------------------------


@dataclass
class DropsDeletes:
    """An index that acknowledges deletes without sending them."""

    inner: Any

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def delete(self, deletes: Sequence[ChunkDelete]) -> WriteResult:
        return WriteResult(tuple(ItemResult(d.chunk_id, ItemStatus.APPLIED) for d in deletes))


@dataclass
class KeepsOldMetadata:
    """An index that takes a chunk whose text it already holds (a metadata-only rewrite) with the
    metadata it had: version, text and hash are written, the new metadata is not."""

    inner: Any

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def upsert(self, chunks: Sequence[IndexedChunk]) -> WriteResult:
        held = self.inner.get([c.chunk_id for c in chunks])
        kept = [self._old_metadata(c, held.get(c.chunk_id)) for c in chunks]
        result: WriteResult = self.inner.upsert(kept)
        return result

    @staticmethod
    def _old_metadata(chunk: IndexedChunk, held: Any) -> IndexedChunk:
        if held is None or held.content_hash != chunk.content_hash or held.metadata is None:
            return chunk
        return replace(chunk, metadata=dict(held.metadata))


class ForgetsTombstones:
    """A ledger that garbage-collects a deleted document's row as soon as its delete commits (as
    ES forgets a tombstone after ``gc_deletes``): an older upsert of it then meets no gate."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def commit(self, doc_versions: Sequence[tuple[str, int]], sides: frozenset[str], fence: Fence | None = None) -> int:
        committed: int = self.inner.commit(doc_versions, sides, fence)
        # The bug's own connection to the ledger file, as an outside garbage collector would have.
        with closing(sqlite3.connect(self.inner.path)) as db, db:
            db.executemany(
                "DELETE FROM documents WHERE doc_id = ? AND deleted = 1", [(d,) for d, _ in doc_versions]
            )
        return committed


class IgnoresFence:
    """A ledger that writes whatever epoch a write carries: an owner that was taken over keeps
    preparing, marking and committing."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def prepare(self, intents: Sequence[Intent], fence: Fence | None = None, **kwargs: Any) -> Any:
        return self.inner.prepare(intents, None, **kwargs)

    def mark_done(self, side: str, doc_versions: Sequence[tuple[str, int]], fence: Fence | None = None) -> Any:
        return self.inner.mark_done(side, doc_versions, None)

    def commit(self, doc_versions: Sequence[tuple[str, int]], sides: frozenset[str], fence: Fence | None = None) -> Any:
        return self.inner.commit(doc_versions, sides, None)

    def replace_intents(self, intents: Sequence[Intent], fence: Fence | None = None) -> Any:
        return self.inner.replace_intents(intents, None)


# --- subclasses overriding one step ----------------------------------------------------------------


class GateOffEngine(ApplyEngine):
    """The version gate is off: an event older than the committed version is applied anyway (it
    is planned as the next version, so that the ledger takes it)."""

    def _plan(self, events: Sequence[ChangeEvent]) -> list[Plan]:
        states = self.ledger.get_docs(e.doc_id for e in events)
        return super()._plan([_past_gate(e, states.get(e.doc_id)) for e in events])


def _past_gate(event: ChangeEvent, state: Any) -> ChangeEvent:
    if state is None or event.version >= state.version:
        return event
    return replace(event, version=state.version + 1)


class KeepsOlderEngine(ApplyEngine):
    """Coalescing a batch keeps the oldest event of each document instead of the newest."""

    def _coalesce(self, events: Sequence[ChangeEvent]) -> list[ChangeEvent]:
        oldest: dict[str, ChangeEvent] = {}
        for event in events:
            if event.doc_id not in oldest or event.version < oldest[event.doc_id].version:
                oldest[event.doc_id] = event
        self.stats.coalesced_events += len(events) - len(oldest)
        return list(oldest.values())


class KeepsOlderWorker(ShardWorker):
    """The shard's mailbox keeps the older of two waiting events of a document."""

    def _put(self, envelope: Envelope) -> bool:
        record = envelope.record
        slot = self._waiting.get(record.doc_id) if isinstance(record, ChangeEvent) else None
        before = None if slot is None else slot.event
        if not super()._put(envelope):
            return False
        if slot is not None and before is not None:
            slot.event = _oldest(before, record)
        return True


def _oldest(kept: SourceRecord, arrived: SourceRecord) -> SourceRecord:
    older = isinstance(kept, ChangeEvent) and isinstance(arrived, ChangeEvent) and arrived.version < kept.version
    return arrived if older else kept


class RecoversKeywordOnlyEngine(ApplyEngine):
    """Recovery marks the vector side of every prepared intent done without writing it, so only
    the keyword side is re-driven before the commit."""

    def recover(self, fence: Fence | None = None, owns: Callable[[str], bool] | None = None) -> int:
        pending = [(i.doc_id, i.version) for i in self.ledger.pending() if VECTOR not in i.done]
        if pending:
            self.ledger.mark_done(VECTOR, pending, fence)
        return super().recover(fence, owns)


class KeepsLastChunkEngine(ApplyEngine):
    """A shrinking document's plan deletes every chunk beyond its new count but the last one."""

    def _plan(self, events: Sequence[ChangeEvent]) -> list[Plan]:
        return [_keep_last_chunk(p) for p in super()._plan(events)]


def _keep_last_chunk(plan: Plan) -> Plan:
    if plan.after is None or plan.after.deleted or not plan.deletes:
        return plan
    return replace(plan, deletes=plan.deletes[:-1])


class SkipsRestoreEngine(ApplyEngine):
    """A document a store refuses is dead-lettered, but the intent that should bring both indexes
    back to its committed state writes nothing: the index that took the refused version keeps it."""

    def _restores(self, refused: Sequence[Intent]) -> list[Intent]:
        return [replace(r, upserts=(), deletes=()) for r in super()._restores(refused)]


@dataclass
class EagerWatermark(LowWatermark):
    """A low watermark that counts an event finished once it is read (a consumer's auto-commit):
    its checkpoint is the position of the newest event read, committed or not."""

    _newest: str | None = None

    def track(self, position: str | None) -> int:
        self._newest = position if position is not None else self._newest
        return super().track(position)

    def checkpoint(self) -> str | None:
        return self._newest


# --- the catalogue -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plant:
    """One planted bug: which collaborators it replaces or wraps (the real ones by default) and
    which violations report it (``caught_by``: regular expressions over violation lines)."""

    name: str
    guarantee: str
    caught_by: tuple[str, ...]
    wrap_keyword: Wrap = _same
    wrap_vector: Wrap = _same
    wrap_ledger: Wrap = _same
    engine: type[ApplyEngine] = ApplyEngine
    worker: type[ShardWorker] = ShardWorker
    watermark: type[LowWatermark] = LowWatermark
    # Schedules that must run the streaming path to meet it (the watermark lives only there).
    shard_only: bool = False

    def caught(self, violations: Iterable[str]) -> list[str]:
        """The violation lines that report this bug."""
        patterns = [re.compile(p) for p in self.caught_by]
        return [v for v in violations if any(p.match(v) for p in patterns)]


NO_PLANT = Plant("none", "", ())
# Violations that a chunk which should be gone but is still held causes, per index side.
_GHOSTS = r"(I1|I3|audit:ghost|audit:orphan) \[{side}\]"

PLANTS: Mapping[str, Plant] = {
    p.name: p
    for p in (
        Plant(
            "keyword-drops-deletes",
            "a delete reaches the keyword index",
            (_GHOSTS.format(side="keyword"),),
            wrap_keyword=DropsDeletes,
        ),
        Plant(
            "vector-drops-deletes",
            "a delete reaches the vector index",
            (_GHOSTS.format(side="vector"),),
            wrap_vector=DropsDeletes,
        ),
        Plant(
            "version-gate-off",
            "an older event never overwrites a newer one",
            (r"(I1|I2|I3) \[", r"ledger_ahead "),
            engine=GateOffEngine,
        ),
        Plant(
            "watermark-skips-uncommitted",
            "the checkpoint never passes an unfinished event (nothing is lost after a crash)",
            (r"applied_or_dlq ", r"(I1|I2|I3) \["),
            watermark=EagerWatermark,
            shard_only=True,
        ),
        Plant(
            "tombstone-forgotten",
            "a deleted document stays deleted: an older upsert cannot resurrect it",
            (r"applied_or_dlq ", r"I3 \["),
            wrap_ledger=ForgetsTombstones,
        ),
        Plant(
            "metadata-one-index",
            "a metadata-only change reaches both indexes",
            (r"I2 \[vector\] .*metadata differs", r"audit:stale \[vector\] .*metadata differs"),
            wrap_vector=KeepsOldMetadata,
        ),
        Plant(
            "coalescing-keeps-older",
            "coalescing keeps the newest event of a document",
            (r"applied_or_dlq ", r"(I1|I2|I3) \["),
            engine=KeepsOlderEngine,
            worker=KeepsOlderWorker,
        ),
        Plant(
            "recovery-keyword-only",
            "recovery re-drives prepared intents on both sides",
            (r"(I1|I2|I3) \[vector\]", r"audit:(missing|stale|ghost|orphan) \[vector\]"),
            engine=RecoversKeywordOnlyEngine,
        ),
        Plant(
            "shrink-keeps-last-chunk",
            "a shrinking document loses every chunk beyond its new count",
            (r"I1 \[\w+\] .* in index but not at the source", r"audit:orphan \["),
            engine=KeepsLastChunkEngine,
        ),
        Plant(
            "fence-ignored",
            "a fenced (old-epoch) owner can neither prepare nor commit",
            (r"fenced ",),
            wrap_ledger=IgnoresFence,
            shard_only=True,
        ),
        Plant(
            "refusal-not-restored",
            "a document a store refuses is rolled back in both indexes",
            (r"audit:(stale|orphan|ghost|cross_index) \[",),
            engine=SkipsRestoreEngine,
        ),
    )
}
KEYWORD_DROPS_DELETES = "keyword-drops-deletes"
PLANTED_BUGS = tuple(PLANTS)


def plant(name: str | None) -> Plant:
    """The planted bug called ``name`` (none when None)."""
    if name is None:
        return NO_PLANT
    if name not in PLANTS:
        raise ValueError(f"unknown planted bug {name!r}; one of {', '.join(PLANTED_BUGS)}")
    return PLANTS[name]

