"""How a schedule's deliveries reach lockstep: the two paths it ships, each driven as it runs.

- ``ShardDrive``, the streaming path (``lockstep run``): a reader with the service's own flow
  control (``coordinator.reader.ReaderFlow``, the real low watermark in it) numbers every delivery
  it reads, offers them to the ``ShardWorker`` as far as its mailbox reported room (bounded
  mailbox: backpressure), steps the worker on the simulated clock, feeds the finished seqs and
  the worker's status back and commits the flow's checkpoint as the source's position. After a
  crash, or when a new owner takes the shard over, the source resumes at the committed
  checkpoint: every delivery after it comes again.
- ``BatchDrive``, the batch path (``lockstep sync``): ``coordinator.sync.run_sync`` over a
  source that reads the deliveries from its committed checkpoint, in batches of
  ``SYNC_BATCH_EVENTS``. Faults fire between batches (``run_sync``'s progress callback); a
  crash, or a run that failed on a store or the embedder, is followed by another run in a new
  process, as a scheduler would start one.

Both fire the schedule's armed faults at seeded ticks, observe versions for I5, heal every fault
after the last delivery and measure the simulated time to quiescence (I6).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from chaos.catalogue import KINDS
from chaos.faults import EMBED_5XX, EMBED_TIMEOUT, MALFORMED_VECTOR
from chaos.rig import STEP_S, Rig, SimulatedCrash
from coordinator import crashpoints
from coordinator.errors import LockstepError, StoreError
from coordinator.events import ChangeEvent
from coordinator.reader import ReaderFlow
from coordinator.sync import run_sync

# Deliveries the reader reads ahead and offers to the shard per simulated step (its
# ``offer_batch_max``).
OFFER_EVENTS_PER_STEP = 6
# Liveness bound: a schedule that is not quiet after this many steps (or batches) is a violation.
STEPS_MAX = 3000
# Steps without quiescence after which a sentinel change is delivered: live traffic proves the
# embedder works, which is what lets the shard dead-letter a poison document.
SENTINEL_EVERY_STEPS = 30
# Observe versions (I5) every this many steps.
OBSERVE_EVERY_STEPS = 8
# Events per batch of the batch path (``sync.batch_events``): small, so that a schedule has
# several batches to crash between.
SYNC_BATCH_EVENTS = 8
# Simulated seconds before the next ``lockstep sync`` run after one failed (a scheduler's retry).
SYNC_RERUN_AFTER_S = 5.0
# Faults that destroy stored data fire in the last quarter of the deliveries, and on the streaming
# path not before this share of them is committed: most data exists and later traffic rewrites
# little of it, so the reconciler has a real loss to repair.
LATE_KINDS = frozenset({"keyword_server_data_loss", "vector_server_kill9"})
LATE_AFTER_COMMITTED_SHARE = 0.75
# Steps a data loss waits past its tick for that share at most (a poison document can hold the
# checkpoint back until its sentinels come, after the last delivery).
LATE_WAIT_STEPS_MAX = 60
ZOMBIE_OWNER = "zombie_owner"
# Crash points armed by ``lockstep_crash``: the apply protocol's and the ledger's; the batch path
# also crashes right after a batch's checkpoint, between batches.
CRASH_POINTS = (
    crashpoints.AFTER_EMBED,
    crashpoints.AFTER_PREPARE,
    crashpoints.AFTER_KEYWORD_APPLY,
    crashpoints.AFTER_VECTOR_APPLY,
    crashpoints.AFTER_COMMIT,
    "ledger.prepare.between_statements",
    "ledger.mark_done.between_statements",
    "ledger.commit.between_statements",
)
BATCH_CRASH_POINTS = (*CRASH_POINTS, crashpoints.AFTER_CHECKPOINT)

# Server-tier hook: arms one server fault kind on a running schedule.
ServerArm = Callable[[str, Rig, random.Random], None]


class Spec(Protocol):
    """What a drive needs of a schedule's spec (``chaos.runner.ScheduleSpec``)."""

    @property
    def faults(self) -> tuple[str, ...]: ...


# --- the schedule's source ---------------------------------------------------------------------


@dataclass
class DeliveryLog:
    """The schedule's source: its deliveries in order, and its committed checkpoint.

    A position is the number of deliveries before the next one to read, as a decimal string, so
    ``commit(position)`` records "the position after the last applied event". The checkpoint
    lives with the source (as a Kafka group's offsets or a replication slot do) and survives
    lockstep's crashes."""

    records: list[Any]
    committed: int = 0

    def commit(self, position: str) -> None:
        self.committed = int(position)

    @property
    def end(self) -> int:
        return len(self.records)


@dataclass
class SyncSource:
    """The ``ChangeSource`` that ``run_sync`` reads: the log from its committed checkpoint on."""

    log: DeliveryLog
    name: str = "chaos"

    def read(self) -> Iterator[Any]:
        for at in range(self.log.committed, self.log.end):
            record = self.log.records[at]
            yield replace(record, position=str(at + 1)) if isinstance(record, ChangeEvent) else record

    def commit(self, position: str) -> None:
        self.log.commit(position)

    def close(self) -> None:
        return None


