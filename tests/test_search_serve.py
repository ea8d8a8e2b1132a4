"""``lockstep serve``: a read-only search server for read replicas, on the servers pair (the
OpenSearch-API server + Milvus 2.3.5; a milvus-lite file admits one process, a replica needs a
server)."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from coordinator.events import ChangeEvent, Op
from lockstep import Lockstep
from tests.support.milvus_servers import RealMilvus
from tests.support.search_service import Stores, drop_collection
from tests.support.service_process import LOCKSTEP, STOP_TIMEOUT_S, free_port, ready, wait_for

SEARCH_TOKEN = "serve-test-search-token-012345"
HTTP_TIMEOUT_S = 60.0


@pytest.fixture
def servers(request: pytest.FixtureRequest) -> Iterator[Stores]:
    suffix = uuid.uuid4().hex[:10]
    milvus: RealMilvus = request.getfixturevalue("real_milvus")
    url = request.getfixturevalue("opensearch_api_url")
    chosen = Stores("servers", {"kind": "opensearch", "url": url, "index": f"kw-{suffix}"},
                    {"uri": milvus.uri, "collection": f"c_{suffix}"})
    yield chosen
    drop_collection(chosen)


def _config(tmp_path: Path, stores: Stores, port: int) -> Path:
    config = {
        "keyword": stores.keyword,
        "vector": stores.vector,
        "ledger": {"path": str(tmp_path / "ledger.db")},
        "embedder": {"kind": "hashing"},
        "run": {"http_port": port},
        "search": {"token": SEARCH_TOKEN, "consistency_wait_s": 60},
    }
    path = tmp_path / "lockstep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _embeddings(ledger: Path) -> int:
    with sqlite3.connect(ledger) as db:
        return int(db.execute("SELECT count(*) FROM embeddings").fetchone()[0])


def test_serve_answers_searches_read_only_with_its_own_probes_and_metrics(servers: Stores, tmp_path: Path) -> None:
    """lockstep serve answers POST /search (bearer token required when configured), sees a
    write made elsewhere through its token, fences what the ledger did not commit and counts it in
    /metrics, serves no POST /events, writes nothing, and stops on SIGTERM with exit 0."""
    port = free_port()
    config = _config(tmp_path, servers, port)
    writer = Lockstep.open(config)
    writer.write([ChangeEvent(Op.UPSERT, f"d{i}", 1, f"serve test okapi number {i}", {"n": i}) for i in range(5)])
    embedded_before = _embeddings(tmp_path / "ledger.db")
    proc = subprocess.Popen([*LOCKSTEP, "serve", "-c", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {SEARCH_TOKEN}"}
    try:
        wait_for(lambda: ready(base), "ready", proc)
        with httpx.Client(base_url=base, timeout=HTTP_TIMEOUT_S) as http:
            assert http.get("/healthz").json() == {"alive": True}
            assert http.post("/search", json={"query": "okapi"}).status_code == 401
            first = http.post("/search", json={"query": "okapi", "k": 3}, headers=auth)
            assert first.status_code == 200 and len(first.json()["hits"]) == 3
            receipt = writer.write([ChangeEvent(Op.UPSERT, "late", 1, "a late gnu arrives")])
            seen = http.post("/search", json={"query": "gnu", "consistent_with": receipt.token.encode()}, headers=auth)
            assert "late" in {h["doc_id"] for h in seen.json()["hits"]}
            _uncommitted_vector_row(writer)
            # The token makes the vector leg read at Strong consistency: the new row is seen at once.
            strong = {"query": "okapi", "mode": "vector", "k": 10, "consistent_with": receipt.token.encode()}
            fenced = http.post("/search", json=strong, headers=auth).json()
            assert fenced["fenced"] == {"uncommitted": 1}
            metrics = http.get("/metrics").text
            assert 'lockstep_search_fenced_hits_total{reason="uncommitted"} 1.0' in metrics
            assert 'lockstep_search_requests_total{mode="vector",status="200"} 1.0' in metrics
            assert http.post("/events", json=[{"op": "delete", "doc_id": "d0", "version": 9}]).status_code == 404
            assert http.get("/search").status_code == 405
        # The writer cached its two new chunk texts; serve's query vectors went nowhere durable.
        assert _embeddings(tmp_path / "ledger.db") == embedded_before + 2
    finally:
        writer.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=STOP_TIMEOUT_S)
    assert proc.returncode == 0, err[-3000:]
    assert SEARCH_TOKEN not in err


def _uncommitted_vector_row(writer: Lockstep) -> None:
    """A version of d1 written to the vector index but never committed (prepared, one side done)."""
    rt = writer._writer()
    [intent] = rt.engine.prepare([ChangeEvent(Op.UPSERT, "d1", 2, "serve test okapi number 1, edited", {"n": 1})])
    rt.engine._write_side("vector", [intent])
