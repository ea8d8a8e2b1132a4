"""The server tier: schedules over real server processes behind fault proxies.

lockstep -> HttpFaultProxy -> TcpFaultProxy -> an OpenSearch/Elasticsearch server, and
lockstep -> TcpFaultProxy -> a Milvus server. The servers are either

- *managed* (``ServerTier(workdir)``, ``lockstep chaos run --servers managed``): the tier starts
  its own OpenSearch-API server (in memory) and a ``milvus-lite server`` (or Milvus 2.3.5), so every
  server kind runs, process faults included; or
- *a deployment's* (``ServerTier(workdir, deployment=settings)``, ``lockstep chaos run -c FILE``):
  the proxies sit in front of the OpenSearch/Elasticsearch URL and the Milvus server URI the config
  names. Only network kinds run there (the suite does not kill or pause servers it does not own;
  ``refusal`` says why a kind cannot run). A side the config keeps embedded (Tantivy, a
  milvus-lite file) runs in the work directory, without a proxy.

Each schedule gets its own OpenSearch index ``<index>-chaos-<namespace>``, created with
``index.gc_deletes=0s`` so that a delete's tombstone is forgotten at once (a late older upsert then
passes the index's own version check and only lockstep's ledger can stop it), and its own Milvus
collection ``<collection>_chaos_<namespace>``; both are dropped after the schedule's checks, so a
deployment's real index is never touched.

Process faults (managed only): ``vector_server_kill9`` (SIGKILL + restart of the Milvus server on
the same data directory), ``keyword_server_data_loss`` (SIGKILL + restart of the in-memory
OpenSearch-API server: every index is gone; the schedule then runs the reconciler, which must
rebuild the keyword side without a single embed call), ``store_pause`` (SIGSTOP a store for
``PAUSE_S``, then SIGCONT). Both process kills are followed by a reconcile at quiescence, as the
runbook says (``lockstep reconcile``).

``ServerTierSetup`` builds one tier in each worker process of ``run_schedules`` (its own proxies
and, when managed, its own servers, so a kill -9 in one worker never hits another's schedule).
"""

from __future__ import annotations

import base64
import json
import random
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.util import Finalize
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from adapters.keyword._search_engine import INDEX_MAPPINGS, SearchEngineIndex
from adapters.keyword.elasticsearch import ElasticsearchKeywordIndex
from adapters.keyword.opensearch import OpenSearchKeywordIndex
from adapters.keyword.settings import KeywordSettings
from adapters.keyword.tantivy_index import TantivyKeywordIndex
from adapters.vector.milvus import MilvusVectorIndex
from adapters.vector.settings import VectorSettings
from chaos.net import HTTP_KINDS, TCP_KINDS, HttpFaultProxy, TcpFaultProxy
from chaos.rig import EMBED_DIM, Rig
from chaos.runner import ScheduleResult, ScheduleRunner, ScheduleSpec, run_schedule
from chaos.servers import MilvusLiteServer, OpenSearchApiServer, RealMilvusServer
from coordinator.audit import Auditor
from coordinator.errors import StoreError
from coordinator.invariants import Violation
from coordinator.reconcile import RateLimiter, Reconciler
from lockstep.bootstrap import build_vector
from lockstep.settings import Settings

# Client timeouts on managed servers: short, so black holes and pauses cost seconds, not minutes.
# (A deployment's schedules keep the timeouts its config sets.)
KEYWORD_TIMEOUT_S = 2.0
VECTOR_TIMEOUT_S = 3.0
# Milvus 2.3.5 loads a collection in seconds and serves again only after its session TTL.
REAL_MILVUS_TIMEOUT_S = 30.0
# How long a paused store stays stopped (wall seconds).
PAUSE_S = 1.5
# The reconciler's pace in the chaos tier: as fast as the stores go.
RECONCILE_OPS_PER_S = 1e6
# Proxied blocks slowed per latency / bandwidth arming.
SHAPED_BLOCKS = 40
# Tombstones forgotten at once: every late upsert after a delete is "after the window".
GC_DELETES = "0s"
HTTP_TIMEOUT_S = 10.0
# After a kill -9, how long (wall) the vector server may take to serve reads again (Milvus 2.3.5
# reloads a collection only after the dead session expired, MILVUS_SESSION_TTL_S, plus loading).
VECTOR_READS_BACK_S = 90.0
READS_POLL_S = 1.0
# Index and collection names on managed servers: <index>-chaos-<namespace>, <collection>_chaos_<namespace>.
MANAGED_NAME = "lockstep"
# Default ports of URLs that name none.
HTTP_PORT_DEFAULT = 80
MILVUS_PORT_DEFAULT = 19530
# Worker-exit finalizers run in decreasing priority; the tier has no ordering needs of its own.
FINALIZE_PRIORITY = 10

