"""`lockstep run` on a Ray cluster of several nodes started with `ray start` on this machine: the
shard actors go to the node that offers their custom resource, and the loss of that node costs
nothing but time."""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from adapters.ledger.sqlite import SqliteLedger
from lockstep.settings import load_settings
from tests.support.raw_stores import documents, read_keyword, read_vector
from tests.support.service_process import STOP_TIMEOUT_S, LogTail, free_port, still_running

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")
# The custom resource the shard actors require; only the worker nodes offer it.
SHARD_RESOURCE = "lockstep_shard"
SHARDS = 2
# A node's `ray start` must report it running within this long.
NODE_START_S = 120.0
# How long a test waits for the service to reach a state before failing.
WAIT_S = 240.0
# Killed processes must be gone within this long.
KILL_WAIT_S = 30.0
# Ray's GCS checks each raylet's health this often and declares the node dead after this many
# failed checks: the defaults (3 s, 5) take 15 s or more to notice a killed node.
RAY_ENV = {
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "4",
}
# Chunk size of the config below (every paragraph of a document is one chunk).
MAX_CHARS = 80


@dataclass
class RayNode:
    """One Ray node, run by `ray start --block` in a session of its own; its processes are that
    process's descendants and whatever names the node's own temp dir."""

    name: str
    temp_dir: Path
    proc: subprocess.Popen[str]
    output: list[str] = field(default_factory=list)

    def processes(self) -> list[psutil.Process]:
        found = {p.pid: p for p in _descendants(self.proc.pid)}
        for process in psutil.process_iter(["cmdline"]):
            if str(self.temp_dir) in " ".join(process.info["cmdline"] or []):
                found.setdefault(process.pid, process)
        return list(found.values())

    def kill(self) -> None:
        """SIGKILL every process of this node (a node lost with its machine), and wait for them."""
        processes = self.processes()
        for process in processes:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                continue
        self.proc.wait(timeout=KILL_WAIT_S)
        deadline = time.monotonic() + KILL_WAIT_S
        while still_running(processes) and time.monotonic() < deadline:
            time.sleep(0.1)
        alive = still_running(processes)
        assert not alive, f"{self.name}: processes outlived SIGKILL: {alive}"


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


# The cluster's own token: `ray start --head` turns token authentication on whenever a token
# exists in ~/.ray, and every node and driver must then present the same one.
RAY_TOKEN = secrets.token_hex(32)


def _env() -> dict[str, str]:
    """Every Ray process imports lockstep from this tree (workers inherit their raylet's env) and
    authenticates with this test's token, whatever ~/.ray holds."""
    return {
        **os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **RAY_ENV,
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": RAY_TOKEN,
    }  # fmt: skip


def _start_node(name: str, temp_dir: Path, args: list[str]) -> RayNode:
    """`ray start --block` with ``args``; fails (never skips) if the node does not come up."""
    command = [
        str(RAY), "start", "--block", f"--temp-dir={temp_dir}", "--num-cpus=1", "--node-ip-address=127.0.0.1",
        "--disable-usage-stats", f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", *args,
    ]  # fmt: skip
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
        start_new_session=True, env=_env(),
    )  # fmt: skip
    node = RayNode(name, temp_dir, proc)
    started = threading.Event()
    threading.Thread(target=_read_output, args=(node, started), name=f"ray-{name}", daemon=True).start()
    if not started.wait(NODE_START_S):
        node.kill()
        raise AssertionError(f"Ray node {name} did not start: {''.join(node.output)[-3000:]}")
    return node


def _read_output(node: RayNode, started: threading.Event) -> None:
    assert node.proc.stdout is not None
    for line in node.proc.stdout:
        node.output.append(line)
        if "Ray runtime started" in line:
            started.set()


