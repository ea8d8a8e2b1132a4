"""The streaming service (``lockstep run``) against the raw-client ceiling, side by side in one run.

    python -m bench.streaming [--events 15000] [--shards 1,2,4] [--freshness-s 30] [--seed 7]

This module starts its own OpenSearch-API server and Milvus 2.3.5 server (``chaos/servers.py``),
generates documents of exactly ``CHUNKS_PER_DOC`` chunks (one event = one new document), and
measures, in one run:

1. *Raw-client ceiling*: the rows lockstep would write (chunk rows, hashing-embedder vectors
   computed beforehand) written straight through opensearch-py ``bulk`` (external versions) and
   pymilvus ``MilvusClient.upsert``, in the request sizes lockstep's shards send (one step of
   ``batch_docs_max`` documents). Each store alone, then both at once (as lockstep writes them).
   The slower store alone is measured again right before each lockstep run, because the same
   server's raw rate moves by a quarter from one measurement to the next: the ceiling is the
   median of those measurements of the slower store alone, in events/s, and each run is also
   compared with the raw measurement just before it.
2. *Sustained throughput*: ``lockstep run -c CFG --exit-when-idle`` as a real subprocess on a
   JSONL of ``--events`` events; the applied rate is taken from ``/metrics``
   (``lockstep_events_total{outcome="applied"}``, polled) between ``STEADY_FROM`` and
   ``STEADY_TO`` of the events, so Ray and actor start-up are left out. Repeated per shard count.
   Over the same window, the cores each part used (``bench/cpu.py``, from ``/proc``): each store
   server, the shard actors, the index writer actors, the service's driver, Ray's own processes,
   this harness, the rest of the machine, and what stayed idle.
3. *Freshness lag*: the service in follow mode, with events appended to its JSONL at
   ``FRESHNESS_LOAD`` of the best measured rate; each event's lag runs from the moment its line
   was flushed to the file until the ledger shows its version committed (polled from here).

Every lockstep installation gets its own index, collection and ledger and is checked against the
source with ``coordinator.invariants.check_index`` (I1-I4) when its run ends.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import yaml
from opensearchpy import OpenSearch
from prometheus_client.parser import text_string_to_metric_families
from pymilvus import MilvusClient

from adapters.embedders.hashing import HashingEmbedder
from adapters.keyword._search_engine import BULK_ITEMS_MAX
from adapters.keyword.settings import KeywordSettings
from adapters.ledger.sqlite import SqliteLedger
from adapters.vector.milvus import UPSERT_BATCH_ROWS_MAX
from adapters.vector.settings import VectorSettings
from bench import cpu
from bench.incremental import expected_chunks, machine
from bench.results_doc import write_results
from chaos.servers import OpenSearchApiServer, RealMilvusServer, free_port
from coordinator.chunking import ChunkingSettings, chunk_id, chunk_text, content_hash
from coordinator.invariants import Violation, check_index
from lockstep.bootstrap import build_keyword, build_vector
from lockstep.corpus import Doc, make_doc
from lockstep.logging import configure_logging
from lockstep.runtime import runtime
from lockstep.settings import RunSettings, load_settings

DEFAULT_EVENTS = 15_000
DEFAULT_SHARDS = (1, 2, 4)
DEFAULT_SEED = 7
DEFAULT_FRESHNESS_S = 30.0
# Title + two body paragraphs of at most PARA_CHARS: the title joins the first paragraph and two
# paragraphs never share a 1000-character chunk, so every document is exactly two chunks.
CHUNKS_PER_DOC = 2
PARA_CHARS = 800
DIM = 384
# The steady-state window, as fractions of the events applied: before it Ray and the actors
# start and the pipeline fills; after it the last shards drain alone.
STEADY_FROM = 0.10
STEADY_TO = 0.90
# /metrics is scraped this often during a throughput run.
METRICS_POLL_S = 0.25
# The freshness run appends at this fraction of the best sustained rate measured.
FRESHNESS_LOAD = 0.5
# A raw keyword request slower than this counts as a write stall in the freshness report.
STALL_S = 0.5
# The freshness report shows the lag per window of this many seconds of appends.
LAG_WINDOW_S = 5.0
# The appender writes (and flushes) whole lines this often, keeping to the target rate.
APPEND_TICK_S = 0.02
# The ledger is asked for committed versions this often: it bounds the lag's measurement error.
LEDGER_POLL_S = 0.05
# Goals of the issue.
RATIO_GOAL = 0.70
LAG_P99_GOAL_S = 2.0
# Bounds on waiting for the service, so a stuck run fails instead of hanging the benchmark.
READY_TIMEOUT_S = 180.0
RUN_TIMEOUT_S = 900.0
DRAIN_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 90.0
HTTP_TIMEOUT_S = 2.0
# Raw client requests; generous, the servers answer a batch in well under a second.
RAW_REQUEST_TIMEOUT_S = 120.0
# Pause between phases so that a server's background work (Milvus flushes and index builds of a
# dropped collection) does not bleed into the next measurement.
SETTLE_S = 5.0
VIOLATIONS_SHOWN_MAX = 10
DOCS_SECTION = "## Streaming service (`bench/streaming.py`)"
RESULTS_BEGIN = "<!-- bench.streaming results: begin (rewritten by `python -m bench.streaming`) -->"
RESULTS_END = "<!-- bench.streaming results: end -->"
LOCKSTEP = [sys.executable, "-m", "lockstep", "--log-level", "warning", "run"]


# --- the workload --------------------------------------------------------------------------------


def make_docs(n: int, seed: int) -> list[Doc]:
    """``n`` new documents of exactly CHUNKS_PER_DOC chunks each, deterministic in ``seed``."""
    rng = random.Random(seed)
    return [make_doc(rng, i, paragraphs=CHUNKS_PER_DOC, para_chars=PARA_CHARS) for i in range(n)]


def event_line(doc: Doc) -> str:
    """The JSONL line of the upsert event creating ``doc``."""
    event = {"op": "upsert", "doc_id": doc.doc_id, "version": doc.version, "text": doc.text,
             "metadata": doc.metadata}  # fmt: skip
    return json.dumps(event) + "\n"


def write_events(path: Path, docs: Iterable[Doc]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        out.writelines(event_line(d) for d in docs)


# --- the raw-client ceiling ----------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkRow:
    """One chunk as both stores receive it, vector included."""

    chunk_id: str
    doc_id: str
    chunk_index: int
    text: str
    content_hash: str
    version: int
    metadata: dict[str, Any]
    vector: list[float]


@dataclass(frozen=True)
class StoreRate:
    """Rows written to one store by the raw client, and how long it took."""

    store: str
    rows: int
    requests: int
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds


@dataclass(frozen=True)
class Ceiling:
    """The raw clients' rates: each store alone, both at once, and the slower store alone again
    (``again``, one measurement before each lockstep run)."""

    keyword: StoreRate
    vector: StoreRate
    both_keyword: StoreRate
    both_vector: StoreRate
    rows_per_request: int
    again: tuple[StoreRate, ...] = ()

    @property
    def slower(self) -> StoreRate:
        return min(self.keyword, self.vector, key=lambda r: r.rows_per_s)

    @property
    def slower_is_keyword(self) -> bool:
        return self.slower is self.keyword

    @property
    def slower_rates(self) -> list[float]:
        """Rows/s of every measurement of the slower store alone."""
        return [self.slower.rows_per_s, *(r.rows_per_s for r in self.again)]

    @property
    def events_per_s(self) -> float:
        return statistics.median(self.slower_rates) / CHUNKS_PER_DOC

    @property
    def both_events_per_s(self) -> float:
        return min(self.both_keyword.rows_per_s, self.both_vector.rows_per_s) / CHUNKS_PER_DOC


def chunk_rows(docs: Sequence[Doc], chunking: ChunkingSettings) -> list[ChunkRow]:
    """The chunk rows of ``docs`` with their hashing-embedder vectors (computed here, untimed)."""
    parts = [(d, i, t) for d in docs for i, t in enumerate(chunk_text(d.text, chunking))]
    assert len(parts) == CHUNKS_PER_DOC * len(docs), "the corpus shape fixes the chunks per document"
    vectors = HashingEmbedder(dim=DIM).embed([t for _, _, t in parts])
    return [
        ChunkRow(chunk_id(d.doc_id, i), d.doc_id, i, t, content_hash(t), d.version, d.metadata, v)
        for (d, i, t), v in zip(parts, vectors, strict=True)
    ]


def bulk_body(index: str, rows: Sequence[ChunkRow]) -> list[str]:
    """One ``_bulk`` request: an external-versioned index action and the source per row."""
    lines: list[str] = []
    for r in rows:
        action = {
            "index": {"_index": index, "_id": r.chunk_id, "version": r.version, "version_type": "external"}
        }
        source = {"chunk_id": r.chunk_id, "doc_id": r.doc_id, "chunk_index": r.chunk_index, "text": r.text,
                  "content_hash": r.content_hash, "version": r.version, "metadata": r.metadata}  # fmt: skip
        lines += [json.dumps(action), json.dumps(source, ensure_ascii=False)]
    return lines


def milvus_rows(rows: Sequence[ChunkRow]) -> list[dict[str, Any]]:
    """The entities of one ``upsert`` request, as the Milvus adapter builds them."""
    return [
        {"chunk_id": r.chunk_id, "vector": r.vector, "doc_id": r.doc_id, "chunk_index": r.chunk_index,
         "text": r.text, "content_hash": r.content_hash, "version": r.version, "metadata": r.metadata}
        for r in rows
    ]  # fmt: skip


def split(rows: Sequence[ChunkRow], size: int) -> list[Sequence[ChunkRow]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


KEYWORD_RAW = "keyword (OpenSearch-API)"


def _raw_keyword_client(url: str) -> OpenSearch:
    return OpenSearch(hosts=[url], timeout=RAW_REQUEST_TIMEOUT_S, max_retries=0)


def _bulk_ok(client: OpenSearch, body: list[str]) -> int:
    """Send one pre-serialized ``_bulk``; every item must succeed. Returns the items written."""
    reply = client.bulk(body=body, request_timeout=RAW_REQUEST_TIMEOUT_S)
    assert not reply["errors"], f"raw bulk failed: {json.dumps(reply['items'][:2])}"
    return len(reply["items"])


def write_keyword_raw(url: str, index: str, requests: Sequence[list[str]]) -> StoreRate:
    """Send pre-serialized ``_bulk`` requests one after the other, as the keyword writer actor does."""
    client = _raw_keyword_client(url)
    rows = 0
    started = time.perf_counter()
    for body in requests:
        rows += _bulk_ok(client, body)
    seconds = time.perf_counter() - started
    client.close()
    return StoreRate(KEYWORD_RAW, rows, len(requests), seconds)


def write_vector_raw(uri: str, collection: str, requests: Sequence[list[dict[str, Any]]]) -> StoreRate:
    """Send ``upsert`` requests one after the other, as the vector writer actor does."""
    client = MilvusClient(uri=uri, timeout=RAW_REQUEST_TIMEOUT_S)
    rows = 0
    started = time.perf_counter()
    for batch in requests:
        reply = client.upsert(collection, batch, timeout=RAW_REQUEST_TIMEOUT_S)
        assert reply["upsert_count"] == len(batch), f"raw upsert acknowledged {reply} of {len(batch)}"
        rows += len(batch)
    seconds = time.perf_counter() - started
    client.close()
    return StoreRate("vector (Milvus 2.3.5)", rows, len(requests), seconds)


@contextmanager
def fresh_stores(url: str, uri: str, name: str) -> Iterator[tuple[str, str]]:
    """A new index and collection with lockstep's own mapping and schema; dropped afterwards."""
    keyword = build_keyword(KeywordSettings(kind="opensearch", url=url, index=f"raw-{name}"))
    vector = build_vector(VectorSettings(uri=uri, collection=f"raw_{name}"), dim=DIM)
    keyword.ensure()
    vector.ensure()
    try:
        yield keyword.name, vector.name
    finally:
        keyword.drop()
        vector.drop()
        keyword.close()
        vector.close()


