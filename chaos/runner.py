"""Seeded chaos schedules: build a source history, inject faults, run to quiescence, check.

A schedule is fully determined by its seed and its fault list: ``run_schedule(spec)`` with the
same spec injects the same faults at the same steps (the simulated clock, not the wall, drives
every backoff), which is what makes a failing seed replayable. ``run_schedules`` runs many
across worker processes, each schedule in its own namespace: by default over embedded stores
that each worker reuses (``WorkerStores``: a fresh Tantivy directory and SQLite ledger per
schedule, one milvus-lite collection per worker, emptied after every schedule), in worker
directories on a RAM filesystem when the machine has one (``scratch_root``).

Fault mix: ``draw_faults`` picks kinds from the seed; ``plan_specs`` also rotates through the
requested kinds so that each appears in the first ``len(kinds)`` schedules.

Path: a schedule drives the streaming path (``chaos.drive.ShardDrive``: the service's reader flow
control with its low watermark, shard worker) or the batch path (``chaos.drive.BatchDrive``:
``run_sync``). Unless a spec names one, one schedule seed in ``BATCH_EVERY`` takes the batch path,
when its faults can happen there (``path_of``): the path follows from the seed and the faults, so
a replay needs no more than them.

Where schedules run is a *setup* (``WorkerSetup``), called once in each worker process with the
worker's own directory; it returns what runs one schedule there. ``StoresSetup`` opens each
schedule's stores (embedded ones the worker reuses, or a deployment's);
``chaos.servertier.ServerTierSetup`` starts the worker's own fault proxies (and servers) first.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import shutil
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from adapters.keyword.tantivy_index import TantivyKeywordIndex
from adapters.vector.milvus import MilvusVectorIndex
from adapters.vector.settings import VectorSettings
from chaos import check, planted
from chaos.catalogue import INPROC_KINDS, SERVER_KINDS
from chaos.drive import BatchDrive, ServerArm, ShardDrive
from chaos.faults import STORE_REFUSES_DOCUMENT
from chaos.rig import EMBED_DIM, Rig, Stores
from chaos.stream import DELIVERY_FAULTS, StreamFaults, ensure_deleted_docs
from chaos.workload import REFUSAL_KEY, SourceModel, random_history
from coordinator.audit import Auditor
from coordinator.invariants import Violation
from coordinator.model import ChunkDelete
from lockstep.bootstrap import build_vector
from lockstep.logging import configure_logging

# Source changes per schedule: enough for every fault to find a target, small enough for CI.
CHANGES_MIN = 16
CHANGES_MAX = 36
# I6: simulated seconds from the last heal to quiescence (the backoff caps at 10 s).
LAG_AFTER_HEAL_S_MAX = 120.0
# Extra faults drawn per schedule on top of the rotated one.
EXTRA_FAULTS_MAX = 3
# One schedule seed in this many takes the batch path (when its faults can happen there).
BATCH_EVERY = 4
SHARD_PATH = "shard"
BATCH_PATH = "batch"
PATHS = (SHARD_PATH, BATCH_PATH)
# Kinds only the streaming path meets: a poison document (``lockstep sync`` has no isolation: a
# text the model always fails on fails every run), an ownership takeover, and the server kinds.
SHARD_ONLY_KINDS = frozenset({"poison_document", "zombie_owner", *SERVER_KINDS})
# Kinds never drawn into one schedule. A store that lost its data (until the reconciler rebuilds
# it after quiescence) holds no copy of a document's committed chunks; if the other store then
# takes a version that the first one refuses, its copy is overwritten too and nothing is left to
# roll back to: no index, and for an event stream no source, holds the committed text any more.
APART = frozenset(
    frozenset({"store_refuses_document", loss}) for loss in ("keyword_server_data_loss", "vector_server_kill9")
)
# Salt of the seeded choice of the store that refuses a document (kept apart from the
# schedule's own random stream, so that adding the kind moved no other fault).
REFUSING_SIDE_SALT = 0x4EF05E
# Where worker directories go by default: a RAM filesystem, when the machine has one. A schedule
# commits to Tantivy and SQLite dozens of times, and each commit's fsync on a busy disk cost more
# than the rest of the schedule; lockstep's crashes are simulated in-process, so nothing the
# checks rely on needs the data to reach a disk.
RAM_ROOT = Path("/dev/shm")
# ... if it has this much room: a container's default /dev/shm (64 MiB) would fill up with the
# workers' milvus-lite files, so a small one is passed over for the system's temporary directory.
RAM_ROOT_FREE_MIN_BYTES = 1024**3
# The collection each worker reuses across its schedules (``WorkerStores``).
WORKER_COLLECTION = "chaos_worker"
# Schedules a worker's collection serves before it is dropped and created anew. milvus-lite keeps
# the deletes that empty it in its memtable, and every query filters them: past a few hundred
# schedules a query costs more than the schedule's own work (0.2 s a schedule became 0.45 s by
# the 1,000th). Creating a collection costs about 0.5 s, once per this many schedules.
WORKER_COLLECTION_USES_MAX = 200


@dataclass(frozen=True)
class ScheduleSpec:
    seed: int
    faults: tuple[str, ...]
    planted_bug: str | None = None
    # SHARD_PATH or BATCH_PATH; None: follows from the seed and the faults (``path_of``).
    path: str | None = None


def path_of(spec: ScheduleSpec) -> str:
    """The path a schedule drives: the spec's, else batch for one seed in BATCH_EVERY whose faults
    the batch path can meet (and whose planted bug lives there), else the streaming path."""
    if spec.path is not None:
        return spec.path
    shard_only = set(spec.faults) & SHARD_ONLY_KINDS or planted.plant(spec.planted_bug).shard_only
    return BATCH_PATH if spec.seed % BATCH_EVERY == 0 and not shard_only else SHARD_PATH


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
    """The fault kinds of one schedule: ``forced`` plus up to EXTRA_FAULTS_MAX drawn from the seed,
    leaving out a drawn kind that must not share a schedule with one chosen before it."""
    rng = random.Random(seed ^ 0x5EED)
    extra = rng.sample(list(kinds), min(len(kinds), rng.randint(1, EXTRA_FAULTS_MAX)))
    chosen: list[str] = [forced] if forced else []
    for kind in extra:
        if kind not in chosen and not any(frozenset({kind, c}) in APART for c in chosen):
            chosen.append(kind)
    return tuple(chosen)


def plan_specs(
    seed: int, schedules: int, kinds: Sequence[str], planted_bug: str | None = None, path: str | None = None
) -> list[ScheduleSpec]:
    """Schedule seeds derived from ``seed``; the first ``len(kinds)`` each force one kind."""
    rng = random.Random(seed)
    seeds = [rng.getrandbits(40) for _ in range(schedules)]
    return [
        ScheduleSpec(s, draw_faults(s, kinds, kinds[i] if i < len(kinds) else None), planted_bug, path)
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
        vector = build_vector(
            VectorSettings(uri=str(workdir / "milvus.db"), collection=namespace.replace("-", "_")),
            dim=EMBED_DIM,
        )
        keyword.ensure()
        vector.ensure()
        return cls(keyword, vector)

    def close(self) -> None:
        self.keyword.drop()
        self.vector.drop()
        self.vector.close()


@dataclass
class ReusedStores:
    """One schedule's stores out of a worker's ``WorkerStores``: a fresh Tantivy index, and the
    worker's collection, emptied when the schedule closes its stores."""

    keyword: TantivyKeywordIndex
    vector: MilvusVectorIndex
    owner: WorkerStores

    def close(self) -> None:
        self.keyword.drop()
        self.owner.empty(self.vector)


