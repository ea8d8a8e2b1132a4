"""Merging concurrent writes to one index into one store request (group commit).

Every shard writes an index through the same writer. While the writer sends one shard's batch,
the other shards' batches queue behind it; the next request then carries all of them. Stores
answer fewer, larger requests for less (on the OpenSearch-API server a ``_bulk`` of 100-400 items
ran at ~1,850 rows/s against ~1,300 for 20-50 items, and each request adds a segment that it
merges again later), and the merged request saves round trips.

Each caller still gets exactly its own items' results, in its own order, or the exception its
request raised:

- one request is sent at a time, and only writes of the same method (upsert or delete) merge;
- a request never merges with, or overtakes, an earlier waiting request naming one of its
  chunk IDs, so writes of one chunk keep their order (and no store request names an ID twice);
- a retriable failure of a merged request is every caller's failure (they all retry); any other
  failure sends the merged requests again one by one, so that only the request that causes it
  sees it.

Nothing waits for company: a write that finds the writer idle is sent at once, so a quiet
stream pays no latency for merging.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from coordinator.errors import LockstepError
from coordinator.model import ChunkDelete, IndexedChunk, WriteResult
from coordinator.ports import ChunkIndex

UPSERT = "upsert"
DELETE = "delete"
WRITE_METHODS = frozenset({UPSERT, DELETE})

Item = IndexedChunk | ChunkDelete


@dataclass(eq=False)
class _Request:
    """One caller's write, waiting to be sent alone or merged."""

    method: str
    items: list[Item]
    ids: frozenset[str]
    result: WriteResult | None = None
    error: BaseException | None = None
    done: bool = False

    def outcome(self) -> WriteResult:
        if self.error is not None:
            raise self.error
        assert self.result is not None, "a finished request has a result or an error"
        return self.result


@dataclass
class MergeStats:
    """How many callers' writes went out in how many store calls."""

    requests: int = 0
    calls: int = 0


class MergingWriter:
    """Serves concurrent ``upsert``/``delete`` callers of one index, merging what waits.

    ``lock`` serializes every call into the index (writes here, reads by the owner), so an index
    client never runs two calls at once, as with a single-threaded writer.
    """

    def __init__(self, index: ChunkIndex, *, items_max: int, lock: threading.Lock) -> None:
        if items_max < 1:
            raise ValueError(f"items_max must be at least 1, got {items_max}")
        self.index = index
        self.items_max = items_max
        self.lock = lock
        self.stats = MergeStats()
        self._cond = threading.Condition()
        self._queue: list[_Request] = []
        self._sending = False

    def write(self, method: str, items: Sequence[Item]) -> WriteResult:
        """Write ``items`` with ``method``, possibly in one store request with other callers'."""
        if method not in WRITE_METHODS:
            raise ValueError(f"not a write method: {method}")
        request = _Request(method, list(items), frozenset(i.chunk_id for i in items))
        with self._cond:
            self._queue.append(request)
            self.stats.requests += 1
        while (batch := self._lead_or_wait(request)) is not None:
            self._send(batch)
        return request.outcome()

    def _lead_or_wait(self, request: _Request) -> list[_Request] | None:
        """Wait while another caller sends; then take the next batch to send (None: ours is done)."""
        with self._cond:
            while self._sending and not request.done:
                self._cond.wait()
            if request.done:
                return None
            self._sending = True
            return self._take()

    def _take(self) -> list[_Request]:
        """The oldest request and every later one of its method that may join it."""
        method = self._queue[0].method
        taken: list[_Request] = []
        taken_ids: set[str] = set()
        passed_ids: set[str] = set()  # IDs of waiting requests left behind: nothing overtakes them
        items = 0
        for request in self._queue:
            joins = request.method == method and request.ids.isdisjoint(passed_ids | taken_ids)
            if joins and (not taken or items + len(request.items) <= self.items_max):
                taken.append(request)
                taken_ids |= request.ids
                items += len(request.items)
            else:
                passed_ids |= request.ids
        self._queue = [r for r in self._queue if r not in taken]
        return taken

    def _send(self, batch: list[_Request]) -> None:
        """Send ``batch`` as one store call, record each request's outcome, hand over the turn."""
        try:
            outcomes = self._outcomes(batch)
        except BaseException as exc:  # even an interrupt is handed on, so no waiter is stranded
            outcomes = [(None, exc)] * len(batch)
        with self._cond:
            for request, (result, error) in zip(batch, outcomes, strict=True):
                request.result, request.error, request.done = result, error, True
            self._sending = False
            self._cond.notify_all()

    def _outcomes(self, batch: list[_Request]) -> list[tuple[WriteResult | None, BaseException | None]]:
        method = batch[0].method
        try:
            merged = self._call(method, [i for r in batch for i in r.items])
        except LockstepError as exc:
            if exc.retriable or len(batch) == 1:
                return [(None, exc)] * len(batch)
            return [self._alone(r) for r in batch]
        except Exception as exc:
            if len(batch) == 1:
                return [(None, exc)]
            return [self._alone(r) for r in batch]
        return [(result, None) for result in _split(merged, [r.items for r in batch])]

    def _alone(self, request: _Request) -> tuple[WriteResult | None, BaseException | None]:
        try:
            return self._call(request.method, request.items), None
        except Exception as exc:
            return None, exc

    def _call(self, method: str, items: list[Item]) -> WriteResult:
        write: Callable[[list[Any]], WriteResult] = getattr(self.index, method)
        with self.lock:
            self.stats.calls += 1
            result = write(items)
        assert len(result.items) == len(items), f"{method} answered {len(result.items)} of {len(items)} items"
        return result


def _split(result: WriteResult, requests: list[list[Item]]) -> list[WriteResult]:
    """Cut a merged result back into each request's results (the port answers in item order)."""
    out = []
    start = 0
    for items in requests:
        part = result.items[start : start + len(items)]
        assert [r.chunk_id for r in part] == [i.chunk_id for i in items], "results out of item order"
        out.append(WriteResult(part))
        start += len(items)
    return out
