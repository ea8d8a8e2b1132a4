"""Generations under chaos: rebuilds, switches, swaps, rollbacks, aborts and gc amid live faults.

A generations schedule runs the real ``Rebuild`` (coordinator/rebuild/, wired by
lockstep/rebuild.py) next to a live service (chaos/gen_live.py: ``lockstep run``'s shard over every
live generation, following the registry), both in the worker process and on one simulated clock:
every wait of the rebuild (``sleep``) and every backfill batch (``progress``) steps the live
service, which goes on taking the schedule's events, switches its engines when the registry's live
set changes, crashes at armed crash points and restarts. Everything is single-threaded and seeded,
so a failing seed replays exactly.

The seed picks the *story* (``STORIES``; the first five schedules of a run tell one each) and
the rebuild's target (a new model, a new chunking, or both):

- ``swap``: rebuild, validate, swap; live writes go on into both generations;
- ``rollback``: the same, then ``lockstep rebuild --rollback``;
- ``gc``: the same, then ``lockstep gc --retention-s 0`` drops the standby generation;
- ``resume``: the rebuild dies at a crash point of the new generation's engine or ledger,
  the live service goes on, then the rebuild is run again and resumes to the swap;
- ``abort``: the rebuild dies (or, if its crash point was never reached, stops before the
  swap), then ``lockstep rebuild --abort`` drops the new generation.

In-process faults (``--faults``) hit the live service meanwhile: stream faults on its events,
store and embedder faults on one live generation's injectors, crashes of the service itself.

Checked at quiescence, for every live generation (the active one, and the new one after a swap):
nothing prepared, every event committed there or dead-lettered, both indexes against the source
cut that generation's way, the auditor's view against that generation's ledger, versions never
going back; then liveness (the rebuild ended, every event finished: the checkpoint reached the
end, within I6's bound after the last heal) and the story's outcome in the registry (which
generation is active, and the stores of a dropped one gone).
"""

from __future__ import annotations

import math
import random
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from chaos import check
from chaos.drive import ARMED_INPROC, CRASH_POINTS, OBSERVE_EVERY_STEPS, SENTINEL_EVERY_STEPS
from chaos.gen_live import LiveService
from chaos.gen_stores import GenStores, managed_stores
from chaos.rig import EMBED_DIM, STEP_S, SimClock, SimulatedCrash
from chaos.runner import (
    LAG_AFTER_HEAL_S_MAX,
    ScheduleResult,
    ScheduleRunner,
    ScheduleSpec,
    build_deliveries,
    draw_faults,
)
from chaos.stream import StreamFaults
from chaos.workload import CHUNK_CHARS_MAX, SourceModel
from coordinator.audit import Auditor
from coordinator.chunking import ChunkingSettings
from coordinator.errors import LockstepError, StoreError
from coordinator.generations import Generation, GenState
from coordinator.invariants import Violation
from coordinator.shard import Envelope
from lockstep.bootstrap import build_keyword, build_vector, keyword_settings, vector_settings
from lockstep.generation_parts import drop_generation_stores
from lockstep.rebuild import Rebuild
from lockstep.settings import EmbedderSettings, Settings

STORIES = ("swap", "rollback", "gc", "resume", "abort")
# The rebuild's target: another dimension, another chunk size, or both (chosen by the seed).
TARGET_DIM = 24
TARGET_CHUNK_CHARS = 200
# Live steps run by the rebuild's progress callback after each backfill batch.
LIVE_STEPS_PER_BATCH = 2
# One event offered per live step: the schedule's events spread over the whole story.
OFFER_EVENTS_PER_STEP = 1
# The rebuild starts once this share of the events was offered (drawn between the two).
REBUILD_AT_SHARE = (0.2, 0.5)
# Live steps between the swap and a rollback or gc, and between a dead rebuild and its resume/abort.
OPS_GAP_STEPS = (2, 10)
# Liveness: the checkpoint may stand still this long (simulated) while events past it are
# offered: a store fault's backoff, a drain before a switch, a wait on another writer's intent
# (INTENT_ADOPT_AFTER_S) all fit well inside it.
CHECKPOINT_STALL_S_MAX = LAG_AFTER_HEAL_S_MAX
# Liveness: a schedule not quiet after this many live steps is a violation.
STEPS_MAX = 2000
# A rebuild killed this many times in a row is not retried (its crash point fires once per run).
REBUILD_RUNS_MAX = 3
# Faults are armed while this share of the events is offered: around the rebuild, and early
# enough that later events meet them (an armed crash point fires at a later write).
FAULT_ARMING_SHARE = 0.75