class WorkerStores:
    """A worker process's embedded stores, reused across its schedules (a ``StoreOpener``).

    Creating a milvus-lite collection costs half a second (pymilvus waits 0.5 s for its index),
    more than the rest of a schedule, so a worker creates one collection in its milvus-lite file
    and every schedule empties it when done: each scanned chunk deleted by primary key, then
    ``count()`` must be 0. A schedule starts only on a collection found empty; one that is not
    (its emptying failed) is dropped and created anew. Each schedule still gets its own Tantivy
    directory (cheap to create; Tantivy keeps deletes as tombstones, which emptying would leave)
    and its own ledger, both removed when it ends. Nothing a schedule wrote is left for the next
    one, so a schedule gives the same result first in a worker or after thousands of others. The
    collection itself is created anew every ``WORKER_COLLECTION_USES_MAX`` schedules."""

    def __init__(self) -> None:
        self._vector: MilvusVectorIndex | None = None
        self._uses = 0

    def __call__(self, workdir: Path, namespace: str) -> ReusedStores:
        vector = self._empty_collection(workdir)
        self._uses += 1
        keyword = TantivyKeywordIndex(str(workdir / f"{namespace}.tantivy"), "kw")
        keyword.ensure()
        return ReusedStores(keyword, vector, self)

    def _empty_collection(self, workdir: Path) -> MilvusVectorIndex:
        if self._vector is not None and (self._uses >= WORKER_COLLECTION_USES_MAX or self._vector.count() != 0):
            self._vector.drop()
            self._vector.close()
            self._vector = None
            self._uses = 0
        if self._vector is None:
            settings = VectorSettings(uri=str(workdir / "milvus.db"), collection=WORKER_COLLECTION)
            self._vector = build_vector(settings, dim=EMBED_DIM)
            self._vector.ensure()
        assert self._vector.count() == 0, "a schedule starts on an empty collection"
        return self._vector

    @staticmethod
    def empty(vector: MilvusVectorIndex) -> None:
        """Delete every chunk of the collection (a version above the stored one, as a delete
        carries), and check that none is left."""
        vector.delete([ChunkDelete(c.chunk_id, c.version + 1) for c in vector.scan()])
        left = vector.count()
        if left:
            raise AssertionError(f"{left} chunks left in the worker's collection after emptying it")


