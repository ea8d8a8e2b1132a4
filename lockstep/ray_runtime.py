"""Every Ray API call lockstep makes lives in this module.

Topology of ``lockstep run``:
- one ``IndexWriterActor`` per side (keyword, vector) owns that index's client; embedded stores
  (a Tantivy directory, a milvus-lite file) allow a single writer process, and for servers one
  writer per side batches best. The shards write through ``KeywordWriterProxy`` and
  ``VectorWriterProxy`` (the ChunkWriter and VectorWriter ports), and the service's search of a
  milvus-lite file through ``VectorSearchProxy`` (VectorSearch): one Ray call per port call;
- N ``ShardActor``s, each hosting a plain ``coordinator.shard.ShardWorker`` with its own ledger
  connection and embedder, claim their shard's lease (epoch) in the ledger, re-drive the shard's
  prepared intents, then run the apply loop on a background thread;
- the reader (the driver process, ``lockstep/service.py``) routes batches of envelopes to the
  shards: one Ray call per batch, never one per event.

Placement on a cluster (``run.ray_address``): the writers run on the driver's node when it can
host them (an embedded store's files are there; with a ``ray://`` client, the head), the shards
on nodes that offer ``run.shard_resources``. A shard actor Ray gives up on (it died with its
node) is *lost*: the cluster re-creates it under a new lease epoch, which fences the lost one,
and its constructor re-drives the shard's prepared intents; the service offers the new actor
what the lost one had accepted and not finished (``ReaderFlow.reoffer``). No node offering the
resources within ``run.shard_replace_timeout_s`` stops the service.

Lifetimes: every actor on the driver's machine ends itself as soon as the driver is gone
(``DRIVER_WATCH_S``), so that a driver killed with its process group (actors live in groups of
their own) does not leave actors holding an embedded store's lock for the next start to trip
over. The driver keeps its own SIGTERM handler while Ray starts (``start_ray``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeAlias, TypeVar

import ray
import ray._private.ray_constants
import ray._private.utils
import structlog
from ray import ObjectRef
from ray.actor import ActorProxy
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from adapters.vector.milvus import MilvusVectorIndex
from coordinator.apply import KEYWORD, VECTOR, ApplyEngine
from coordinator.crashpoints import CrashHook
from coordinator.errors import FencedError, LockstepError, TransientStoreError
from coordinator.generations import Generation
from coordinator.leftovers import ProcessId, is_running
from coordinator.model import ChunkDelete, IndexedChunk, SearchHit, StoredChunk, Vector, WriteResult
from coordinator.multi_apply import MultiEngine
from coordinator.ports import ChunkIndex, MetadataFilter
from coordinator.routing import shard_of
from coordinator.shard import Backoff, Envelope, ShardStatus, ShardWorker
from lockstep.bootstrap import (
    IndexWriters,
    build_generation,
    build_keyword,
    build_ledger,
    build_vector,
    generation_settings,
)
from lockstep.leftovers import machine, start_of, this_process
from lockstep.logging import configure_logging
from lockstep.settings import Settings

log = structlog.get_logger(__name__)
T = TypeVar("T")

# A write of one bounded batch to one index; beyond this the call counts as failed (retried).
INDEX_CALL_TIMEOUT_S = 120.0
# Control calls (offer, drain, status): the actors answer these between steps.
CONTROL_CALL_TIMEOUT_S = 60.0
# Starting a shard includes claiming its lease and re-driving its prepared intents.
SHARD_START_TIMEOUT_S = 600.0
# How long after a re-created shard actor died too (its new node was lost as well, or its
# constructor failed) the next one is started: each attempt costs a worker process.
SHARD_RECREATE_RETRY_S = 2.0
# A shard's apply loop sleeps this long when it has nothing to do.
IDLE_SLEEP_S = 0.01
# How soon a lease renewal the ledger could not take (busy, unreachable) is tried again.
LEASE_RETRY_S = 1.0
# Threads per actor: the apply loop plus concurrent offer/drain/status calls.
ACTOR_CONCURRENCY = 4
# Calls the writer of a server-backed keyword index (OpenSearch, Elasticsearch) runs at once:
# while the server works on one shard's _bulk, the next is encoded and sent, so the keyword
# store (the slower one, as a rule) never idles between requests. A writer of an embedded store
# (Tantivy, milvus-lite) and the vector writer take one call at a time.
KEYWORD_WRITER_CONCURRENCY = 2
# How often an actor looks whether its driver still runs. Ray ends the actors of a driver killed
# with its process group only once they notice that their raylet died with it, and they finish
# exiting seconds later (tens under load), still holding what they had open (an embedded
# store's lock); an actor on the driver's machine ends itself within this instead.
DRIVER_WATCH_S = 0.1
# The driver's own handlers of these stop it cleanly (lockstep/service.py).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def start_ray(address: str | None, num_cpus: int | None) -> None:
    """Join ``address`` or start a local Ray (no dashboard; actor logs stay in Ray's log files)."""
    if ray.is_initialized():
        return
    # Ray starts workers at nice 15 by default; the shard and writer actors are the service's
    # hot path, so they get the same priority as the stores they talk to.
    os.environ.setdefault("RAY_worker_niceness", "0")
    with _keeping_stop_handlers():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)


