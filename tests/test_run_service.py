"""`lockstep run` on Ray, as a real process: crash points, ordering, probes, fencing."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from adapters.keyword.settings import KeywordSettings
from adapters.ledger.sqlite import SqliteLedger
from adapters.vector.settings import VectorSettings
from coordinator.chunking import ChunkingSettings, chunk_id, chunk_text, content_hash
from coordinator.crashpoints import PROTOCOL_POINTS
from coordinator.invariants import ExpectedChunk, check_index, versions_never_go_back
from lockstep.bootstrap import build_keyword, build_vector
from lockstep.runtime import runtime
from lockstep.settings import load_settings
from tests.support.service_process import STOP_TIMEOUT_S, LogTail, kill_all, kill_process_group, still_running

LOCKSTEP = [sys.executable, "-m", "lockstep"]
RUN_TIMEOUT_S = 300
CHUNKING = ChunkingSettings(max_chars=80)
# How long a test waits for the service to reach a state before failing.
WAIT_S = 120.0


def _config(tmp_path: Path, **overrides: Any) -> Path:
    config = {
        "source": {"kind": "jsonl", "path": str(tmp_path / "events.jsonl"), "name": "events"},
        "keyword": {"kind": "tantivy", "path": str(tmp_path / "tantivy")},
        "vector": {"uri": str(tmp_path / "milvus.db")},
        "ledger": {"path": str(tmp_path / "ledger.db")},
        "embedder": {"kind": "hashing"},
        "chunking": {"max_chars": CHUNKING.max_chars},
        "run": {"shards": 2, "http_port": 0, "batch_docs_max": 50},
        **overrides,
    }
    path = tmp_path / "lockstep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _text(doc_id: str, version: int, paragraphs: int) -> str:
    return "\n\n".join(f"{doc_id} v{version} part {i} on refunds" for i in range(paragraphs))


def _upsert(doc_id: str, version: int, paragraphs: int = 3) -> dict[str, Any]:
    return {"op": "upsert", "doc_id": doc_id, "version": version, "text": _text(doc_id, version, paragraphs),
            "metadata": {"v": version}}


def _append(tmp_path: Path, events: list[dict[str, Any]]) -> None:
    with (tmp_path / "events.jsonl").open("a") as out:
        out.writelines(json.dumps(e) + "\n" for e in events)


def _run(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LOCKSTEP, "run", "-c", str(config), *args], capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
        check=False, stdin=subprocess.DEVNULL, start_new_session=True,
    )


def _history(docs: int, versions: int, seed: int, prefix: str = "doc") -> tuple[list[dict[str, Any]], dict[str, dict[str, Any] | None]]:
    """Per doc: versions 1..n of upserts (sizes vary, so documents grow and shrink), some ending
    in a delete; returns the events in order and the newest state per doc (None = deleted)."""
    rng = random.Random(seed)
    events: list[dict[str, Any]] = []
    final: dict[str, dict[str, Any] | None] = {}
    for d in range(docs):
        doc_id = f"{prefix}-{d:04d}"
        for v in range(1, versions + 1):
            events.append(_upsert(doc_id, v, rng.randint(1, 5)))
        final[doc_id] = events[-1]
        if rng.random() < 0.2:
            events.append({"op": "delete", "doc_id": doc_id, "version": versions + 1})
            final[doc_id] = None
    return events, final


def _expected(final: dict[str, dict[str, Any] | None]) -> tuple[dict[str, ExpectedChunk], set[str]]:
    expected = {
        chunk_id(d, i): ExpectedChunk(chunk_id(d, i), content_hash(t))
        for d, ev in final.items() if ev is not None
        for i, t in enumerate(chunk_text(ev["text"], CHUNKING))
    }
    return expected, {d for d, ev in final.items() if ev is None}


def _assert_converged(config: Path, final: dict[str, dict[str, Any] | None]) -> None:
    expected, deleted = _expected(final)
    settings = load_settings(config)
    with runtime(settings) as rt:
        violations = [
            *check_index("keyword", expected, deleted, list(rt.keyword.scan())),
            *check_index("vector", expected, deleted, list(rt.vector.scan())),
        ]
        counts = rt.ledger.counts()
    assert violations == [], "\n".join(map(str, violations[:20]))
    assert counts["pending_intents"] == 0 and counts["dead_letters"] == 0


@pytest.mark.parametrize("point", PROTOCOL_POINTS)
def test_a_kill_at_any_crash_point_converges_after_restart(tmp_path: Path, point: str) -> None:
    """SIGKILL of the whole service at each protocol boundary, then a restart: both indexes equal
    the source, with no duplicate entity, no chunk of a deleted document and nothing pending.
    Batches of 20 (about 75 documents per shard) so that batches are also prepared ahead, and a
    kill may land in a prepare running beside a drive."""
    config = _config(tmp_path, run={"shards": 2, "http_port": 0, "batch_docs_max": 20, "prepare_ahead": 2})
    events, final = _history(docs=150, versions=2, seed=PROTOCOL_POINTS.index(point))
    _append(tmp_path, events)
    crashed = _run(config, "--exit-when-idle", "--crash-at", point)
    assert crashed.returncode == -signal.SIGKILL, f"not killed at {point}: {crashed.stderr[-3000:]}"
    more, final2 = _history(docs=20, versions=3, seed=7, prefix="late")
    _append(tmp_path, more)
    final.update(final2)
    restarted = _run(config, "--exit-when-idle")
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    _assert_converged(config, final)


def test_reordered_and_duplicated_histories_end_at_the_newest_version(
    tmp_path: Path, opensearch_api_url: str, lite_server: Any
) -> None:
    """Versions shuffled within a window and each event sent 1-3 times: the final state is each
    document's newest version, and versions observed in both stores never go back. Small batches,
    so that shards prepare batches ahead and the OpenSearch writer takes two at once."""
    suffix = uuid.uuid4().hex[:8]
    keyword = {"kind": "opensearch", "url": opensearch_api_url, "index": f"order-{suffix}"}
    vector = {"uri": lite_server.uri, "collection": f"order_{suffix}"}
    run = {"shards": 2, "http_port": 0, "batch_docs_max": 4, "prepare_ahead": 2}
    config = _config(tmp_path, keyword=keyword, vector=vector, run=run)
    events, final = _history(docs=60, versions=6, seed=11)
    rng = random.Random(5)
    shuffled = [e for e in _shuffle_within(events, window=8, rng=rng) for _ in range(rng.randint(1, 3))]
    _append(tmp_path, shuffled)
    observed: list[tuple[str, int]] = []
    stop = threading.Event()
    poller = threading.Thread(target=_poll_versions, args=(keyword, vector, sorted(final), observed, stop))
    poller.start()
    try:
        result = _run(config, "--exit-when-idle")
    finally:
        stop.set()
        poller.join()
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(observed) > 50, "the poller observed too little to prove anything"
    assert versions_never_go_back("both", observed) == []
    _assert_converged(config, final)


def _shuffle_within(events: list[dict[str, Any]], *, window: int, rng: random.Random) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for start in range(0, len(events), window):
        part = events[start : start + window]
        rng.shuffle(part)
        out += part
    return out


def _poll_versions(keyword: dict[str, Any], vector: dict[str, Any], doc_ids: list[str],
                   observed: list[tuple[str, int]], stop: threading.Event) -> None:
    """Read chunk-0 of every document from both stores until stopped, recording versions seen."""
    kw = build_keyword(KeywordSettings(**keyword))
    vec = build_vector(VectorSettings(**vector), dim=384)
    ids = [chunk_id(d, 0) for d in doc_ids]
    try:
        while not stop.is_set():
            for side, index in (("kw", kw), ("vec", vec)):
                try:
                    held = index.get(ids)
                except Exception:  # the index may not exist yet at the start of the run
                    continue
                observed.extend((f"{side}:{cid}", c.version) for cid, c in held.items())
            time.sleep(0.05)
    finally:
        kw.close()
        vec.close()


def test_probes_metrics_and_graceful_shutdown(tmp_path: Path) -> None:
    """A running service answers /healthz and /readyz, exports metrics, follows appended events,
    and on SIGTERM drains and checkpoints before exiting 0."""
    config = _config(tmp_path, run={"shards": 2, "http_port": _free_port(), "batch_docs_max": 50})
    port = yaml.safe_load(config.read_text())["run"]["http_port"]
    _append(tmp_path, [_upsert(f"a{i}", 1) for i in range(30)])
    proc = subprocess.Popen([*LOCKSTEP, "--log-level", "info", "run", "-c", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait(lambda: _get(base + "/readyz").status_code == 200, "ready")
        assert _get(base + "/healthz").json() == {"alive": True}
        _append(tmp_path, [_upsert(f"b{i}", 1) for i in range(20)] + [{"op": "delete", "doc_id": "a0", "version": 2}])
        _wait(lambda: _metric(base, 'lockstep_events_total{outcome="applied"}') >= 51, "51 applied events")
        metrics = _get(base + "/metrics").text
        for name in ("lockstep_embed_calls_total", "lockstep_freshness_lag_seconds_bucket",
                     "lockstep_prepared_intents", "lockstep_unfinished_events"):
            assert name in metrics, f"{name} missing from /metrics"
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, err[-3000:]
    size = (tmp_path / "events.jsonl").stat().st_size
    assert SqliteLedger(tmp_path / "ledger.db").get_checkpoint("events") == str(size)
    final: dict[str, dict[str, Any] | None] = {f"a{i}": _upsert(f"a{i}", 1) for i in range(30)}
    final |= {f"b{i}": _upsert(f"b{i}", 1) for i in range(20)}
    final["a0"] = None
    _assert_converged(config, final)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str) -> httpx.Response:
    try:
        return httpx.get(url, timeout=5.0)
    except httpx.TransportError:
        return httpx.Response(599)


def _metric(base: str, sample: str) -> float:
    for line in _get(base + "/metrics").text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def _wait(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_paused_owner_that_resumes_after_losing_its_lease_is_fenced(
    tmp_path: Path, opensearch_api_url: str, lite_server: Any
) -> None:
    """Replica A is SIGSTOPped past its lease; replica B takes the shards over; when A resumes,
    its ledger writes are rejected by epoch and it stops, while B's results stand."""
    suffix = uuid.uuid4().hex[:8]
    keyword = {"kind": "opensearch", "url": opensearch_api_url, "index": f"fence-{suffix}"}
    vector = {"uri": lite_server.uri, "collection": f"fence_{suffix}"}
    run_a = {"shards": 2, "http_port": 0, "lease_s": 3.0, "replica": "replica-a"}
    config_a = _config(tmp_path, keyword=keyword, vector=vector, run=run_a)
    config_b = tmp_path / "b.yaml"
    config_b.write_text(config_a.read_text().replace("replica-a", "replica-b"))
    _append(tmp_path, [_upsert(f"d{i}", 1) for i in range(20)])
    a = subprocess.Popen([*LOCKSTEP, "--log-level", "info", "run", "-c", str(config_a)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        ledger = SqliteLedger(tmp_path / "ledger.db")
        _wait(lambda: ledger.counts()["live_docs"] == 20, "replica A applied the first events")
        _signal_tree(a.pid, signal.SIGSTOP)
        time.sleep(4.0)  # past A's 3 s lease
        _append(tmp_path, [_upsert(f"d{i}", 2) for i in range(20)])
        b = _run(config_b, "--exit-when-idle")
        assert b.returncode == 0, b.stderr[-3000:]
        _append(tmp_path, [_upsert(f"d{i}", 3) for i in range(5)])
        _signal_tree(a.pid, signal.SIGCONT)
        _, a_err = a.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if a.poll() is None:
            _signal_tree(a.pid, signal.SIGKILL)
            a.wait()
    assert a.returncode == 1, f"replica A was not stopped by its fence: {a_err[-3000:]}"
    assert "fenced" in a_err
    final: dict[str, dict[str, Any] | None] = {f"d{i}": _upsert(f"d{i}", 2) for i in range(20)}
    _assert_converged(config_a, final)


def _signal_tree(pid: int, sig: int) -> None:
    """Signal a service and every process it started (Ray's raylet and workers leave its group)."""
    root = psutil.Process(pid)
    for proc in [*root.children(recursive=True), root]:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            continue


def _start_service(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([*LOCKSTEP, "--log-level", "info", "run", "-c", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL, start_new_session=True)


def _stop_service(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    return err


def _outage_config(tmp_path: Path, keyword_url: str, vector_uri: str) -> tuple[Path, str]:
    suffix = uuid.uuid4().hex[:8]
    port = _free_port()
    config = _config(
        tmp_path,
        keyword={"kind": "opensearch", "url": keyword_url, "index": f"outage-{suffix}", "request_timeout_s": 2.0},
        vector={"uri": vector_uri, "collection": f"outage_{suffix}", "request_timeout_s": 5.0, "connect_timeout_s": 2.0},
        run={"shards": 2, "http_port": port, "batch_docs_max": 50},
    )
    return config, f"http://127.0.0.1:{port}"


def _count(settings_kwargs: dict[str, Any], ids: list[str]) -> int:
    index = build_keyword(KeywordSettings(**settings_kwargs))
    try:
        return len(index.get(ids))
    finally:
        index.close()


def test_a_vector_index_outage_loses_nothing_and_the_keyword_side_keeps_up(
    tmp_path: Path, opensearch_api_url: str, real_milvus: Any
) -> None:
    """The real Milvus server is killed mid-stream: OpenSearch keeps receiving writes, /readyz says
    degraded, and after Milvus restarts everything converges with zero loss."""
    config, base = _outage_config(tmp_path, opensearch_api_url, real_milvus.uri)
    keyword = yaml.safe_load(config.read_text())["keyword"]
    final: dict[str, dict[str, Any] | None] = {f"a{i}": _upsert(f"a{i}", 1) for i in range(30)}
    _append(tmp_path, list(final.values()))
    proc = _start_service(config)
    try:
        ledger = SqliteLedger(tmp_path / "ledger.db")
        _wait(lambda: ledger.counts()["live_docs"] == 30, "the first events committed")
        real_milvus.kill9()
        outage = {f"b{i}": _upsert(f"b{i}", 1) for i in range(30)}
        _append(tmp_path, list(outage.values()))
        final |= outage
        b_ids = [chunk_id(d, 0) for d in outage]
        _wait(lambda: _count(keyword, b_ids) == 30, "the keyword side applied events during the outage")
        _wait(lambda: _get(base + "/readyz").status_code == 503, "/readyz reporting degraded")
        assert "degraded" in _get(base + "/readyz").text
        assert ledger.counts()["pending_intents"] > 0, "documents must stay prepared while Milvus is down"
        real_milvus.start()
        _wait(lambda: ledger.counts()["pending_intents"] == 0 and ledger.counts()["live_docs"] == 60, "convergence")
        _wait(lambda: _get(base + "/readyz").status_code == 200, "/readyz ready again")
    finally:
        if real_milvus.pid is None:
            real_milvus.start()
        err = _stop_service(proc)
    assert proc.returncode == 0, err[-3000:]
    _assert_converged(config, final)


def test_a_keyword_index_outage_loses_nothing(tmp_path: Path, lite_server: Any) -> None:
    """The OpenSearch-API server is paused (SIGSTOP) mid-stream: writes time out and are retried,
    documents stay prepared, and after SIGCONT everything converges with zero loss."""
    from chaos.servers import OpenSearchApiServer

    with OpenSearchApiServer() as search:
        config, base = _outage_config(tmp_path, search.url, lite_server.uri)
        final: dict[str, dict[str, Any] | None] = {f"a{i}": _upsert(f"a{i}", 1) for i in range(20)}
        _append(tmp_path, list(final.values()))
        proc = _start_service(config)
        try:
            ledger = SqliteLedger(tmp_path / "ledger.db")
            _wait(lambda: ledger.counts()["live_docs"] == 20, "the first events committed")
            with search.paused():
                outage = {f"b{i}": _upsert(f"b{i}", 1) for i in range(20)}
                _append(tmp_path, list(outage.values()))
                final |= outage
                _wait(lambda: _get(base + "/readyz").status_code == 503, "/readyz reporting degraded")
                assert ledger.counts()["live_docs"] == 20, "nothing may commit while the keyword index is away"
            _wait(lambda: ledger.counts()["pending_intents"] == 0 and ledger.counts()["live_docs"] == 40, "convergence")
        finally:
            err = _stop_service(proc)
        assert proc.returncode == 0, err[-3000:]
        _assert_converged(config, final)


def test_a_write_hanging_longer_than_the_lease_does_not_cost_the_shard_its_lease(
    tmp_path: Path, lite_server: Any
) -> None:
    """The keyword server hangs (SIGSTOP) for more than twice the 3 s lease while a write to it
    waits on a long request timeout: the shard's lease is renewed on its own thread, so when the
    server resumes the same shards finish the work and the service never stops fenced."""
    from chaos.servers import OpenSearchApiServer

    with OpenSearchApiServer() as search:
        suffix = uuid.uuid4().hex[:8]
        config = _config(
            tmp_path,
            keyword={"kind": "opensearch", "url": search.url, "index": f"hang-{suffix}", "request_timeout_s": 60.0},
            vector={"uri": lite_server.uri, "collection": f"hang_{suffix}"},
            run={"shards": 2, "http_port": 0, "lease_s": 3.0},
        )
        final: dict[str, dict[str, Any] | None] = {f"a{i}": _upsert(f"a{i}", 1) for i in range(10)}
        _append(tmp_path, list(final.values()))
        proc = _start_service(config)
        try:
            ledger = SqliteLedger(tmp_path / "ledger.db")
            _wait(lambda: ledger.counts()["live_docs"] == 10, "the first events committed")
            with search.paused():
                hung = {f"b{i}": _upsert(f"b{i}", 1) for i in range(10)}
                _append(tmp_path, list(hung.values()))
                final |= hung
                _wait(lambda: ledger.counts()["pending_intents"] > 0, "writes waiting on the hung server")
                time.sleep(8.0)  # well past the 3 s lease
                assert proc.poll() is None, "the service stopped while the keyword server hung"
            _wait(lambda: ledger.counts()["pending_intents"] == 0 and ledger.counts()["live_docs"] == 20, "convergence")
        finally:
            err = _stop_service(proc)
        assert proc.returncode == 0, err[-3000:]
        assert "fenced" not in err, err[-3000:]
        _assert_converged(config, final)


# Backoff of one keyword request over all its attempts (adapters/keyword/_search_engine.py).
KEYWORD_RETRY_BUDGET_S = 3.1


def test_a_service_started_before_its_keyword_store_writes_once_the_store_is_up(
    tmp_path: Path, lite_server: Any
) -> None:
    """As in a cluster where pods start in any order: the keyword server is not listening yet
    when `lockstep run` starts. The service still starts, says degraded, keeps every event
    prepared, and converges as soon as the server comes up (its writer builds the client then)."""
    from chaos.servers import OpenSearchApiServer

    search = OpenSearchApiServer()  # its port is reserved; nothing listens yet
    config, base = _outage_config(tmp_path, search.url, lite_server.uri)
    final: dict[str, dict[str, Any] | None] = {f"a{i}": _upsert(f"a{i}", 1) for i in range(10)}
    _append(tmp_path, list(final.values()))
    proc = _start_service(config)
    try:
        _wait(lambda: _get(base + "/readyz").status_code == 503, "/readyz reporting degraded")
        ledger = SqliteLedger(tmp_path / "ledger.db")
        _wait(lambda: ledger.counts()["pending_intents"] > 0, "events prepared while the keyword server is away")
        assert ledger.counts()["live_docs"] == 0
        time.sleep(3 * KEYWORD_RETRY_BUDGET_S)  # well past what one request retries for
        assert ledger.counts()["live_docs"] == 0
        search.start()
        _wait(lambda: ledger.counts()["pending_intents"] == 0 and ledger.counts()["live_docs"] == 10, "convergence")
        _wait(lambda: _get(base + "/readyz").status_code == 200, "/readyz ready")
        err = _stop_service(proc)
        assert proc.returncode == 0, err[-3000:]
        _assert_converged(config, final)
    finally:
        if proc.poll() is None:
            _stop_service(proc)
        search.stop()


def test_the_continuous_audit_publishes_drift_made_behind_locksteps_back(
    tmp_path: Path, opensearch_api_url: str, lite_server: Any
) -> None:
    """Inside lockstep run, audit rounds publish zero drift on a clean system and count a chunk
    deleted from the keyword index behind lockstep's back."""
    suffix = uuid.uuid4().hex[:8]
    keyword = {"kind": "opensearch", "url": opensearch_api_url, "index": f"caudit-{suffix}"}
    vector = {"uri": lite_server.uri, "collection": f"caudit_{suffix}"}
    port = _free_port()
    run = {"shards": 2, "http_port": port, "audit_interval_s": 1.0, "audit_sample_docs": 1000}
    config = _config(tmp_path, keyword=keyword, vector=vector, run=run)
    base = f"http://127.0.0.1:{port}"
    _append(tmp_path, [_upsert(f"d{i}", 1) for i in range(40)])
    proc = _start_service(config)
    missing = 'lockstep_drift_chunks{category="missing",index="keyword"}'
    try:
        ledger = SqliteLedger(tmp_path / "ledger.db")
        _wait(lambda: ledger.counts()["live_docs"] == 40, "the events committed")
        rounds_before = _metric(base, "lockstep_audit_rounds_total")
        _wait(lambda: _metric(base, "lockstep_audit_rounds_total") >= rounds_before + 2, "two clean audit rounds")
        assert _metric(base, missing) == 0 and _metric(base, "lockstep_audit_documents") == 40
        from coordinator.model import ChunkDelete

        index = build_keyword(KeywordSettings(**keyword))
        index.delete([ChunkDelete(chunk_id("d7", 0), 99)])
        index.close()
        _wait(lambda: _metric(base, missing) == 1, "the audit to count the missing chunk")
    finally:
        err = _stop_service(proc)
    assert proc.returncode == 0, err[-3000:]


def test_metrics_absorb_every_figure_a_shard_reports() -> None:
    """Every field of a shard status lands in a metric (a missing metric would crash the service)."""
    from coordinator.shard import ShardStatus
    from lockstep.metrics import Metrics

    metrics = Metrics()
    stats = dict.fromkeys(("events", "applied_events", "stale_events", "coalesced_events", "dead_letters",
                           "upserted_chunks", "rewritten_chunks", "deleted_chunks", "skipped_chunks",
                           "embed_calls", "cache_hits"), 3)
    metrics.absorb_status(ShardStatus(0, 1, 2, 0, "", stats, {"vector": 1}, {"keyword": 0.5}, {"keyword": 2}, 4))
    assert metrics.ahead.labels("0")._value.get() == 4
    assert metrics.apply_seconds.labels("keyword")._value.get() == 0.5
    assert metrics.apply_writes.labels("keyword")._value.get() == 2
    assert metrics.events.labels("applied")._value.get() == 3


# --- restarts after a crash, and stops at any moment --------------------------------------------


def _streaming_config(tmp_path: Path) -> tuple[Path, str]:
    """Embedded stores (a Tantivy directory, a milvus-lite file), small batches and small
    mailboxes, so that a run is still streaming seconds after it turned ready and a stop leaves
    records unread."""
    port = _free_port()
    run = {"shards": 2, "http_port": port, "batch_docs_max": 5, "mailbox_docs_max": 20, "offer_batch_max": 10}
    return _config(tmp_path, run=run), f"http://127.0.0.1:{port}"


# How long the killed run's processes stay frozen before they may go on, where the restart
# (`lockstep sync`, which keeps no run file) cannot clear them itself.
FROZEN_S = 5.0
# After freezing them, how long until a process counts as frozen (several DRIVER_WATCH_S).
FREEZE_SETTLE_S = 1.0


def _kill_group_mid_stream(
    tmp_path: Path, config: Path, *, freeze: bool = False
) -> tuple[list[psutil.Process], dict[int, str], dict[str, Any]]:
    """Start a run over 300 documents, SIGKILL its process group once 20 are committed (with
    ``freeze``, SIGSTOP the processes outside it right after), append more events; returns the
    processes it had started, those frozen still running (by name), and the newest state per
    document."""
    events, final = _history(docs=300, versions=1, seed=16)
    _append(tmp_path, events)
    proc = _start_service(config)
    frozen: dict[int, str] = {}
    try:
        ledger = SqliteLedger(tmp_path / "ledger.db")
        _wait(lambda: ledger.counts()["live_docs"] >= 20, "the first documents committed")
        ledger.close()
        outside = {p: p.name() for p in psutil.Process(proc.pid).children(recursive=True)
                   if os.getpgid(p.pid) != proc.pid}
        started = kill_process_group(proc)
        # After the kill: stopped before it, they would be sent SIGHUP and SIGCONT the moment
        # their process groups were orphaned (POSIX), and end.
        if freeze:
            for process in outside:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.suspend()
            # One whose driver watch had already sent its SIGKILL dies stopped or not: only
            # those still there after several of its rounds count as frozen.
            time.sleep(FREEZE_SETTLE_S)
            frozen = {p.pid: outside[p] for p in still_running(list(outside))}
    finally:
        if proc.poll() is None:
            _signal_tree(proc.pid, signal.SIGKILL)
            proc.wait()
    more, final2 = _history(docs=20, versions=2, seed=17, prefix="late")
    _append(tmp_path, more)
    return started, frozen, final | final2


def _restart(config: Path, command: str) -> subprocess.CompletedProcess[str]:
    """`lockstep run --exit-when-idle` or `lockstep sync`, started at once."""
    if command == "run":
        return _run(config, "--exit-when-idle")
    return subprocess.run([*LOCKSTEP, "sync", "-c", str(config)], capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S, check=False, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("restart", ["run", "sync"])
def test_a_restart_at_once_after_the_process_group_is_killed_converges(tmp_path: Path, restart: str) -> None:
    """SIGKILL of the service's process group only, mid-stream (as systemd or a container runtime
    sends it: Ray's actors, in groups of their own, get nothing), then `lockstep run` or, in the
    other case, `lockstep sync` at once: it gets past whatever the killed run left, both indexes
    equal the source with nothing pending, and no process of the killed run is left."""
    config, _ = _streaming_config(tmp_path)
    started: list[psutil.Process] = []
    try:
        started, _, final = _kill_group_mid_stream(tmp_path, config)
        again = _restart(config, restart)
        assert again.returncode == 0, again.stderr[-3000:]
        assert still_running(started) == [], "processes of the killed run are still running"
    finally:
        kill_all(started)
    _assert_converged(config, final)




@pytest.mark.parametrize("restart", ["run", "sync"])
def test_a_restart_gets_past_leftovers_frozen_after_the_kill(tmp_path: Path, restart: str) -> None:
    """As above, but the processes outside the group that are still running right after the kill
    are frozen (SIGSTOP), as if starved of CPU: `lockstep run` finds them through the killed
    run's record and kills them, naming the actors in its log; `lockstep sync` waits for the
    milvus-lite file (if its holder is among them) until they thaw after FROZEN_S and end
    themselves, their driver gone. Either converges, and nothing of the killed run is left."""
    config, _ = _streaming_config(tmp_path)
    started: list[psutil.Process] = []
    try:
        started, frozen, final = _kill_group_mid_stream(tmp_path, config, freeze=True)
        thaw = threading.Timer(FROZEN_S, _thaw, args=([p for p in started if p.pid in frozen],))
        if restart == "sync":
            thaw.start()
        again = _restart(config, restart)
        if restart == "sync":
            thaw.join()
        assert again.returncode == 0, again.stderr[-3000:]
        _wait(lambda: still_running(started) == [], "no process of the killed run running")
        actors = {pid for pid, name in frozen.items() if "Actor" in name}
        if restart == "run" and actors:
            line = next(line for line in again.stderr.splitlines() if "killing the processes it left" in line)
            killed = set(json.loads(line)["pids"])
            assert actors <= killed <= set(frozen), f"killed {killed}, frozen {frozen}"
    finally:
        kill_all(started)
    _assert_converged(config, final)


def _thaw(processes: list[psutil.Process]) -> None:
    for process in still_running(processes):
        try:
            process.resume()
        except psutil.NoSuchProcess:
            continue


def test_sigterm_while_ray_is_still_starting_exits_0_after_a_clean_stop(tmp_path: Path) -> None:
    """SIGTERM as soon as /healthz answers, while Ray is still starting: the service stops
    cleanly before any shard starts and exits 0, and a restart then converges."""
    config, base = _streaming_config(tmp_path)
    events, final = _history(docs=30, versions=1, seed=18)
    _append(tmp_path, events)
    proc = _start_service(config)
    log = LogTail(proc)
    try:
        _wait(lambda: _get(base + "/healthz").status_code == 200, "/healthz answering")
        proc.send_signal(signal.SIGTERM)
        code = log.wait_exit()
    finally:
        if proc.poll() is None:
            _signal_tree(proc.pid, signal.SIGKILL)
            proc.wait()
    assert code == 0, log.text()[-3000:]
    assert "shards ready" not in log.text(), "the SIGTERM came too late to test a stop while Ray starts"
    again = _run(config, "--exit-when-idle")
    assert again.returncode == 0, again.stderr[-3000:]
    _assert_converged(config, final)


def test_sigterm_while_streaming_exits_0_and_a_restart_converges(tmp_path: Path) -> None:
    """SIGTERM while documents are still streaming: the service stops reading, lets in-flight
    work commit, exits 0 with a checkpoint short of the end, and a restart converges."""
    config, _ = _streaming_config(tmp_path)
    events, final = _history(docs=300, versions=1, seed=19)
    _append(tmp_path, events)
    proc = _start_service(config)
    log = LogTail(proc)
    try:
        ledger = SqliteLedger(tmp_path / "ledger.db")
        _wait(lambda: ledger.counts()["live_docs"] >= 20, "the first documents committed")
        proc.send_signal(signal.SIGTERM)
        code = log.wait_exit()
        stopped_at = ledger.get_checkpoint("events")
        ledger.close()
    finally:
        if proc.poll() is None:
            _signal_tree(proc.pid, signal.SIGKILL)
            proc.wait()
    assert code == 0, log.text()[-3000:]
    assert stopped_at is not None and int(stopped_at) < (tmp_path / "events.jsonl").stat().st_size, (
        "the SIGTERM came too late to test a stop while streaming")
    again = _run(config, "--exit-when-idle")
    assert again.returncode == 0, again.stderr[-3000:]
    _assert_converged(config, final)


# Between two SIGTERMs sent to a service that is stopping.
SIGTERM_REPEAT_S = 0.05


def test_sigterm_again_and_again_while_stopping_still_exits_0(tmp_path: Path) -> None:
    """SIGTERM mid-stream, then SIGTERM again and again all through the stop (draining, actors
    stopping, Ray shutting down), as an impatient supervisor may: the stop stays clean, exits 0."""
    config, _ = _streaming_config(tmp_path)
    events, final = _history(docs=200, versions=1, seed=20)
    _append(tmp_path, events)
    proc = _start_service(config)
    log = LogTail(proc)
    try:
        ledger = SqliteLedger(tmp_path / "ledger.db")
        _wait(lambda: ledger.counts()["live_docs"] >= 20, "the first documents committed")
        ledger.close()
        while proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            time.sleep(SIGTERM_REPEAT_S)
        code = log.wait_exit()
    finally:
        if proc.poll() is None:
            _signal_tree(proc.pid, signal.SIGKILL)
            proc.wait()
    assert code == 0, log.text()[-3000:]
    again = _run(config, "--exit-when-idle")
    assert again.returncode == 0, again.stderr[-3000:]
    _assert_converged(config, final)


def _catches(pid: int, sig: signal.Signals) -> bool:
    """Whether the process has a handler installed for ``sig`` (its /proc status SigCgt mask)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
    return bool(caught & (1 << (sig - 1)))


def test_sigterm_while_the_command_line_still_imports_exits_0_and_other_commands_die_by_it(
    tmp_path: Path,
) -> None:
    """A SIGTERM that reaches `lockstep run` as soon as it catches the signal (while it still
    imports, long before the service exists) is a clean stop: exit 0. A command other than run
    that got one meanwhile ends by the signal, as it always did."""
    config, _ = _streaming_config(tmp_path)
    for command, expected in ((["run", "-c", str(config)], 0), (["status", "-c", str(config)], -signal.SIGTERM)):
        proc = subprocess.Popen([*LOCKSTEP, *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        try:
            _wait(lambda p=proc: _catches(p.pid, signal.SIGTERM) or p.poll() is not None, "SIGTERM caught")
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=STOP_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                _signal_tree(proc.pid, signal.SIGKILL)
                proc.wait()
        assert proc.returncode == expected, (command, err[-2000:])
        assert "Started a local Ray instance" not in err and "shards ready" not in err