StoreOpener = Callable[[Path, str], Stores]
ScheduleRunner = Callable[[ScheduleSpec], ScheduleResult]
# Called once per worker process with the worker's directory; must be picklable.
WorkerSetup = Callable[[Path], ScheduleRunner]


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
    path = path_of(spec)
    violations: list[Violation] = []
    details: dict[str, Any] = {"path": path, "planted_bug": spec.planted_bug}
    if spec.path is not None:
        details["forced_path"] = spec.path
    try:
        rig = Rig(model, stores, workdir, plant=planted.plant(spec.planted_bug))
    except Exception as exc:
        stores.close()
        error = Violation("error", "runner", model.namespace, _short_trace(exc))
        return ScheduleResult(
            spec.seed, spec.faults, {}, len(deliveries), [str(error)], time.monotonic() - started, details
        )
    try:
        _refusing_store(rig, spec)
        drive = (BatchDrive if path == BATCH_PATH else ShardDrive)(rig, deliveries, spec, rng, server_arm)
        drive.to_quiescence()
        if after_quiet is not None:
            violations += after_quiet(rig)
        violations += quiescent_checks(rig, drive)
        details |= {"restarts": rig.restarts, "crash_points": rig.crash.fired_at, "steps": drive.steps}
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
    """Close the rig, remove its ledger files, then close the stores (even if the rig failed to);
    a failure is reported, e.g. a store that cannot drop the schedule's index."""
    errors = []
    for close in (rig.close, partial(_remove_ledger, rig.ledger_path), stores.close):
        try:
            close()
        except Exception as exc:
            errors.append(Violation("error", "close", rig.model.namespace, _short_trace(exc)))
    return errors


def _remove_ledger(path: Path) -> None:
    """The schedule's SQLite ledger and its WAL files: a worker directory holds only the
    schedules running in it, however many ran before."""
    for name in (path.name, f"{path.name}-wal", f"{path.name}-shm"):
        (path.parent / name).unlink(missing_ok=True)


def _refusing_store(rig: Rig, spec: ScheduleSpec) -> None:
    """With ``store_refuses_document``, one store (seeded) refuses metadata holding REFUSAL_KEY:
    the keyword index item by item, the vector index the whole request (as Milvus does)."""
    if STORE_REFUSES_DOCUMENT in spec.faults:
        side = random.Random(spec.seed ^ REFUSING_SIDE_SALT).choice(("keyword", "vector"))
        index = rig.keyword if side == "keyword" else rig.vector
        index.refuse = REFUSAL_KEY
        index.refuse_whole_request = side == "vector"