def _arm_crash(target: Any, rng: random.Random) -> None:
    target.crash.point = rng.choice(CRASH_POINTS)


# The in-process kinds a generations schedule arms on its live service (a crash included: the
# shard path's drive arms its own).
ARMED: dict[str, Callable[[Any, random.Random], None]] = {**ARMED_INPROC, "lockstep_crash": _arm_crash}


def story_of(seed: int) -> str:
    return STORIES[seed % len(STORIES)]


def plan_generation_specs(seed: int, schedules: int, kinds: Sequence[str]) -> list[ScheduleSpec]:
    """Schedule seeds derived from ``seed``, the i-th one telling story i modulo the stories (the
    story is the seed modulo their count, so ``--replay SEED`` tells it again); the first
    ``len(kinds)`` each force one kind."""
    rng = random.Random(seed)
    specs = []
    for i in range(schedules):
        raw = rng.getrandbits(40)
        s = raw - raw % len(STORIES) + i % len(STORIES)
        specs.append(ScheduleSpec(s, draw_faults(s, kinds, kinds[i] if i < len(kinds) else None)))
    return specs


def target_of(seed: int) -> tuple[EmbedderSettings, ChunkingSettings]:
    """The rebuild's target: a new model, a new chunking, or both."""
    change = seed // len(STORIES) % 3
    dim = EMBED_DIM if change == 1 else TARGET_DIM
    chars = CHUNK_CHARS_MAX if change == 0 else TARGET_CHUNK_CHARS
    return EmbedderSettings(kind="hashing", dim=dim), ChunkingSettings(max_chars=chars)


@dataclass
class CountdownCrash:
    """The rebuild's crash hook: ``SimulatedCrash`` at the ``after``-th time ``point`` is reached."""

    point: str | None = None
    after: int = 1
    seen: int = 0
    fired: Counter[str] = field(default_factory=Counter)

    def __call__(self, name: str) -> None:
        if name != self.point:
            return
        self.seen += 1
        if self.seen >= self.after:
            self.point = None
            self.fired[name] += 1
            raise SimulatedCrash(name)


# --- one schedule ----------------------------------------------------------------------------