@contextlib.contextmanager
def _keeping_stop_handlers() -> Iterator[None]:
    """Keep the driver's own SIGTERM and SIGINT handlers (a clean stop) in force from Ray's start
    to the process's exit. ray.init installs two SIGTERM handlers in Python (one calls
    ``sys.exit(15)`` wherever the driver is, one kills Ray's processes and exits 1), and its
    core worker a native one that ray.shutdown resets to the default action, so that a SIGTERM
    during or after the shutdown would kill the driver. Ray installs the first two through one
    function and the third unless one of its constants says not to (the driver then loses
    only Ray's stack dump of a native crash; its workers keep theirs)."""
    utils: Any = ray._private.utils
    constants: Any = ray._private.ray_constants
    assert callable(getattr(utils, "set_sigterm_handler", None)), "Ray no longer installs its handlers here"
    assert hasattr(constants, "RAY_DISABLE_FAILURE_SIGNAL_HANDLER"), "Ray no longer reads this constant"
    kept = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    ray_installs, ray_disables = utils.set_sigterm_handler, constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER
    utils.set_sigterm_handler = lambda _handler: None
    constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
    try:
        yield
    finally:
        utils.set_sigterm_handler = ray_installs
        constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = ray_disables
        for sig, handler in kept.items():
            signal.signal(sig, handler)


@dataclass(frozen=True)
class Driver:
    """The driver process and its machine (boot and PID namespace), for its actors to end with it."""

    machine: str
    process: ProcessId


def this_driver() -> Driver | None:
    """This process as its actors' driver; None where processes cannot be watched (no /proc)."""
    here, me = machine(), this_process()
    return None if here is None or me is None else Driver(here, me)


def _end_with(driver: Driver | None) -> None:
    """Let this actor end itself once ``driver`` is gone, if both run on one machine (on another
    node of a cluster, the raylet outlives the driver and Ray ends the driver's actors itself)."""
    if driver is None or machine() != driver.machine:
        return
    threading.Thread(target=_watch_driver, args=(driver.process,), name="driver-watch", daemon=True).start()


def _watch_driver(driver: ProcessId) -> None:
    while is_running(driver, start_of):
        time.sleep(DRIVER_WATCH_S)
    log.warning("the driver is gone; this actor ends with it", driver_pid=driver.pid)
    # SIGKILL, not an exit: exit handlers (milvus-lite's waits 2 s for its server) would keep
    # the locks held longer, and nothing here has anything left to save.
    os.kill(os.getpid(), signal.SIGKILL)


def stop_ray() -> None:
    if ray.is_initialized():
        ray.shutdown()


def _answer(ref: ObjectRef[T], timeout_s: float, what: str) -> T:
    """``_call`` of one typed actor call: the answer has the called method's return type."""
    answer: T = _call(ref, timeout_s, what)
    return answer


