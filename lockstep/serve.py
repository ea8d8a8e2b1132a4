"""``lockstep serve``: a read-only search server for read replicas.

No source, no writes, no Ray: ``POST /search`` (the same handler as ``lockstep run``'s),
``/healthz``, ``/readyz`` and ``/metrics`` on ``run.http_host:run.http_port``. It reads the
ledger (the fence) and both indexes through the readers' aliases; it never writes the ledger,
an index or the embedding cache. A milvus-lite file admits one process, so a replica needs a
Milvus server (or ``milvus-lite server``) and an OpenSearch/Elasticsearch or Tantivy index on
storage it can read. SIGTERM or SIGINT stops it (exit 0).
"""

from __future__ import annotations

import signal
import threading

import structlog

from lockstep.metrics import SearchMetrics
from lockstep.ops_http import OpsServer
from lockstep.runtime import open_search
from lockstep.search_http import SearchEndpoint
from lockstep.searching import FollowingSearch
from lockstep.settings import Settings
from lockstep.stop_signals import STOP_SIGNALS

log = structlog.get_logger(__name__)

# How often the main thread looks whether a stop was asked for.
STOP_CHECK_S = 0.2


class SearchServer:
    """One ``lockstep serve`` process."""

    def __init__(self, settings: Settings, *, stop_requested: threading.Event | None = None) -> None:
        self.settings = settings
        self.stop_requested = stop_requested or threading.Event()
        self.metrics = SearchMetrics()
        self.searching: FollowingSearch | None = None

    def run(self) -> int:
        """Serve until a stop signal; 0 after a clean stop. An error opening the stores is raised
        (the command line reports it in one line)."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, lambda *_: self.stop_requested.set())
        rs = self.settings.run
        ops = OpsServer(rs.http_host, rs.http_port, self.metrics.registry, self.readiness, search=True).start()
        try:
            self.searching = FollowingSearch(lambda: open_search(self.settings))
            ops.attach_search(SearchEndpoint(self.searching.search, self.metrics, self.settings.search.token))
            log.info("serving searches", port=ops.port, generation=self.searching.generation)
            while not self.stop_requested.wait(STOP_CHECK_S):
                pass
        finally:
            ops.stop()
            if self.searching is not None:
                self.searching.close()
        log.info("stopped")
        return 0

    def readiness(self) -> tuple[bool, list[str]]:
        if self.stop_requested.is_set():
            return False, ["shutting down"]
        if self.searching is None:
            return False, ["starting: opening the ledger and the indexes"]
        return True, []
