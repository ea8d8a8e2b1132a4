"""One shard's logic: a bounded mailbox with per-document coalescing, driving the apply engine.

Plain Python, testable without Ray; ``lockstep/ray_runtime.py`` hosts one per Ray actor.

- Events are numbered by the reader (``seq``). ``offer`` accepts them unless the mailbox already
  holds ``mailbox_docs_max`` distinct documents; the caller must offer the rest again later
  (backpressure, never a drop).
- Per document only the newest waiting event is kept (latest wins); the older ones are finished
  when the newest is. A document whose intent is prepared but not yet committed (one side is
  down) is *in flight*: newer events for it wait and coalesce until it commits.
- ``step`` first retries in-flight intents (capped exponential backoff), then takes up to
  ``batch_docs_max`` waiting documents, prepares and drives them. It returns the seqs finished.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from coordinator.apply import ApplyEngine
from coordinator.errors import EmbedError, LockstepError, StoreError
from coordinator.events import ChangeEvent
from coordinator.ports import BadRecord, Fence, Intent, SourceRecord

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Envelope:
    """A source record on its way through a shard, with the reader's sequence number."""

    seq: int
    record: SourceRecord


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff: ``base_s * 2**attempt``, at most ``max_s``."""

    base_s: float = 0.2
    max_s: float = 10.0

    def delay_s(self, attempt: int) -> float:
        return float(min(self.max_s, self.base_s * 2 ** min(attempt, 30)))


@dataclass
class _Waiting:
    event: SourceRecord
    seqs: list[int] = field(default_factory=list)


@dataclass
class ShardStatus:
    """What a shard tells the service: for metrics and /readyz."""

    shard: int
    waiting_docs: int
    in_flight_docs: int
    retry_attempt: int
    last_error: str
    stats: dict[str, int]
    retries: dict[str, int]


class ShardWorker:
    """The shard's mailbox and apply loop step; thread-safe between ``offer`` and ``step``."""

    def __init__(
        self,
        shard: int,
        engine: ApplyEngine,
        *,
        fence: Fence | None,
        mailbox_docs_max: int,
        batch_docs_max: int,
        backoff: Backoff,
        clock: Callable[[], float],
    ) -> None:
        self.shard = shard
        self.engine = engine
        self.fence = fence
        self.mailbox_docs_max = mailbox_docs_max
        self.batch_docs_max = batch_docs_max
        self.backoff = backoff
        self.clock = clock
        self._lock = threading.Lock()
        self._waiting: OrderedDict[str, _Waiting] = OrderedDict()
        self._in_flight: dict[str, tuple[Intent, list[int]]] = {}
        self._attempt = 0
        self._retry_at = 0.0
        self._last_error = ""

    # --- mailbox ---------------------------------------------------------------------------

    def offer(self, envelopes: Sequence[Envelope]) -> int:
        """Accept envelopes in order until the mailbox is full; returns how many were accepted."""
        with self._lock:
            for taken, envelope in enumerate(envelopes):
                if not self._put(envelope):
                    return taken
            return len(envelopes)

    def _put(self, envelope: Envelope) -> bool:
        key = _key(envelope)
        slot = self._waiting.get(key)
        if slot is None:
            if len(self._waiting) >= self.mailbox_docs_max:
                return False
            self._waiting[key] = _Waiting(envelope.record, [envelope.seq])
            return True
        slot.seqs.append(envelope.seq)
        if _newer(envelope.record, slot.event):
            slot.event = envelope.record
        return True

    # --- the apply loop step ---------------------------------------------------------------

    def step(self) -> list[int]:
        """One unit of work; returns the seqs it finished (empty if idle or backing off)."""
        if self.clock() < self._retry_at:
            return []
        if self._in_flight:
            return self._retry_in_flight()
        batch = self._take()
        if not batch:
            return []
        try:
            intents = self.engine.prepare([w.event for w in batch.values()], self.fence)
        except (StoreError, EmbedError) as exc:
            self._put_back(batch)
            self._failed(exc)
            return []
        return self._drive(batch, intents)

    def _take(self) -> dict[str, _Waiting]:
        with self._lock:
            keys = [k for k in self._waiting if k not in self._in_flight][: self.batch_docs_max]
            return {k: self._waiting.pop(k) for k in keys}

    def _put_back(self, batch: dict[str, _Waiting]) -> None:
        with self._lock:
            for key, slot in batch.items():
                newer = self._waiting.pop(key, None)
                self._waiting[key] = slot
                if newer is not None:
                    slot.seqs += newer.seqs
                    slot.event = newer.event if _newer(newer.event, slot.event) else slot.event

    def _drive(self, batch: dict[str, _Waiting], intents: list[Intent]) -> list[int]:
        prepared = {i.doc_id: i for i in intents}
        finished = [s for k, w in batch.items() if k not in prepared for s in w.seqs]
        try:
            self.engine.drive(intents, self.fence)
        except (StoreError, EmbedError) as exc:
            with self._lock:
                self._in_flight.update((d, (i, batch[d].seqs)) for d, i in prepared.items())
            self._failed(exc)
            return finished
        self._succeeded()
        return finished + [s for k in prepared for s in batch[k].seqs]

    def _retry_in_flight(self) -> list[int]:
        held = dict(self._in_flight)
        # Intents may have been committed or aborted by the failed attempt's other side already.
        pending = {i.doc_id: i for i in self.engine.ledger.pending() if i.doc_id in held}
        try:
            self.engine.drive(list(pending.values()), self.fence)
        except (StoreError, EmbedError) as exc:
            self._failed(exc)
            return []
        with self._lock:
            self._in_flight.clear()
        self._succeeded()
        return [s for _, seqs in held.values() for s in seqs]

    def _failed(self, exc: LockstepError) -> None:
        if not exc.retriable:
            raise exc
        delay_s = self.backoff.delay_s(self._attempt)
        self._attempt += 1
        self._retry_at = self.clock() + delay_s
        self._last_error = str(exc)
        log.warning("shard backing off", shard=self.shard, attempt=self._attempt, delay_s=delay_s, error=str(exc))

    def _succeeded(self) -> None:
        self._attempt = 0
        self._last_error = ""

    def status(self) -> ShardStatus:
        with self._lock:
            return ShardStatus(
                self.shard,
                len(self._waiting),
                len(self._in_flight),
                self._attempt,
                self._last_error,
                self.engine.stats.as_dict(),
                dict(self.engine.stats.side_retries),
            )

    @property
    def idle(self) -> bool:
        with self._lock:
            return not self._waiting and not self._in_flight


def _key(envelope: Envelope) -> str:
    record = envelope.record
    if isinstance(record, BadRecord):
        # Bad records never coalesce: each is dead-lettered on its own.
        return f"\x00bad:{envelope.seq}"
    return record.doc_id


def _newer(candidate: SourceRecord, current: SourceRecord) -> bool:
    if isinstance(candidate, ChangeEvent) and isinstance(current, ChangeEvent):
        return candidate.version > current.version
    return False