@pytest.fixture
def cluster_dir() -> Iterator[Path]:
    """A short directory for the nodes' temp dirs (Ray's socket paths must stay under ~107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="lsr", dir="/tmp"))
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.fixture
def nodes(cluster_dir: Path) -> Iterator[list[RayNode]]:
    """Every node a test starts is killed at its end, whatever happened (never `ray stop`: it
    would end every Ray on this machine)."""
    started: list[RayNode] = []
    yield started
    for node in reversed(started):
        node.kill()


def _config(tmp_path: Path, gcs_port: int, http_port: int) -> Path:
    """Embedded stores, small batches and mailboxes (a run still streams seconds after the first
    commits), shards that need the workers' resource."""
    config = {
        "source": {"kind": "jsonl", "path": str(tmp_path / "events.jsonl"), "name": "events"},
        "keyword": {"kind": "tantivy", "path": str(tmp_path / "tantivy")},
        "vector": {"uri": str(tmp_path / "milvus.db")},
        "ledger": {"path": str(tmp_path / "ledger.db")},
        "embedder": {"kind": "hashing"},
        "chunking": {"max_chars": MAX_CHARS},
        "run": {
            "ray_address": f"127.0.0.1:{gcs_port}", "shards": SHARDS, "shard_resources": {SHARD_RESOURCE: 1},
            "shard_replace_timeout_s": WAIT_S, "http_port": http_port, "batch_docs_max": 5,
            "mailbox_docs_max": 20, "offer_batch_max": 10, "audit_interval_s": 0,
        },
    }  # fmt: skip
    path = tmp_path / "lockstep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class Model:
    """The source's events as they were appended, and the newest state of every document."""

    path: Path
    final: dict[str, dict[str, Any] | None] = field(default_factory=dict)

    def append(self, events: list[dict[str, Any]]) -> None:
        with self.path.open("a") as out:
            out.writelines(json.dumps(e) + "\n" for e in events)
        for event in events:
            self.final[event["doc_id"]] = event if event["op"] == "upsert" else None

    @property
    def live(self) -> dict[str, dict[str, Any]]:
        return {d: e for d, e in self.final.items() if e is not None}


def _upsert(doc_id: str, version: int, paragraphs: int) -> dict[str, Any]:
    text = "\n\n".join(f"{doc_id} v{version} part {i} on refunds" for i in range(paragraphs))
    return {"op": "upsert", "doc_id": doc_id, "version": version, "text": text, "metadata": {"v": version}}


def _history(docs: range, versions: range, rng: random.Random, prefix: str) -> list[dict[str, Any]]:
    """For each document, upserts of ``versions`` (sizes vary: documents grow and shrink), one in
    five then deleted."""
    events = []
    for d in docs:
        doc_id = f"{prefix}-{d:04d}"
        events += [_upsert(doc_id, v, rng.randint(1, 5)) for v in versions]
        if rng.random() < 0.2:
            events.append({"op": "delete", "doc_id": doc_id, "version": versions[-1] + 1})
    return events


def _metric(base: str, name: str) -> float:
    for line in httpx.get(f"{base}/metrics", timeout=5.0).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def _not_ready_for(base: str, reason: str) -> bool:
    readyz = httpx.get(f"{base}/readyz", timeout=5.0)
    return readyz.status_code == 503 and reason in readyz.text


def _wait(predicate: Callable[[], bool], what: str, service: LogTail) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if predicate():
            return
        if service.proc.poll() is not None:
            raise AssertionError(f"the service exited ({service.proc.returncode}) waiting for {what}: "
                                 f"{service.text()[-4000:]}")
        time.sleep(0.25)
    raise AssertionError(f"timed out after {WAIT_S} s waiting for {what}: {service.text()[-4000:]}")


def _counts(tmp_path: Path) -> dict[str, int]:
    ledger = SqliteLedger(tmp_path / "ledger.db")
    try:
        return ledger.counts()
    finally:
        ledger.close()


def _logged(service: LogTail, event: str) -> list[dict[str, Any]]:
    """The service's JSON log lines of ``event`` (Ray writes lines of its own to the same stream)."""
    found = []
    for line in service.text().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("event") == event:
                found.append(record)
    return found


def _applied(tmp_path: Path, base: str, model: Model) -> Callable[[], bool]:
    def done() -> bool:
        counts = _counts(tmp_path)
        return (
            counts["live_docs"] == len(model.live)
            and counts["pending_intents"] == 0
            and _metric(base, "lockstep_unfinished_events") == 0
        )

    return done


def _assert_indexes_hold(config: Path, model: Model) -> None:
    """Both indexes, read with their own clients, hold exactly the model's live documents: text,
    metadata and version; nothing of a deleted document and no document the model lacks."""
    settings = load_settings(config)
    for name, chunks in (("keyword", read_keyword(settings)), ("vector", read_vector(settings))):
        docs = documents(chunks)
        assert set(docs) == set(model.live), (
            f"{name}: ghosts {sorted(set(docs) - set(model.live))[:10]}, "
            f"missing {sorted(set(model.live) - set(docs))[:10]}"
        )
        for doc_id, (version, text, metadata) in docs.items():
            want = model.live[doc_id]
            assert (version, text) == (want["version"], want["text"]), (
                f"{name}: {doc_id!r} holds v{version} {text!r}, not v{want['version']}"
            )
            assert all(m == want["metadata"] for m in metadata), f"{name}: {doc_id!r} holds metadata {metadata}"


