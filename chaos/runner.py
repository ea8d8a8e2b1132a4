"""Seeded chaos schedules: build a source history, inject faults, run to quiescence, check.

A schedule is fully determined by its seed and its fault list: ``run_schedule(spec)`` with the
same spec injects the same faults at the same steps (the simulated clock, not the wall, drives
every backoff), which is what makes a failing seed replayable. ``run_schedules`` runs many
across worker processes, each schedule in its own namespace over fresh embedded stores (a
Tantivy directory, a collection in the worker's milvus-lite file, a SQLite ledger).

Fault mix: ``draw_faults`` picks kinds from the seed; ``plan_specs`` also rotates through the
requested kinds so that each appears in the first ``len(kinds)`` schedules.

Where schedules run is a *setup* (``WorkerSetup``), called once in each worker process with the
worker's own directory; it returns what runs one schedule there. ``StoresSetup`` opens fresh
stores per schedule (embedded ones, or a deployment's); ``chaos.servertier.ServerTierSetup``
starts the worker's own fault proxies (and servers) first.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import random
import tempfile
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from adapters.keyword.tantivy_index import TantivyKeywordIndex
from adapters.vector.milvus import MilvusVectorIndex
from adapters.vector.settings import VectorSettings
from chaos import check, planted
from chaos.catalogue import INPROC_KINDS, KINDS
from chaos.faults import EMBED_5XX, EMBED_TIMEOUT, MALFORMED_VECTOR
from chaos.rig import EMBED_DIM, Rig, Stores
from chaos.stream import DELIVERY_FAULTS, StreamFaults, ensure_deleted_docs
from chaos.workload import SourceModel, random_history
from coordinator import crashpoints
from coordinator.audit import Auditor
from coordinator.errors import StoreError
from coordinator.invariants import Violation
from coordinator.shard import Envelope
from lockstep.logging import configure_logging

# Source changes per schedule: enough for every fault to find a target, small enough for CI.
CHANGES_MIN = 16
CHANGES_MAX = 36
# Deliveries offered to the shard per simulated step.
OFFER_EVENTS_PER_STEP = 6
# Liveness bound: a schedule that is not quiet after this many steps is a violation.
STEPS_MAX = 3000
# I6: simulated seconds from the last heal to quiescence (the backoff caps at 10 s).
LAG_AFTER_HEAL_S_MAX = 120.0
# Steps without quiescence after which a sentinel change is delivered: live traffic proves the
# embedder works, which is what lets the shard dead-letter a poison document.
SENTINEL_EVERY_STEPS = 30
# Observe versions (I5) every this many steps.
OBSERVE_EVERY_STEPS = 8
# Extra faults drawn per schedule on top of the rotated one.
EXTRA_FAULTS_MAX = 3
# Faults that destroy stored data fire in the second half of the deliveries, once data exists.
LATE_KINDS = frozenset({"keyword_server_data_loss", "vector_server_kill9"})
# Crash points armed by ``lockstep_crash``: the apply protocol's and the ledger's.
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


@dataclass(frozen=True)
class ScheduleSpec:
    seed: int
    faults: tuple[str, ...]
    planted_bug: str | None = None


@dataclass
class ScheduleResult:
    seed: int
    faults: tuple[str, ...]
    injected: dict[str, int]
    events: int
    violations: list[str]
    wall_s: float
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations

    def as_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "faults": list(self.faults),
            "injected": self.injected,
            "events": self.events,
            "violations": self.violations,
            "wall_s": round(self.wall_s, 3),
            "details": self.details,
        }


# --- fault mix ---------------------------------------------------------------------------------


def draw_faults(seed: int, kinds: Sequence[str], forced: str | None) -> tuple[str, ...]:
    """The fault kinds of one schedule: ``forced`` plus up to EXTRA_FAULTS_MAX drawn from the seed."""
    rng = random.Random(seed ^ 0x5EED)
    extra = rng.sample(list(kinds), min(len(kinds), rng.randint(1, EXTRA_FAULTS_MAX)))
    chosen = ([forced] if forced else []) + [k for k in extra if k != forced]
    return tuple(dict.fromkeys(chosen))


def plan_specs(
    seed: int, schedules: int, kinds: Sequence[str], planted_bug: str | None = None
) -> list[ScheduleSpec]:
    """Schedule seeds derived from ``seed``; the first ``len(kinds)`` each force one kind."""
    rng = random.Random(seed)
    seeds = [rng.getrandbits(40) for _ in range(schedules)]
    return [
        ScheduleSpec(s, draw_faults(s, kinds, kinds[i] if i < len(kinds) else None), planted_bug)
        for i, s in enumerate(seeds)
    ]


# --- stores ------------------------------------------------------------------------------------


@dataclass
class EmbeddedStores:
    """A fresh Tantivy index and a fresh collection in a shared milvus-lite file."""

    keyword: TantivyKeywordIndex
    vector: MilvusVectorIndex

    @classmethod
    def open(cls, workdir: Path, namespace: str) -> EmbeddedStores:
        keyword = TantivyKeywordIndex(str(workdir / f"{namespace}.tantivy"), "kw")
        vector = MilvusVectorIndex(
            VectorSettings(uri=str(workdir / "milvus.db"), collection=namespace.replace("-", "_")),
            dim=EMBED_DIM,
        )
        keyword.ensure()
        vector.ensure()
        return cls(keyword, vector)

    def close(self) -> None:
        self.keyword.close()
        self.vector.drop()
        self.vector.close()


StoreOpener = Callable[[Path, str], Stores]
ScheduleRunner = Callable[[ScheduleSpec], ScheduleResult]
# Called once per worker process with the worker's directory; must be picklable.
WorkerSetup = Callable[[Path], ScheduleRunner]
# Server-tier hook: arms one server fault kind on a running schedule.
ServerArm = Callable[[str, Rig, random.Random], None]


# --- one schedule ------------------------------------------------------------------------------


def run_schedule(
    spec: ScheduleSpec,
    workdir: Path,
    *,
    open_stores: StoreOpener = EmbeddedStores.open,
    server_arm: ServerArm | None = None,
    after_quiet: Callable[[Rig], list[Violation]] | None = None,
) -> ScheduleResult:
    """Run one schedule to quiescence and check every invariant; never raises for a violation."""
    started = time.monotonic()
    rng = random.Random(spec.seed)
    model = SourceModel(namespace=f"s{spec.seed:x}")
    streams = StreamFaults(random.Random(spec.seed + 1))
    deliveries = build_deliveries(model, spec, rng, streams)
    try:
        stores = open_stores(workdir, model.namespace)
    except Exception as exc:
        # A store that cannot be opened (a server down) fails this schedule, not the whole run.
        error = Violation("error", "runner", model.namespace, _short_trace(exc))
        return ScheduleResult(
            spec.seed, spec.faults, {}, len(deliveries), [str(error)], time.monotonic() - started
        )
    rig = Rig(model, stores, workdir, wrap_keyword=planted.keyword_wrapper(spec.planted_bug))
    violations: list[Violation] = []
    details: dict[str, Any] = {}
    try:
        run = _Run(rig, deliveries, spec, rng, server_arm)
        run.to_quiescence()
        if after_quiet is not None:
            violations += after_quiet(rig)
        violations += quiescent_checks(rig, run)
        details = {"restarts": rig.restarts, "crash_points": rig.crash.fired_at, "steps": run.steps}
        details["planted_bug"] = spec.planted_bug
    except Exception as exc:
        violations.append(Violation("error", "runner", model.namespace, _short_trace(exc)))
    finally:
        violations += _closed(rig, stores)
    injected = streams.injected + rig.injected() + Counter(getattr(stores, "injected", {}))
    return ScheduleResult(
        spec.seed,
        spec.faults,
        {k: v for k, v in sorted(injected.items()) if v},
        len(deliveries),
        [str(v) for v in violations],
        time.monotonic() - started,
        details | getattr(stores, "details", {}),
    )


def _closed(rig: Rig, stores: Stores) -> list[Violation]:
    """Close the rig, then the stores (even if the rig failed to); a failure is reported, e.g. a
    store that cannot drop the schedule's index."""
    errors = []
    for close in (rig.close, stores.close):
        try:
            close()
        except Exception as exc:
            errors.append(Violation("error", "close", rig.model.namespace, _short_trace(exc)))
    return errors


