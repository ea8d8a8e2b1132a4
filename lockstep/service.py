"""``lockstep run``: the reader loop that feeds shard actors and advances the checkpoint.

The reader numbers every record (``seq``), routes it by ``shard_of(doc_id)`` and offers shards
their batches in one Ray call each. Shards report finished seqs; the low watermark turns them
into the position to commit. A full shard mailbox leaves records in the reader's buffer, which
stops the reader thread at its bounded queue: backpressure reaches the source, nothing drops.
Those decisions are ``coordinator.reader.ReaderFlow``'s; this module does the I/O around them.
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import structlog

from adapters.ledger.registry import registry_for
from adapters.sources.webhook import WebhookSource
from coordinator import crashpoints
from coordinator.audit import Auditor
from coordinator.continuous_audit import ContinuousAudit, drift_gauges
from coordinator.errors import LockstepError
from coordinator.generations import Generation, live
from coordinator.ports import ChangeSource, FollowingSource, ReconcilableSource, SourceRecord, VectorSearch
from coordinator.reader import ReaderFlow
from coordinator.shard import ShardStatus
from lockstep.bootstrap import AnyLedger, build_embedder, build_ledger, build_source
from lockstep.generation_parts import WriterAnnouncement, load_generations
from lockstep.leftovers import RunFile, run_file
from lockstep.metrics import Metrics, SearchMetrics
from lockstep.ops_http import EventsEndpoint, OpsServer
from lockstep.ray_runtime import (
    STOP_SIGNALS,
    ShardCluster,
    ShardNotReplaced,
    kill_service,
    start_ray,
    stop_ray,
    this_driver,
)
from lockstep.runtime import open_search
from lockstep.search_http import SearchEndpoint
from lockstep.searching import FollowingSearch
from lockstep.settings import Settings, WebhookSourceSettings

log = structlog.get_logger(__name__)

# Records read ahead of the shards; when full, the reader thread waits (backpressure).
READ_QUEUE_MAX = 10_000
# The ledger is asked for the DLQ size this often (a COUNT over a small table).
LEDGER_GAUGES_INTERVAL_S = 5.0
# The main loop's tick: how often it offers, drains and checkpoints when there is little to do.
TICK_S = 0.02
# How often the registry is read for a generation being built, swapped or dropped; a change
# restarts the shard actors (after in-flight work commits) so that writes reach the new set.
GENERATIONS_POLL_S = 2.0
# How often the reader thread, waiting on a full queue, looks whether a stop was asked for.
READER_CHECK_S = 0.1
# At a stop, the reader thread is given this long to notice and return before the source is
# closed (it looks every READER_CHECK_S, or at every poll of a source's own).
READER_STOP_S = 10.0


@dataclass
class _State:
    statuses: list[ShardStatus] = field(default_factory=list)
    fatal: list[str] = field(default_factory=list)
    # Shards whose actor was lost and whose successor is not ready yet.
    replacing: list[int] = field(default_factory=list)
    started: bool = False
    stopping: bool = False


class Service:
    """One ``lockstep run`` process."""

    def __init__(
        self,
        settings: Settings,
        *,
        log_level: str,
        crash_at: str | None = None,
        exit_when_idle: bool = False,
        stop_requested: threading.Event | None = None,
        unfenced_search: bool = False,
    ) -> None:
        """``stop_requested``: an event a stop signal may have set before the service existed
        (the command line's, set while it was still importing). ``unfenced_search`` is
        test-only: ``POST /search`` serves hits without the ledger's fence."""
        self.settings = settings
        self.rs = settings.run
        self.log_level = log_level
        self.crash_at = crash_at
        self.exit_when_idle = exit_when_idle
        self.metrics = Metrics()
        self.search_metrics = SearchMetrics(self.metrics.registry)
        self.unfenced_search = unfenced_search
        self.searching: FollowingSearch | None = None
        self.stop_requested = stop_requested or threading.Event()
        self.flow = ReaderFlow(
            self.rs.shards, offer_batch_max=self.rs.offer_batch_max, mailbox_docs_max=self.rs.mailbox_docs_max
        )
        self.state = _State()
        self.owner = f"{self.rs.replica or os.uname().nodename}#{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.ops: OpsServer | None = None
        self.ledger: AnyLedger | None = None
        self._gauges_at = 0.0
        self._generations_at = 0.0
        self.generations: list[Generation] = []
        self._auditing: threading.Thread | None = None
        self._audit_stop = threading.Event()
        self._reader: threading.Thread | None = None
        self.run_file = RunFile(None, None)

    # --- lifecycle -------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT (or until idle when asked); returns the exit status: 0
        after a clean stop, whenever the signal came; 1 if a shard or the source stopped it."""
        self._install_signals()
        if self.stop_requested.is_set():
            log.info("stopped before starting")
            return 0
        with contextlib.ExitStack() as stack:
            self.ops = OpsServer(
                self.rs.http_host,
                self.rs.http_port,
                self.metrics.registry,
                self.readiness,
                events=isinstance(self.settings.source, WebhookSourceSettings),
                search=True,
            ).start()
            stack.callback(self.ops.stop)
            log.info("serving", port=self.ops.port, owner=self.owner)
            # Before Ray starts: what a killed run left running beside this data goes first.
            self.run_file = stack.enter_context(run_file(self.settings))
            start_ray(self.rs.ray_address, self.rs.ray_num_cpus)
            stack.callback(stop_ray)
            self.run_file.note_children()
            if self.stop_requested.is_set():
                log.info("stopped before serving")
            else:
                self._run_ready()
        _ignore_stop_signals()
        return 1 if self.state.fatal else 0

    def _run_ready(self) -> None:
        """Ray is up: build the ledger, source and shard actors, serve, and stop in order."""
        ledger = self.ledger = build_ledger(self.settings)
        # Announced before the registry is read: a rebuild registering a generation meanwhile
        # waits for this service to report writing it (docs/rebuild.md, "Live writers").
        self.writer = WriterAnnouncement(registry_for(ledger), self.owner)
        self.writer.starting()
        self.registry, gens = load_generations(
            self.settings, ledger, lambda: build_embedder(self.settings.embedder), self.writer.registry
        )
        self.generations = live(gens)
        active_ledger = ledger if self.generations[0].number == 1 else build_ledger(
            self.settings, generation=self.generations[0].number
        )
        # Sources that diff a snapshot read the active generation's versions (checkpoints, which
        # every generation shares with home, are the same either way).
        source = build_source(self.settings, active_ledger)
        self._attach_events(source)
        self.cluster = cluster = self._new_cluster()
        self.state.started = True
        self._auditing = self._start_audit(cluster)
        threading.Thread(target=self._open_search, name="search-open", daemon=True).start()
        try:
            self._serve(source)
        finally:
            if self.searching is not None:
                self.searching.close()
            self._stop_audit()
            self.cluster.stop()
            self.writer.withdraw()
            self._stop_reader()
            source.close()
            if active_ledger is not ledger:
                active_ledger.close()
            ledger.close()

    def _attach_events(self, source: ChangeSource) -> None:
        """Open ``POST /events`` once the webhook source (and its inbox) exists."""
        src = self.settings.source
        if not isinstance(src, WebhookSourceSettings) or not isinstance(source, WebhookSource):
            return
        assert self.ops is not None, "the HTTP server starts first"
        intake = source.intake(batch_events_max=src.batch_events_max, backlog_events_max=src.backlog_events_max)
        self.ops.attach_events(EventsEndpoint(intake, src.token, src.body_bytes_max, self._events_refusal))

    def _open_search(self) -> None:
        """Open ``POST /search`` (in the background: loading the query embedder takes seconds).
        A milvus-lite file admits one process, its writer: the vector leg then searches through
        it; every other store is read by a client of this process's own."""
        try:
            self.searching = FollowingSearch(
                lambda: open_search(self.settings, vector=self._vector_reader(), fenced=not self.unfenced_search)
            )
        except LockstepError as exc:
            log.error("search unavailable", error=str(exc), error_type=type(exc).__name__)
            return
        assert self.ops is not None, "the HTTP server starts first"
        self.ops.attach_search(SearchEndpoint(self.searching.search, self.search_metrics, self.settings.search.token))
        log.info("search open", generation=self.searching.generation)

    def _vector_reader(self) -> VectorSearch | None:
        if not self.settings.vector.is_embedded:
            return None
        return self.cluster.vector_search()

    def _events_refusal(self) -> str | None:
        """Why POST /events is answered 503 right now, or None (the inbox takes events even while
        an index is down: that is what it is for)."""
        if self.stop_requested.is_set() or self.state.stopping:
            return "shutting down"
        if self.state.fatal:
            return "stopped: a shard failed"
        return None

    def _new_cluster(self) -> ShardCluster:
        cluster = ShardCluster(
            self.settings,
            owner=self.owner,
            generations=self.generations,
            crash_at=(self.crash_at, os.getpid()) if self.crash_at else None,
            log_level=self.log_level,
            # Actors of a Ray started here end with this process; a cluster joined ends them itself.
            driver=None if self.rs.ray_address else this_driver(),
        )
        self.run_file.note_children()
        # Every record offered from now on goes to actors that write this set.
        self.writer.writing([g.number for g in self.generations])
        log.info("shards ready", shards=self.rs.shards, recovered_intents=cluster.recovered,
                 generations=[g.number for g in self.generations], nodes=cluster.nodes,
                 driver_node=cluster.home_node)
        return cluster

    def _follow_generations(self) -> None:
        """Restart the shard actors when the set of live generations changed (a rebuild started,
        a swap, a rollback, a gc): wait until every record read so far is committed, then build
        actors that write the new set. The reader keeps filling its bounded queue meanwhile."""
        self.writer.renew()
        now = time.monotonic()
        if now - self._generations_at < GENERATIONS_POLL_S:
            return
        self._generations_at = now
        try:
            current = live(self.registry.all())
        except LockstepError as exc:
            log.warning("cannot read the generation registry", error=str(exc))
            return
        if [(g.number, g.state) for g in current] == [(g.number, g.state) for g in self.generations]:
            return
        log.info("generations changed; switching shard actors", before=[g.number for g in self.generations],
                 after=[g.number for g in current])
        while self.flow.outstanding and not self.stop_requested.is_set() and not self.state.fatal:
            self._offer(self.cluster)
            self._drain(self.cluster)
            self._checkpoint(self._source)
            self.writer.renew()  # still writing the old set until the switch
            time.sleep(TICK_S)
        if self.flow.outstanding:
            return
        self._stop_audit()
        self.cluster.stop()
        self.generations = current
        self.flow.new_shards()
        self.cluster = self._new_cluster()
        self._auditing = self._start_audit(self.cluster)

    def _stop_audit(self) -> None:
        self._audit_stop.set()
        if self._auditing is not None:
            self._auditing.join(timeout=self.rs.grace_s)
        self._auditing = None

    def _start_audit(self, cluster: ShardCluster) -> threading.Thread | None:
        """The continuous audit thread (reads through the writer actors, so embedded stores work)."""
        if self.rs.audit_interval_s <= 0:
            return None
        self._audit_stop = threading.Event()
        audit_ledger = build_ledger(self.settings, generation=self.generations[0].number)
        keyword, vector = cluster.readers()
        auditor = Auditor(
            ledger=audit_ledger,
            keyword=keyword,
            vector=vector,
            source=None,
            chunking=self.generations[0].chunking,
            reference_name="ledger",
        )
        rounds = ContinuousAudit(
            auditor,
            audit_ledger,
            self.generations[0].chunking,
            sample_docs=self.rs.audit_sample_docs,
            rng=random.Random(),
            clock=time.time,
        )
        thread = threading.Thread(
            target=self._audit_loop, args=(rounds, audit_ledger, self._audit_stop), name="audit", daemon=True
        )
        thread.start()
        return thread

    def _audit_loop(self, rounds: ContinuousAudit, audit_ledger: AnyLedger, stop: threading.Event) -> None:
        try:
            while not stop.wait(self.rs.audit_interval_s) and not self.stop_requested.is_set():
                try:
                    report = rounds.round()
                except LockstepError as exc:
                    log.warning("audit round failed", error=str(exc), phase="audit")
                    continue
                for gauge in drift_gauges(report):
                    self.metrics.drift.labels(gauge.category, gauge.index).set(gauge.value)
                self.metrics.audits.inc()
                self.metrics.audit_docs.set(report.documents_checked)
                if report.drift:
                    log.warning("drift found", drift=report.drift, counts=report.counts, phase="audit")
        finally:
            audit_ledger.close()

    def _install_signals(self) -> None:
        """A stop signal, at any moment and however often, only asks for a clean stop (Ray's own
        SIGTERM handler is kept out while it starts: see ``start_ray``)."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, lambda *_: self.stop_requested.set())

    def readiness(self) -> tuple[bool, list[str]]:
        """Ready once shards are up and no index is failing; otherwise the reasons."""
        s = self.state
        reasons = [f"shard fatal: {f}" for f in s.fatal]
        reasons += [f"shard {st.shard} degraded: {st.last_error}" for st in s.statuses if st.last_error]
        reasons += [f"shard {shard} lost: re-creating its actor" for shard in s.replacing]
        if not s.started:
            reasons.append("starting: re-driving prepared intents")
        if s.stopping:
            reasons.append("shutting down")
        return not reasons, reasons

    # --- the reader loop -------------------------------------------------------------------

    def _serve(self, source: ChangeSource) -> None:
        self._source = source
        records: queue.Queue[SourceRecord | None] = queue.Queue(maxsize=READ_QUEUE_MAX)
        self._reader = threading.Thread(target=self._read, args=(source, records), name="reader", daemon=True)
        self._reader.start()
        while not self.stop_requested.is_set():
            self._tick(self.cluster, source, records)
            self._follow_generations()
            if self.exit_when_idle and self.flow.idle():
                break
            if self.state.fatal:
                break
        self._shutdown(self.cluster, source, records)

    def _tick(
        self, cluster: ShardCluster, source: ChangeSource, records: queue.Queue[SourceRecord | None]
    ) -> None:
        self._pull(records)
        self._offer(cluster)
        if self.flow.drain_due():
            self._drain(cluster)
        self._checkpoint(source)

    def _read(self, source: ChangeSource, records: queue.Queue[SourceRecord | None]) -> None:
        try:
            for record in self._records(source):
                while not self.stop_requested.is_set():
                    try:
                        records.put(record, timeout=READER_CHECK_S)
                        break
                    except queue.Full:
                        continue
                if self.stop_requested.is_set():
                    return
        except Exception as exc:
            self._source_failed(exc)
        finally:
            self._put_end(records)

    def _source_failed(self, exc: Exception) -> None:
        """A source that cannot go on (a lost replication slot, an outage beyond its limit) stops
        the service with the reason on /readyz and a non-zero exit, never reads silently. Once
        a stop was asked for, what the source raises (a consumer already leaving its group) costs
        nothing: no record read after it would be offered any more."""
        if self.stop_requested.is_set():
            log.warning("the source failed while stopping", error=str(exc), error_type=type(exc).__name__)
            return
        log.error("source failed; stopping", error=str(exc), error_type=type(exc).__name__)
        self.state.fatal.append(f"source: {type(exc).__name__}: {exc}")

    def _put_end(self, records: queue.Queue[SourceRecord | None]) -> None:
        """Tell the main loop that reading ended (while it still pulls records: not at a stop)."""
        while True:
            try:
                records.put(None, timeout=READER_CHECK_S)
                return
            except queue.Full:
                if self.stop_requested.is_set():
                    return

    def _stop_reader(self) -> None:
        """Wait for the reader thread to return before its source is closed under it."""
        self.stop_requested.set()
        if self._reader is None:
            return
        self._reader.join(READER_STOP_S)
        if self._reader.is_alive():
            log.warning("the reader did not stop in time; closing its source under it", waited_s=READER_STOP_S)

    def _records(self, source: ChangeSource) -> Iterator[SourceRecord]:
        if isinstance(source, FollowingSource) and not self.exit_when_idle:
            yield from source.follow(self.stop_requested.is_set)
            return
        reconciled_at: float | None = None
        while True:
            yield from self._poll(source)
            if isinstance(source, ReconcilableSource) and self._reconcile_due(reconciled_at):
                reconciled_at = time.monotonic()
                yield from self._reconcile(source)
            if self.exit_when_idle or self.stop_requested.wait(self.rs.poll_interval_s):
                return

    def _poll(self, source: ChangeSource) -> Iterator[SourceRecord]:
        """One read of a polled source; a failed poll is logged and retried at the next interval."""
        try:
            yield from source.read()
        except LockstepError as exc:
            if self.exit_when_idle:
                raise
            log.warning("poll failed; retrying at the next interval", error=str(exc), phase="read")

    def _reconcile_due(self, reconciled_at: float | None) -> bool:
        interval_s = self.rs.reconcile_interval_s
        if interval_s <= 0:
            return False
        return reconciled_at is None or time.monotonic() - reconciled_at >= interval_s

    def _reconcile(self, source: ReconcilableSource) -> Iterator[SourceRecord]:
        """Deletes for documents whose rows vanished without a trace (hard deletes)."""
        deletes = 0
        try:
            for event in source.reconcile_ids():
                deletes += 1
                yield event
        except LockstepError as exc:
            if self.exit_when_idle:
                raise
            log.warning("id reconciliation failed; retrying at the next interval", error=str(exc), phase="reconcile")
        log.info("ids reconciled", deletes=deletes, phase="reconcile")

    def _pull(self, records: queue.Queue[SourceRecord | None]) -> None:
        """Move records from the reader into per-shard buffers, unless the buffers are full."""
        room = self.flow.buffer_room()
        if room <= 0:  # the shards are behind: wait a tick instead of spinning on full buffers
            time.sleep(TICK_S)
            return
        deadline = time.monotonic() + TICK_S
        while room > 0:
            try:
                record = records.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return
            if record is None:
                self.flow.reader_done = True
                return
            self.flow.read(record, record.position)
            room -= 1

    def _offer(self, cluster: ShardCluster) -> None:
        """Offer each shard what the flow control says its mailbox has room for."""
        batches = self.flow.batches()
        if batches:
            self.flow.offered(cluster.offer(batches))

    def _drain(self, cluster: ShardCluster) -> None:
        reports = cluster.drain()
        drained = self.flow.drained((finished, status) for finished, status, _ in reports)
        for lag_s in drained.lags_s:
            self.metrics.lag.observe(lag_s)
        statuses = [status for _, status, _ in reports]
        for _, status, fatal in reports:
            self.metrics.absorb_status(status)
            if fatal and fatal not in self.state.fatal:
                log.error("shard stopped", shard=status.shard, reason=fatal)
                self.state.fatal.append(fatal)
        self.state.statuses = statuses
        self.metrics.degraded.set(int(any(s.last_error for s in statuses)))
        self.metrics.outstanding.set(self.flow.outstanding)
        self.metrics.oldest_s.set(drained.oldest_s)
        self._heal(cluster)

    def _heal(self, cluster: ShardCluster) -> None:
        """Give each shard lost since the last drain (with its Ray node) its unfinished work back,
        for the successor the cluster started, and see which successors are ready. None ready
        within ``shard_replace_timeout_s`` stops the service."""
        for shard in cluster.take_lost():
            again = self.flow.reoffer(shard)
            self.metrics.forget_shard(shard)
            self.metrics.shards_lost.inc()
            log.warning("shard lost; its unfinished work goes to its successor", shard=shard, reoffered=again)
        try:
            self.metrics.shards_recreated.inc(len(cluster.heal()))
        except ShardNotReplaced as exc:
            log.error("shard not re-created; stopping", error=str(exc))
            self.state.fatal.append(str(exc))
        self.state.replacing = sorted(cluster.replacing)

    def _checkpoint(self, source: ChangeSource) -> None:
        """Commit the position after the last event below which everything is finished."""
        position = self.flow.checkpoint()
        if position is None:
            return
        source.commit(position)
        self.flow.committed = position
        if self.crash_at == crashpoints.AFTER_CHECKPOINT:
            kill_service(os.getpid())

    def _shutdown(
        self, cluster: ShardCluster, source: ChangeSource, records: queue.Queue[SourceRecord | None]
    ) -> None:
        """Stop reading, then let in-flight work commit for at most ``grace_s``."""
        self.state.stopping = True
        self.stop_requested.set()
        log.info("stopping", unfinished=self.flow.outstanding, grace_s=self.rs.grace_s)
        deadline = time.monotonic() + self.rs.grace_s
        while self.flow.outstanding and time.monotonic() < deadline and not self.state.fatal:
            self._offer(cluster)
            self._drain(cluster)
            self._checkpoint(source)
            time.sleep(TICK_S)
        log.info("stopped", unfinished=self.flow.outstanding, checkpoint=self.flow.committed)


def _ignore_stop_signals() -> None:
    """Once everything is stopped, a stop signal has nothing left to stop: ignore it, so that one
    arriving while the interpreter exits (Python restores default handlers then, but leaves
    ignored signals ignored) cannot turn a clean exit into a death by that signal."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