# --- what both paths share -----------------------------------------------------------------------


class Drive:
    """Armed faults and their ticks, version observations (I5), the lag after healing (I6)."""

    def __init__(
        self,
        rig: Rig,
        deliveries: Sequence[Any],
        spec: Spec,
        rng: random.Random,
        server_arm: ServerArm | None,
        *,
        events_per_tick: int,
        crash_points: Sequence[str],
    ) -> None:
        self.rig = rig
        self.rng = rng
        self.server_arm = server_arm
        self.crash_points = crash_points
        self.log = DeliveryLog(list(deliveries))
        self.steps = 0
        ticks = max(2, math.ceil(len(deliveries) / events_per_tick))
        self.actions = sorted((_tick(k, ticks, rng), k) for k in spec.faults if armed_kind(k))
        self.history: dict[str, list[tuple[str, int]]] = {"ledger": [], "keyword": [], "vector": []}
        self.lag_s = 0.0

    def heal(self) -> float:
        """Clear every armed fault; returns the simulated time of healing."""
        self.rig.keyword.armed.clear()
        self.rig.vector.armed.clear()
        self.rig.embedder.armed.clear()
        self.rig.crash.point = None
        return self.rig.clock.now_s

    def arm(self, kind: str) -> None:
        assert kind != ZOMBIE_OWNER, "an ownership takeover is the streaming path's own"
        if kind == "lockstep_crash":
            self.rig.crash.point = self.rng.choice(self.crash_points)
        elif kind in ARMED_INPROC:
            ARMED_INPROC[kind](self.rig, self.rng)
        elif self.server_arm is not None:
            self.server_arm(kind, self.rig, self.rng)

    def observe(self) -> None:
        """Record versions seen now, for I5 (an index that is down right now is skipped)."""
        docs = self.rig.ledger.get_docs(self.rig.model.latest)
        self.history["ledger"] += sorted((d, s.version) for d, s in docs.items())
        for side, index in (("keyword", self.rig.stores.keyword), ("vector", self.rig.stores.vector)):
            try:
                self.history[side] += sorted((c.chunk_id, c.version) for c in index.scan())
            except StoreError as exc:
                if not exc.retriable:
                    raise

    def _count_step(self) -> None:
        """One more step done (a worker step, a batch, a failed run); versions are observed
        every few, and a schedule that keeps going past the bound is a violation."""
        if self.steps >= STEPS_MAX:
            raise AssertionError(f"not quiet after {STEPS_MAX} steps: {self.rig.worker.status()}")
        self.steps += 1
        if self.steps % OBSERVE_EVERY_STEPS == 0:
            self.observe()


class ShardDrive(Drive):
    """The streaming path: the service's reader flow control, shard worker, checkpoint."""

    def __init__(
        self, rig: Rig, deliveries: Sequence[Any], spec: Spec, rng: random.Random, server_arm: ServerArm | None
    ) -> None:
        super().__init__(
            rig, deliveries, spec, rng, server_arm, events_per_tick=OFFER_EVENTS_PER_STEP, crash_points=CRASH_POINTS
        )
        self.flow = self._new_flow()
        self.read_at = 0

    def _new_flow(self) -> ReaderFlow:
        """The flow control of a new lockstep process: one shard, on the simulated clock."""
        return ReaderFlow(
            1,
            offer_batch_max=OFFER_EVENTS_PER_STEP,
            mailbox_docs_max=self.rig.worker.mailbox_docs_max,
            watermark=self.rig.plant.watermark(),
            clock=self.rig.clock,
        )

    def to_quiescence(self) -> None:
        while self.read_at < self.log.end or self.flow.buffered or self.actions:
            self._feed()
            self._fire_due()
            self._step()
        healed_at = self.heal()
        self._settle()
        self.lag_s = self.rig.clock.now_s - healed_at

    def _fire_due(self) -> None:
        while self.actions and self.actions[0][0] <= self.steps:
            tick, kind = self.actions[0]
            if not self._ready(kind, tick):
                return
            self.actions.pop(0)
            if kind == ZOMBIE_OWNER:
                self._take_over()
            else:
                self.arm(kind)

    def _ready(self, kind: str, tick: int) -> bool:
        """A takeover waits until the owner holds events (so its stall strands them), or until
        everything was read; a data loss until most deliveries are committed (so data exists),
        or for LATE_WAIT_STEPS_MAX steps."""
        if kind == ZOMBIE_OWNER:
            return self.rig.worker.status().waiting_docs > 0 or self.read_at >= self.log.end
        if kind in LATE_KINDS:
            committed = self.log.committed >= LATE_AFTER_COMMITTED_SHARE * self.log.end
            return committed or self.steps >= tick + LATE_WAIT_STEPS_MAX
        return True

    def _take_over(self) -> None:
        zombie = self.rig.take_over()
        self._resume()
        self.rig.wake(zombie)

    def _feed(self) -> None:
        """Read as many deliveries as the flow's buffer takes (each numbered by its watermark),
        offer what it says, and checkpoint, as the service's reader does on every tick."""
        for _ in range(min(self.flow.buffer_room(), self.log.end - self.read_at)):
            self.flow.read(self.log.records[self.read_at], str(self.read_at + 1))
            self.read_at += 1
        batches = self.flow.batches()
        if batches:
            self.flow.offered({shard: self.rig.offer(batch) for shard, batch in batches.items()})
        self._checkpoint()

    def _step(self) -> None:
        """One worker step, its finished seqs and status reported back as a shard's drain is
        (every step: the worker hands its finished seqs over only once)."""
        finished, crashed = self.rig.step()
        if crashed:
            self._resume()
        else:
            self.flow.drained([(finished, self.rig.worker.status())])
            self._checkpoint()
        self._count_step()

    def _checkpoint(self) -> None:
        position = self.flow.checkpoint()
        if position is not None:
            self.log.commit(position)
            self.flow.committed = position

    def _resume(self) -> None:
        """A new process: a fresh flow control (watermark included), nothing buffered, the source
        read again from its committed checkpoint."""
        self.flow = self._new_flow()
        self.read_at = self.log.committed

    def _settle(self) -> None:
        quiet_steps = 0
        while not (self.rig.worker.idle and self.read_at >= self.log.end and not self.flow.buffered):
            self._feed()
            self._step()
            quiet_steps += 1
            if quiet_steps % SENTINEL_EVERY_STEPS == 0:
                self.log.records.append(self.rig.model.create(self.rng))
        self.observe()


