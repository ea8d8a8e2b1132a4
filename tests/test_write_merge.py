"""The index writer's merging of concurrent writes: fewer store calls, the same per-caller results.

A real Tantivy index behind a gate that holds the first store call until the other callers are
queued, so what merges is decided, not left to thread timing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from adapters.keyword.tantivy_index import TantivyKeywordIndex
from chaos.faults import FaultyIndex
from coordinator.errors import TransientStoreError
from coordinator.model import ChunkDelete, IndexedChunk, ItemStatus, WriteResult
from coordinator.write_merge import MergingWriter

# How long a test waits for its threads to reach the state it needs before failing.
WAIT_S = 10.0


@dataclass
class Gate:
    """Wraps an index: records every store call's chunk IDs; calls wait for ``opened``."""

    inner: Any
    entered: threading.Event = field(default_factory=threading.Event)
    opened: threading.Event = field(default_factory=threading.Event)
    calls: list[list[str]] = field(default_factory=list)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def upsert(self, chunks: Sequence[IndexedChunk]) -> WriteResult:
        return self._pass("upsert", chunks)

    def delete(self, deletes: Sequence[ChunkDelete]) -> WriteResult:
        return self._pass("delete", deletes)

    def _pass(self, method: str, items: Sequence[IndexedChunk] | Sequence[ChunkDelete]) -> WriteResult:
        self.entered.set()
        assert self.opened.wait(WAIT_S), "the test never opened the gate"
        self.calls.append([i.chunk_id for i in items])
        result: WriteResult = getattr(self.inner, method)(items)
        return result


@dataclass
class Rig:
    writer: MergingWriter
    gate: Gate
    faults: FaultyIndex
    pool: ThreadPoolExecutor

    def start(
        self, method: str, items: Sequence[IndexedChunk] | Sequence[ChunkDelete]
    ) -> Future[WriteResult]:
        """Submit one caller's write and wait until the writer has queued it."""
        queued = self.writer.stats.requests
        future = self.pool.submit(self.writer.write, method, items)
        _wait_for(lambda: self.writer.stats.requests > queued, "the write to be queued")
        return future

    def start_sending(self, items: Sequence[IndexedChunk]) -> Future[WriteResult]:
        """Submit a first upsert and wait until it is inside the (closed) gate: the writer is busy."""
        future = self.pool.submit(self.writer.write, "upsert", items)
        _wait_for(self.gate.entered.is_set, "the first write to reach the store")
        return future


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    index = TantivyKeywordIndex(str(tmp_path / "tantivy"), "kw")
    index.ensure()
    faults = FaultyIndex(index)
    gate = Gate(faults)
    with ThreadPoolExecutor(max_workers=8) as pool:
        writer = MergingWriter(gate, items_max=100, lock=threading.Lock())
        yield Rig(writer, gate, faults, pool)
        gate.opened.set()
    index.close()


def _chunks(doc_id: str, n: int, version: int = 1) -> list[IndexedChunk]:
    return [
        IndexedChunk(
            f"{doc_id}:chunk-{i}", doc_id, i, f"{doc_id} part {i}", f"h{doc_id}{i}v{version}", version
        )
        for i in range(n)
    ]


def _wait_for(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def test_writes_waiting_behind_a_write_leave_as_one_call_and_each_caller_gets_its_own_results(
    rig: Rig,
) -> None:
    """Three callers queued behind a busy writer share one store call; each gets its items' results, in order."""
    first = rig.start_sending(_chunks("a", 2))
    waiting = {d: rig.start("upsert", _chunks(d, n)) for d, n in (("b", 3), ("c", 1), ("d", 2))}
    rig.gate.opened.set()
    assert [i.chunk_id for i in first.result(WAIT_S).items] == ["a:chunk-0", "a:chunk-1"]
    for doc_id, future in waiting.items():
        items = future.result(WAIT_S).items
        assert [i.chunk_id for i in items] == [c.chunk_id for c in _chunks(doc_id, len(items))]
        assert all(i.status is ItemStatus.APPLIED for i in items)
    merged = ["b:chunk-0", "b:chunk-1", "b:chunk-2", "c:chunk-0", "d:chunk-0", "d:chunk-1"]
    assert rig.gate.calls == [["a:chunk-0", "a:chunk-1"], merged]
    assert rig.writer.stats.calls == 2 and rig.writer.stats.requests == 4


def test_writes_of_one_chunk_never_merge_and_keep_their_order(rig: Rig) -> None:
    """A later write of a chunk already waiting is sent after it, and nothing overtakes the earlier one."""
    first = rig.start_sending(_chunks("x", 1))
    older = rig.start("upsert", _chunks("a", 1, version=1))
    other_method = rig.start("delete", [ChunkDelete("b:chunk-0", 5)])
    newer = rig.start("upsert", _chunks("a", 1, version=2) + _chunks("c", 1))
    rig.gate.opened.set()
    for future in (first, older, other_method, newer):
        assert future.result(WAIT_S).rejected() == []
    assert rig.gate.calls == [["x:chunk-0"], ["a:chunk-0"], ["b:chunk-0"], ["a:chunk-0", "c:chunk-0"]]
    assert rig.faults.inner.get(["a:chunk-0"])["a:chunk-0"].version == 2


def test_a_merged_request_that_breaks_the_call_fails_alone(rig: Rig) -> None:
    """A caller whose own request fails the whole store call gets that error; the others still apply."""
    first = rig.start_sending(_chunks("x", 1))
    good = rig.start("upsert", _chunks("a", 2))
    bad = rig.start("upsert", _chunks("b", 1) + _chunks("b", 1, version=2))  # one chunk ID twice
    rig.gate.opened.set()
    first.result(WAIT_S)
    assert good.result(WAIT_S).rejected() == []
    with pytest.raises(ValueError, match="same chunk_id twice"):
        bad.result(WAIT_S)
    assert set(rig.faults.inner.get(["a:chunk-0", "a:chunk-1", "b:chunk-0"])) == {"a:chunk-0", "a:chunk-1"}


def test_a_retriable_failure_of_a_merged_call_reaches_every_caller_in_it(rig: Rig) -> None:
    """When the store refuses a merged call for now, every caller in it sees the retriable error."""
    first = rig.start_sending(_chunks("x", 1))
    merged = [rig.start("upsert", _chunks(d, 1)) for d in "ab"]
    rig.faults.arm("down", writes=2)
    rig.gate.opened.set()
    for future in [first, *merged]:
        with pytest.raises(TransientStoreError):
            future.result(WAIT_S)
    assert rig.gate.calls == [["x:chunk-0"], ["a:chunk-0", "b:chunk-0"]]


def test_a_merge_stays_within_its_item_limit(rig: Rig) -> None:
    """Waiting writes that together exceed ``items_max`` leave in more than one call, oldest first."""
    first = rig.start_sending(_chunks("x", 1))
    waiting = [rig.start("upsert", _chunks(d, 40)) for d in "abc"]
    rig.gate.opened.set()
    for future in [first, *waiting]:
        future.result(WAIT_S)
    assert [len(call) for call in rig.gate.calls] == [1, 80, 40]