def build_deliveries(
    model: SourceModel, spec: ScheduleSpec, rng: random.Random, streams: StreamFaults
) -> list[Any]:
    """The source history (with its source faults) in delivery order (with its delivery faults)."""
    poison = 1 if "poison_document" in spec.faults else 0
    random_history(model, rng, rng.randint(CHANGES_MIN, CHANGES_MAX), poison_docs=poison)
    ensure_deleted_docs(model, rng)
    if "pk_change" in spec.faults:
        streams.pk_change(model)
    if "truncate" in spec.faults:
        streams.truncate(model)
    deliveries = list(model.history)
    for kind in spec.faults:
        if kind in DELIVERY_FAULTS:
            deliveries = DELIVERY_FAULTS[kind](streams, deliveries)
    if "late_upsert_after_tombstone_gc" in spec.faults:
        deliveries = streams.late_upsert_after_delete(deliveries, "late_upsert_after_tombstone_gc")
    return deliveries


class _Run:
    """The delivery loop of one schedule: offer, step, fire faults, then settle."""

    def __init__(
        self,
        rig: Rig,
        deliveries: list[Any],
        spec: ScheduleSpec,
        rng: random.Random,
        server_arm: ServerArm | None,
    ) -> None:
        self.rig = rig
        self.rng = rng
        self.server_arm = server_arm
        self.envelopes = [Envelope(seq, e) for seq, e in enumerate(deliveries)]
        self.queue: deque[Envelope] = deque(self.envelopes)
        self.offered = 0
        self.finished: set[int] = set()
        self.steps = 0
        ticks = max(2, math.ceil(len(deliveries) / OFFER_EVENTS_PER_STEP))
        self.actions = sorted((_tick(k, ticks, rng), k) for k in spec.faults if _armed_kind(k))
        self.history: dict[str, list[tuple[str, int]]] = {"ledger": [], "keyword": [], "vector": []}
        self.lag_s = 0.0

    def to_quiescence(self) -> None:
        while self.queue or self.actions:
            self._fire_due()
            self._offer()
            self._step()
        self.rig.keyword.armed.clear()
        self.rig.vector.armed.clear()
        self.rig.embedder.armed.clear()
        self.rig.crash.point = None
        healed_at = self.rig.clock.now_s
        self._settle()
        self.lag_s = self.rig.clock.now_s - healed_at

    def _fire_due(self) -> None:
        while self.actions and self.actions[0][0] <= self.steps:
            _, kind = self.actions.pop(0)
            arm(kind, self.rig, self.rng, self.server_arm)

    def _offer(self) -> None:
        batch = [self.queue[i] for i in range(min(OFFER_EVENTS_PER_STEP, len(self.queue)))]
        for _ in range(self.rig.offer(batch)):
            self.queue.popleft()
            self.offered += 1

    def _step(self) -> None:
        if self.steps >= STEPS_MAX:
            raise AssertionError(f"not quiet after {STEPS_MAX} steps: {self.rig.worker.status()}")
        finished, crashed = self.rig.step()
        self.finished.update(finished)
        self.steps += 1
        if crashed:
            self._redeliver()
        if self.steps % OBSERVE_EVERY_STEPS == 0:
            self.observe()

    def _redeliver(self) -> None:
        """After a restart the source resumes at the low watermark: everything after it comes again."""
        delivered = self.envelopes[: self.offered]
        low = min((e.seq for e in delivered if e.seq not in self.finished), default=self.offered)
        again = [e for e in delivered if e.seq >= low]
        self.queue.extendleft(reversed(again))
        self.offered -= len(again)

    def _settle(self) -> None:
        quiet_steps = 0
        while not (self.rig.worker.idle and not self.queue):
            self._offer()
            self._step()
            quiet_steps += 1
            if quiet_steps % SENTINEL_EVERY_STEPS == 0:
                self._sentinel()
        self.observe()

    def _sentinel(self) -> None:
        event = self.rig.model.create(self.rng)
        envelope = Envelope(len(self.envelopes), event)
        self.envelopes.append(envelope)
        self.queue.append(envelope)

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