class BatchDrive(Drive):
    """The batch path: ``run_sync`` runs, faults between batches, a new run after a failure."""

    def __init__(
        self, rig: Rig, deliveries: Sequence[Any], spec: Spec, rng: random.Random, server_arm: ServerArm | None
    ) -> None:
        super().__init__(
            rig,
            deliveries,
            spec,
            rng,
            server_arm,
            events_per_tick=SYNC_BATCH_EVENTS,
            crash_points=BATCH_CRASH_POINTS,
        )

    def to_quiescence(self) -> None:
        done = False
        while not done or self.actions:
            if done:
                self._fire(len(self.actions))
            done = self._run_sync()
        healed_at = self.heal()
        while not self._run_sync():
            pass
        self.lag_s = self.rig.clock.now_s - healed_at
        self.observe()

    def _run_sync(self) -> bool:
        """One ``lockstep sync`` run; True when it read the source to its end."""
        try:
            run_sync(SyncSource(self.log), self.rig.engine, batch_events=SYNC_BATCH_EVENTS, progress=self._batched)
            return True
        except SimulatedCrash:
            self.rig.restart()
        except LockstepError as exc:
            if not exc.retriable:
                raise
            self.rig.clock.now_s += SYNC_RERUN_AFTER_S
            self.rig.restart()
        self._count_step()
        return False

    def _batched(self, _records: int) -> None:
        """Between two batches: time passes, due faults fire."""
        self._count_step()
        self.rig.clock.now_s += STEP_S
        self._fire(sum(tick <= self.steps for tick, _ in self.actions))

    def _fire(self, count: int) -> None:
        for _ in range(count):
            self.arm(self.actions.pop(0)[1])


# --- fault arming ------------------------------------------------------------------------------


def _tick(kind: str, ticks: int, rng: random.Random) -> int:
    """When a fault fires: early (so counted faults meet traffic), data losses late (so data exists)."""
    if kind in LATE_KINDS:
        return ticks - 1 - rng.randrange(max(1, ticks // 4))
    return rng.randrange(ticks // 2 + 1)


def armed_kind(kind: str) -> bool:
    """Kinds fired at a tick (the others shape the deliveries or the stores up front)."""
    return kind in ARMED_INPROC or kind in ("lockstep_crash", ZOMBIE_OWNER) or KINDS[kind].tier == "server"


def _arm_embedder(kind: str) -> Callable[[Rig, random.Random], None]:
    return lambda rig, rng: rig.embedder.arm(kind, rng.randint(1, 3))


def _arm_index(side: str, kind: str) -> Callable[[Rig, random.Random], None]:
    return lambda rig, rng: getattr(rig, side).arm(kind, rng.randint(1, 3))


ARMED_INPROC: dict[str, Callable[[Rig, random.Random], None]] = {
    "embed_timeout": _arm_embedder(EMBED_TIMEOUT),
    "embed_5xx": _arm_embedder(EMBED_5XX),
    "malformed_vector": _arm_embedder(MALFORMED_VECTOR),
    "keyword_down": _arm_index("keyword", "down"),
    "vector_down": _arm_index("vector", "down"),
    "keyword_lost_ack": _arm_index("keyword", "lost_ack"),
    "vector_lost_ack": _arm_index("vector", "lost_ack"),
}
