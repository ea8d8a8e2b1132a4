"""The webhook inbox as a ChangeSource: its rows in ``seq`` order from the last committed seq.

Positions: a row's position is its ``seq`` as a decimal string; ``commit(position)`` stores "the
position after the last applied event" in the ledger's checkpoint store, and ``read()``/
``follow()`` resume with the rows after it.

Retention: rows at or below the committed checkpoint and older than ``retention_s`` are pruned
(at most every ``PRUNE_INTERVAL_S``). A retry of an event arriving after its row was pruned is
stored again and is then a no-op at the ledger's version gate (stale), never a regression.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import structlog

from adapters.sources.base import bad_record
from adapters.sources.webhook.inbox import Inbox, InboxRow, bad_row_record
from adapters.sources.webhook.intake import BACKLOG_EVENTS_MAX, BATCH_EVENTS_MAX, WebhookIntake
from coordinator.errors import InvalidEvent, SourceError, StoreError
from coordinator.events import event_from_dict
from coordinator.ports import CheckpointStore, SourceRecord

if TYPE_CHECKING:
    # For annotations only: the settings read RETENTION_S from this module.
    from adapters.sources.webhook.settings import WebhookSourceSettings

# Inbox rows read per query by the source: a page is all that is held in memory.
READ_PAGE_ROWS = 1_000
# How long ``follow`` waits for a wake-up (a POST to this process) before looking again; POSTs
# to another replica sharing a Postgres inbox are seen within this time.
FOLLOW_POLL_S = 0.2
# After a failed inbox read ``follow`` waits this long before trying again.
READ_RETRY_S = 1.0
# Rows are kept this long after arrival (and until committed): the window in which a retried
# request is recognised as a duplicate without reaching the ledger.
RETENTION_S = 7 * 24 * 3600.0
# Pruning runs at most this often (and deletes at most PRUNE_ROWS_MAX rows per run), so a commit
# never waits on a long delete.
PRUNE_INTERVAL_S = 60.0

log = structlog.get_logger(__name__)


class WebhookSource:
    """The inbox as a ChangeSource: rows in seq order from the last committed seq.

    ``follow`` is what ``lockstep run`` uses: it reads what is there, then waits for a wake-up
    from this process's intake (or ``FOLLOW_POLL_S``) and reads again.
    """

    def __init__(
        self,
        inbox: Inbox,
        checkpoints: CheckpointStore,
        *,
        name: str = "webhook",
        retention_s: float = RETENTION_S,
        clock: Callable[[], float] = time.time,
        page_rows: int = READ_PAGE_ROWS,
    ) -> None:
        self.name = name
        self.inbox = inbox
        self._checkpoints = checkpoints
        self._retention_s = retention_s
        self._clock = clock
        self._page_rows = page_rows
        self._wake = threading.Event()
        self._pruned_at = float("-inf")

    @classmethod
    def from_settings(cls, settings: WebhookSourceSettings, inbox: Inbox, checkpoints: CheckpointStore) -> WebhookSource:
        """The source that reads ``inbox``, named and pruned as ``settings`` say."""
        return cls(inbox, checkpoints, name=settings.name, retention_s=settings.retention_s)

    def intake(self, *, batch_events_max: int = BATCH_EVENTS_MAX, backlog_events_max: int = BACKLOG_EVENTS_MAX) -> WebhookIntake:
        """The intake that stores requests in this source's inbox and wakes it up."""
        return WebhookIntake(
            self.inbox,
            self.committed_seq,
            wake=self._wake.set,
            batch_events_max=batch_events_max,
            backlog_events_max=backlog_events_max,
        )

    def read(self) -> Iterator[SourceRecord]:
        """Every row after the committed seq, up to the current end of the inbox."""
        after = self.committed_seq()
        while True:
            rows = self.inbox.read_after(after, self._page_rows)
            yield from map(self._record, rows)
            if len(rows) < self._page_rows:
                return
            after = rows[-1].seq

    def follow(self, stop: Callable[[], bool], poll_s: float = FOLLOW_POLL_S) -> Iterator[SourceRecord]:
        """Like ``read()``, then keep reading new rows until ``stop()`` is true."""
        after = self.committed_seq()
        while not stop():
            try:
                rows = self.inbox.read_after(after, self._page_rows)
            except StoreError as exc:
                if not exc.retriable:
                    raise
                log.warning("inbox read failed; retrying", source=self.name, error=str(exc), phase="read")
                time.sleep(READ_RETRY_S)
                continue
            for row in rows:
                after = row.seq
                yield self._record(row)
            if len(rows) < self._page_rows:
                # Cleared before the next read: a wake-up set after this point is never lost.
                self._wake.wait(poll_s)
                self._wake.clear()

    def commit(self, position: str) -> None:
        """Persist ``position`` (the seq of the last applied row) as the place to resume from."""
        seq = _parse_seq(position)
        self._checkpoints.set_checkpoint(self.name, position)
        self._prune(seq)

    def committed_seq(self) -> int:
        stored = self._checkpoints.get_checkpoint(self.name)
        return 0 if stored is None else _parse_seq(stored)

    def close(self) -> None:
        self.inbox.close()

    def _prune(self, committed: int) -> None:
        now = self._clock()
        if now - self._pruned_at < PRUNE_INTERVAL_S:
            return
        self._pruned_at = now
        try:
            pruned = self.inbox.prune(through_seq=committed, received_before=now - self._retention_s)
        except StoreError as exc:
            log.warning("inbox prune failed", source=self.name, error=str(exc))
            return
        if pruned:
            log.info("inbox pruned", source=self.name, rows=pruned, through_seq=committed)

    def _record(self, row: InboxRow) -> SourceRecord:
        position = str(row.seq)
        if row.reason is not None:
            return bad_row_record(row, position)
        try:
            return event_from_dict(json.loads(row.payload), position=position)
        except (InvalidEvent, json.JSONDecodeError) as exc:
            # Only a stored row altered behind lockstep's back can get here.
            reason = exc.reason if isinstance(exc, InvalidEvent) else f"stored row is not JSON: {exc.msg}"
            return bad_record(f"inbox row {row.seq}: {reason}", row.payload, position, row.doc_id)


def _parse_seq(position: str) -> int:
    if not position.isdigit():
        raise SourceError(f"not a webhook inbox position (a seq): {position!r}")
    return int(position)