def test_losing_the_node_of_the_shard_actors_loses_nothing(
    tmp_path: Path, cluster_dir: Path, nodes: list[RayNode]
) -> None:
    """On a head and a worker node started with `ray start`, the shard actors run on the worker
    (the only node offering their resource) and the writers on the head; the worker's processes
    are SIGKILLed mid-stream and events keep coming; the service says it is not ready while no
    node offers the resource, re-creates both shards on a worker that joins, and ends with every
    event applied once in effect in both indexes: no loss, no ghost, every delete applied."""
    gcs_port, http_port = free_port(), free_port()
    base = f"http://127.0.0.1:{http_port}"
    nodes.append(_start_node("head", cluster_dir / "h", [
        "--head", f"--port={gcs_port}", f"--ray-client-server-port={free_port()}", "--include-dashboard=false",
    ]))  # fmt: skip
    worker_args = [f"--address=127.0.0.1:{gcs_port}", f"--resources={json.dumps({SHARD_RESOURCE: SHARDS})}"]
    nodes.append(_start_node("worker-1", cluster_dir / "w1", worker_args))
    rng = random.Random(20)
    model = Model(tmp_path / "events.jsonl")
    model.append(_history(range(300), range(1, 3), rng, "doc"))
    config = _config(tmp_path, gcs_port, http_port)
    proc = subprocess.Popen(
        [sys.executable, "-m", "lockstep", "--log-level", "info", "run", "-c", str(config)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
        start_new_session=True, env=_env(), cwd=ROOT,
    )  # fmt: skip
    service = LogTail(proc)
    try:
        _wait(lambda: bool(_logged(service, "shards ready")), "the shards to start", service)
        ready = _logged(service, "shards ready")[0]
        first_node = ready["nodes"][0]
        assert ready["nodes"] == [first_node] * SHARDS and first_node != ready["driver_node"], (
            f"the shards must run on the worker, the writers on the head: {ready}"
        )
        _wait(lambda: _counts(tmp_path)["live_docs"] >= 20, "the first documents committed", service)
        nodes[1].kill()
        at_kill = _counts(tmp_path)
        assert at_kill["live_docs"] < len(model.live), f"the stream was over before the kill: {at_kill}"

        # Edits, deletes and new documents, written while the shards' node is gone. The edits start
        # above the first round's deletes (version 3), so no version is ever reused.
        model.append(_history(range(0, 300, 7), range(4, 6), rng, "doc") + _history(range(40), range(1, 3), rng, "late"))
        _wait(lambda: _metric(base, "lockstep_shards_lost_total") == SHARDS, "both shards noticed lost", service)
        _wait(lambda: _not_ready_for(base, "re-creating"), "/readyz to say the shards are being re-created", service)

        nodes.append(_start_node("worker-2", cluster_dir / "w2", worker_args))
        _wait(lambda: _metric(base, "lockstep_shards_recreated_total") == SHARDS, "both shards re-created", service)
        _wait(_applied(tmp_path, base, model), "every event applied", service)
        assert httpx.get(f"{base}/readyz", timeout=5.0).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert service.wait_exit() == 0, service.text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)

    lost = _logged(service, "shard actor lost; re-creating it")
    assert {line["node"] for line in lost} == {first_node}, lost
    handed_back = _logged(service, "shard lost; its unfinished work goes to its successor")
    assert sum(line["reoffered"] for line in handed_back) > 0, f"the lost shards held no work: {handed_back}"
    recreated = _logged(service, "shard re-created")
    assert sorted(line["shard"] for line in recreated) == list(range(SHARDS)), recreated
    assert all(line["node"] not in (first_node, ready["driver_node"]) for line in recreated), (
        f"the shards must end on the new worker: {recreated}"
    )
    counts = _counts(tmp_path)
    assert counts["pending_intents"] == 0 and counts["dead_letters"] == 0, counts
    _assert_indexes_hold(config, model)