class ActorLost(TransientStoreError):
    """Ray gave up on the actor called: it died with its process or its node (Ray restarts none
    of lockstep's actors), or its node cannot be reached. Retrying the same actor cannot help;
    a shard's is re-created (``ShardCluster.heal``)."""


class ShardNotReplaced(LockstepError):
    """A lost shard actor could not be re-created within ``run.shard_replace_timeout_s``: no
    node offered ``run.shard_resources``, or every new actor died."""


def _call(ref: Any, timeout_s: float, what: str) -> Any:
    """ray.get with a timeout; Ray failures become lockstep errors (the cause's own when it is one)."""
    try:
        return ray.get(ref, timeout=timeout_s)
    except RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, LockstepError):
            raise cause from exc
        raise TransientStoreError(f"{what} failed in its actor: {cause!r}", store=what) from exc
    except RayActorError as exc:
        raise ActorLost(f"{what}: its actor is lost ({exc.__class__.__name__})", store=what) from exc
    except GetTimeoutError as exc:
        raise TransientStoreError(f"{what} did not answer: {exc.__class__.__name__}", store=what) from exc
    except RayError as exc:
        raise TransientStoreError(f"{what}: {exc}", store=what) from exc


@ray.remote(max_concurrency=1)  # type: ignore[call-overload]  # ray's remote() overloads omit actor options
class IndexWriterActor:
    """Owns one side's index client; every write to that index goes through here. Its methods
    are the ChunkWriter port (and the vector side's VectorWriter and VectorSearch), each with
    the generation it addresses first; the typed proxies below are its only callers."""

    def __init__(self, side: str, generations: list[WriterTarget], log_level: str, driver: Driver | None) -> None:
        """One client per live generation (its physical index names), all in this one process:
        an embedded store (a milvus-lite file) admits a single process. The vector side refuses
        a collection built with another model than its generation's.

        A store that cannot be reached now (a pod started before its database) does not fail
        the actor, which Ray would never start again: its client is built at the first call
        that needs it, and until then every such call fails like a write to a store that is
        down (the shards back off and /readyz says degraded)."""
        _end_with(driver)
        configure_logging(log_level)
        self.side = side
        self.targets = {t.number: t for t in generations}
        self.indexes: dict[int, ChunkIndex] = {}
        # Concurrent calls (see KEYWORD_WRITER_CONCURRENCY) must not build a client twice.
        self._building = threading.Lock()
        for number in self.targets:
            try:
                self._index(number)
            except Exception as exc:
                log.warning("index not reachable at start; tried again at its first use", side=side,
                            generation=number, error=str(exc), error_type=type(exc).__name__)

    def _index(self, number: int) -> ChunkIndex:
        index = self.indexes.get(number)
        if index is not None:
            return index
        with self._building:
            return self._build(number)

    def _build(self, number: int) -> ChunkIndex:
        index = self.indexes.get(number)
        if index is None:
            target = self.targets[number]
            index = (
                build_keyword(target.settings.keyword)
                if self.side == KEYWORD
                else build_vector(target.settings.vector, dim=target.dim, model_id=target.model_id)
            )
            try:
                index.ensure()
            except BaseException:
                with contextlib.suppress(Exception):
                    index.close()
                raise
            self.indexes[number] = index
        return index

    def _vector(self, number: int) -> MilvusVectorIndex:
        index = self._index(number)
        assert isinstance(index, MilvusVectorIndex), f"the {self.side} writer holds no vector index"
        return index

    @ray.method
    def ready(self) -> list[int]:
        """Answers once the constructor is done: the generations whose client is built."""
        return sorted(self.indexes)

    @ray.method
    def upsert(self, generation: int, chunks: list[IndexedChunk]) -> WriteResult:
        return self._index(generation).upsert(chunks)

    @ray.method
    def delete(self, generation: int, deletes: list[ChunkDelete]) -> WriteResult:
        return self._index(generation).delete(deletes)

    @ray.method
    def get(self, generation: int, chunk_ids: list[str]) -> dict[str, StoredChunk]:
        return self._index(generation).get(chunk_ids)

    @ray.method
    def fetch_vectors(self, generation: int, chunk_ids: list[str]) -> dict[str, list[float]]:
        return self._vector(generation).fetch_vectors(chunk_ids)

    @ray.method
    def search_hits(
        self,
        generation: int,
        vector: list[float],
        k: int,
        where: MetadataFilter | None,
        strong: bool,
        timeout_s: float | None,
    ) -> list[SearchHit]:
        return self._vector(generation).search_hits(vector, k, where=where, strong=strong, timeout_s=timeout_s)

    @ray.method
    def close(self) -> None:
        for index in self.indexes.values():
            index.close()