def build_deliveries(
    model: SourceModel, spec: ScheduleSpec, rng: random.Random, streams: StreamFaults
) -> list[Any]:
    """The source history (with its source faults) in delivery order (with its delivery faults)."""
    poison = 1 if "poison_document" in spec.faults else 0
    random_history(model, rng, rng.randint(CHANGES_MIN, CHANGES_MAX), poison_docs=poison)
    ensure_deleted_docs(model, rng)
    if "pk_change" in spec.faults:
        streams.pk_change(model)
    if STORE_REFUSES_DOCUMENT in spec.faults:
        streams.refused_version(model)
    if "truncate" in spec.faults:
        streams.truncate(model)
    deliveries = list(model.history)
    for kind in spec.faults:
        if kind in DELIVERY_FAULTS:
            deliveries = DELIVERY_FAULTS[kind](streams, deliveries)
    if "late_upsert_after_tombstone_gc" in spec.faults:
        deliveries = streams.late_upsert_after_delete(deliveries, "late_upsert_after_tombstone_gc")
    return deliveries


# --- checks ------------------------------------------------------------------------------------


def quiescent_checks(rig: Rig, drive: ShardDrive | BatchDrive) -> list[Violation]:
    """Every invariant of chaos/check.py, once the schedule is quiet."""
    model = rig.model
    docs = rig.ledger.get_docs(model.latest)
    letters = [letter for _, letter in rig.ledger.dead_letters(limit=check.DEAD_LETTERS_READ_MAX)]
    skip = check.dead_lettered_newest(model, letters)
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
        *check.ledger_not_ahead(model, docs),
        *check.index_against_source("keyword", model, skip, rig.stores.keyword.scan(with_text=True)),
        *check.index_against_source("vector", model, skip, rig.stores.vector.scan(with_text=True)),
        *check.audit_violations(auditor),
        *(v for side, h in drive.history.items() for v in check.versions(h, side)),
        *check.lag_bound(drive.lag_s, LAG_AFTER_HEAL_S_MAX),
        *check.embed_bound(model, rig.embedder.texts_embedded),
        *check.checkpoint_at_end(drive.log.committed, drive.log.end),
        *check.fenced(rig.witness),
    ]


def _short_trace(exc: BaseException) -> str:
    lines = traceback.format_exception(exc)
    return "".join(lines[-6:]).strip()


# --- many schedules ----------------------------------------------------------------------------


def headline(schedules: int, injected: Mapping[str, int], violations: int, wall_s: float) -> str:
    """A run in one line, as ``lockstep chaos run`` and the test session's summary print it."""
    return (
        f"schedules {schedules}, faults injected {sum(injected.values())} ({len(injected)} kinds), "
        f"violations {violations}, wall {wall_s:.0f} s"
    )


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
    """Schedules over the stores ``open_stores`` gives (None: embedded ones each worker reuses,
    ``WorkerStores``), with no server faults."""

    open_stores: StoreOpener | None = None

    def __call__(self, workdir: Path) -> ScheduleRunner:
        return partial(run_schedule, workdir=workdir, open_stores=self.open_stores or WorkerStores())


def scratch_root() -> Path | None:
    """Where a run's worker directories go when its caller names none: RAM_ROOT when it is a
    writable directory with RAM_ROOT_FREE_MIN_BYTES free, else None (the system's temporary
    directory)."""
    usable = RAM_ROOT.is_dir() and os.access(RAM_ROOT, os.W_OK | os.X_OK)
    return RAM_ROOT if usable and shutil.disk_usage(RAM_ROOT).free >= RAM_ROOT_FREE_MIN_BYTES else None


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
    (default: embedded stores it reuses) says, in its own directory under ``base_dir`` (default: a
    temporary directory under ``scratch_root()``, removed at the end)."""
    if base_dir is None:
        with tempfile.TemporaryDirectory(
            prefix="lockstep-chaos-", dir=scratch_root(), ignore_cleanup_errors=True
        ) as scratch:
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