SHAPED_KINDS = ("net_latency", "net_bandwidth")
PROCESS_KINDS = ("vector_server_kill9", "keyword_server_data_loss", "store_pause")
# Kinds that need an OpenSearch/Elasticsearch keyword index (behind the HTTP proxy).
SEARCH_ENGINE_KINDS = (*HTTP_KINDS, "late_upsert_after_tombstone_gc")
SEARCH_ENGINE_KINDS_OF_CONFIG = ("opensearch", "elasticsearch")


def _no_sleep(_s: float) -> None:
    return None


def _made(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def create_index_with_gc(
    url: str, index: str, gc_deletes: str = GC_DELETES, *, headers: dict[str, str] | None = None
) -> None:
    """Create ``index`` with lockstep's mapping and a short tombstone window (a schedule's index)."""
    body = json.dumps(
        {"settings": {"index": {"gc_deletes": gc_deletes}}, "mappings": INDEX_MAPPINGS}
    ).encode()
    request = urllib.request.Request(
        f"{url.rstrip('/')}/{index}",
        data=body,
        method="PUT",
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as reply:
        reply.read()


def auth_headers(settings: KeywordSettings) -> dict[str, str]:
    """The Authorization header the keyword clients would send for ``settings`` (none without auth)."""
    if settings.api_key is not None:
        return {"Authorization": f"ApiKey {settings.api_key.get_secret_value()}"}
    if settings.username is not None and settings.password is not None:
        pair = f"{settings.username}:{settings.password.get_secret_value()}".encode()
        return {"Authorization": f"Basic {base64.b64encode(pair).decode()}"}
    return {}


def keyword_server(settings: Settings) -> KeywordSettings | None:
    """The config's keyword server, or None when its keyword index is embedded (Tantivy)."""
    return settings.keyword if settings.keyword.kind in SEARCH_ENGINE_KINDS_OF_CONFIG else None


def vector_server(settings: Settings) -> VectorSettings | None:
    """The config's Milvus server, or None when its vector index is a milvus-lite file."""
    return None if settings.vector.is_embedded else settings.vector


def refusal(kinds: Sequence[str], deployment: Settings) -> str | None:
    """Why ``kinds`` cannot run against the servers ``deployment`` names (None: they can)."""
    process = [k for k in kinds if k in PROCESS_KINDS]
    if process:
        return (
            f"process faults ({', '.join(process)}) kill, wipe or pause a server: they run only on "
            "servers the suite starts itself (--servers managed, without -c)"
        )
    keyword, vector = keyword_server(deployment), vector_server(deployment)
    search = [k for k in kinds if k in SEARCH_ENGINE_KINDS]
    if search and keyword is None:
        return f"an opensearch or elasticsearch keyword index in the config is needed by {', '.join(search)}"
    network = [k for k in kinds if k in TCP_KINDS]
    if network and keyword is None and vector is None:
        return f"a keyword or vector server in the config is needed by {', '.join(network)} (it names only embedded stores)"
    if (search or network) and _tls(keyword, vector):
        return (
            "the fault proxies speak plain HTTP/TCP and cannot sit in front of a TLS endpoint; point -c "
            "at a plain-http test deployment or use --servers managed"
        )
    return None


def _tls(keyword: KeywordSettings | None, vector: VectorSettings | None) -> bool:
    keyword_tls = keyword is not None and (keyword.url or "").startswith("https:")
    return keyword_tls or (vector is not None and vector.uses_tls)


def _host_port(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None, "validated by the settings models"
    return parts.hostname, parts.port or default_port


def _search_engine_index(settings: KeywordSettings) -> SearchEngineIndex:
    """The adapter of ``settings.kind``, retrying without sleeping (the schedule's clock is simulated)."""
    if settings.kind == "elasticsearch":
        return ElasticsearchKeywordIndex(settings, sleep=_no_sleep)
    return OpenSearchKeywordIndex(settings, sleep=_no_sleep)


@dataclass
class ServerStores:
    """One schedule's index and collection on the tier's servers; ``injected`` is set by ``close``."""

    tier: ServerTier
    keyword: SearchEngineIndex | TantivyKeywordIndex
    vector: MilvusVectorIndex
    injected: Counter[str] = field(default_factory=Counter)
    details: dict[str, Any] = field(default_factory=dict)

    def close(self) -> None:
        """Heal every proxy, take the schedule's own injection report, drop its index and collection."""
        self.tier.heal()
        self.injected = self.tier.injected_total() - self.tier.baseline
        self.details["injected_by_proxy"] = self.tier.injected_by_proxy()
        try:
            self.keyword.drop()
            self.keyword.close()
        finally:
            self.vector.drop()
            self.vector.close()


class ServerTier:
    """The servers and proxies shared by the server-tier schedules of one process."""

    def __init__(
        self, workdir: Path, seed: int = 0, *, real_milvus: bool = False, deployment: Settings | None = None
    ) -> None:
        self.workdir = workdir
        self.seed = seed
        self.deployment = deployment
        self.opensearch: OpenSearchApiServer | None = None
        self.milvus: MilvusLiteServer | RealMilvusServer | None = None
        if deployment is None:
            self.opensearch = OpenSearchApiServer(log_path=workdir / "osmem.log")
            self.milvus = (
                RealMilvusServer(_made(workdir / "milvus-2.3.5"))
                if real_milvus
                else MilvusLiteServer(workdir / "milvus-data")
            )
        self.vector_timeout_s = REAL_MILVUS_TIMEOUT_S if real_milvus else VECTOR_TIMEOUT_S
        self.os_tcp: TcpFaultProxy | None = None
        self.os_http: HttpFaultProxy | None = None
        self.milvus_tcp: TcpFaultProxy | None = None
        self.keyword_base: KeywordSettings | None = None
        self.vector_base: VectorSettings | None = None
        self.injected: Counter[str] = Counter()
        self.baseline: Counter[str] = Counter()
        self._proxy_baseline: dict[str, Counter[str]] = {}
        self.needs_reconcile = False
        self.reconciled: list[dict[str, Any]] = []
        self._index = ""

    def __enter__(self) -> ServerTier:
        try:
            for server in self._managed_servers():
                server.start()
            self._start_proxies()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop the proxies; kill the managed servers (their data is the tier's, thrown away with
        it: a graceful stop would only make Milvus 2.3.5 flush for 10 s)."""
        for proxy in self._proxies():
            proxy.stop()
        for server in reversed(self._managed_servers()):
            if server.pid is not None:
                server.kill9()

    def _start_proxies(self) -> None:
        self.keyword_base = self._keyword_server()
        self.vector_base = self._vector_server()
        if self.keyword_base is not None:
            assert self.keyword_base.url is not None, "a search-engine keyword index has a url"
            host, port = _host_port(self.keyword_base.url, HTTP_PORT_DEFAULT)
            self.os_tcp = TcpFaultProxy(host, port, seed=self.seed).start()
            netloc = urlsplit(self.keyword_base.url).netloc
            self.os_http = HttpFaultProxy(
                "127.0.0.1", self.os_tcp.port, seed=self.seed, host_header=netloc
            ).start()
        if self.vector_base is not None:
            host, port = _host_port(self.vector_base.uri, MILVUS_PORT_DEFAULT)
            self.milvus_tcp = TcpFaultProxy(host, port, seed=self.seed + 1).start()

    def _keyword_server(self) -> KeywordSettings | None:
        if self.opensearch is not None:
            return KeywordSettings(
                kind="opensearch",
                url=self.opensearch.url,
                index=MANAGED_NAME,
                request_timeout_s=KEYWORD_TIMEOUT_S,
            )
        assert self.deployment is not None, "a tier has managed servers or a deployment"
        return keyword_server(self.deployment)

    def _vector_server(self) -> VectorSettings | None:
        if self.milvus is not None:
            return VectorSettings(
                uri=self.milvus.uri, collection=MANAGED_NAME, request_timeout_s=self.vector_timeout_s
            )
        assert self.deployment is not None, "a tier has managed servers or a deployment"
        return vector_server(self.deployment)

    def _managed_servers(self) -> list[OpenSearchApiServer | MilvusLiteServer | RealMilvusServer]:
        return [s for s in (self.opensearch, self.milvus) if s is not None]

    def _proxies(self) -> list[TcpFaultProxy | HttpFaultProxy]:
        return [p for p in (self.os_http, self.os_tcp, self.milvus_tcp) if p is not None]

    def _tcp_proxies(self) -> list[TcpFaultProxy]:
        return [p for p in (self.os_tcp, self.milvus_tcp) if p is not None]

    def injected_total(self) -> Counter[str]:
        total = Counter(self.injected)
        for proxy in self._proxies():
            total.update(proxy.injected)
        return total

    def _proxy_counts(self) -> dict[str, Counter[str]]:
        named = {"keyword_http": self.os_http, "keyword_tcp": self.os_tcp, "vector_tcp": self.milvus_tcp}
        return {name: Counter(proxy.injected) for name, proxy in named.items() if proxy is not None}

    def injected_by_proxy(self) -> dict[str, dict[str, int]]:
        """What each proxy injected since the schedule opened: which side a network fault hit."""
        now = self._proxy_counts()
        spent = {name: now[name] - self._proxy_baseline.get(name, Counter()) for name in now}
        return {name: dict(sorted(counts.items())) for name, counts in spent.items() if counts}

    # --- one schedule ------------------------------------------------------------------------

    def open(self, workdir: Path, namespace: str) -> ServerStores:
        """A schedule's own index and collection on the servers, reached through the proxies."""
        self.baseline = self.injected_total()
        self._proxy_baseline = self._proxy_counts()
        self.needs_reconcile = False
        for i, proxy in enumerate(self._proxies()):
            # Jitter and the choice of failed _bulk items follow the schedule, not the worker's past.
            proxy.rng.seed(f"{namespace}/{i}")
        keyword = self._open_keyword(workdir, namespace)
        try:
            vector = self._open_vector(workdir, namespace)
        except BaseException:
            keyword.drop()
            keyword.close()
            raise
        return ServerStores(self, keyword, vector)

    def _open_keyword(self, workdir: Path, namespace: str) -> SearchEngineIndex | TantivyKeywordIndex:
        if self.keyword_base is None or self.os_http is None:
            tantivy = TantivyKeywordIndex(str(workdir / f"{namespace}.tantivy"), "kw")
            tantivy.ensure()
            return tantivy
        self._index = f"{self.keyword_base.index}-chaos-{namespace}"
        self._create_index()
        assert self.keyword_base.url is not None, "a search-engine keyword index has a url"
        # A URL with a path (a gateway's /es prefix) keeps it: the proxies forward paths unchanged.
        url = self.os_http.url + urlsplit(self.keyword_base.url).path.rstrip("/")
        index = _search_engine_index(self.keyword_base.model_copy(update={"url": url, "index": self._index}))
        index.ensure()
        return index

    def _create_index(self) -> None:
        """Create the schedule's index directly on the server (no fault proxy), tombstone window 0 s."""
        assert self.keyword_base is not None and self.keyword_base.url is not None, "a keyword server"
        create_index_with_gc(self.keyword_base.url, self._index, headers=auth_headers(self.keyword_base))

    def _open_vector(self, workdir: Path, namespace: str) -> MilvusVectorIndex:
        if self.vector_base is None or self.milvus_tcp is None:
            settings = VectorSettings(uri=str(workdir / "milvus.db"), collection=namespace.replace("-", "_"))
        else:
            collection = f"{self.vector_base.collection}_chaos_{namespace}".replace("-", "_")
            settings = self.vector_base.model_copy(
                update={"uri": self.milvus_tcp.url, "collection": collection}
            )
        vector = build_vector(settings, dim=EMBED_DIM)
        vector.ensure()
        return vector

    def run(self, spec: ScheduleSpec) -> ScheduleResult:
        return run_schedule(
            spec, self.workdir, open_stores=self.open, server_arm=self.arm, after_quiet=self.after_quiet
        )

    def heal(self) -> None:
        for proxy in self._proxies():
            proxy.clear()

    # --- faults ------------------------------------------------------------------------------

    def arm(self, kind: str, rig: Rig, rng: random.Random) -> None:
        if kind in TCP_KINDS:
            count = SHAPED_BLOCKS if kind in SHAPED_KINDS else 1
            rng.choice(self._tcp_proxies()).arm(kind, count)
        elif kind in HTTP_KINDS:
            if self.os_http is None:
                raise ValueError(f"{kind} needs an OpenSearch/Elasticsearch keyword index")
            self.os_http.arm(kind, rng.randint(1, 3))
        elif kind == "vector_server_kill9":
            self._kill_vector(rig)
        elif kind == "keyword_server_data_loss":
            self._lose_keyword_data()
        elif kind == "store_pause":
            self._pause(rng.choice(self._owned(kind)))

    def _owned(self, kind: str) -> list[OpenSearchApiServer | MilvusLiteServer | RealMilvusServer]:
        """The managed servers, for a process fault; a deployment's servers are never touched."""
        servers = self._managed_servers()
        if not servers:
            raise ValueError(f"{kind} needs servers the suite starts itself (--servers managed)")
        return servers

    def _kill_vector(self, rig: Rig) -> None:
        self._owned("vector_server_kill9")
        assert self.milvus is not None, "managed servers include Milvus"
        self.milvus.kill9()
        self.milvus.start()
        if isinstance(self.milvus, MilvusLiteServer):
            # A restarted milvus-lite server serves its collections "released" and, unlike Milvus
            # 2.3.5, never loads them again by itself; the adapter retries code 101 forever, so
            # the collection is loaded again here, as a restarted lockstep's ensure() would.
            rig.stores.vector.ensure()
        self.injected["vector_server_kill9"] += 1
        self.needs_reconcile = True

    def _lose_keyword_data(self) -> None:
        self._owned("keyword_server_data_loss")
        assert self.opensearch is not None, "managed servers include the OpenSearch-API server"
        self.opensearch.kill9()
        self.opensearch.start()
        self._create_index()
        self.injected["keyword_server_data_loss"] += 1
        self.needs_reconcile = True

    def _pause(self, server: OpenSearchApiServer | MilvusLiteServer | RealMilvusServer) -> None:
        server.pause()
        self.injected["store_pause"] += 1
        threading.Timer(PAUSE_S, server.resume).start()

    # --- after quiescence --------------------------------------------------------------------

    def after_quiet(self, rig: Rig) -> list[Violation]:
        """After a store lost data, the reconciler rebuilds it without embedding anything."""
        if not self.needs_reconcile:
            return []
        if not _serves_reads(rig.stores.vector, VECTOR_READS_BACK_S):
            return [
                Violation(
                    "I6",
                    "vector",
                    rig.model.namespace,
                    f"no reads served {VECTOR_READS_BACK_S} s after restart",
                )
            ]
        before = rig.embedder.texts_embedded
        auditor = Auditor(
            ledger=rig.ledger,
            keyword=rig.stores.keyword,
            vector=rig.stores.vector,
            source=None,
            chunking=rig.model.chunking,
            reference_name="ledger",
            buckets=64,
        )
        reconciler = Reconciler(
            auditor=auditor,
            engine=rig.engine,
            ledger=rig.ledger,
            keyword=rig.stores.keyword,
            vector=rig.stores.vector,
            chunking=rig.model.chunking,
            limiter=RateLimiter(RECONCILE_OPS_PER_S, sleep=_no_sleep),
        )
        summary = reconciler.run(dry_run=False, max_ops=None).as_json()
        spent = rig.embedder.texts_embedded - before
        # The summary's embed_calls is the engine's total over the whole schedule; this is the repair's own.
        self.reconciled.append(summary | {"texts_embedded": spent})
        if isinstance(rig.stores, ServerStores):
            rig.stores.details["reconciled"] = self.reconciled[-1]
        if spent:
            return [
                Violation("reconcile_embeds", "embedder", rig.model.namespace, f"{spent} texts re-embedded")
            ]
        return []


def _serves_reads(index: MilvusVectorIndex, within_s: float) -> bool:
    """Poll ``count()`` until it answers, for at most ``within_s`` wall seconds."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            index.count()
            return True
        except StoreError as exc:
            if not exc.retriable or time.monotonic() > deadline:
                return False
        time.sleep(READS_POLL_S)


@dataclass(frozen=True)
class ServerTierSetup:
    """Builds one ServerTier in each worker process of ``run_schedules`` (picklable).

    The tier (its proxies and, when managed, its servers) lives as long as the worker process and
    is stopped when the worker exits: pool workers end without running ``atexit`` handlers, but
    they do run multiprocessing's finalizers.
    """

    real_milvus: bool = False
    deployment: Settings | None = None

    def __call__(self, workdir: Path) -> ScheduleRunner:
        tier = ServerTier(workdir, real_milvus=self.real_milvus, deployment=self.deployment)
        tier.__enter__()
        Finalize(tier, tier.__exit__, exitpriority=FINALIZE_PRIORITY)
        return tier.run
