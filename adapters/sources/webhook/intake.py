"""The intake: turns one ``POST /events`` body into inbox rows and wakes the source up.

It knows nothing of HTTP beyond the media type; ``lockstep/ops_http.py`` serves the endpoint and
checks the bearer token. The intake answers only after the whole request is committed to the
inbox, and reports each bad item by index with its reason.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from adapters.sources.webhook.body import parse_body
from adapters.sources.webhook.inbox import AppendResult, Inbox

# A shorter bearer token could be guessed; 16 random characters are beyond reach.
TOKEN_CHARS_MIN = 16
# Items per request: one request is one inbox transaction, and its answer lists bad items.
BATCH_EVENTS_MAX = 5_000
# Stored but not yet committed events beyond which the intake refuses new requests (503): the
# inbox is a buffer for index outages, not an unbounded disk sink.
BACKLOG_EVENTS_MAX = 1_000_000
# The committed checkpoint is read for the backlog check at most this often per intake.
BACKLOG_CHECK_INTERVAL_S = 1.0


class WebhookIntake:
    """Turns one request body into inbox rows; knows nothing of HTTP beyond the media type."""

    def __init__(
        self,
        inbox: Inbox,
        committed_seq: Callable[[], int],
        *,
        wake: Callable[[], None],
        batch_events_max: int = BATCH_EVENTS_MAX,
        backlog_events_max: int = BACKLOG_EVENTS_MAX,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._inbox = inbox
        self._committed_seq = committed_seq
        self._wake = wake
        self.batch_events_max = batch_events_max
        self.backlog_events_max = backlog_events_max
        self._clock = clock
        self._committed = (float("-inf"), 0)
        self._lock = threading.Lock()

    def accept(self, body: bytes, media_type: str) -> AppendResult:
        """Store the body's items durably; BodyError, InboxFull or StoreError when it cannot."""
        items = parse_body(body, media_type, self.batch_events_max)
        result = self._inbox.append(items, committed_seq=self._committed_now(), backlog_max=self.backlog_events_max)
        if result.accepted or result.rejected:
            self._wake()
        return result

    def _committed_now(self) -> int:
        """The committed checkpoint, read from the ledger at most every BACKLOG_CHECK_INTERVAL_S."""
        with self._lock:
            read_at, seq = self._committed
            now = self._clock()
            if now - read_at >= BACKLOG_CHECK_INTERVAL_S:
                seq = self._committed_seq()
                self._committed = (now, seq)
            return seq