def keyword_raw_requests(index: str, rows: Sequence[ChunkRow], rows_per_request: int) -> list[list[str]]:
    """The ``_bulk`` requests of ``rows`` in lockstep's request size (at most BULK_ITEMS_MAX)."""
    return [bulk_body(index, b) for b in split(rows, min(rows_per_request, BULK_ITEMS_MAX))]


def vector_raw_requests(rows: Sequence[ChunkRow], rows_per_request: int) -> list[list[dict[str, Any]]]:
    """The ``upsert`` requests of ``rows`` in lockstep's request size (at most UPSERT_BATCH_ROWS_MAX)."""
    return [milvus_rows(b) for b in split(rows, min(rows_per_request, UPSERT_BATCH_ROWS_MAX))]


def measure_ceiling(url: str, uri: str, rows: Sequence[ChunkRow], rows_per_request: int) -> Ceiling:
    """Each store alone, then both at once, on fresh indexes, in lockstep's request sizes."""
    vector_requests = vector_raw_requests(rows, rows_per_request)

    def keyword_requests(index: str) -> list[list[str]]:
        return keyword_raw_requests(index, rows, rows_per_request)

    _say(f"raw ceiling: {len(rows)} rows, keyword alone")
    with fresh_stores(url, uri, "kw") as (index, _):
        keyword = write_keyword_raw(url, index, keyword_requests(index))
    _settle()
    _say("raw ceiling: vector alone")
    with fresh_stores(url, uri, "vec") as (_, collection):
        vector = write_vector_raw(uri, collection, vector_requests)
    _settle()
    _say("raw ceiling: both stores at once")
    with fresh_stores(url, uri, "both") as (index, collection), ThreadPoolExecutor(2) as pool:
        kw_future = pool.submit(write_keyword_raw, url, index, keyword_requests(index))
        vec_future = pool.submit(write_vector_raw, uri, collection, vector_requests)
        both = kw_future.result(), vec_future.result()
    _settle()
    return Ceiling(keyword, vector, both[0], both[1], rows_per_request)