def _tick(kind: str, ticks: int, rng: random.Random) -> int:
    """When a fault fires: early (so counted faults meet traffic), data losses late (so data exists)."""
    if kind in LATE_KINDS:
        return ticks // 2 + rng.randrange(ticks // 2 + 1)
    return rng.randrange(ticks // 2 + 1)


def _armed_kind(kind: str) -> bool:
    return kind in ARMED_INPROC or KINDS[kind].tier == "server"


def _arm_embedder(kind: str) -> Callable[[Rig, random.Random], None]:
    return lambda rig, rng: rig.embedder.arm(kind, rng.randint(1, 3))


def _arm_index(side: str, kind: str) -> Callable[[Rig, random.Random], None]:
    return lambda rig, rng: getattr(rig, side).arm(kind, rng.randint(1, 3))


def _arm_crash(rig: Rig, rng: random.Random) -> None:
    rig.crash.point = rng.choice(CRASH_POINTS)


ARMED_INPROC: dict[str, Callable[[Rig, random.Random], None]] = {
    "embed_timeout": _arm_embedder(EMBED_TIMEOUT),
    "embed_5xx": _arm_embedder(EMBED_5XX),
    "malformed_vector": _arm_embedder(MALFORMED_VECTOR),
    "keyword_down": _arm_index("keyword", "down"),
    "vector_down": _arm_index("vector", "down"),
    "keyword_lost_ack": _arm_index("keyword", "lost_ack"),
    "vector_lost_ack": _arm_index("vector", "lost_ack"),
    "lockstep_crash": _arm_crash,
}


def arm(kind: str, rig: Rig, rng: random.Random, server_arm: ServerArm | None) -> None:
    if kind in ARMED_INPROC:
        ARMED_INPROC[kind](rig, rng)
    elif server_arm is not None:
        server_arm(kind, rig, rng)


# --- checks ------------------------------------------------------------------------------------


def quiescent_checks(rig: Rig, run: _Run) -> list[Violation]:
    """Every invariant of chaos/check.py, once the schedule is quiet."""
    model = rig.model
    docs = rig.ledger.get_docs(model.latest)
    letters = [letter for _, letter in rig.ledger.dead_letters(limit=check.DEAD_LETTERS_READ_MAX)]
    skip = check.dead_lettered_newest(model, docs)
    auditor = Auditor(
        ledger=rig.ledger,
        keyword=rig.stores.keyword,
        vector=rig.stores.vector,
        source=None,
        chunking=model.chunking,
        reference_name="ledger",
        buckets=64,
    )
    return [
        *check.nothing_pending(rig.ledger),
        *check.accounted(model, docs, letters),
        *check.index_against_source("keyword", model, skip, rig.stores.keyword.scan()),
        *check.index_against_source("vector", model, skip, rig.stores.vector.scan()),
        *check.audit_violations(auditor),
        *(v for side, h in run.history.items() for v in check.versions(h, side)),
        *check.lag_bound(run.lag_s, LAG_AFTER_HEAL_S_MAX),
        *check.embed_bound(model, rig.embedder.texts_embedded),
    ]


def _short_trace(exc: BaseException) -> str:
    lines = traceback.format_exception(exc)
    return "".join(lines[-6:]).strip()


# --- many schedules ----------------------------------------------------------------------------


@dataclass
class RunSummary:
    results: list[ScheduleResult]
    wall_s: float
    budget_exhausted: bool

    @property
    def violations(self) -> int:
        return sum(len(r.violations) for r in self.results)

    @property
    def injected(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for r in self.results:
            total.update(r.injected)
        return total

    def failed_seeds(self) -> list[int]:
        return [r.seed for r in self.results if not r.ok]

    def as_json(self) -> dict[str, Any]:
        """The whole run as the JSON ``lockstep chaos run --report`` writes."""
        return {
            "schedules": len(self.results),
            "violations": self.violations,
            "injected": dict(sorted(self.injected.items())),
            "wall_s": round(self.wall_s, 3),
            "budget_exhausted": self.budget_exhausted,
            "failed_seeds": self.failed_seeds(),
            "results": [r.as_json() for r in sorted(self.results, key=lambda r: r.seed)],
        }


@dataclass(frozen=True)
class StoresSetup:
    """Schedules over fresh stores from ``open_stores`` (embedded by default), with no server faults."""

    open_stores: StoreOpener = EmbeddedStores.open

    def __call__(self, workdir: Path) -> ScheduleRunner:
        return partial(run_schedule, workdir=workdir, open_stores=self.open_stores)


_worker: dict[str, Any] = {}


def _worker_init(base: str, setup: WorkerSetup) -> None:
    """Each worker process gets its own directory (and so its own milvus-lite file)."""
    quiet_logs()
    _worker["dir"] = Path(tempfile.mkdtemp(prefix=f"chaos-{os.getpid()}-", dir=base))
    _worker["setup"] = setup


def quiet_logs() -> None:
    """Schedules provoke warnings on purpose (retries, backoffs, dead letters): show errors only."""
    configure_logging("error")
    logging.getLogger("pymilvus").setLevel(logging.ERROR)


def _run_in_worker(spec: ScheduleSpec) -> ScheduleResult:
    # The setup runs on the first schedule, not in the pool initializer: an initializer that
    # raises (a server that did not start) breaks the pool without saying why; here the error
    # reaches the caller through the schedule's future.
    if "run" not in _worker:
        _worker["run"] = _worker["setup"](_worker["dir"])
    runner: ScheduleRunner = _worker["run"]
    return runner(spec)


def run_schedules(
    specs: Sequence[ScheduleSpec],
    *,
    workers: int,
    budget_s: float,
    base_dir: Path | None = None,
    on_result: Callable[[ScheduleResult], None] | None = None,
    setup: WorkerSetup | None = None,
    fail_fast: bool = False,
) -> RunSummary:
    """Run schedules across ``workers`` processes until done, or ``budget_s`` is spent, or (with
    ``fail_fast``) a schedule found a violation. Each worker runs its schedules as ``setup``
    (default: fresh embedded stores) says, in its own directory under ``base_dir`` (default: a
    temporary directory removed at the end)."""
    if base_dir is None:
        with tempfile.TemporaryDirectory(prefix="lockstep-chaos-", ignore_cleanup_errors=True) as scratch:
            return run_schedules(
                specs,
                workers=workers,
                budget_s=budget_s,
                base_dir=Path(scratch),
                on_result=on_result,
                setup=setup,
                fail_fast=fail_fast,
            )
    started = time.monotonic()
    results: list[ScheduleResult] = []
    todo = iter(specs)
    exhausted = False
    # "spawn", not fork: the parent may already run gRPC threads (pymilvus), and a forked child
    # of such a process can abort inside gRPC's poller.
    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_worker_init,
        initargs=(str(base_dir), setup or StoresSetup()),
    ) as pool:
        running: set[Future[ScheduleResult]] = set()
        for spec in _take(todo, workers * 2):
            running.add(pool.submit(_run_in_worker, spec))
        while running:
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                results.append(future.result())
                if on_result is not None:
                    on_result(results[-1])
            exhausted = exhausted or time.monotonic() - started > budget_s
            stop = exhausted or (fail_fast and any(not r.ok for r in results))
            if not stop:
                running |= {pool.submit(_run_in_worker, s) for s in _take(todo, len(done))}
    return RunSummary(results, time.monotonic() - started, exhausted and len(results) < len(specs))


def _take(items: Iterator[ScheduleSpec], n: int) -> list[ScheduleSpec]:
    out = []
    for _ in range(n):
        item = next(items, None)
        if item is None:
            break
        out.append(item)
    return out


def inproc_only(kinds: Sequence[str]) -> tuple[str, ...]:
    return tuple(k for k in kinds if k in INPROC_KINDS)