class GenerationsRun:
    """The live loop of one schedule and the story told against it."""

    def __init__(self, settings: Settings, spec: ScheduleSpec, model: SourceModel, deliveries: list[Any]) -> None:
        self.settings = settings
        self.spec = spec
        self.model = model
        self.story = story_of(spec.seed)
        self.rng = random.Random(spec.seed ^ 0x6E11)
        self.clock = SimClock()
        self.service = LiveService(settings, self.clock, random.Random(spec.seed + 2))
        self.envelopes = [Envelope(seq, e) for seq, e in enumerate(deliveries)]
        self.queue: deque[Envelope] = deque(self.envelopes)
        self.offered = 0
        self.finished: set[int] = set()
        self.steps = 0
        horizon = max(2, math.ceil(FAULT_ARMING_SHARE * len(deliveries) / OFFER_EVENTS_PER_STEP))
        self.actions = sorted((self.rng.randrange(horizon), k) for k in spec.faults if k in ARMED)
        self.history: dict[tuple[int, str], list[tuple[str, int]]] = {}
        # The checkpoint: the first event not finished yet, when it last moved, its longest stall.
        self.low = 0
        self.low_moved_at = 0.0
        self.stall_s = 0.0
        self.rebuild_crash = CountdownCrash()
        self.rebuild_runs = 0
        self.reports: list[dict[str, Any]] = []
        self.errors: list[Violation] = []
        self.lag_s = 0.0

    # --- the live loop ---------------------------------------------------------------------

    def live(self, steps: int) -> None:
        for _ in range(steps):
            self._tick()

    def _tick(self) -> None:
        if self.service.switch_due():
            self._switch()
        self._fire_due()
        self._offer()
        self._step()

    def _switch(self) -> None:
        """Drain (no new events until nothing is waiting or in flight), then write the new set.
        A crash during the drain is a restart, which builds the registry's set itself."""
        while not self.service.worker.idle:
            if self._step():
                return
        self.service.switch()

    def _fire_due(self) -> None:
        while self.actions and self.actions[0][0] <= self.steps:
            _, kind = self.actions.pop(0)
            # LiveService carries the Rig's injectors (embedder, keyword, vector, crash).
            ARMED[kind](self.service, self.rng)

    def _offer(self) -> None:
        batch = [self.queue[i] for i in range(min(OFFER_EVENTS_PER_STEP, len(self.queue)))]
        for _ in range(self.service.offer(batch)):
            self.queue.popleft()
            self.offered += 1

    def _step(self) -> bool:
        if self.steps >= STEPS_MAX:
            raise AssertionError(f"not quiet after {STEPS_MAX} steps: {self.service.worker.status()}; "
                                 f"prepared: {self.service.pending()}")
        finished, crashed = self.service.step()
        self.finished.update(finished)
        self._advance_checkpoint()
        self.steps += 1
        if crashed:
            self._redeliver()
        if self.steps % OBSERVE_EVERY_STEPS == 0:
            self.observe()
        return crashed

    def _advance_checkpoint(self) -> None:
        """Move the checkpoint past finished events; while events it has not passed are offered,
        it must not stand still longer than CHECKPOINT_STALL_S_MAX (checked at the end)."""
        moved = False
        while self.low < len(self.envelopes) and self.low in self.finished:
            self.low += 1
            moved = True
        if moved or self.low >= self.offered:
            self.low_moved_at = self.clock.now_s
        self.stall_s = max(self.stall_s, self.clock.now_s - self.low_moved_at)

    def _redeliver(self) -> None:
        """After a restart the source resumes at the low watermark: everything after it comes again."""
        delivered = self.envelopes[: self.offered]
        low = min((e.seq for e in delivered if e.seq not in self.finished), default=self.offered)
        again = [e for e in delivered if e.seq >= low]
        self.queue.extendleft(reversed(again))
        self.offered -= len(again)

    def observe(self) -> None:
        """Versions seen now in every generation the service writes, for I5 (not in one the
        registry no longer holds live: an abort or a gc may have dropped its stores already)."""
        registered = {g.number for g in self.service.registry.all() if g.live}
        for parts in self.service.parts:
            n = parts.generation.number
            if n not in registered:
                continue
            docs = parts.ledger.get_docs(self.model.latest)
            self.history.setdefault((n, "ledger"), []).extend(sorted((d, s.version) for d, s in docs.items()))
            for side, index in (("keyword", parts.keyword), ("vector", parts.vector)):
                try:
                    seen = sorted((c.chunk_id, c.version) for c in index.scan())
                except StoreError as exc:
                    if not exc.retriable:
                        raise
                    continue
                self.history.setdefault((n, side), []).extend(seen)

    # --- the story -------------------------------------------------------------------------

    def play(self) -> None:
        share = self.rng.uniform(*REBUILD_AT_SHARE)
        while self.queue and self.offered < share * len(self.envelopes):
            self._tick()
        getattr(self, f"_story_{self.story}")()
        while self.queue or self.actions:
            self._tick()
        self.service.heal()
        healed_at = self.clock.now_s
        self._settle()
        self.lag_s = self.clock.now_s - healed_at

    def _story_swap(self) -> None:
        self._rebuild(swap=True)

    def _story_rollback(self) -> None:
        self._rebuild(swap=True)
        self._gap()
        self._operate(lambda rb: rb.rollback())

    def _story_gc(self) -> None:
        self._rebuild(swap=True)
        self._gap()
        self._operate(lambda rb: rb.gc(now=time.time(), retention_s=0.0))

    def _story_resume(self) -> None:
        self._arm_rebuild_crash()
        for _ in range(REBUILD_RUNS_MAX):
            if self._rebuild(swap=True):
                return
            self._gap()

    def _story_abort(self) -> None:
        self._arm_rebuild_crash()
        self._rebuild(swap=False)
        self._gap()
        self._operate(lambda rb: rb.abort())

    def _arm_rebuild_crash(self) -> None:
        self.rebuild_crash.point = self.rng.choice(CRASH_POINTS)
        self.rebuild_crash.after = self.rng.randint(1, 3)

    def _gap(self) -> None:
        self.live(self.rng.randint(*OPS_GAP_STEPS))

    @contextmanager
    def _rebuild_cli(self) -> Any:
        """A ``lockstep rebuild`` process: on the schedule's clock, its waits step the live service."""
        rebuild = Rebuild(self.settings, clock=self.clock, sleep=self._sleep, crash=self.rebuild_crash)
        try:
            yield rebuild
        finally:
            rebuild.close()

    def _sleep(self, seconds: float) -> None:
        self.live(max(1, math.ceil(seconds / STEP_S)))

    def _rebuild(self, *, swap: bool) -> bool:
        """One run of ``lockstep rebuild`` to the target; False if it died at its crash point."""
        embedder, chunking = target_of(self.spec.seed)
        self.rebuild_runs += 1
        try:
            with self._rebuild_cli() as rb:
                progress = lambda _done, _total: self.live(LIVE_STEPS_PER_BATCH)  # noqa: E731
                report = rb.run(embedder, chunking, swap=swap, progress=progress)
        except SimulatedCrash:
            return False
        except LockstepError as exc:
            self.errors.append(Violation("rebuild", "rebuild", self.model.namespace, f"{exc}"))
            return True
        self.reports.append({"swap": report.swap is not None, "rounds": len(report.audit_rounds),
                             "backfilled_docs": report.backfilled_docs, "seconds": report.seconds})
        return True

    def _operate(self, operation: Callable[[Rebuild], Any]) -> None:
        """A ``lockstep rebuild --rollback/--abort`` or ``lockstep gc`` process."""
        try:
            with self._rebuild_cli() as rb:
                operation(rb)
        except LockstepError as exc:
            self.errors.append(Violation("operation", self.story, self.model.namespace, f"{exc}"))

    def _settle(self) -> None:
        """Step until nothing waits, nothing is in flight and the service writes the registry's set."""
        quiet_steps = 0
        while not (self.service.worker.idle and not self.queue and self.service.in_step_with_registry()):
            self._tick()
            quiet_steps += 1
            if quiet_steps % SENTINEL_EVERY_STEPS == 0:
                self._sentinel()
        self.observe()

    def _sentinel(self) -> None:
        envelope = Envelope(len(self.envelopes), self.model.create(self.rng))
        self.envelopes.append(envelope)
        self.queue.append(envelope)

    # --- checks ----------------------------------------------------------------------------

    def checks(self) -> list[Violation]:
        letters = [letter for _, letter in self.service.home.dead_letters(limit=check.DEAD_LETTERS_READ_MAX)]
        out = [*self.errors, *self._story_checks(), *self._adoptions(), *check.lag_bound(self.lag_s, LAG_AFTER_HEAL_S_MAX)]
        if self.low < len(self.envelopes):
            out.append(Violation("checkpoint", "source", self.model.namespace,
                                 f"stopped at event {self.low} of {len(self.envelopes)}"))
        if self.stall_s > CHECKPOINT_STALL_S_MAX:
            out.append(Violation("checkpoint", "source", self.model.namespace,
                                 f"stood still {self.stall_s:.0f} s with events offered past it"))
        for parts in self.service.parts:
            out += [_in_generation(v, parts.generation.number) for v in self._generation_checks(parts, letters)]
        for (n, side), seen in self.history.items():
            out += [_in_generation(v, n) for v in check.versions(seen, side)]
        return out

    def _generation_checks(self, parts: Any, letters: list[Any]) -> list[Violation]:
        gen: Generation = parts.generation
        cut = replace(self.model, chunking=gen.chunking)
        docs = parts.ledger.get_docs(self.model.latest)
        skip = check.dead_lettered_newest(self.model, letters)
        auditor = Auditor(ledger=parts.ledger, keyword=parts.keyword, vector=parts.vector, source=None,
                          chunking=gen.chunking, reference_name="ledger", buckets=64)
        return [
            *check.nothing_pending(parts.ledger),
            *check.accounted(self.model, docs, letters),
            *check.ledger_not_ahead(self.model, docs),
            *check.index_against_source("keyword", cut, skip, parts.keyword.scan(with_text=True)),
            *check.index_against_source("vector", cut, skip, parts.vector.scan(with_text=True)),
            *check.audit_violations(auditor),
        ]

    def _adoptions(self) -> list[Violation]:
        """The service drives another writer's intent only when that writer died with it prepared:
        here, only a rebuild killed at its crash point. Any other adoption was an intent the
        service itself left behind, found only because a live document waited on it."""
        adopted = self.service.adopted_intents + self.service.worker.adopted_intents
        if not adopted or self.rebuild_crash.fired:
            return []
        return [Violation("adopted", "shard", self.model.namespace,
                          f"{adopted} intents prepared by no live writer were driven after INTENT_ADOPT_AFTER_S")]

    def _story_checks(self) -> list[Violation]:
        """The registry tells the story's outcome, and a dropped generation's stores are gone."""
        gens = {g.number: g for g in self.service.registry.all()}
        active = next((n for n, g in gens.items() if g.state is GenState.ACTIVE), None)
        want = {"swap": 2, "rollback": 1, "gc": 2, "resume": 2, "abort": 1}[self.story]
        out = []
        if active != want:
            out.append(Violation("story", self.story, self.model.namespace, f"generation {active} active, not {want}"))
        dropped = {"gc": 1, "abort": 2}.get(self.story)
        if dropped is not None and dropped in gens:
            out += self._dropped(gens[dropped])
        return out

    def _dropped(self, gen: Generation) -> list[Violation]:
        if gen.state is not GenState.DROPPED:
            return [Violation("story", self.story, self.model.namespace, f"generation {gen.number} is {gen.state}")]
        keyword = build_keyword(keyword_settings(self.settings, gen))
        vector = build_vector(vector_settings(self.settings, gen), dim=gen.dim)
        try:
            left = [side for side, store in (("keyword", keyword), ("vector", vector)) if store.count() > 0]
        except StoreError:
            left = []  # the index or collection is gone: what a drop leaves
        finally:
            keyword.close()
            vector.close()
        return [Violation("story", side, self.model.namespace, f"dropped generation {gen.number} still holds data")
                for side in left]

    def injected(self) -> Counter[str]:
        extra = Counter({"rebuild_crash": sum(self.rebuild_crash.fired.values()),
                         "generation_switch": self.service.switches})
        return self.service.injected() + extra

    def close(self) -> None:
        """Stop the service, then drop every generation's stores (a schedule leaves nothing on a server)."""
        gens = self.service.registry.all()
        try:
            self.service.close()
        finally:
            for gen in gens:
                if gen.state is not GenState.DROPPED:
                    drop_generation_stores(self.settings, gen)