def measure_slower_again(url: str, uri: str, rows: Sequence[ChunkRow], ceiling: Ceiling) -> StoreRate:
    """The slower store alone once more, on a fresh index or collection, as in ``measure_ceiling``."""
    size = ceiling.rows_per_request
    _say(f"raw ceiling again: {ceiling.slower.store} alone")
    with fresh_stores(url, uri, "again") as (index, collection):
        if ceiling.slower_is_keyword:
            rate = write_keyword_raw(url, index, keyword_raw_requests(index, rows, size))
        else:
            rate = write_vector_raw(uri, collection, vector_raw_requests(rows, size))
    _settle()
    return rate


# --- one lockstep installation and its service process --------------------------------------------


@dataclass(frozen=True)
class Tuning:
    """The ``run.*`` settings the benchmark passes to every service it starts."""

    batch_docs_max: int
    offer_batch_max: int
    mailbox_docs_max: int
    audit_interval_s: float
    prepare_ahead: int = RunSettings().prepare_ahead

    def describe(self) -> str:
        return ", ".join(f"run.{k}={v}" for k, v in self.__dict__.items())


@dataclass(frozen=True)
class Installation:
    """A config file naming a fresh index, collection, ledger and JSONL source."""

    name: str
    base: Path
    port: int

    @property
    def config(self) -> Path:
        return self.base / "lockstep.yaml"

    @property
    def events(self) -> Path:
        return self.base / "events.jsonl"

    @property
    def ledger(self) -> Path:
        return self.base / "ledger.db"

    @property
    def log(self) -> Path:
        return self.base / "service.log"


def install(work: Path, name: str, url: str, uri: str, shards: int, tuning: Tuning) -> Installation:
    """Write the config of a new installation (its own index, collection, ledger, source)."""
    inst = Installation(name, work / name, free_port())
    inst.base.mkdir(parents=True)
    config = {
        "source": {"kind": "jsonl", "path": str(inst.events), "name": "bench"},
        "keyword": {"kind": "opensearch", "url": url, "index": f"stream-{name}"},
        "vector": {"uri": uri, "collection": f"stream_{name}"},
        "ledger": {"kind": "sqlite", "path": str(inst.ledger)},
        "embedder": {"kind": "hashing", "dim": DIM},
        "run": {"shards": shards, "http_port": inst.port, **tuning.__dict__},
    }
    inst.config.write_text(yaml.safe_dump(config), encoding="utf-8")
    return inst


class Service:
    """One ``lockstep run`` subprocess in its own process group, logging to its installation."""

    def __init__(self, inst: Installation, *, exit_when_idle: bool) -> None:
        args = [*LOCKSTEP, "-c", str(inst.config), *(["--exit-when-idle"] if exit_when_idle else [])]
        self.inst = inst
        self.started = time.monotonic()
        with inst.log.open("ab") as log:
            self.process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{inst.port}", timeout=HTTP_TIMEOUT_S)

    def metrics(self) -> dict[str, float] | None:
        """Every sample of /metrics by name and labels, or None while the port is not up."""
        try:
            text = self.http.get("/metrics").text
        except httpx.HTTPError:
            return None
        return {
            _sample_key(s.name, s.labels): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def wait_ready(self) -> float:
        """Wait for /readyz to answer 200 (shards up); returns the seconds since start."""
        deadline = self.started + READY_TIMEOUT_S
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if self.http.get("/readyz").status_code == 200:
                    return time.monotonic() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(METRICS_POLL_S)
        raise RuntimeError(f"the service was not ready within {READY_TIMEOUT_S} s; see {self.inst.log}")

    def wait_exit(self, timeout_s: float) -> int:
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(
                f"the service did not exit within {timeout_s} s; see {self.inst.log}"
            ) from None

    def terminate(self) -> int:
        """SIGTERM (graceful drain), then wait for the exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self.wait_exit(STOP_TIMEOUT_S)

    def kill(self) -> None:
        """SIGKILL this service's own process group (the driver and the Ray processes it started)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def close(self) -> None:
        self.http.close()
        if self.process.poll() is None:
            self.kill()


def _sample_key(name: str, labels: dict[str, str]) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}" if inner else name


