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
- With ``prepare_ahead`` = N, while a batch is driven (both index writes, then the commit), up
  to N further *full* batches are taken and prepared, in order, on a helper thread: the CPU work
  of embedding and planning is done while the indexes are busy (a store's stall included)
  instead of competing with them once they answer. Batches in flight never share a document, so
  each document's versions still apply one after the other; each step drives the oldest batch
  prepared ahead. Only full batches go ahead: under a light load a batch keeps gathering the
  events that arrive while the last one is written, as it would without.
- A document another writer holds (a rebuild's backfill has an intent for it) goes back to the
  mailbox for ``INTENT_CONFLICT_RETRY_S`` while the rest of its batch goes on.
- Poison documents: when preparing a batch fails on the embedder, the shard isolates, preparing
  one document per step and rotating failing ones to the back. A document is dead-lettered
  after ``poison_attempts_max`` failures on its own, but only once another document has been
  prepared since its first failure: that proves the embedder works and this input does not,
  so an embedder outage never empties the mailbox into the DLQ.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import structlog

from coordinator.errors import EmbedError, IntentConflict, LockstepError, StoreError
from coordinator.events import ChangeEvent
from coordinator.planner import event_hash
from coordinator.ports import BadRecord, Engine, Fence, Intent, SourceRecord

# How soon a batch that met another writer's intent (IntentConflict) is tried again.
INTENT_CONFLICT_RETRY_S = 0.05
# How long a document may wait on another writer's intent before its shard drives that intent
# itself (see ``_hold``): longer than any live writer takes to drive one batch.
INTENT_ADOPT_AFTER_S = 30.0

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
    # Events at the kept event's version with other content: handed to the engine with it,
    # which dead-letters them as conflicts (the first one stands).
    conflicts: list[ChangeEvent] = field(default_factory=list)

    def events(self) -> list[SourceRecord]:
        return [self.event, *self.conflicts]

    def take(self, record: SourceRecord) -> None:
        """Keep the newer of ``record`` and the waiting event; a copy of the same version with
        other content is kept aside as a conflict."""
        if _newer(record, self.event):
            self.event = record
        elif _conflicting(record, self.event):
            assert isinstance(record, ChangeEvent), "only change events conflict"
            self.conflicts.append(record)


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
    apply_seconds: dict[str, float]
    apply_writes: dict[str, int]
    # Documents in batches taken and prepared ahead (``prepare_ahead``), not yet driven.
    ahead_docs: int = 0


class ShardWorker:
    """The shard's mailbox and apply loop step; thread-safe between ``offer`` and ``step``."""

    def __init__(
        self,
        shard: int,
        engine: Engine,
        *,
        fence: Fence | None,
        mailbox_docs_max: int,
        batch_docs_max: int,
        backoff: Backoff,
        clock: Callable[[], float],
        poison_attempts_max: int = 3,
        prepare_ahead: int = 0,
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
        # Documents another writer holds, when they may be taken again, and since when they
        # have been waiting on it (see ``_hold``).
        self._held_until: dict[str, float] = {}
        self._held_since: dict[str, float] = {}
        # Intents of other writers this shard drove (``_adopt``): a writer died with them prepared.
        self.adopted_intents = 0
        self._attempt = 0
        self._retry_at = 0.0
        self._last_error = ""
        self.poison_attempts_max = poison_attempts_max
        self._isolate = False
        self._prepared_batches = 0
        # doc_id -> (failures, prepared batches counted at its first failure)
        self._suspects: dict[str, tuple[int, int]] = {}
        # Batches taken and prepared (or being prepared) on the helper thread, oldest first.
        self.prepare_ahead = prepare_ahead
        self._ahead: deque[tuple[dict[str, _Waiting], Future[tuple[list[Intent], list[str]]]]] = deque()
        self._helper = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"prepare-{shard}") if prepare_ahead > 0 else None
        )

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
        slot.take(envelope.record)
        return True

    # --- the apply loop step ---------------------------------------------------------------

    def step(self) -> list[int]:
        """One unit of work; returns the seqs it finished (empty if idle or backing off)."""
        if self.clock() < self._retry_at:
            return []
        if self._in_flight:
            return self._retry_in_flight()
        if self._ahead:
            batch, prepared = self._ahead.popleft()
            batch, intents, finished = self._settle(batch, prepared.result)
        else:
            batch = self._take()
            if not batch:
                return []
            events = _events(batch)
            batch, intents, finished = self._settle(batch, lambda: self.engine.prepare_some(events, self.fence))
        if not batch:
            return finished
        self._prepare_next(exclude=batch.keys())
        return self._drive(batch, intents)

    def _settle(
        self, batch: dict[str, _Waiting], prepare: Callable[[], tuple[list[Intent], list[str]]]
    ) -> tuple[dict[str, _Waiting], list[Intent], list[int]]:
        """Run (or collect) a batch's prepare and sort out its outcome: the documents to drive
        and their intents, or, if preparing failed, nothing to drive (the batch went back to the
        mailbox) and the seqs a dead-lettered poison document finished."""
        try:
            intents, held = prepare()
        except EmbedError as exc:
            return {}, [], self._embed_failed(batch, exc)
        except StoreError as exc:
            self._put_back(batch)
            self._failed(exc)
            return {}, [], []
        if held:
            batch = self._hold(batch, set(held))
        self._prepared(batch)
        return batch, intents, []

    def _prepare_next(self, exclude: Collection[str]) -> None:
        """With ``prepare_ahead``: take further full batches (none of ``exclude``, the documents
        about to be driven, nor of a batch already ahead) and queue their prepare on the helper
        thread. Not while isolating a poison document, which goes one document per step."""
        if self._helper is None or self._isolate:
            return
        busy = set(exclude).union(*(b.keys() for b, _ in self._ahead))
        while len(self._ahead) < self.prepare_ahead:
            batch = self._take(busy, full_only=True)
            if not batch:
                return
            busy.update(batch)
            events = _events(batch)
            self._ahead.append((batch, self._helper.submit(self.engine.prepare_some, events, self.fence)))

    def _hold(self, batch: dict[str, _Waiting], held: set[str]) -> dict[str, _Waiting]:
        """Another writer (a rebuild's backfill) holds these documents: they go back to the
        front of the mailbox and are not taken again for INTENT_CONFLICT_RETRY_S, while the rest
        of the batch goes on (each document's versions still apply in order). Not an outage:
        no backoff, no degraded report. Returns the rest.

        A document still held after INTENT_ADOPT_AFTER_S waits on a writer that died with its
        intent prepared (a killed rebuild nobody resumed): the shard drives that intent itself,
        as a recovery would, and the document goes on. Driving an intent its writer is still
        driving is harmless (same versions; the second commit finds it committed)."""
        now = self.clock()
        self._put_back({k: w for k, w in batch.items() if k in held})
        with self._lock:
            self._held_until.update(dict.fromkeys(held, now + INTENT_CONFLICT_RETRY_S))
            since = {k: self._held_since.setdefault(k, now) for k in held}
        self._adopt({k for k, t in since.items() if now - t >= INTENT_ADOPT_AFTER_S})
        return {k: w for k, w in batch.items() if k not in held}

    def _adopt(self, doc_ids: set[str]) -> None:
        """Drive what is prepared for these documents, whoever prepared it."""
        if not doc_ids:
            return
        pending = [i for i in self.engine.pending() if i.doc_id in doc_ids]
        try:
            self.engine.drive(pending, self.fence)
        except (StoreError, EmbedError) as exc:
            self._failed(exc)
            return
        self.adopted_intents += len(pending)
        for intent in pending:
            log.warning("drove an intent another writer left prepared", shard=self.shard, doc_id=intent.doc_id,
                        version=intent.version, phase="adopt")
        with self._lock:
            for doc_id in doc_ids:
                self._held_since.pop(doc_id, None)

    def _take(self, exclude: Collection[str] = (), *, full_only: bool = False) -> dict[str, _Waiting]:
        """Up to a batch of waiting documents (none in flight, excluded or held back); with
        ``full_only``, nothing unless a whole batch is waiting."""
        limit = 1 if self._isolate else self.batch_docs_max
        with self._lock:
            now = self.clock() if self._held_until else 0.0
            keys = [
                k for k in self._waiting
                if k not in self._in_flight and k not in exclude and self._held_until.get(k, 0.0) <= now
            ][:limit]
            if full_only and len(keys) < limit:
                return {}
            for k in keys:
                self._held_until.pop(k, None)
            return {k: self._waiting.pop(k) for k in keys}

    def _embed_failed(self, batch: dict[str, _Waiting], exc: EmbedError) -> list[int]:
        """Isolate documents after an embedder failure; dead-letter a proven poison document.
        A failure that is no document's fault (the service refuses every request) only backs off."""
        if not exc.retriable:
            self._put_back(batch)
            self._failed(exc)
            return []
        for key in batch:
            failures, since = self._suspects.get(key, (0, self._prepared_batches))
            self._suspects[key] = (failures + 1, since)
        if len(batch) == 1:
            [(key, slot)] = batch.items()
            failures, since = self._suspects[key]
            if failures >= self.poison_attempts_max and self._prepared_batches > since:
                return self._give_up(key, slot, exc, failures)
        self._isolate = True
        self._put_back(batch, to_back=True)
        self._failed(exc)
        return []

    def _give_up(self, key: str, slot: _Waiting, exc: EmbedError, failures: int) -> list[int]:
        assert isinstance(slot.event, ChangeEvent), "only change events reach the embedder"
        self.engine.dead_letter_event(slot.event, f"embedding failed {failures} times: {exc}", failures)
        del self._suspects[key]
        self._isolate = bool(self._suspects)
        return slot.seqs

    def _prepared(self, batch: dict[str, _Waiting]) -> None:
        self._prepared_batches += 1
        for key in batch:
            self._suspects.pop(key, None)
            self._held_since.pop(key, None)
        self._isolate = bool(self._suspects)

    def _put_back(self, batch: dict[str, _Waiting], *, to_back: bool = False) -> None:
        """Return taken documents to the mailbox (in front, or behind the others to rotate)."""
        with self._lock:
            for key, slot in reversed(batch.items()):
                newer = self._waiting.pop(key, None)
                self._waiting[key] = slot
                if not to_back:
                    self._waiting.move_to_end(key, last=False)
                if newer is not None:
                    # What arrived while the batch was out, merged as if it had been offered.
                    slot.seqs += newer.seqs
                    slot.conflicts += newer.conflicts
                    slot.take(newer.event)

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
        pending = {i.doc_id: i for i in self.engine.pending() if i.doc_id in held}
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
        """Back off after a store or embedder failure. One that will not pass by itself (refused
        credentials, a collection of another schema) is retried at the longest backoff and
        reported, so that the shard resumes once an operator fixes it; anything else is a
        programmer's error and stops the shard."""
        if not exc.retriable and not isinstance(exc, StoreError | EmbedError):
            raise exc
        if isinstance(exc, IntentConflict):
            # Another writer's intent for the same document (a rebuild's backfill) is not an
            # outage: try again soon, without growing the backoff or reporting the shard degraded.
            self._retry_at = self.clock() + INTENT_CONFLICT_RETRY_S
            return
        delay_s = self.backoff.delay_s(self._attempt) if exc.retriable else self.backoff.max_s
        self._attempt += 1
        self._retry_at = self.clock() + delay_s
        self._last_error = str(exc)
        log.warning(
            "shard backing off",
            shard=self.shard,
            attempt=self._attempt,
            delay_s=delay_s,
            error=str(exc),
            phase="retry",
        )

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
                dict(self.engine.stats.side_seconds),
                dict(self.engine.stats.side_writes),
                # A copy first: the loop thread changes the deque without this lock.
                sum(len(batch) for batch, _ in tuple(self._ahead)),
            )

    @property
    def idle(self) -> bool:
        with self._lock:
            return not self._waiting and not self._in_flight and not self._ahead

    def close(self) -> None:
        """Wait for the prepares running ahead (their intents stay prepared, for the next start)."""
        if self._helper is not None:
            self._helper.shutdown(wait=True)


def _key(envelope: Envelope) -> str:
    record = envelope.record
    if isinstance(record, BadRecord):
        # Bad records never coalesce: each is dead-lettered on its own.
        return f"\x00bad:{envelope.seq}"
    return record.doc_id


def _events(batch: dict[str, _Waiting]) -> list[SourceRecord]:
    return [e for w in batch.values() for e in w.events()]


def _conflicting(candidate: SourceRecord, current: SourceRecord) -> bool:
    """Same document, same version, other content: the source reused a version."""
    if isinstance(candidate, ChangeEvent) and isinstance(current, ChangeEvent):
        return candidate.version == current.version and event_hash(candidate) != event_hash(current)
    return False


def _newer(candidate: SourceRecord, current: SourceRecord) -> bool:
    if isinstance(candidate, ChangeEvent) and isinstance(current, ChangeEvent):
        return candidate.version > current.version
    return False
