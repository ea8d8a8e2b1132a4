"""One schedule's system under test: the real apply engine and shard worker over real stores,
with every collaborator wrapped by an injector, a simulated clock and in-process crashes.

A *crash* is ``SimulatedCrash`` raised from a named crash point (the engine's protocol points
and the SQLite ledger's between-statement points). It unwinds like a process death: the ledger
transaction in progress rolls back, the engine, the worker and the ledger connection are thrown
away, and ``restart`` builds new ones over the same files and stores, re-drives prepared
intents (``ApplyEngine.recover``) and redelivers every event from the low watermark on, as a
source resuming from its checkpoint would.
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
from chaos.workload import POISON_MARK, SourceModel
from coordinator.apply import ApplyEngine
from coordinator.errors import LockstepError
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


KeywordWrap = Callable[[Any], Any]


def _same(index: Any) -> Any:
    return index


class Rig:
    """The engine, worker, ledger and wrapped stores of one schedule."""

    def __init__(
        self, model: SourceModel, stores: Stores, workdir: Path, *, wrap_keyword: KeywordWrap = _same
    ) -> None:
        self.model = model
        self.stores = stores
        self.clock = SimClock()
        self.ledger_path = workdir / f"{model.namespace}.ledger.db"
        self.embedder = FaultyEmbedder(HashingEmbedder(dim=EMBED_DIM), poison=POISON_MARK)
        self.keyword = FaultyIndex(stores.keyword, label="keyword")
        self.vector = FaultyIndex(stores.vector, label="vector")
        self.crash = CrashSwitch()
        self.wrap_keyword = wrap_keyword
        self.restarts = 0
        self._open()

    def _open(self) -> None:
        self.ledger = SqliteLedger(self.ledger_path, crash_hook=self.crash)
        # FaultyEmbedder exposes model_id and dim as read-only properties; the port declares attributes.
        self.cached = CachedEmbedder(self.embedder, SqliteEmbeddingCache(self.ledger))  # type: ignore[arg-type]
        self.engine = ApplyEngine(
            ledger=self.ledger,
            keyword=self.wrap_keyword(self.keyword),
            vector=self.vector,
            embedder=self.cached,
            chunking=self.model.chunking,
            source_name="chaos",
            crash=self.crash,
            clock=self.clock,
        )
        self.worker = ShardWorker(
            0,
            self.engine,
            fence=None,
            mailbox_docs_max=MAILBOX_DOCS_MAX,
            batch_docs_max=BATCH_DOCS_MAX,
            backoff=Backoff(),
            clock=self.clock,
        )

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
        self.engine.close()
        self.ledger.close()
        self._open()
        for _ in range(RECOVER_ATTEMPTS_MAX):
            self.clock.now_s += STEP_S
            try:
                self.engine.recover()
                return
            except SimulatedCrash:
                self.engine.close()
                self.ledger.close()
                self._open()
            except LockstepError as exc:
                if not exc.retriable:
                    raise
        raise AssertionError(f"recovery did not succeed within {RECOVER_ATTEMPTS_MAX} attempts")

    def offer(self, envelopes: list[Envelope]) -> int:
        return self.worker.offer(envelopes)

    def injected(self) -> Counter[str]:
        return self.embedder.injected + self.keyword.injected + self.vector.injected + self.crash.injected

    def close(self) -> None:
        self.engine.close()
        self.ledger.close()
