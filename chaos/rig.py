"""One schedule's system under test: the real apply engine and shard worker over real stores,
with every collaborator wrapped by an injector, a simulated clock and in-process crashes.

A *crash* is ``SimulatedCrash`` raised from a named crash point (the engine's protocol points
and the SQLite ledger's between-statement points). It unwinds like a process death: the ledger
transaction in progress rolls back, the engine, the worker and the ledger connection are thrown
away, and ``restart`` builds new ones over the same files and stores, re-drives prepared
intents (``ApplyEngine.recover``) and redelivers every event from the low watermark on, as a
source resuming from its checkpoint would.

Every *owner* (the engine, worker and ledger connection of one incarnation) claims the shard's
lease in the ledger and writes with its epoch, as ``lockstep run``'s shard actors do. A
*takeover* (``take_over``) starts a new owner while the old one is kept, stalled: a zombie that
the runner wakes afterwards (``wake``). A ``FenceWitness`` sees every owner's fenced ledger
writes and records any that the ledger accepted from an owner that was taken over.

A planted bug (``chaos.planted.Plant``) may replace the engine, worker or watermark class, or
wrap the ledger or either index as the engine sees them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from adapters.embedders.cached import CachedEmbedder
from adapters.embedders.hashing import HashingEmbedder
from adapters.ledger.sqlite import SqliteEmbeddingCache, SqliteLedger
from chaos.faults import FaultyEmbedder, FaultyIndex
from chaos.planted import NO_PLANT, Plant
from chaos.workload import POISON_MARK, SourceModel
from coordinator.apply import ApplyEngine
from coordinator.errors import FencedError, LockstepError
from coordinator.ports import Fence
from coordinator.shard import Backoff, Envelope, ShardWorker

# Vector dimension of the hashing embedder used by schedules: small, so writes stay fast.
EMBED_DIM = 16
# Simulated seconds per worker step: backoffs (0.2 s .. 10 s) elapse in a few steps.
STEP_S = 1.0
# Mailbox and batch bounds of the shard worker under test (small, so backpressure happens).
MAILBOX_DOCS_MAX = 12
BATCH_DOCS_MAX = 6
# Attempts to re-drive prepared intents after a restart while a store may still be failing.
RECOVER_ATTEMPTS_MAX = 60
# The shard every schedule's documents belong to, and the replica that owns it; each owner is an
# incarnation of that replica ("chaos#3"), so a new one takes the lease over at once.
SHARD = 0
REPLICA = "chaos"
# Simulated seconds of a shard lease: longer than any schedule (at most STEPS_MAX steps of at
# most the 10 s backoff), so a lease never lapses by itself; owners change only by takeover.
LEASE_S = 1e7
# Steps a zombie owner is given after a takeover: enough to try its mailbox and its in-flight
# intents, which the ledger must refuse.
ZOMBIE_STEPS_MAX = 4


class SimulatedCrash(BaseException):
    """lockstep "died" at a crash point (a BaseException: no handler in lockstep catches it)."""


class Stores(Protocol):
    """The two real indexes of one schedule."""

    keyword: Any
    vector: Any

    def close(self) -> None: ...


@dataclass
class SimClock:
    """The injected clock: advanced by the runner, never by the wall."""

    now_s: float = 0.0

    def __call__(self) -> float:
        return self.now_s


@dataclass
class CrashSwitch:
    """A crash hook that fires once, at the armed point."""

    point: str | None = None
    injected: Counter[str] = field(default_factory=Counter)
    fired_at: list[str] = field(default_factory=list)

    def __call__(self, name: str) -> None:
        if name == self.point:
            self.point = None
            self.injected["lockstep_crash"] += 1
            self.fired_at.append(name)
            raise SimulatedCrash(name)


@dataclass
class FenceWitness:
    """Sees the fenced ledger writes (prepare, mark_done, commit, replace_intents) of every
    owner. The runner, not the ledger, says which owner is current (``current``): a write the
    ledger accepted from an earlier owner is recorded in ``accepted_stale``; ``stale_attempts``
    counts the earlier owners' writes, accepted or refused."""

    current: int = 0
    accepted_stale: list[str] = field(default_factory=list)
    stale_attempts: int = 0


class WitnessedLedger:
    """A ledger as one owner (``owner``) uses it, reporting its fenced writes to the witness."""

    def __init__(self, inner: Any, witness: FenceWitness, owner: int) -> None:
        self.inner = inner
        self.witness = witness
        self.owner = owner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def prepare(self, intents: Any, fence: Fence | None = None, **kwargs: Any) -> Any:
        return self._seen("prepare", lambda: self.inner.prepare(intents, fence, **kwargs))

    def mark_done(self, side: str, doc_versions: Any, fence: Fence | None = None) -> Any:
        return self._seen("mark_done", lambda: self.inner.mark_done(side, doc_versions, fence))

    def commit(self, doc_versions: Any, sides: Any, fence: Fence | None = None) -> Any:
        return self._seen("commit", lambda: self.inner.commit(doc_versions, sides, fence))

    def replace_intents(self, intents: Any, fence: Fence | None = None) -> Any:
        return self._seen("replace_intents", lambda: self.inner.replace_intents(intents, fence))

    def _seen(self, what: str, write: Callable[[], Any]) -> Any:
        stale = self.owner < self.witness.current
        self.witness.stale_attempts += stale
        result = write()
        if stale:
            self.witness.accepted_stale.append(
                f"{what} of owner {self.owner} accepted after owner {self.witness.current} took over"
            )
        return result