# A handle to an IndexWriterActor: mypy checks each call's arguments and answer against the
# actor's (``ray.method``-typed) methods.
Writer: TypeAlias = "ActorProxy[IndexWriterActor]"


def writer_concurrency(side: str, targets: Sequence[WriterTarget]) -> int:
    """How many calls one side's writer runs at once (KEYWORD_WRITER_CONCURRENCY)."""
    server_backed = not any(t.settings.keyword.is_embedded for t in targets)
    return KEYWORD_WRITER_CONCURRENCY if side == KEYWORD and server_backed else 1


@dataclass(frozen=True)
class WriterTarget:
    """What an index writer needs to know of one generation."""

    number: int
    settings: Settings
    dim: int
    model_id: str


class _WriterProxy:
    """The ChunkWriter port of one generation's index: each call is one round trip to the side's
    IndexWriterActor, carrying the whole batch the engine hands it."""

    name: str

    def __init__(self, handle: Writer, generation: int) -> None:
        self.handle = handle
        self.generation = generation

    def _wait(self, ref: ObjectRef[T]) -> T:
        return _answer(ref, INDEX_CALL_TIMEOUT_S, f"{self.name} index")

    def upsert(self, chunks: Sequence[IndexedChunk]) -> WriteResult:
        return self._wait(self.handle.upsert.remote(self.generation, list(chunks)))

    def delete(self, deletes: Sequence[ChunkDelete]) -> WriteResult:
        return self._wait(self.handle.delete.remote(self.generation, list(deletes)))

    def get(self, chunk_ids: Sequence[str]) -> dict[str, StoredChunk]:
        return self._wait(self.handle.get.remote(self.generation, list(chunk_ids)))


class KeywordWriterProxy(_WriterProxy):
    """The keyword index of one generation as the apply path writes it (ChunkWriter)."""

    name = KEYWORD


class VectorWriterProxy(_WriterProxy):
    """The vector index of one generation as the apply path writes it (VectorWriter)."""

    name = VECTOR

    def fetch_vectors(self, chunk_ids: Sequence[str]) -> dict[str, list[float]]:
        return self._wait(self.handle.fetch_vectors.remote(self.generation, list(chunk_ids)))


class VectorSearchProxy:
    """The vector index of one generation as the read path searches it (VectorSearch), through
    its writer: a milvus-lite file admits one process."""

    name = VECTOR
    # As the Milvus adapter behind the actor: the read path asks before pushing a filter down.
    filters_metadata = True

    def __init__(self, handle: Writer, generation: int, dim: int) -> None:
        self.handle = handle
        self.generation = generation
        self.dim = dim

    def search_hits(
        self,
        vector: Vector,
        k: int,
        /,
        *,
        where: MetadataFilter | None = None,
        strong: bool = False,
        timeout_s: float | None = None,
    ) -> list[SearchHit]:
        """Queued behind the write in progress in the writer, so ``timeout_s`` bounds the wait
        as well (without one, INDEX_CALL_TIMEOUT_S does)."""
        ref = self.handle.search_hits.remote(
            self.generation, list(vector), k, None if where is None else dict(where), strong, timeout_s
        )
        return _answer(ref, INDEX_CALL_TIMEOUT_S if timeout_s is None else timeout_s, f"{self.name} index")

    def close(self) -> None:
        """Nothing to release: the writer actor owns the client."""


