"""The two store servers the benchmark starts for itself and stops when it ends (``chaos/servers.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.streaming.cpu_parts import KEYWORD_STORE, VECTOR_STORE
from bench.streaming.progress import say
from chaos.servers import OpenSearchApiServer, RealMilvusServer

# What the report names as the stores measured.
STORES = "OpenSearch-API server (osmem-server) + Milvus 2.3.5 server, SQLite ledger"


@dataclass(frozen=True)
class Servers:
    """Where the running servers answer, and which CPU-table part each server's process is."""

    url: str
    uri: str
    parts: dict[int, str]  # server pid -> part

    @property
    def addresses(self) -> tuple[str, str]:
        return self.url, self.uri


@contextmanager
def started_servers(work: Path) -> Iterator[Servers]:
    """An OpenSearch-API server and a Milvus 2.3.5 server, their files under ``work``."""
    say("starting the OpenSearch-API server and Milvus 2.3.5")
    (work / "milvus").mkdir(parents=True)
    with (
        OpenSearchApiServer(log_path=work / "osmem.log") as search,
        RealMilvusServer(work / "milvus") as milvus,
    ):
        yield Servers(search.url, milvus.uri, {_pid(search): KEYWORD_STORE, _pid(milvus): VECTOR_STORE})


def _pid(server: OpenSearchApiServer | RealMilvusServer) -> int:
    pid = server.pid
    assert pid is not None, "the server runs while the benchmark does"
    return pid
