"""The live service of a generations schedule: ``lockstep run``'s shard, over every live generation.

What ``lockstep run`` does (lockstep/service.py, lockstep/ray_runtime.py), without Ray and on the
schedule's simulated clock, so that a schedule is reproducible from its seed:

- at start it announces itself *starting* among the generations' writers, reads the registry and
  builds one two-phase engine per live generation (``build_generation``; a ``MultiEngine`` over them
  when there are several, the active one first) under one ``ShardWorker``, re-drives what is
  prepared, and announces the set it writes;
- every SERVICE_POLL_S it reads the registry; when the set of live generations changed it stops
  taking new events, steps until nothing is waiting or in flight (the drain), and builds
  engines for the new set (the switch);
- a crash (``SimulatedCrash`` from a crash point) throws the worker, the engines and the ledger
  connections away; the restart comes back as a restarted ``lockstep run`` would, from the
  registry as it is then. It uses the same writer name, so its *starting* row replaces the dead
  one at once (a real restart gets a new name and the dead row expires after WRITER_TTL_S).

Faults hit every generation: each one's indexes and embedder are wrapped by the suite's
injectors, kept across switches and restarts (they count what they injected), and an armed
fault goes to one live generation chosen by the schedule's seed.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from typing import Any

from adapters.ledger.registry import registry_for
from chaos.faults import FaultyEmbedder, FaultyIndex
from chaos.rig import (
    BATCH_DOCS_MAX,
    MAILBOX_DOCS_MAX,
    RECOVER_ATTEMPTS_MAX,
    STEP_S,
    CrashSwitch,
    SimClock,
    SimulatedCrash,
)
from chaos.workload import POISON_MARK
from coordinator.apply import ApplyEngine
from coordinator.errors import LockstepError
from coordinator.generations import Generation, live
from coordinator.multi_apply import MultiEngine
from coordinator.shard import Backoff, Envelope, ShardWorker
from lockstep.bootstrap import (
    AnyLedger,
    GenerationParts,
    build_embedder,
    build_generation,
    build_ledger,
    generation_embedder_settings,
)
from lockstep.generation_parts import WriterAnnouncement, load_generations
from lockstep.settings import Settings

# How often the service reads the registry: lockstep run's GENERATIONS_POLL_S (simulated seconds).
SERVICE_POLL_S = 2.0
# The service's name among the generations' writers.
OWNER = "chaos-service"
SOURCE_NAME = "chaos"


class _Fan:
    """The injectors of one kind (keyword index, vector index or embedder), one per generation;
    ``arm`` arms the one of a live generation chosen by the schedule's seed."""

    def __init__(self, make: Callable[[int], Any], live_numbers: Callable[[], list[int]], rng: random.Random) -> None:
        self._make = make
        self._live = live_numbers
        self._rng = rng
        self.by_generation: dict[int, Any] = {}

    def of(self, number: int) -> Any:
        if number not in self.by_generation:
            self.by_generation[number] = self._make(number)
        return self.by_generation[number]

    def arm(self, kind: str, count: int) -> None:
        self.of(self._rng.choice(self._live())).arm(kind, count)

    def heal(self) -> None:
        for injector in self.by_generation.values():
            injector.armed.clear()

    @property
    def injected(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for injector in self.by_generation.values():
            total.update(injector.injected)
        return total


class LiveService:
    """One ``lockstep run`` of a schedule: its worker, engines and home ledger, and its registry."""

    def __init__(self, settings: Settings, clock: SimClock, rng: random.Random) -> None:
        self.settings = settings
        self.clock = clock
        self.crash = CrashSwitch()
        self.restarts = 0
        self.switches = 0
        # Other writers' intents the service's workers drove (ShardWorker.adopted_intents).
        self.adopted_intents = 0
        self.generations: list[Generation] = []
        self.parts: list[GenerationParts] = []
        self.keyword = _Fan(lambda _n: FaultyIndex(None, label="keyword"), self._numbers, rng)
        self.vector = _Fan(lambda _n: FaultyIndex(None, label="vector"), self._numbers, rng)
        self.embedder = _Fan(self._faulty_embedder, self._numbers, rng)
        self._polled_at = 0.0
        self._open()

    def _numbers(self) -> list[int]:
        """The generations written now (read when a fault is armed)."""
        return [g.number for g in self.generations]

    # --- start, switch, restart ------------------------------------------------------------

    def _open(self) -> None:
        self.home: AnyLedger = build_ledger(self.settings, self.crash)
        self.writer = WriterAnnouncement(registry_for(self.home), OWNER)
        self.writer.starting()
        self.registry, gens = load_generations(
            self.settings, self.home, lambda: build_embedder(self.settings.embedder), self.writer.registry
        )
        self.generations = live(gens)
        self._build()

    def _build(self) -> None:
        """Engines for the current set, the worker over them, recovery, then the announcement."""
        self.parts = [self._parts(g) for g in self.generations]
        engines = [p.engine for p in self.parts]
        engine: ApplyEngine | MultiEngine = engines[0] if len(engines) == 1 else MultiEngine(engines)
        self.worker = ShardWorker(
            0,
            engine,
            fence=None,
            mailbox_docs_max=MAILBOX_DOCS_MAX,
            batch_docs_max=BATCH_DOCS_MAX,
            backoff=Backoff(),
            clock=self.clock,
        )
        self._recover(engine)
        self.writer.writing([g.number for g in self.generations])

    def _parts(self, gen: Generation) -> GenerationParts:
        def wrap(side: str, index: Any) -> Any:
            injector: FaultyIndex = (self.keyword if side == "keyword" else self.vector).of(gen.number)
            injector.inner = index
            return injector

        embedder = self.embedder.of(gen.number)
        return build_generation(
            self.settings, gen, self.home, source_name=SOURCE_NAME, crash=self.crash, inner=embedder, wrap=wrap
        )

    def _faulty_embedder(self, number: int) -> FaultyEmbedder:
        gen = next(g for g in self.registry.all() if g.number == number)
        return FaultyEmbedder(build_embedder(generation_embedder_settings(self.settings, gen)), poison=POISON_MARK)

    def _recover(self, engine: ApplyEngine | MultiEngine) -> None:
        """Re-drive prepared intents in every generation while a store may still be failing; a
        crash meanwhile is another restart."""
        for _ in range(RECOVER_ATTEMPTS_MAX):
            self.clock.now_s += STEP_S
            try:
                engine.recover()
                return
            except LockstepError as exc:
                if not exc.retriable:
                    raise
        raise AssertionError(f"recovery did not succeed within {RECOVER_ATTEMPTS_MAX} attempts")

    def _close_parts(self) -> None:
        self.adopted_intents += self.worker.adopted_intents
        self.worker.adopted_intents = 0
        self.worker.close()
        for parts in self.parts:
            parts.close(keep_ledger=parts.ledger is self.home)
        self.parts = []

    def restart(self) -> None:
        """Throw the process state away and start again as a restarted ``lockstep run``."""
        self.restarts += 1
        self._close_parts()
        self.home.close()
        while True:
            try:
                self._open()
                return
            except SimulatedCrash:
                self.restarts += 1
                self._close_parts()
                self.home.close()

    def switch(self) -> None:
        """Build engines for the registry's live set (the caller drained the worker first)."""
        self.switches += 1
        self._close_parts()
        self.generations = self._live_now()
        self._build()

    def _live_now(self) -> list[Generation]:
        return live(self.registry.all())

    def in_step_with_registry(self) -> bool:
        """Whether the service writes exactly the registry's live set (read now)."""
        return [(g.number, g.state) for g in self._live_now()] == [(g.number, g.state) for g in self.generations]

    def switch_due(self) -> bool:
        """Every SERVICE_POLL_S: whether the registry's live set differs from the one written."""
        if self.clock.now_s - self._polled_at < SERVICE_POLL_S:
            return False
        self._polled_at = self.clock.now_s
        return not self.in_step_with_registry()

    # --- the loop's calls --------------------------------------------------------------------

    def offer(self, envelopes: list[Envelope]) -> int:
        return self.worker.offer(envelopes)

    def step(self) -> tuple[list[int], bool]:
        """One worker step; returns (finished seqs, whether the service crashed and restarted)."""
        try:
            self.writer.renew()
            finished = self.worker.step()
        except SimulatedCrash:
            self.restart()
            return [], True
        self.clock.now_s += STEP_S
        return finished, False

    def pending(self) -> dict[int, list[str]]:
        """Intents prepared in each generation the service writes, as doc@version."""
        return {p.generation.number: [f"{i.doc_id}@v{i.version}" for i in p.ledger.pending()] for p in self.parts}

    def heal(self) -> None:
        self.keyword.heal()
        self.vector.heal()
        self.embedder.heal()
        self.crash.point = None

    def injected(self) -> Counter[str]:
        return self.keyword.injected + self.vector.injected + self.embedder.injected + self.crash.injected

    def close(self) -> None:
        self._close_parts()
        self.writer.withdraw()
        self.home.close()
