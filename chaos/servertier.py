"""The server tier: schedules over real server processes behind fault proxies.

lockstep -> HttpFaultProxy -> TcpFaultProxy -> the OpenSearch-API server (in memory), and
lockstep -> TcpFaultProxy -> a ``milvus-lite server`` process. Each schedule gets its own
OpenSearch index, created with ``index.gc_deletes=0s`` so that a delete's tombstone is forgotten
at once (a late older upsert then passes the index's own version check and only lockstep's
ledger can stop it), and its own Milvus collection.

Process faults: ``vector_server_kill9`` (SIGKILL + restart of the Milvus server on the same data
directory), ``keyword_server_data_loss`` (SIGKILL + restart of the in-memory OpenSearch-API
server: every index is gone; the schedule then runs the reconciler, which must rebuild the
keyword side without a single embed call), ``store_pause`` (SIGSTOP a store for
``PAUSE_S``, then SIGCONT). Both process kills are followed by a reconcile at quiescence, as the
runbook says (``lockstep reconcile``).
"""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from adapters.keyword._search_engine import INDEX_MAPPINGS
from adapters.keyword.opensearch import OpenSearchKeywordIndex
from adapters.keyword.settings import KeywordSettings
from adapters.vector.milvus import MilvusVectorIndex
from adapters.vector.settings import VectorSettings
from chaos.net import HttpFaultProxy, TcpFaultProxy
from chaos.rig import EMBED_DIM, Rig
from chaos.runner import ScheduleResult, ScheduleSpec, run_schedule
from chaos.servers import MilvusLiteServer, OpenSearchApiServer, RealMilvusServer
from coordinator.audit import Auditor
from coordinator.errors import StoreError
from coordinator.invariants import Violation
from coordinator.reconcile import RateLimiter, Reconciler

# Client timeouts in the server tier: short, so black holes and pauses cost seconds, not minutes.
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


def _no_sleep(_s: float) -> None:
    return None


def _made(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def create_index_with_gc(url: str, index: str, gc_deletes: str = GC_DELETES) -> None:
    """Create ``index`` with lockstep's mapping and a short tombstone window (test-only)."""
    body = json.dumps(
        {"settings": {"index": {"gc_deletes": gc_deletes}}, "mappings": INDEX_MAPPINGS}
    ).encode()
    request = urllib.request.Request(
        f"{url}/{index}", data=body, method="PUT", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as reply:
        reply.read()


@dataclass
class ServerStores:
    tier: ServerTier
    keyword: OpenSearchKeywordIndex
    vector: MilvusVectorIndex
    injected: Counter[str] = field(default_factory=Counter)

    def close(self) -> None:
        self.tier.heal()
        self.injected = self.tier.injected_total() - self.tier.baseline
        self.keyword.drop()
        self.keyword.close()
        self.vector.drop()
        self.vector.close()


class ServerTier:
    """The servers and proxies shared by the server-tier schedules of one run."""

    def __init__(self, workdir: Path, seed: int = 0, *, real_milvus: bool = False) -> None:
        self.workdir = workdir
        self.opensearch = OpenSearchApiServer(log_path=workdir / "osmem.log")
        self.milvus: MilvusLiteServer | RealMilvusServer = (
            RealMilvusServer(_made(workdir / "milvus-2.3.5"))
            if real_milvus
            else MilvusLiteServer(workdir / "milvus-data")
        )
        self.seed = seed
        self.injected: Counter[str] = Counter()
        self.baseline: Counter[str] = Counter()
        self.vector_timeout_s = REAL_MILVUS_TIMEOUT_S if real_milvus else VECTOR_TIMEOUT_S
        self.needs_reconcile = False
        self.reconciled: list[dict[str, Any]] = []
        self._index = ""

    def __enter__(self) -> ServerTier:
        self.opensearch.start()
        self.milvus.start()
        self.os_tcp = TcpFaultProxy("127.0.0.1", self.opensearch.port, seed=self.seed).start()
        self.os_http = HttpFaultProxy("127.0.0.1", self.os_tcp.port, seed=self.seed).start()
        milvus_port = urlsplit(self.milvus.uri).port
        assert milvus_port is not None, "the Milvus servers listen on an explicit port"
        self.milvus_tcp = TcpFaultProxy("127.0.0.1", milvus_port, seed=self.seed + 1).start()
        return self

    def __exit__(self, *exc: object) -> None:
        for proxy in (self.os_http, self.os_tcp, self.milvus_tcp):
            proxy.stop()
        self.milvus.stop()
        self.opensearch.stop()

    def injected_total(self) -> Counter[str]:
        return self.injected + self.os_tcp.injected + self.os_http.injected + self.milvus_tcp.injected

    # --- one schedule ------------------------------------------------------------------------

    def open(self, _workdir: Path, namespace: str) -> ServerStores:
        self.baseline = self.injected_total()
        self.needs_reconcile = False
        self._index = f"chaos-{namespace}"
        create_index_with_gc(self.opensearch.url, self._index)
        keyword = OpenSearchKeywordIndex(
            KeywordSettings(
                kind="opensearch",
                url=self.os_http.url,
                index=self._index,
                request_timeout_s=KEYWORD_TIMEOUT_S,
            ),
            sleep=_no_sleep,
        )
        vector = MilvusVectorIndex(
            VectorSettings(
                uri=self.milvus_tcp.url,
                collection=namespace.replace("-", "_"),
                request_timeout_s=self.vector_timeout_s,
            ),
            dim=EMBED_DIM,
        )
        keyword.ensure()
        vector.ensure()
        return ServerStores(self, keyword, vector)

    def run(self, spec: ScheduleSpec) -> ScheduleResult:
        return run_schedule(
            spec, self.workdir, open_stores=self.open, server_arm=self.arm, after_quiet=self.after_quiet
        )

    def heal(self) -> None:
        for proxy in (self.os_tcp, self.os_http, self.milvus_tcp):
            proxy.clear()

    # --- faults ------------------------------------------------------------------------------

    def arm(self, kind: str, rig: Rig, rng: random.Random) -> None:
        tcp = rng.choice((self.os_tcp, self.milvus_tcp))
        if kind in ("net_latency", "net_bandwidth"):
            tcp.arm(kind, SHAPED_BLOCKS)
        elif kind in ("net_reset_before_send", "net_reset_after_send", "net_blackhole"):
            tcp.arm(kind, 1)
        elif kind in ("http_429", "http_503", "bulk_item_429"):
            self.os_http.arm(kind, rng.randint(1, 3))
        elif kind == "vector_server_kill9":
            self._kill_vector(rig)
        elif kind == "keyword_server_data_loss":
            self._lose_keyword_data()
        elif kind == "store_pause":
            self._pause(rng.choice((self.opensearch, self.milvus)))

    def _kill_vector(self, rig: Rig) -> None:
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
        self.opensearch.kill9()
        self.opensearch.start()
        create_index_with_gc(self.opensearch.url, self._index)
        self.injected["keyword_server_data_loss"] += 1
        self.needs_reconcile = True

    def _pause(self, server: Any) -> None:
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