def _done(ref: ObjectRef[Any]) -> bool:
    """Whether the call has answered (or failed), without waiting."""
    ready, _ = ray.wait([ref], timeout=0)
    return bool(ready)


def _kill(handle: Any) -> None:
    """End an actor for good (one lost, or one given up on); it may be gone already."""
    with contextlib.suppress(RayError, ValueError):
        ray.kill(handle, no_restart=True)


def driver_node() -> str:
    """The Ray node this driver runs on (with a ``ray://`` client, the head)."""
    node: str = ray.get_runtime_context().get_node_id()
    return node


def writer_placement(node: str) -> NodeAffinitySchedulingStrategy:
    """The writers run on ``node`` (the driver's) while it can host them, elsewhere if not."""
    return NodeAffinitySchedulingStrategy(node_id=node, soft=True)


def shard_placement(resources: dict[str, float]) -> dict[str, Any]:
    """Ray options placing a shard actor on a node that offers ``resources``, holding them and no
    CPU (once any resource is named, Ray would hold a CPU for the actor's whole life); with none,
    Ray's defaults (no CPU held, one free needed to place it)."""
    return {"num_cpus": 0, "resources": dict(resources)} if resources else {}


@dataclass(frozen=True)
class ShardPlace:
    """A shard actor once started: the prepared intents it re-drove, and the node it runs on."""

    recovered: int
    node: str


@dataclass(frozen=True)
class ShardConfig:
    shard: int
    shards: int
    owner: str
    lease_s: float
    mailbox_docs_max: int
    batch_docs_max: int
    log_level: str
    prepare_ahead: int = 0