def _in_generation(v: Violation, number: int) -> Violation:
    return Violation(v.invariant, v.side, v.chunk_id, f"generation {number}: {v.detail}")


def run_generation_schedule(spec: ScheduleSpec, workdir: Path, *, stores: GenStores) -> ScheduleResult:
    """Run one generations schedule to quiescence and check it; never raises for a violation."""
    started = time.monotonic()
    rng = random.Random(spec.seed)
    model = SourceModel(namespace=f"g{spec.seed:x}")
    streams = StreamFaults(random.Random(spec.seed + 1))
    deliveries = build_deliveries(model, spec, rng, streams)
    settings = stores.settings(workdir, model.namespace)
    violations: list[Violation] = []
    details: dict[str, Any] = {"story": story_of(spec.seed)}
    run: GenerationsRun | None = None
    try:
        run = GenerationsRun(settings, spec, model, deliveries)
        run.play()
        violations += run.checks()
    except Exception as exc:
        violations.append(Violation("error", "runner", model.namespace, _short_trace(exc)))
    finally:
        if run is not None:
            violations += _closed(run)
    injected = streams.injected + (run.injected() if run is not None else Counter())
    if run is not None:
        details |= {"steps": run.steps, "restarts": run.service.restarts, "rebuild_runs": run.rebuild_runs,
                    "rebuilds": run.reports, "checkpoint_stall_s": run.stall_s}
    return ScheduleResult(spec.seed, spec.faults, {k: v for k, v in sorted(injected.items()) if v},
                          len(deliveries), [str(v) for v in violations], time.monotonic() - started, details)


def _closed(run: GenerationsRun) -> list[Violation]:
    try:
        run.close()
    except Exception as exc:
        return [Violation("error", "close", run.model.namespace, _short_trace(exc))]
    return []


def _short_trace(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)[-6:]).strip()


# --- worker setup ------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationsSetup:
    """Builds what runs generations schedules in one worker process (picklable): on the servers
    of ``stores`` (a config's), or on servers the worker starts itself (``managed``: "lite" for a
    milvus-lite server, "2.3.5" for Milvus 2.3.5, "file" for a milvus-lite file), which it stops
    when it exits."""

    stores: GenStores | None = None
    managed: str | None = None

    def __call__(self, workdir: Path) -> ScheduleRunner:
        stores = self.stores if self.stores is not None else managed_stores(workdir, self.managed or "lite")
        return partial(run_generation_schedule, workdir=workdir, stores=stores)