APPLIED = _sample_key("lockstep_events_total", {"outcome": "applied"})


@contextmanager
def running(inst: Installation, *, exit_when_idle: bool) -> Iterator[Service]:
    service = Service(inst, exit_when_idle=exit_when_idle)
    try:
        yield service
    finally:
        service.close()


def verify(inst: Installation, docs: Sequence[Doc]) -> list[Violation]:
    """I1-I4 of both indexes of an installation against ``docs``; then drop them (see SETTLE_S)."""
    settings = load_settings(inst.config)
    expected = expected_chunks(docs, settings.chunking.to_domain())
    with runtime(settings) as rt:
        violations = [
            *check_index("keyword", expected, set(), list(rt.keyword.scan())),
            *check_index("vector", expected, set(), list(rt.vector.scan())),
        ]
        rt.keyword.drop()
        rt.vector.drop()
    return violations


# --- sustained throughput ------------------------------------------------------------------------


@dataclass(frozen=True)
class ThroughputRun:
    """One ``lockstep run --exit-when-idle`` over the whole JSONL."""

    shards: int
    events: int
    ready_s: float
    wall_s: float
    steady_s: float
    events_per_s: float
    write_s_mean: dict[str, float]
    violations: list[Violation]
    # Cores per part of the machine over the steady window (see CPU_PARTS); empty if the window
    # held fewer than two snapshots.
    cpu_cores: dict[str, float] = field(default_factory=dict)
    # The slower store alone, measured by the raw client right before this run.
    raw_before: StoreRate | None = None

    def paired_ratio(self) -> float | None:
        """This run's rate over the raw rate measured just before it."""
        if self.raw_before is None:
            return None
        return self.events_per_s / (self.raw_before.rows_per_s / CHUNKS_PER_DOC)


Sample = tuple[float, float]

# The parts of the machine the CPU table names, in its column order.
KEYWORD_STORE = "keyword store"
VECTOR_STORE = "vector store"
SHARD_ACTORS = "shard actors"
WRITER_ACTORS = "index writer actors"
DRIVER = "service driver"
RAY_SYSTEM = "Ray system"
HARNESS = "benchmark harness"
CPU_PARTS = (KEYWORD_STORE, VECTOR_STORE, SHARD_ACTORS, WRITER_ACTORS, DRIVER, RAY_SYSTEM, HARNESS,
             cpu.OTHER, cpu.IDLE)  # fmt: skip


def classifier(stores: dict[int, str], service_pid: int) -> cpu.Classifier:
    """Group processes: the store servers (and their children), the service's session (its
    driver, Ray's processes, the actors), this harness; the rest of the machine is left out."""
    harness = os.getpid()

    def classify(info: cpu.ProcInfo, table: Mapping[int, cpu.ProcInfo]) -> str | None:
        for pid, part in stores.items():
            if cpu.descends_from(info, pid, table):
                return part
        if info.session == service_pid or cpu.descends_from(info, service_pid, table):
            if info.pid == service_pid:
                return DRIVER
            if "ray::ShardActor" in info.cmdline:
                return SHARD_ACTORS
            if "ray::IndexWriterActor" in info.cmdline:
                return WRITER_ACTORS
            return RAY_SYSTEM
        return HARNESS if info.pid == harness else None

    return classify


def window_cores(snapshots: Sequence[tuple[float, cpu.CpuSnapshot]], start: float, end: float) -> dict[str, float]:
    """Cores per part between the first snapshot at or after ``start`` and the last at or before
    ``end`` (times since the service started)."""
    inside = [snap for t, snap in snapshots if start <= t <= end]
    return cpu.cores(inside[0], inside[-1]) if len(inside) >= 2 else {}


def crossing(samples: Sequence[Sample], level: float) -> float:
    """When the applied count first reached ``level``, interpolated between two samples."""
    for (t0, v0), (t1, v1) in itertools.pairwise(samples):
        if v0 < level <= v1:
            return t0 + (t1 - t0) * (level - v0) / (v1 - v0)
    raise ValueError(f"the applied count never crossed {level}")


def steady_window(samples: Sequence[Sample], events: int) -> tuple[float, float]:
    """When STEADY_FROM and STEADY_TO of ``events`` had been applied."""
    return crossing(samples, STEADY_FROM * events), crossing(samples, STEADY_TO * events)


def steady_rate(samples: Sequence[Sample], events: int) -> tuple[float, float]:
    """Events/s between STEADY_FROM and STEADY_TO of ``events`` applied, and that window's length."""
    start, end = steady_window(samples, events)
    return (STEADY_TO - STEADY_FROM) * events / (end - start), end - start