@ray.remote(max_concurrency=ACTOR_CONCURRENCY)  # type: ignore[call-overload]  # ray's remote() overloads omit actor options
class ShardActor:
    """Hosts one ShardWorker and runs its apply loop on a thread."""

    def __init__(
        self,
        config: ShardConfig,
        settings: Settings,
        generations: list[Generation],
        writers: dict[str, Writer],
        crash_at: tuple[str, int] | None,
        driver: Driver | None,
    ) -> None:
        _end_with(driver)
        configure_logging(config.log_level)
        structlog.contextvars.bind_contextvars(shard=config.shard)
        self.config = config
        self.ledger = build_ledger(settings, _crash_hook(crash_at))
        self._gen_ledgers: list[Any] = []
        self.engine = self._build_engine(settings, generations, writers, _crash_hook(crash_at))
        self.fence = self.ledger.claim_shard(config.shard, config.owner, config.lease_s)
        self.recovered = self.engine.recover(
            self.fence, owns=lambda d: shard_of(d, config.shards) == config.shard
        )
        self.worker = ShardWorker(
            config.shard,
            self.engine,
            fence=self.fence,
            mailbox_docs_max=config.mailbox_docs_max,
            batch_docs_max=config.batch_docs_max,
            backoff=Backoff(),
            clock=time.monotonic,
            prepare_ahead=config.prepare_ahead,
        )
        self._finished: list[int] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._fatal = ""
        self._thread = threading.Thread(target=self._loop, name=f"shard-{config.shard}", daemon=True)
        self._lease_thread = threading.Thread(target=self._keep_lease, name=f"lease-{config.shard}", daemon=True)
        self._thread.start()
        self._lease_thread.start()

    def _build_engine(
        self,
        settings: Settings,
        generations: list[Generation],
        writers: dict[str, Writer],
        crash: CrashHook,
    ) -> ApplyEngine | MultiEngine:
        """One two-phase engine per live generation (the active one first): each with its own
        ledger namespace and index writers, all sharing the home ledger's leases, dead-letter
        queue and embedding cache. One generation: a plain ApplyEngine."""
        source_name = settings.source.name if settings.source else "run"
        engines = []
        for gen in generations:
            proxies = IndexWriters(
                KeywordWriterProxy(writers[KEYWORD], gen.number), VectorWriterProxy(writers[VECTOR], gen.number)
            )
            built = build_generation(settings, gen, self.ledger, source_name=source_name, crash=crash, writers=proxies)
            if built.ledger is not self.ledger:
                self._gen_ledgers.append(built.ledger)
            engines.append(built.engine)
        return engines[0] if len(engines) == 1 else MultiEngine(engines)

    def ready(self) -> ShardPlace:
        return ShardPlace(self.recovered, ray.get_runtime_context().get_node_id())

    def offer(self, envelopes: list[Envelope]) -> int:
        return self.worker.offer(envelopes)

    def drain(self) -> tuple[list[int], ShardStatus, str]:
        """Seqs finished since the last drain, the shard's status, and a fatal error if any."""
        with self._lock:
            finished, self._finished = self._finished, []
        return finished, self.worker.status(), self._fatal

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=CONTROL_CALL_TIMEOUT_S)
        self._lease_thread.join(timeout=CONTROL_CALL_TIMEOUT_S)
        self.worker.close()
        self.engine.close()
        for ledger in self._gen_ledgers:
            ledger.close()
        self.ledger.close()

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                done = self.worker.step()
                if done:
                    with self._lock:
                        self._finished.extend(done)
                elif self.worker.idle or not done:
                    time.sleep(IDLE_SLEEP_S)
        except FencedError as exc:
            self._fatal = f"fenced: {exc}"
            log.error("shard fenced; stopping", error=str(exc))
        except Exception as exc:  # a programmer error: stop this shard loudly, /readyz reports it
            self._fatal = f"{exc.__class__.__name__}: {exc}"
            log.exception("shard loop crashed")

    def _keep_lease(self) -> None:
        """Renew the lease on its own thread, every third of its length, so no step however slow
        (a store outage's backoff, a ledger busy with a rebuild) lets it lapse; a renewal the
        ledger could not take now is tried again within LEASE_RETRY_S. Losing the lease to
        another owner stops the shard: its writes would be fenced anyway."""
        wait = self.config.lease_s / 3
        while not self._stop.wait(wait):
            try:
                self.ledger.renew_shard(self.fence, self.config.owner, self.config.lease_s)
                wait = self.config.lease_s / 3
            except FencedError as exc:
                self._fatal = f"fenced: {exc}"
                log.error("shard lease lost; stopping", error=str(exc))
                self._stop.set()
                return
            except LockstepError as exc:
                log.warning("lease renewal failed; retrying", error=str(exc), retry_in_s=LEASE_RETRY_S)
                wait = LEASE_RETRY_S


def _crash_hook(crash_at: tuple[str, int] | None) -> CrashHook:
    """Test-only: at the named point, SIGKILL the whole service (the driver) and this actor."""

    def hook(name: str) -> None:
        if crash_at is not None and name == crash_at[0]:
            kill_service(crash_at[1])

    return hook


