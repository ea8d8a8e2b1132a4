"""Which delivered documents are not yet committed, so a TRUNCATE also deletes those.

Records are grouped by the position that ends them (only the last record of a transaction, and
every n-th of a snapshot, carries one); committing a position settles its group and every group
before it. Safe to use from the reader's thread and the committer's at once.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator

from coordinator.events import ChangeEvent, Op
from coordinator.ports import SourceRecord


class InFlight:
    """The upserted documents of records yielded but not yet committed, by position."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._groups: deque[tuple[str, set[str]]] = deque()
        self._open_group: set[str] = set()
        self._unpositioned = 0
        self._yielded_last: str | None = None
        self._committed_last: str | None = None

    def tracked(self, records: Iterator[SourceRecord]) -> Iterator[SourceRecord]:
        """Yield records, remembering which upserted documents are not yet committed."""
        for record in records:
            with self._lock:
                if isinstance(record, ChangeEvent) and record.op is Op.UPSERT:
                    self._open_group.add(record.doc_id)
                self._unpositioned += 1
                if record.position is not None:
                    self._groups.append((record.position, self._open_group))
                    self._open_group, self._unpositioned = set(), 0
                    self._yielded_last = record.position
            yield record

    def committed(self, position: str) -> None:
        """``position`` is committed: its group and those before it are no longer in flight."""
        with self._lock:
            self._committed_last = position
            if all(p != position for p, _ in self._groups):
                return
            while self._groups and self._groups.popleft()[0] != position:
                pass

    def docs(self, prefix: str) -> set[str]:
        """The in-flight documents whose ids start with ``prefix``."""
        with self._lock:
            groups = [*(docs for _, docs in self._groups), self._open_group]
            return {d for docs in groups for d in docs if d.startswith(prefix)}

    def settled(self) -> bool:
        """Every record yielded ends in a position, and the last of those is committed."""
        with self._lock:
            return self._unpositioned == 0 and self._yielded_last == self._committed_last