def scrape_until_exit(
    service: Service, classify: cpu.Classifier
) -> tuple[list[Sample], list[tuple[float, cpu.CpuSnapshot]], dict[str, float], int]:
    """Scrape /metrics until the process exits: the applied counts, a CPU snapshot per scrape,
    the last scrape, the exit status."""
    samples: list[Sample] = [(0.0, 0.0)]
    snapshots: list[tuple[float, cpu.CpuSnapshot]] = []
    last: dict[str, float] = {}
    deadline = service.started + RUN_TIMEOUT_S
    while service.process.poll() is None:
        if time.monotonic() > deadline:
            service.kill()
            raise RuntimeError(f"the run took longer than {RUN_TIMEOUT_S} s; see {service.inst.log}")
        metrics = service.metrics()
        if metrics is not None and APPLIED in metrics:
            samples.append((time.monotonic() - service.started, metrics[APPLIED]))
            last = metrics
        snap = cpu.snapshot(classify)
        snapshots.append((snap.at - service.started, snap))
        time.sleep(METRICS_POLL_S)
    return samples, snapshots, last, service.wait_exit(STOP_TIMEOUT_S)


def writes_made(metrics: dict[str, float]) -> dict[str, int]:
    """Batch writes per index, as the shards count them."""
    return {
        side: int(metrics.get(_sample_key("lockstep_index_apply_writes_total", {"index": side}), 0.0))
        for side in ("keyword", "vector")
    }


def write_s_mean(metrics: dict[str, float]) -> dict[str, float]:
    """Mean seconds per batch write per index, as the shards time it (queueing at the writer included)."""
    out = {}
    for side, writes in writes_made(metrics).items():
        seconds = metrics.get(_sample_key("lockstep_index_apply_seconds_total", {"index": side}), 0.0)
        out[side] = seconds / writes if writes else 0.0
    return out


def measure_throughput(work: Path, servers: tuple[str, str], docs: Sequence[Doc], shards: int,
                       tuning: Tuning, stores: dict[int, str]) -> ThroughputRun:  # fmt: skip
    """``lockstep run --exit-when-idle`` on all ``docs``; the steady-state applied rate and the
    cores each part of the machine used meanwhile (``stores``: server pid -> part)."""
    inst = install(work, f"s{shards}", *servers, shards, tuning)
    write_events(inst.events, docs)
    _say(f"lockstep run, {shards} shard(s), {len(docs)} events")
    with running(inst, exit_when_idle=True) as service:
        samples, snapshots, last, status = scrape_until_exit(service, classifier(stores, service.process.pid))
        wall_s = time.monotonic() - service.started
    if status != 0:
        raise RuntimeError(f"lockstep run exited with {status}; see {inst.log}")
    first = next(t for t, v in samples if v > 0)
    rate, steady_s = steady_rate(samples, len(docs))
    cores = window_cores(snapshots, *steady_window(samples, len(docs)))
    _say(f"{shards} shard(s): {rate:.1f} events/s over {steady_s:.1f} s; verifying both indexes")
    violations = verify(inst, docs)
    _settle()
    return ThroughputRun(shards, len(docs), first, wall_s, steady_s, rate, write_s_mean(last), violations, cores)


# --- freshness lag ------------------------------------------------------------------------------


@dataclass
class LagLog:
    """Append and commit times per document, shared by the appender and the ledger poller."""

    appended: dict[str, float] = field(default_factory=dict)
    committed: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def uncommitted(self) -> list[str]:
        with self.lock:
            return [d for d in self.appended if d not in self.committed]

    def lags_s(self) -> list[float]:
        return sorted(self.committed[d] - self.appended[d] for d in self.committed)

    def timeline(self) -> list[tuple[float, float]]:
        """(seconds from the first append, lag) of every committed event, in append order."""
        if not self.appended:
            return []
        first = min(self.appended.values())
        return sorted((self.appended[d] - first, self.committed[d] - self.appended[d]) for d in self.committed)


