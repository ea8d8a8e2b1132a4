"""Debezium change events from Kafka topics, read by an aiokafka consumer in a consumer group.

Threads. The consumer lives in an asyncio loop on a thread of its own (``_ConsumerLoop``), so it
keeps heartbeating however long lockstep takes to apply a batch. The loop fetches raw records
into a bounded hand-off buffer (pausing its partitions while the buffer is full: backpressure
reaches Kafka, nothing drops); the reader thread (``read``/``follow``) decodes them, because a
truncate consults the ledger and blocking I/O must not stall the event loop. ``commit`` is called
by lockstep's main thread; it only records what is finished and wakes the loop, which commits.

Positions and checkpoints. Every record handed out gets a sequence number ``seq`` in read order
across all partitions, and the position ``{"seq", "topic", "partition", "offset"}``.
``commit(position)`` means "this record and every record read before it are finished" (the low
watermark), so for every partition the offset after the last of its records up to that seq
may be committed, and only that: per partition, never past an unfinished record. Only
partitions currently assigned are committed; an offset below what the group already committed
(another member got further) is never written. Records that carry no change (tombstones,
logical-decoding messages, a truncate of an empty table) are finished as soon as every record
read before them is. Delivery is at-least-once: after a crash or a rebalance, records after the
committed offsets come again, and the ledger's version gate makes the redelivery a no-op.

Rebalances. When partitions are revoked, their records still waiting in the hand-off buffer are
dropped (the next owner reads them), and the revocation waits up to ``revoke_grace_s`` for the
records of those partitions already handed out to be finished, then commits them before the
group moves on. Whatever is still unfinished then is redelivered to the next owner and
deduplicated by the version gate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.helpers import create_ssl_context

from adapters.sources.debezium import (
    Change,
    DebeziumDecoder,
    KafkaSourceSettings,
    Skipped,
    Truncate,
    TruncateTracker,
)
from coordinator.errors import SourceError
from coordinator.ports import BadRecord, CheckpointStore, KnownDocs, SourceRecord

log = structlog.get_logger(__name__)

# Raw records fetched ahead of the reader; when full, the consumer pauses its partitions.
HANDOFF_RECORDS_MAX = 5_000
# Records one fetch hands over at most (the buffer may overshoot its bound by this much).
FETCH_RECORDS_MAX = 500
# How long one fetch waits for data; also how often the loop re-checks pause and shutdown.
FETCH_WAIT_MS = 200
# Per-partition and per-fetch byte budgets: big enough for a maximal document envelope
# (a broker still returns one oversized batch), small enough to bound the loop's memory.
FETCH_PARTITION_BYTES_MAX = 8 * 1024 * 1024
FETCH_BYTES_MAX = 64 * 1024 * 1024
# A member that does not fetch for this long leaves the group. Fetching continues while paused,
# so only a wedged loop hits this.
MAX_POLL_INTERVAL_MS = 300_000
# The group waits this much beyond revoke_grace_s for members to rejoin during a rebalance.
REBALANCE_SLACK_S = 20.0
# How often the reader thread looks at the hand-off buffer while it is empty.
POLL_S = 0.1
# How often finished offsets are committed when lockstep is not asking (it asks on every
# checkpoint); also the retry interval after a failed commit.
COMMIT_INTERVAL_S = 1.0
# How long the revocation sleeps between checks of its partitions' unfinished records.
REVOKE_POLL_S = 0.05
# Backoff between attempts to reach the brokers and after a failed fetch.
RETRY_BACKOFF_S = 1.0
# Bounds every call from another thread into the loop (a status question, the final flush).
LOOP_CALL_TIMEOUT_S = 30.0


def tp_name(tp: TopicPartition) -> str:
    return f"{tp.topic}:{tp.partition}"


@dataclass(frozen=True)
class _Raw:
    """One fetched record, not yet decoded."""

    tp: TopicPartition
    offset: int
    key: bytes | None
    value: bytes | None


class _Handoff:
    """The bounded buffer between the consumer loop and the reader thread."""

    def __init__(self, records_max: int) -> None:
        self.records_max = records_max
        self._items: deque[_Raw] = deque()
        self._cond = threading.Condition()
        # The partition of the record the reader took and has not finished handing out.
        self._in_hand: TopicPartition | None = None

    def put_many(self, items: Iterable[_Raw]) -> None:
        with self._cond:
            self._items.extend(items)
            self._cond.notify_all()

    def pop(self, timeout_s: float) -> _Raw | None:
        """The next record, which stays "in hand" until ``release``."""
        with self._cond:
            if not self._items:
                self._cond.wait(timeout_s)
            item = self._items.popleft() if self._items else None
            self._in_hand = None if item is None else item.tp
            return item

    def release(self) -> None:
        with self._cond:
            self._in_hand = None

    def in_hand(self, tps: set[TopicPartition]) -> bool:
        with self._cond:
            return self._in_hand in tps

    def drop(self, tps: set[TopicPartition]) -> int:
        """Remove every waiting record of ``tps``; returns how many went."""
        with self._cond:
            kept = deque(item for item in self._items if item.tp not in tps)
            dropped = len(self._items) - len(kept)
            self._items = kept
            return dropped

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)


@dataclass
class _OffsetBook:
    """What is finished, per partition: the low watermark folded into next offsets. Thread-safe."""

    _pending: deque[tuple[int, TopicPartition, int]] = field(default_factory=deque)
    _done: dict[TopicPartition, int] = field(default_factory=dict)
    _committed_seq: int = -1
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, seq: int, tp: TopicPartition, next_offset: int) -> None:
        """Record ``tp``'s offset as finished once record ``seq`` is (seqs never go down)."""
        with self._lock:
            self._pending.append((seq, tp, next_offset))
            self._fold()

    def finish_through(self, seq: int) -> None:
        with self._lock:
            self._committed_seq = max(self._committed_seq, seq)
            self._fold()

    def _fold(self) -> None:
        while self._pending and self._pending[0][0] <= self._committed_seq:
            _, tp, next_offset = self._pending.popleft()
            self._done[tp] = max(self._done.get(tp, 0), next_offset)

    @property
    def committed_seq(self) -> int:
        with self._lock:
            return self._committed_seq

    def done(self, tps: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        with self._lock:
            return {tp: self._done[tp] for tp in tps if tp in self._done}

    def unfinished(self, tps: set[TopicPartition]) -> int:
        with self._lock:
            return sum(1 for _, tp, _ in self._pending if tp in tps)


class KafkaDebeziumSource:
    """Debezium envelopes from Kafka topics, resumable from the group's committed offsets."""

    def __init__(
        self,
        settings: KafkaSourceSettings,
        docs: KnownDocs,
        checkpoints: CheckpointStore,
        *,
        name: str | None = None,
    ) -> None:
        self.name = name or settings.name
        self.settings = settings
        self._decoder = DebeziumDecoder(settings.tables, version_field=settings.version_field)
        self._truncates = TruncateTracker(self.name, self._decoder.tables, docs, checkpoints)
        self._buffer = _Handoff(HANDOFF_RECORDS_MAX)
        self._book = _OffsetBook()
        self._seq = -1
        self._loop: _ConsumerLoop | None = None
        self._log = log.bind(source=self.name)

    # --- ChangeSource ------------------------------------------------------------------------

    def read(self) -> Iterator[SourceRecord]:
        """Records from the committed offsets to the end of every assigned partition as the broker
        reports it when the read starts (for ``lockstep sync`` and ``run --exit-when-idle``)."""
        loop = self._started()
        loop.wait_assigned(self.settings.assignment_wait_s)
        loop.forget_ends()
        while True:
            raw = self._buffer.pop(POLL_S)
            if raw is not None:
                yield from self._records(raw)
                continue
            loop.check()
            if loop.caught_up():
                return

    def follow(self, stop: Callable[[], bool]) -> Iterator[SourceRecord]:
        """Records as they arrive, until ``stop()`` is true."""
        loop = self._started()
        while not stop():
            raw = self._buffer.pop(POLL_S)
            if raw is not None:
                yield from self._records(raw)
            else:
                loop.check()

    def commit(self, position: str) -> None:
        """Mark the record at ``position`` and every record read before it finished; the loop
        commits the resulting offsets (thread-safe: lockstep calls this from its main thread)."""
        seq = parse_position(position)
        if seq > self._seq:
            raise SourceError(f"position {position} was never handed out by this source")
        self._book.finish_through(seq)
        if self._loop is not None:
            self._loop.request_commit()

    def close(self) -> None:
        """Commit what is finished, leave the group and stop the consumer's thread."""
        if self._loop is not None:
            self._loop.stop()
            self._loop = None

    # --- inside the reader thread --------------------------------------------------------------

    def _started(self) -> _ConsumerLoop:
        if self._loop is None:
            self._loop = _ConsumerLoop(self.settings, self._buffer, self._book, self._log)
            self._loop.start()
        return self._loop

    def _records(self, raw: _Raw) -> list[SourceRecord]:
        try:
            return self._accounted(raw)
        finally:
            self._buffer.release()

    def _accounted(self, raw: _Raw) -> list[SourceRecord]:
        """Decode ``raw`` and enter its offset in the book (handed out, or finished at once)."""
        position = position_of(self._seq + 1, raw.tp, raw.offset)
        decoded = self._decoder.decode(raw.key, raw.value, position)
        self._truncates.settle(self._book.committed_seq)
        out = self._handle(decoded, position)
        if not out:
            # Nothing to apply: finished once every record read before it is.
            self._book.add(self._seq, raw.tp, raw.offset + 1)
            return []
        self._seq += 1
        self._book.add(self._seq, raw.tp, raw.offset + 1)
        if isinstance(decoded, Change):
            self._truncates.observe(decoded, self._seq)
        return out

    def _handle(self, decoded: Change | Truncate | Skipped | BadRecord, position: str) -> list[SourceRecord]:
        if isinstance(decoded, Change):
            return [self._truncates.gate(decoded)]
        if isinstance(decoded, Truncate):
            deletes = self._truncates.truncate(decoded, position)
            self._log.info("truncate", table=decoded.table, version=decoded.version, deletes=len(deletes))
            return list(deletes)
        if isinstance(decoded, BadRecord):
            self._log.warning("bad_record", position=position, doc_id=decoded.doc_id, reason=decoded.reason)
            return [decoded]
        return []


def position_of(seq: int, tp: TopicPartition, offset: int) -> str:
    return json.dumps({"seq": seq, "topic": tp.topic, "partition": tp.partition, "offset": offset})


def parse_position(position: str) -> int:
    try:
        seq = json.loads(position)["seq"]
    except (ValueError, KeyError, TypeError) as exc:
        raise SourceError(f"not a Kafka source position: {position!r}") from exc
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise SourceError(f"not a Kafka source position: {position!r}")
    return seq


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka ships no type hints
    def __init__(self, loop: _ConsumerLoop) -> None:
        self._loop = loop

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._loop.revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self._loop.assigned(set(assigned))


class _ConsumerLoop:
    """The aiokafka consumer and its asyncio loop, on a daemon thread of their own."""

    def __init__(self, settings: KafkaSourceSettings, buffer: _Handoff, book: _OffsetBook, logger: Any) -> None:
        self.settings = settings
        self.buffer = buffer
        self.book = book
        self.log = logger
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="kafka-consumer", daemon=True)
        self.consumer: AIOKafkaConsumer | None = None
        self.last_error: str | None = None
        self._ready = threading.Event()
        self._closing = False
        self._commit_wanted: asyncio.Event | None = None
        self._committed: dict[TopicPartition, int] = {}
        self._targets: dict[TopicPartition, int] = {}
        # Partitions being handed over: not resumed, and their fetched records not kept.
        self._revoking: set[TopicPartition] = set()

    # --- called from other threads -------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()
        self._ready.wait(LOOP_CALL_TIMEOUT_S)

    def request_commit(self) -> None:
        event = self._commit_wanted
        # A loop that already ended (shutdown, failure) refuses new calls; nothing to wake then.
        with contextlib.suppress(RuntimeError):
            if event is not None:
                self.loop.call_soon_threadsafe(event.set)

    def wait_assigned(self, wait_s: float) -> None:
        """Block until the group gave this member partitions; SourceError after ``wait_s``."""
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            self.check()
            if self.consumer is not None and self._call(self._assignment()):
                return
            time.sleep(POLL_S)
        topics = ", ".join(self.settings.topics)
        raise SourceError(
            f"no partition of {topics} assigned within {wait_s:.0f} s "
            f"(last error: {self.last_error or 'none'})"
        )

    def caught_up(self) -> bool:
        return bool(self._call(self._caught_up()))

    def forget_ends(self) -> None:
        """Each ``read()`` reads up to the partitions' ends as the broker reports them when it starts."""
        self._call(self._forget_ends())

    def check(self) -> None:
        """SourceError if the consumer's thread died (it ends by itself only on a failure)."""
        if not self.thread.is_alive():
            raise SourceError(f"the Kafka consumer stopped: {self.last_error or 'unknown error'}")

    def stop(self) -> None:
        if not self.thread.is_alive():
            return
        with contextlib.suppress(RuntimeError):  # the loop ended meanwhile
            self.loop.call_soon_threadsafe(self._begin_close)
        self.thread.join(LOOP_CALL_TIMEOUT_S + self.settings.request_timeout_s)

    def _call(self, coro: Any) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(LOOP_CALL_TIMEOUT_S)
        except FutureTimeout as exc:
            future.cancel()
            raise SourceError(f"the Kafka consumer did not answer within {LOOP_CALL_TIMEOUT_S} s") from exc

    # --- inside the loop -----------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        finally:
            self.loop.close()

    def _begin_close(self) -> None:
        self._closing = True
        if self._commit_wanted is not None:
            self._commit_wanted.set()

    async def _serve(self) -> None:
        try:
            self._commit_wanted = asyncio.Event()
            self.consumer = self._consumer()
            self.consumer.subscribe(list(self.settings.topics), listener=_Listener(self))
        except (KafkaError, OSError, ValueError) as exc:
            self._failed("cannot create the kafka consumer", exc)
            return
        finally:
            self._ready.set()
        if not await self._connect():
            return
        committer = asyncio.create_task(self._commit_loop())
        try:
            await self._fetch_loop()
        except Exception as exc:
            self._failed("kafka consumer loop failed", exc)
            raise
        finally:
            self._begin_close()
            await committer
            await self._commit(set(self.consumer.assignment()))
            await self.consumer.stop()
            self.log.info("kafka consumer stopped", committed={tp_name(t): o for t, o in self._committed.items()})

    def _consumer(self) -> AIOKafkaConsumer:
        s = self.settings
        ssl = create_ssl_context(cafile=s.ssl_cafile) if s.security_protocol in ("SSL", "SASL_SSL") else None
        return AIOKafkaConsumer(
            bootstrap_servers=list(s.bootstrap_servers),
            group_id=s.group_id,
            client_id=s.client_id,
            enable_auto_commit=False,
            auto_offset_reset=s.auto_offset_reset,
            isolation_level=s.isolation_level,
            session_timeout_ms=int(s.session_timeout_s * 1000),
            heartbeat_interval_ms=int(s.session_timeout_s * 1000 / 3),
            request_timeout_ms=int(s.request_timeout_s * 1000),
            rebalance_timeout_ms=int((s.revoke_grace_s + REBALANCE_SLACK_S) * 1000),
            max_poll_interval_ms=MAX_POLL_INTERVAL_MS,
            max_partition_fetch_bytes=FETCH_PARTITION_BYTES_MAX,
            fetch_max_bytes=FETCH_BYTES_MAX,
            security_protocol=s.security_protocol,
            sasl_mechanism=s.sasl_mechanism,
            sasl_plain_username=s.sasl_username,
            sasl_plain_password=None if s.sasl_password is None else s.sasl_password.get_secret_value(),
            ssl_context=ssl,
        )

    async def _connect(self) -> bool:
        """Start the consumer, retrying while the brokers are unreachable; False when closing."""
        assert self.consumer is not None
        while not self._closing:
            try:
                await self.consumer.start()
                return True
            except KafkaError as exc:
                self._failed("kafka brokers unreachable", exc)
                await asyncio.sleep(RETRY_BACKOFF_S)
        await self.consumer.stop()
        return False

    async def _fetch_loop(self) -> None:
        assert self.consumer is not None
        while not self._closing:
            self._pause_while_full()
            try:
                batch = await self.consumer.getmany(timeout_ms=FETCH_WAIT_MS, max_records=FETCH_RECORDS_MAX)
            except KafkaError as exc:
                self._failed("kafka fetch failed", exc)
                await asyncio.sleep(RETRY_BACKOFF_S)
                continue
            for tp, messages in batch.items():
                if tp not in self._revoking:
                    self.buffer.put_many(_Raw(tp, m.offset, m.key, m.value) for m in messages)

    def _pause_while_full(self) -> None:
        """Backpressure: fetch nothing while the reader has a full buffer to work through."""
        assert self.consumer is not None
        assigned = set(self.consumer.assignment())
        if len(self.buffer) >= self.buffer.records_max:
            self.consumer.pause(*assigned)
            return
        resumable = (set(self.consumer.paused()) & assigned) - self._revoking
        if resumable:
            self.consumer.resume(*resumable)

    async def _commit_loop(self) -> None:
        assert self._commit_wanted is not None and self.consumer is not None
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._commit_wanted.wait(), COMMIT_INTERVAL_S)
            self._commit_wanted.clear()
            await self._commit(set(self.consumer.assignment()))

    async def _commit(self, tps: set[TopicPartition]) -> None:
        """Commit the finished offsets of ``tps`` that are above what the group holds."""
        assert self.consumer is not None
        offsets = {tp: o for tp, o in self.book.done(tps).items() if o > self._committed.get(tp, 0)}
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except KafkaError as exc:
            # At-least-once: an offset not committed now is committed later or redelivered.
            self._failed("kafka commit failed", exc)
            return
        self._committed.update(offsets)

    async def assigned(self, tps: set[TopicPartition]) -> None:
        assert self.consumer is not None
        self._targets.clear()
        self._revoking.clear()
        for tp in tps:
            try:
                self._committed[tp] = await self.consumer.committed(tp) or 0
            except KafkaError as exc:
                self._failed("cannot read committed offset", exc)
                self._committed[tp] = 0
        self.log.info("partitions assigned", partitions=sorted(map(tp_name, tps)))

    async def revoked(self, tps: set[TopicPartition]) -> None:
        """Hand the partitions over cleanly: drop what is unread, let what is in flight finish
        (for at most revoke_grace_s) and commit it before the group moves on."""
        assert self.consumer is not None
        if not tps:
            return
        self._revoking |= tps
        self.consumer.pause(*tps)
        dropped = self.buffer.drop(tps)
        deadline = time.monotonic() + self.settings.revoke_grace_s
        while self._in_flight(tps) and time.monotonic() < deadline and not self._closing:
            await asyncio.sleep(REVOKE_POLL_S)
        await self._commit(tps)
        self.log.info(
            "partitions revoked",
            partitions=sorted(map(tp_name, tps)),
            dropped_unread=dropped,
            unfinished=self.book.unfinished(tps),
            committed={tp_name(tp): self._committed.get(tp) for tp in tps},
        )
        for tp in tps:
            self._committed.pop(tp, None)

    def _in_flight(self, tps: set[TopicPartition]) -> bool:
        return self.book.unfinished(tps) > 0 or self.buffer.in_hand(tps)

    async def _forget_ends(self) -> None:
        """Take the ends from the broker now: the highwater the last fetch saw may predate
        records already acknowledged to their producers, which this read must deliver."""
        assert self.consumer is not None
        self._targets.clear()
        assigned = list(self.consumer.assignment())
        if not assigned:
            return
        try:
            self._targets.update(await self.consumer.end_offsets(assigned))
        except KafkaError as exc:
            # The ends the next fetches report serve instead; what they miss comes at the next read.
            self._failed("cannot read the partitions' end offsets", exc)

    async def _assignment(self) -> set[TopicPartition]:
        assert self.consumer is not None
        return set(self.consumer.assignment())

    async def _caught_up(self) -> bool:
        """Whether every assigned partition was read up to its end as first seen, and the
        hand-off buffer is empty (so the reader has handed out everything fetched)."""
        assert self.consumer is not None
        assigned = self.consumer.assignment()
        if not assigned or len(self.buffer):
            return False
        for tp in assigned:
            end = self._end(tp)
            if end is None:
                return False
            target = self._targets.setdefault(tp, end)
            if await self.consumer.position(tp) < target:
                return False
        return True

    def _end(self, tp: TopicPartition) -> int | None:
        assert self.consumer is not None
        if self.settings.isolation_level == "read_committed":
            end = self.consumer.last_stable_offset(tp)
        else:
            end = self.consumer.highwater(tp)
        return None if end is None or end < 0 else int(end)

    def _failed(self, what: str, exc: BaseException) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"
        self.log.warning(what, error=self.last_error)