def kill_service(driver_pid: int) -> None:
    """SIGKILL the service like a container kill: the driver's whole process group when the driver
    leads one (tests start it so), else the driver and this process."""
    if os.getpgid(driver_pid) == driver_pid:
        os.killpg(driver_pid, signal.SIGKILL)
    os.kill(driver_pid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class _Replacement:
    """A lost shard's successor while it is being placed and started."""

    config: ShardConfig
    # On the driver's monotonic clock: past this, the service stops (ShardNotReplaced).
    deadline: float
    handle: Any = None
    ready: ObjectRef[ShardPlace] | None = None
    # No new actor is started before this (after one died too): SHARD_RECREATE_RETRY_S.
    retry_at: float = 0.0


class ShardCluster:
    """The actors of one ``lockstep run``: two index writers and N shards, of which those lost
    with their node are re-created (``heal``)."""

    def __init__(
        self,
        settings: Settings,
        *,
        owner: str,
        generations: list[Generation],
        crash_at: tuple[str, int] | None,
        log_level: str,
        driver: Driver | None,
    ) -> None:
        """``generations``: every live generation, the active one (which readers see) first;
        ``driver``: the process the actors end with (None: Ray's own lifetimes only)."""
        rs = settings.run
        self.shards_n = rs.shards
        self.dim = generations[0].dim
        self.active = generations[0].number
        self.replace_timeout_s = rs.shard_replace_timeout_s
        self.owner = owner
        targets = [WriterTarget(g.number, generation_settings(settings, g), g.dim, g.model_id) for g in generations]
        # The node the writers are placed on, when it can host them.
        self.home_node = driver_node()
        near_driver = writer_placement(self.home_node)
        self.writers: dict[str, Writer] = {
            side: IndexWriterActor.options(  # type: ignore[attr-defined]  # mypy does not apply class decorators, so misses the ActorClass
                max_concurrency=writer_concurrency(side, targets), scheduling_strategy=near_driver
            ).remote(side, targets, log_level, driver)
            for side in (KEYWORD, VECTOR)
        }
        self._placement = shard_placement(rs.shard_resources)
        self._shard_args = (settings, generations, self.writers, crash_at, driver)
        self.configs = [
            ShardConfig(
                i, rs.shards, owner, rs.lease_s, rs.mailbox_docs_max, rs.batch_docs_max, log_level, rs.prepare_ahead
            )
            for i in range(rs.shards)
        ]
        self.shards = [self._spawn(c) for c in self.configs]
        places: list[ShardPlace] = _call(
            [s.ready.remote() for s in self.shards], SHARD_START_TIMEOUT_S, "shard start"
        )
        self.recovered = sum(p.recovered for p in places)
        self.nodes = [p.node for p in places]
        # Shards whose actor was lost, until their successor is ready; the service is told of
        # each loss once (``take_lost``). Successors started so far name their owners.
        self.replacing: dict[int, _Replacement] = {}
        self._lost: list[int] = []
        self._successors = 0
        # Ray builds actors in the background: wait for the writers' constructors too (they
        # connect to the stores and ensure the indexes, seconds for a new Milvus collection), so
        # that the service is ready only when a write can go out at once. A switch of
        # generations takes that much longer; a rebuild waits for it (docs/rebuild.md).
        _call([w.ready.remote() for w in self.writers.values()], SHARD_START_TIMEOUT_S, "index writer start")

    def _spawn(self, config: ShardConfig) -> Any:
        return ShardActor.options(**self._placement).remote(config, *self._shard_args)  # type: ignore[attr-defined]  # mypy does not apply class decorators, so misses the ActorClass

    def readers(self) -> tuple[KeywordWriterProxy, VectorWriterProxy]:
        """Reads by chunk ID of the active generation's indexes through the writer actors (for
        the continuous audit, which probes; nothing streams a whole index through a writer)."""
        return KeywordWriterProxy(self.writers[KEYWORD], self.active), VectorWriterProxy(self.writers[VECTOR], self.active)

    def vector_search(self) -> VectorSearchProxy:
        """The active generation's vector index, searched through its writer actor."""
        return VectorSearchProxy(self.writers[VECTOR], self.active, self.dim)

    def route(self, doc_key: str) -> int:
        return shard_of(doc_key, self.shards_n)

    def offer(self, batches: dict[int, list[Envelope]]) -> dict[int, int]:
        """Offer each shard its batch in one call per shard; returns how many each accepted (a
        shard being re-created is offered nothing, a shard lost meanwhile accepted nothing)."""
        refs = {i: self.shards[i].offer.remote(b) for i, b in batches.items() if b and i not in self.replacing}
        return self._answers(refs, "shard offer")

    def drain(self) -> list[tuple[list[int], ShardStatus, str]]:
        """What each live shard finished since its last drain, its status and fatal error."""
        refs = {i: s.drain.remote() for i, s in enumerate(self.shards) if i not in self.replacing}
        return list(self._answers(refs, "shard drain").values())

    def _answers(self, refs: dict[int, ObjectRef[T]], what: str) -> dict[int, T]:
        """Each shard's answer to calls that run at once, within CONTROL_CALL_TIMEOUT_S in all;
        a shard whose actor is lost gives none and is re-created."""
        deadline = time.monotonic() + CONTROL_CALL_TIMEOUT_S
        answers: dict[int, T] = {}
        for shard, ref in refs.items():
            try:
                answers[shard] = _answer(ref, max(0.0, deadline - time.monotonic()), what)
            except ActorLost as exc:
                self._lose(shard, exc)
        return answers

    def _lose(self, shard: int, exc: ActorLost) -> None:
        """Start the lost shard's successor at once, under a new incarnation of this replica's
        owner name: its claim takes the lease over with a higher epoch, fencing the lost actor
        should it still write somewhere."""
        log.warning("shard actor lost; re-creating it", shard=shard, node=self.nodes[shard], error=str(exc))
        _kill(self.shards[shard])
        self._successors += 1
        config = replace(self.configs[shard], owner=f"{self.owner}+{self._successors}")
        self.configs[shard] = config
        self.replacing[shard] = _Replacement(config, deadline=time.monotonic() + self.replace_timeout_s)
        self._start(self.replacing[shard])
        self._lost.append(shard)

    def _start(self, successor: _Replacement) -> None:
        successor.handle = self._spawn(successor.config)
        successor.ready = successor.handle.ready.remote()

    def take_lost(self) -> list[int]:
        """The shards lost since the last call: their unfinished work goes to their successors."""
        lost, self._lost = self._lost, []
        return lost

    def heal(self) -> list[int]:
        """Look in on each lost shard's successor without waiting; returns the shards whose
        successor is now ready (it re-drove the shard's prepared intents) and takes offers.
        Raises ShardNotReplaced once one waited past ``run.shard_replace_timeout_s``."""
        now = time.monotonic()
        back = [shard for shard, successor in list(self.replacing.items()) if self._look_in(shard, successor, now)]
        late = sorted(shard for shard, successor in self.replacing.items() if now > successor.deadline)
        if late:
            raise ShardNotReplaced(
                f"shards {late} lost their actors and none was re-created within {self.replace_timeout_s} s "
                f"(does a node offer {self._placement.get('resources', {})}?)"
            )
        return back

    def _look_in(self, shard: int, successor: _Replacement, now: float) -> bool:
        """Whether the successor is ready now; one that died is started again after a pause."""
        if successor.ready is None:
            if now >= successor.retry_at:
                self._start(successor)
            return False
        if not _done(successor.ready):
            return False
        try:
            place = _answer(successor.ready, CONTROL_CALL_TIMEOUT_S, "shard re-creation")
        except LockstepError as exc:
            log.warning("re-created shard actor failed; starting another", shard=shard, error=str(exc),
                        retry_in_s=SHARD_RECREATE_RETRY_S)
            _kill(successor.handle)
            successor.ready, successor.retry_at = None, now + SHARD_RECREATE_RETRY_S
            return False
        self.shards[shard], self.nodes[shard] = successor.handle, place.node
        del self.replacing[shard]
        log.info("shard re-created", shard=shard, node=place.node, recovered_intents=place.recovered)
        return True

    def stop(self) -> None:
        for successor in self.replacing.values():
            _kill(successor.handle)
        for i, handle in enumerate(self.shards):
            if i in self.replacing:
                continue

            def stop_shard(h: Any = handle) -> Any:
                return _call(h.stop.remote(), CONTROL_CALL_TIMEOUT_S, "shard stop")
            _quietly(stop_shard)
        for writer in self.writers.values():
            def close_writer(w: Any = writer) -> Any:
                return _call(w.close.remote(), CONTROL_CALL_TIMEOUT_S, "writer close")
            _quietly(close_writer)


def _quietly(fn: Callable[[], T]) -> T | None:
    try:
        return fn()
    except LockstepError as exc:
        log.warning("ignored during shutdown", error=str(exc))
        return None