@dataclass(frozen=True)
class FreshnessRun:
    shards: int
    target_per_s: float
    appended: int
    append_s: float
    lags_s: list[float]
    service_p50_le_s: float
    service_p99_le_s: float
    violations: list[Violation]
    # (seconds from the first append, lag) per event: where in the run the slow ones were.
    timeline: list[tuple[float, float]] = field(default_factory=list)
    # Per index: batch writes made, and their mean duration as the shards time it.
    writes: dict[str, int] = field(default_factory=dict)
    write_s_mean: dict[str, float] = field(default_factory=dict)

    def percentile_s(self, q: float) -> float:
        return _percentile(self.lags_s, q)

    def windows(self, width_s: float = LAG_WINDOW_S) -> list[tuple[float, list[float]]]:
        """The lags of the events appended in each ``width_s`` window (start, sorted lags)."""
        out: dict[int, list[float]] = {}
        for at, lag in self.timeline:
            out.setdefault(int(at // width_s), []).append(lag)
        return [(k * width_s, sorted(v)) for k, v in sorted(out.items())]


def _percentile(ordered: Sequence[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def append_paced(path: Path, docs: Sequence[Doc], rate_per_s: float, log: LagLog) -> float:
    """Append one line per document at ``rate_per_s``, flushing every APPEND_TICK_S; returns the duration."""
    started = time.monotonic()
    written = 0
    with path.open("a", encoding="utf-8") as out:
        while written < len(docs):
            due = min(len(docs), int((time.monotonic() - started) * rate_per_s) + 1)
            batch = docs[written:due]
            out.writelines(event_line(d) for d in batch)
            out.flush()
            now = time.monotonic()
            with log.lock:
                log.appended.update((d.doc_id, now) for d in batch)
            written = due
            time.sleep(APPEND_TICK_S)
    return time.monotonic() - started


def poll_commits(ledger_path: Path, log: LagLog, stop: threading.Event) -> None:
    """Record when each appended document's version first shows as committed in the ledger."""
    ledger = SqliteLedger(ledger_path)
    try:
        while not stop.wait(LEDGER_POLL_S):
            pending = log.uncommitted()
            if not pending:
                continue
            states = ledger.get_docs(pending)
            now = time.monotonic()
            with log.lock:
                log.committed.update((d, now) for d in states if states[d].version >= 1)
    finally:
        ledger.close()


def wait_all_committed(log: LagLog, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while log.uncommitted():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(log.uncommitted())} events not committed within {timeout_s} s")
        time.sleep(LEDGER_POLL_S)


def histogram_quantile_le(metrics: dict[str, float], name: str, q: float) -> float:
    """The upper bound of the histogram bucket holding quantile ``q`` (inf if beyond the last)."""
    pattern = re.compile(rf'^{name}_bucket\{{le="([^"]+)"\}}$')
    buckets = sorted((float(m.group(1)), v) for k, v in metrics.items() if (m := pattern.match(k)))
    total = buckets[-1][1]
    return next(le for le, count in buckets if count >= q * total)


def measure_freshness(work: Path, servers: tuple[str, str], docs: Sequence[Doc], shards: int,
                      rate_per_s: float, tuning: Tuning) -> FreshnessRun:  # fmt: skip
    """The service in follow mode, fed at ``rate_per_s``; per-event lag from append to commit."""
    inst = install(work, "fresh", *servers, shards, tuning)
    inst.events.touch()
    log, stop = LagLog(), threading.Event()
    _say(f"freshness: {shards} shard(s), {len(docs)} events appended at {rate_per_s:.1f}/s")
    with running(inst, exit_when_idle=False) as service:
        service.wait_ready()
        poller = threading.Thread(target=poll_commits, args=(inst.ledger, log, stop), daemon=True)
        poller.start()
        try:
            append_s = append_paced(inst.events, docs, rate_per_s, log)
            wait_all_committed(log, DRAIN_TIMEOUT_S)
        finally:
            stop.set()
            poller.join()
        metrics = service.metrics() or {}
        status = service.terminate()
    if status != 0:
        raise RuntimeError(f"lockstep run exited with {status} after SIGTERM; see {inst.log}")
    lag = "lockstep_freshness_lag_seconds"
    violations = verify(inst, docs)
    return FreshnessRun(
        shards, rate_per_s, len(docs), append_s, log.lags_s(),
        histogram_quantile_le(metrics, lag, 0.5), histogram_quantile_le(metrics, lag, 0.99), violations,
        log.timeline(), writes_made(metrics), write_s_mean(metrics),
    )  # fmt: skip


@dataclass(frozen=True)
class StoreLatency:
    """The raw client's requests to one store alone, paced as lockstep's writes were."""

    store: str
    rows_per_request: int
    requests_per_s: float
    seconds: list[float]  # each request's duration, in the order sent

    def percentile_s(self, q: float) -> float:
        return _percentile(sorted(self.seconds), q)

    def slow(self, over_s: float) -> list[tuple[int, float]]:
        """(request number, seconds) of the requests that took longer than ``over_s``."""
        return [(i, t) for i, t in enumerate(self.seconds) if t > over_s]


def keyword_latency_raw(url: str, uri: str, rows: Sequence[ChunkRow], rows_per_request: int, requests: int,
                        requests_per_s: float) -> StoreLatency:  # fmt: skip
    """The keyword store alone, on a fresh index, fed the requests lockstep's freshness run sent
    (as many, as large, as often): how long each takes. A store that stalls its writes now and
    then (osmem-server merges small runs inside the write request that triggers it) delays
    every event behind the stall, whoever writes."""
    take = rows[: rows_per_request * requests]
    _say(f"raw keyword latency: {requests} requests of {rows_per_request} rows at {requests_per_s:.1f}/s")
    with fresh_stores(url, uri, "lat") as (index, _):
        bodies = keyword_raw_requests(index, take, rows_per_request)
        client = _raw_keyword_client(url)
        seconds: list[float] = []
        started = time.monotonic()
        for i, body in enumerate(bodies):
            time.sleep(max(0.0, started + i / requests_per_s - time.monotonic()))
            sent = time.monotonic()
            _bulk_ok(client, body)
            seconds.append(time.monotonic() - sent)
        client.close()
    _settle()
    return StoreLatency(KEYWORD_RAW, rows_per_request, requests_per_s, seconds)


# --- the report ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Results:
    events: int
    seed: int
    tuning: Tuning
    ceiling: Ceiling
    runs: list[ThroughputRun]
    freshness: FreshnessRun
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    # The keyword store alone, fed as the freshness run fed it (None if it made no write).
    keyword_latency: StoreLatency | None = None

    @property
    def best(self) -> ThroughputRun:
        return max(self.runs, key=lambda r: r.events_per_s)


def report(r: Results, stores: str) -> str:
    """Everything measured, as Markdown."""
    c, f = r.ceiling, r.freshness
    ratio = r.best.events_per_s / c.events_per_s
    p99 = f.percentile_s(0.99)
    return "\n".join([
        f"### Streaming service vs raw-client ceiling (seed {r.seed})",
        "",
        machine(),
        f"- load average (1/5/15 min) before: {_load(r.load_before)}; after: {_load(r.load_after)}",
        f"- stores: {stores}",
        f"- workload: {r.events} upsert events of new documents, {CHUNKS_PER_DOC} chunks each "
        f"({CHUNKS_PER_DOC * r.events} chunk rows, ~{PARA_CHARS} characters each), hashing embedder ({DIM} dims)",
        f"- service settings: {r.tuning.describe()}",
        "",
        "| measurement | rows/s | events/s | ratio to ceiling |",
        "|---|--:|--:|--:|",
        *_ceiling_rows(c, r.runs),
        *(_run_row(run, c) for run in r.runs),
        "",
        *_cpu_table(r.runs),
        f"| freshness run ({f.shards} shard(s), {f.target_per_s:.0f} events/s = {FRESHNESS_LOAD:.0%} of the best "
        f"rate, {f.appended} events over {f.append_s:.1f} s) | value |",
        "|---|--:|",
        f"| lag append → committed, p50 | {f.percentile_s(0.5):.3f} s |",
        f"| lag append → committed, p99 | {p99:.3f} s |",
        f"| lag append → committed, max | {f.lags_s[-1]:.3f} s |",
        f"| service histogram (read → commit): p50 / p99 bucket | ≤ {f.service_p50_le_s} s / ≤ {f.service_p99_le_s} s |",
        *(f"| {side} batch writes: count, mean events per write, mean duration | {n}, "
          f"{f.appended / n:.0f}, {f.write_s_mean.get(side, 0.0):.3f} s |" for side, n in f.writes.items() if n),
        "",
        *_lag_windows(f),
        *_store_latency(r.keyword_latency),
        f"- best sustained rate / ceiling (the median of {len(c.slower_rates)} raw measurements): "
        f"{r.best.events_per_s:.1f} / {c.events_per_s:.1f} = **{ratio:.3f}** "
        f"({_verdict(ratio >= RATIO_GOAL, f'goal ≥ {RATIO_GOAL} met', 'goal NOT met')})",
        f"- freshness p99 at half of max throughput: **{p99:.2f} s** "
        f"({_verdict(p99 <= LAG_P99_GOAL_S, f'goal ≤ {LAG_P99_GOAL_S:.0f} s met', 'goal NOT met')})",
        *(f"- after {run.shards} shard(s): {_check(run.violations)}" for run in r.runs),
        f"- after the freshness run: {_check(f.violations)}",
    ])  # fmt: skip


def _store_latency(k: StoreLatency | None) -> list[str]:
    """The keyword store's own request durations under the freshness run's write pattern."""
    if k is None:
        return []
    slow = k.slow(STALL_S)
    return [
        f"The keyword store alone, fed as the freshness run fed it ({len(k.seconds)} raw `_bulk` requests of "
        f"{k.rows_per_request} rows at {k.requests_per_s:.1f}/s, fresh index):",
        "",
        "| raw request duration | p50 | p99 | max | requests over " + f"{STALL_S:.1f} s |",
        "|---|--:|--:|--:|--:|",
        f"| {k.store} | {k.percentile_s(0.5):.3f} s | {k.percentile_s(0.99):.3f} s | {max(k.seconds):.3f} s "
        f"| {len(slow)}{': ' + ', '.join(f'#{i} {t:.2f} s' for i, t in slow[:8]) if slow else ''} |",
        "",
    ]


def _lag_windows(f: FreshnessRun) -> list[str]:
    """Lag by when the events were appended: a slow start reads differently from a stall."""
    windows = f.windows()
    if len(windows) < 2:
        return []
    return [
        f"Lag of the events appended in each {LAG_WINDOW_S:.0f} s window of the freshness run:",
        "",
        "| appended from | events | p50 | p99 | max |",
        "|--:|--:|--:|--:|--:|",
        *(f"| {start:.0f} s | {len(lags)} | {_percentile(lags, 0.5):.3f} s | {_percentile(lags, 0.99):.3f} s "
          f"| {lags[-1]:.3f} s |" for start, lags in windows),
        "",
    ]  # fmt: skip


def _ceiling_rows(c: Ceiling, runs: Sequence[ThroughputRun]) -> list[str]:
    size = f"{c.rows_per_request} rows per request"
    median = c.events_per_s * CHUNKS_PER_DOC
    return [
        f"| raw {c.keyword.store} alone, {size} | {c.keyword.rows_per_s:.0f} | "
        f"{c.keyword.rows_per_s / CHUNKS_PER_DOC:.1f} | |",
        f"| raw {c.vector.store} alone, {size} | {c.vector.rows_per_s:.0f} | "
        f"{c.vector.rows_per_s / CHUNKS_PER_DOC:.1f} | |",
        *(f"| raw {r.store} alone again, right before the {run.shards}-shard run | {r.rows_per_s:.0f} | "
          f"{r.rows_per_s / CHUNKS_PER_DOC:.1f} | |" for run in runs if (r := run.raw_before) is not None),
        f"| **ceiling: median of the {len(c.slower_rates)} measurements of the slower store alone "
        f"({c.slower.store})** | {median:.0f} | **{c.events_per_s:.1f}** | 1.00 |",
        f"| raw, both stores at once (keyword {c.both_keyword.rows_per_s:.0f} rows/s, vector "
        f"{c.both_vector.rows_per_s:.0f} rows/s): the slower | "
        f"{c.both_events_per_s * CHUNKS_PER_DOC:.0f} | {c.both_events_per_s:.1f} | "
        f"{c.both_events_per_s / c.events_per_s:.2f} |",
    ]


def _run_row(run: ThroughputRun, c: Ceiling) -> str:
    label = (f"lockstep run, {run.shards} shard(s): steady {STEADY_FROM:.0%} to {STEADY_TO:.0%} of events "
             f"({run.steady_s:.1f} s; first commit at {run.ready_s:.1f} s, exit at {run.wall_s:.1f} s; "
             f"mean batch write keyword {run.write_s_mean['keyword']:.2f} s, "
             f"vector {run.write_s_mean['vector']:.2f} s)")  # fmt: skip
    paired = run.paired_ratio()
    if paired is not None:
        label += f"; {paired:.2f} of the raw rate measured just before it"
    rate = run.events_per_s
    return f"| {label} | {rate * CHUNKS_PER_DOC:.0f} | {rate:.1f} | {rate / c.events_per_s:.2f} |"


def _cpu_table(runs: Sequence[ThroughputRun]) -> list[str]:
    """Cores each part used in each run's steady window; nothing if no run has the figures."""
    measured = [run for run in runs if run.cpu_cores]
    if not measured:
        return []
    return [
        f"Cores used in each run's steady window, of {os.cpu_count()} (`bench/cpu.py`; {cpu.OTHER}: "
        "everything else that ran; a process that ended inside the window is not counted):",
        "",
        f"| run | {' | '.join(CPU_PARTS)} |",
        f"|---|{'--:|' * len(CPU_PARTS)}",
        *(_cpu_row(run) for run in measured),
        "",
    ]


def _cpu_row(run: ThroughputRun) -> str:
    return f"| {run.shards} shard(s) | " + " | ".join(f"{run.cpu_cores.get(p, 0.0):.2f}" for p in CPU_PARTS) + " |"


def _load(load: tuple[float, float, float]) -> str:
    return " / ".join(f"{x:.2f}" for x in load)


def _verdict(ok: bool, yes: str, no: str) -> str:
    return yes if ok else no


def _check(violations: list[Violation]) -> str:
    if not violations:
        return "both indexes equal the source (I1-I4 hold on every chunk)"
    shown = "; ".join(str(v) for v in violations[:VIOLATIONS_SHOWN_MAX])
    return f"**{len(violations)} violations**: {shown}"


def write_docs(path: Path, command: str, markdown: str) -> None:
    write_results(path, command, markdown, section=DOCS_SECTION, begin=RESULTS_BEGIN, end=RESULTS_END)


def _say(message: str) -> None:
    print(f"-- {message}", file=sys.stderr, flush=True)


def _settle() -> None:
    time.sleep(SETTLE_S)


# --- entry point ---------------------------------------------------------------------------------


def run_all(work: Path, args: argparse.Namespace, tuning: Tuning) -> tuple[Results, str]:
    """Start both servers; ceiling, throughput per shard count, freshness; stop the servers."""
    load_before = os.getloadavg()
    docs = make_docs(args.events, args.seed)
    rows = chunk_rows(docs, ChunkingSettings())
    _say("starting the OpenSearch-API server and Milvus 2.3.5")
    (work / "milvus").mkdir(parents=True)
    with (
        OpenSearchApiServer(log_path=work / "osmem.log") as search,
        RealMilvusServer(work / "milvus") as milvus,
    ):
        stores = "OpenSearch-API server (osmem-server) + Milvus 2.3.5 server, SQLite ledger"
        servers = (search.url, milvus.uri)
        ceiling = measure_ceiling(search.url, milvus.uri, rows, tuning.batch_docs_max * CHUNKS_PER_DOC)
        server_pids = {_pid(search): KEYWORD_STORE, _pid(milvus): VECTOR_STORE}
        runs = []
        for n in args.shards:
            raw_before = measure_slower_again(search.url, milvus.uri, rows, ceiling)
            run = measure_throughput(work, servers, docs, n, tuning, server_pids)
            runs.append(replace(run, raw_before=raw_before))
        ceiling = replace(ceiling, again=tuple(r.raw_before for r in runs if r.raw_before is not None))
        best = max(runs, key=lambda r: r.events_per_s)
        rate = FRESHNESS_LOAD * best.events_per_s
        fresh_docs = make_docs(max(1, round(rate * args.freshness_s)), args.seed + 1)
        freshness = measure_freshness(work, servers, fresh_docs, best.shards, rate, tuning)
        keyword_latency = None
        if (writes := freshness.writes.get("keyword", 0)) > 0:
            size = max(1, round(CHUNKS_PER_DOC * freshness.appended / writes))
            fresh_rows = chunk_rows(fresh_docs, ChunkingSettings())  # the very rows it wrote
            keyword_latency = keyword_latency_raw(
                search.url, milvus.uri, fresh_rows, size, min(writes, len(fresh_rows) // size),
                writes / freshness.append_s,
            )
    results = Results(
        args.events, args.seed, tuning, ceiling, runs, freshness, load_before, os.getloadavg(), keyword_latency
    )
    return results, stores


def _pid(server: OpenSearchApiServer | RealMilvusServer) -> int:
    pid = server.pid
    assert pid is not None, "the server runs while the benchmark does"
    return pid


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = RunSettings()
    parser = argparse.ArgumentParser(prog="python -m bench.streaming", description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=DEFAULT_EVENTS, help="events per throughput run")
    parser.add_argument("--shards", type=_ints, default=DEFAULT_SHARDS, help="shard counts, e.g. 1,2,4")
    parser.add_argument("--freshness-s", type=float, default=DEFAULT_FRESHNESS_S,
                        help="how long events are appended in the freshness run")  # fmt: skip
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="corpus seed")
    parser.add_argument("--batch-docs-max", type=int, default=defaults.batch_docs_max)
    parser.add_argument("--offer-batch-max", type=int, default=defaults.offer_batch_max)
    parser.add_argument("--mailbox-docs-max", type=int, default=defaults.mailbox_docs_max)
    parser.add_argument("--prepare-ahead", type=int, default=defaults.prepare_ahead,
                        help="full batches a shard prepares while one is written (0: none)")  # fmt: skip
    parser.add_argument("--audit-interval-s", type=float, default=0.0,
                        help="continuous audit in the service (0: off, as bench/audit.py measures it)")  # fmt: skip
    parser.add_argument("--docs-file", type=Path, default=Path("docs/benchmarks.md"),
                        help="the results go between this file's bench.streaming markers")  # fmt: skip
    parser.add_argument("--no-docs-file", action="store_true", help="print only")
    return parser.parse_args(argv)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def main(argv: Sequence[str] | None = None) -> int:
    """Run everything; print the Markdown report; exit 1 if an index disagrees with the source."""
    args = parse_args(argv)
    configure_logging("warning")
    tuning = Tuning(
        args.batch_docs_max, args.offer_batch_max, args.mailbox_docs_max, args.audit_interval_s, args.prepare_ahead
    )
    with tempfile.TemporaryDirectory(prefix="lockstep-bench-streaming-") as tmp:
        results, stores = run_all(Path(tmp), args, tuning)
    markdown = report(results, stores)
    print(markdown, flush=True)
    if not args.no_docs_file:
        command = "python -m bench.streaming " + " ".join(argv if argv is not None else sys.argv[1:])
        write_docs(args.docs_file, command.strip(), markdown)
    runs_ok = all(not r.violations for r in results.runs)
    return 0 if runs_ok and not results.freshness.violations else 1