@dataclass
class Owner:
    """One incarnation's engine, worker and ledger connection, with the epoch it claimed."""

    number: int
    ledger: SqliteLedger
    engine: ApplyEngine
    worker: ShardWorker
    fence: Fence

    def close(self) -> None:
        self.engine.close()
        self.ledger.close()


class Rig:
    """The engine, worker, ledger and wrapped stores of one schedule."""

    def __init__(self, model: SourceModel, stores: Stores, workdir: Path, *, plant: Plant = NO_PLANT) -> None:
        self.model = model
        self.stores = stores
        self.clock = SimClock()
        self.ledger_path = workdir / f"{model.namespace}.ledger.db"
        self.embedder = FaultyEmbedder(HashingEmbedder(dim=EMBED_DIM), poison=POISON_MARK)
        self.keyword = FaultyIndex(stores.keyword, label="keyword")
        self.vector = FaultyIndex(stores.vector, label="vector")
        self.crash = CrashSwitch()
        self.plant = plant
        self.witness = FenceWitness()
        self.restarts = 0
        self.takeovers: Counter[str] = Counter()
        self.owner = self._open()

    # The current owner's parts, as the runner and the checks use them.
    @property
    def ledger(self) -> SqliteLedger:
        return self.owner.ledger

    @property
    def engine(self) -> ApplyEngine:
        return self.owner.engine

    @property
    def worker(self) -> ShardWorker:
        return self.owner.worker

    def _open(self) -> Owner:
        number = self.witness.current + 1
        ledger = SqliteLedger(self.ledger_path, clock=self.clock, crash_hook=self.crash)
        fence = ledger.claim_shard(SHARD, f"{REPLICA}#{number}", LEASE_S)
        self.witness.current = number
        cached = CachedEmbedder(self.embedder, SqliteEmbeddingCache(ledger))
        engine = self.plant.engine(
            ledger=WitnessedLedger(self.plant.wrap_ledger(ledger), self.witness, number),
            keyword=self.plant.wrap_keyword(self.keyword),
            vector=self.plant.wrap_vector(self.vector),
            embedder=cached,
            chunking=self.model.chunking,
            source_name="chaos",
            crash=self.crash,
            clock=self.clock,
        )
        worker = self.plant.worker(
            SHARD,
            engine,
            fence=fence,
            mailbox_docs_max=MAILBOX_DOCS_MAX,
            batch_docs_max=BATCH_DOCS_MAX,
            backoff=Backoff(),
            clock=self.clock,
        )
        return Owner(number, ledger, engine, worker, fence)

    def step(self) -> tuple[list[int], bool]:
        """One worker step; returns (finished seqs, whether lockstep crashed and restarted)."""
        try:
            finished = self.worker.step()
        except SimulatedCrash:
            self.restart()
            return [], True
        self.clock.now_s += STEP_S
        return finished, False

    def restart(self) -> None:
        """Throw the process state away and come back as a restarted lockstep would."""
        self.restarts += 1
        self.owner.close()
        self._recover()

    def take_over(self) -> Owner:
        """A new owner claims the shard (a higher epoch) and re-drives the prepared intents while
        the old one stalls; returns the old one, to be woken with ``wake``."""
        stalled = self.owner
        self._recover()
        return stalled

    def _recover(self) -> None:
        """Open a new owner and re-drive prepared intents, again after a crash while doing so."""
        self.owner = self._open()
        for _ in range(RECOVER_ATTEMPTS_MAX):
            self.clock.now_s += STEP_S
            try:
                self.engine.recover(self.owner.fence)
                return
            except SimulatedCrash:
                self.owner.close()
                self.owner = self._open()
            except LockstepError as exc:
                if not exc.retriable:
                    raise
        raise AssertionError(f"recovery did not succeed within {RECOVER_ATTEMPTS_MAX} attempts")

    def wake(self, zombie: Owner) -> None:
        """Let a taken-over owner step again, as a stalled process resumes: the ledger must refuse
        its writes (FencedError stops it, as it stops a shard actor). Counted as injected when
        it did try to write."""
        before = self.witness.stale_attempts
        try:
            for _ in range(ZOMBIE_STEPS_MAX):
                self.clock.now_s += STEP_S
                zombie.worker.step()
                if zombie.worker.idle:
                    break
        except (FencedError, SimulatedCrash):
            pass
        finally:
            zombie.close()
        if self.witness.stale_attempts > before:
            self.takeovers["zombie_owner"] += 1

    def offer(self, envelopes: list[Envelope]) -> int:
        return self.worker.offer(envelopes)

    def injected(self) -> Counter[str]:
        faults = self.embedder.injected + self.keyword.injected + self.vector.injected
        return faults + self.crash.injected + self.takeovers

    def close(self) -> None:
        self.owner.close()
