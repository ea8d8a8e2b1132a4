"""chaos.servers: each real server starts, answers, stops, and takes the faults the chaos suite injects."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import pytest
from pymilvus import MilvusClient

from adapters.vector.milvus import MilvusVectorIndex
from adapters.vector.settings import VectorSettings
from chaos.servers import EmbeddedPostgres, MilvusLiteServer, OpenSearchApiServer, RealMilvusServer
from coordinator.errors import TransientStoreError
from coordinator.model import IndexedChunk
from lockstep.bootstrap import build_vector
from tests.support.milvus_servers import start_or_fail
from tests.support.threads import BackgroundCall

# Bounds every request in these tests; a paused server's request is expected to wait, not this long.
REQUEST_TIMEOUT_S = 30.0
# How long a request to a paused server is watched to prove it hangs.
HANG_OBSERVED_S = 1.0
# How long the answer may take once the paused server is resumed.
ANSWER_AFTER_RESUME_S = 15.0
# A restarted Milvus 2.3.5 reloads collections only after the dead session expires (~10 s).
RELOAD_AFTER_CRASH_DEADLINE_S = 90.0
RELOAD_POLL_INTERVAL_S = 1.0
DIM = 8


def _assert_hangs_then_answers(
    paused: Callable[[], AbstractContextManager[None]], call: Callable[[], object]
) -> object:
    """Start ``call`` inside ``paused()``: it must wait, then answer once the server is resumed."""
    with paused():
        pending = BackgroundCall(call)
        assert not pending.finished_within(HANG_OBSERVED_S), "a paused server answered"
    assert pending.finished_within(ANSWER_AFTER_RESUME_S), "no answer after resume"
    assert pending.error is None, f"the held request failed after resume: {pending.error!r}"
    return pending.result


# --- the OpenSearch-API server -----------------------------------------------------------------


@pytest.fixture
def opensearch(tmp_path: Path) -> Iterator[OpenSearchApiServer]:
    """A fresh OpenSearch-API server per test: these tests kill and pause it."""
    server = OpenSearchApiServer(log_path=tmp_path / "osmem.log")
    start_or_fail(server)
    yield server
    server.stop()


def test_opensearch_starts_answers_and_stops(opensearch: OpenSearchApiServer) -> None:
    """The OpenSearch-API server answers on its URL, and nothing listens there after stop()."""
    assert httpx.get(opensearch.url, timeout=REQUEST_TIMEOUT_S).status_code == 200
    opensearch.stop()
    assert opensearch.pid is None
    with pytest.raises(httpx.ConnectError):
        httpx.get(opensearch.url, timeout=REQUEST_TIMEOUT_S)


def test_opensearch_kill9_and_restart_loses_the_index(opensearch: OpenSearchApiServer) -> None:
    """kill -9 then start(): the same URL serves again, and the in-memory index is gone."""
    doc_url = f"{opensearch.url}/kb/_doc/1?refresh=true"
    assert httpx.put(doc_url, json={"text": "hello"}, timeout=REQUEST_TIMEOUT_S).is_success
    opensearch.kill9()
    opensearch.start()
    reply = httpx.get(f"{opensearch.url}/kb/_doc/1", timeout=REQUEST_TIMEOUT_S)
    assert reply.status_code == 404


def test_opensearch_pause_holds_requests_until_resume(opensearch: OpenSearchApiServer) -> None:
    """While paused the server holds a request; after resume it answers it."""
    reply = _assert_hangs_then_answers(
        opensearch.paused, lambda: httpx.get(opensearch.url, timeout=REQUEST_TIMEOUT_S)
    )
    assert isinstance(reply, httpx.Response) and reply.status_code == 200


# --- milvus-lite server ------------------------------------------------------------------------


def _list_collections(uri: str) -> list[str]:
    client = MilvusClient(uri=uri, timeout=REQUEST_TIMEOUT_S, dedicated=True)
    try:
        return list(client.list_collections(timeout=REQUEST_TIMEOUT_S))
    finally:
        client.close()


def test_milvus_lite_server_starts_answers_and_stops(tmp_path: Path) -> None:
    """A milvus-lite server answers gRPC calls as a context manager and is gone after the block."""
    with MilvusLiteServer(tmp_path / "data") as server:
        assert _list_collections(server.uri) == []
        pid = server.pid
    assert pid is not None and server.pid is None


def test_milvus_lite_server_pause_holds_requests_until_resume(tmp_path: Path) -> None:
    """A paused milvus-lite server holds a gRPC call and answers it after resume."""
    with MilvusLiteServer(tmp_path / "data") as server:
        assert _assert_hangs_then_answers(server.paused, lambda: _list_collections(server.uri)) == []


# --- the real Milvus 2.3.5 server --------------------------------------------------------------


def _chunk(n: int) -> IndexedChunk:
    return IndexedChunk(
        chunk_id=f"doc-{n}:chunk-0",
        doc_id=f"doc-{n}",
        chunk_index=0,
        text=f"text {n}",
        content_hash=f"{n:064x}",
        version=1,
        vector=[float(n + 1)] * DIM,
    )


def _count_when_readable(idx: MilvusVectorIndex) -> int:
    """count() once the restarted server has reloaded the collection; only transient errors allowed."""
    deadline = time.monotonic() + RELOAD_AFTER_CRASH_DEADLINE_S
    while True:
        try:
            return idx.count()
        except TransientStoreError:
            if time.monotonic() > deadline:
                raise
            time.sleep(RELOAD_POLL_INTERVAL_S)


def test_real_milvus_kill9_and_restart_keeps_data(real_milvus: RealMilvusServer) -> None:
    """Rows written before a SIGKILL are all there after kill9_and_restart() on the same URI."""
    idx = build_vector(VectorSettings(uri=real_milvus.uri, collection="servers_kill9"), dim=DIM)
    idx.ensure()
    idx.upsert([_chunk(n) for n in range(20)])
    old_pid = real_milvus.pid
    real_milvus.kill9_and_restart()
    assert real_milvus.pid not in (None, old_pid)
    _assert_holds_then_drop(idx, 20)


def test_real_milvus_restart_moves_an_internal_port_taken_while_it_was_down(real_milvus: RealMilvusServer) -> None:
    """An internal port taken while the server is down (as the local port of some outgoing
    connection) does not stop the restart: that port moves, the URI and the data stay."""
    idx = build_vector(VectorSettings(uri=real_milvus.uri, collection="servers_port_taken"), dim=DIM)
    idx.ensure()
    idx.upsert([_chunk(n) for n in range(5)])
    idx.close()
    key, uri = "index_coord_port", real_milvus.uri
    port = int(real_milvus.server.config.configs[key])
    real_milvus.stop()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        real_milvus.start()
    assert real_milvus.uri == uri
    assert int(real_milvus.server.config.configs[key]) != port
    _assert_holds_then_drop(
        build_vector(VectorSettings(uri=real_milvus.uri, collection="servers_port_taken"), dim=DIM), 5
    )


def _assert_holds_then_drop(idx: MilvusVectorIndex, rows: int) -> None:
    """After a restart: the collection is back with all its rows; then it is dropped."""
    try:
        idx.ensure()
        assert _count_when_readable(idx) == rows
    finally:
        idx.drop()
        idx.close()


def test_real_milvus_pause_holds_requests_until_resume(real_milvus: RealMilvusServer) -> None:
    """A paused Milvus 2.3.5 holds a gRPC call and answers it after resume (pause < session TTL)."""
    result = _assert_hangs_then_answers(real_milvus.paused, lambda: _list_collections(real_milvus.uri))
    assert isinstance(result, list)


# --- embedded Postgres -------------------------------------------------------------------------


def test_postgres_starts_answers_and_deletes_its_data(tmp_path: Path) -> None:
    """Embedded Postgres answers SQL and, by default, removes its data directory on stop()."""
    pgdata = tmp_path / "pg"
    with EmbeddedPostgres(pgdata) as pg:
        assert "42" in pg.psql("SELECT 40 + 2;")
        assert pg.uri.startswith("postgresql://")
    assert not pgdata.exists()


def test_postgres_logical_replication_sets_wal_level(tmp_path: Path) -> None:
    """With logical_replication the restarted server runs with wal_level=logical and a new pid."""
    with EmbeddedPostgres(tmp_path / "pg", logical_replication=True) as pg:
        assert "logical" in pg.psql("SHOW wal_level;")
        assert pg.pid is not None
