"""lockstep as a library: consistent hybrid search, and writes that return a consistency token.

    from lockstep import Lockstep

    with Lockstep.open("lockstep.yaml") as ls:
        receipt = ls.write([{"op": "upsert", "doc_id": "kb-1", "version": 3, "text": "Refunds take 5 days."}])
        result = ls.search("refund", k=5, consistent_with=receipt.token)
        for hit in result.hits:
            print(hit.doc_id, hit.score, hit.text)

``write`` applies events through the same two-phase path as ``lockstep sync`` (in this process,
so it must be the only writer of an embedded store); ``search`` is the fenced read path of
``lockstep search``. Both open what they need on first use; ``close`` releases it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from coordinator.consistency import ConsistencyToken, WrittenChanges
from coordinator.events import ChangeEvent, event_from_dict
from coordinator.search import Mode, SearchRequest, SearchResult
from lockstep.runtime import Runtime, open_search, runtime
from lockstep.searching import FollowingSearch
from lockstep.settings import Settings, load_settings


@dataclass(frozen=True)
class WriteReceipt:
    """What ``Lockstep.write`` did: its consistency token and counters (``dead_letters`` > 0
    means some events were refused; ``lockstep dlq list`` has them and the token leaves them out)."""

    token: ConsistencyToken
    events: int
    applied_events: int
    dead_letters: int


class Lockstep:
    """One configuration's ledger and indexes, for searches and writes; thread-safe."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._search: FollowingSearch | None = None
        self._writes: contextlib.ExitStack | None = None
        self._runtime: Runtime | None = None

    @classmethod
    def open(cls, config: str | Path | None = None) -> Lockstep:
        """From a YAML file (None: the embedded defaults), with ``LOCKSTEP_*`` overrides."""
        return cls(load_settings(config))

    def search(
        self,
        query: str,
        *,
        k: int = 10,
        mode: Mode | str = Mode.HYBRID,
        filter: Mapping[str, str | int | float | bool | None] | None = None,
        per_doc: bool = False,
        consistent_with: ConsistencyToken | str | None = None,
        require_both: bool = False,
    ) -> SearchResult:
        """Fenced hybrid search (docs/search.md). Raises InvalidSearch, SearchUnavailable or
        ConsistencyTimeout (``coordinator.errors``) when it cannot answer as asked."""
        token = ConsistencyToken.decode(consistent_with) if isinstance(consistent_with, str) else consistent_with
        request = SearchRequest(query, k, Mode(mode), dict(filter or {}), per_doc, token, require_both)
        return self._searcher().search(request)[0]

    def write(self, events: Iterable[ChangeEvent | Mapping[str, Any]]) -> WriteReceipt:
        """Apply change events (``ChangeEvent``s or dicts in the JSONL schema) to both indexes,
        in batches of ``sync.batch_events``; returns once they are committed."""
        rt = self._writer()
        changes = WrittenChanges()
        before = rt.engine.stats.as_dict()
        batch: list[ChangeEvent] = []
        for event in _events(events):
            batch.append(event)
            if len(batch) == self.settings.sync.batch_events:
                self._apply(rt, batch, changes)
                batch = []
        self._apply(rt, batch, changes)
        after = rt.engine.stats.as_dict()
        return WriteReceipt(
            token=changes.token(rt.ledger.get_docs(changes.doc_ids)),
            events=after["events"] - before["events"],
            applied_events=after["applied_events"] - before["applied_events"],
            dead_letters=after["dead_letters"] - before["dead_letters"],
        )

    def close(self) -> None:
        with self._lock:
            if self._search is not None:
                self._search.close()
                self._search = None
            if self._writes is not None:
                self._writes.close()
                self._writes, self._runtime = None, None

    def __enter__(self) -> Lockstep:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _searcher(self) -> FollowingSearch:
        with self._lock:
            if self._search is None:
                self._search = FollowingSearch(lambda: open_search(self.settings))
            return self._search

    def _writer(self) -> Runtime:
        with self._lock:
            if self._runtime is None:
                stack = contextlib.ExitStack()
                self._runtime = stack.enter_context(runtime(self.settings, source_name="api"))
                self._writes = stack
            return self._runtime

    @staticmethod
    def _apply(rt: Runtime, batch: list[ChangeEvent], changes: WrittenChanges) -> None:
        if batch:
            rt.engine.apply(batch)
            changes.add(batch)


def _events(events: Iterable[ChangeEvent | Mapping[str, Any]]) -> Iterator[ChangeEvent]:
    for event in events:
        yield event if isinstance(event, ChangeEvent) else event_from_dict(event)
