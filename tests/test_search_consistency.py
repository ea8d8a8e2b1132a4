"""Consistency of ``POST /search`` under concurrent writes and store faults, with teeth.

``lockstep run`` (webhook source, SQLite ledger, the OpenSearch-API server + Milvus 2.3.5 of this
test's own) takes a stream of edits, shrinks, regrowths, metadata-only changes, deletes and
re-creations while readers search continuously. Midway the keyword server is paused (SIGSTOP)
and resumed, later Milvus is killed (SIGKILL) and restarted. The checker
(``tests/support/read_checker.py``) replays the ledger's own commit history against every
answer. With the fence the answers must hold no violation; with the fence switched off
(``--unfenced-search``, test-only) the very same scenario must show violations, so the checker
is shown to catch what the fence prevents.
"""

from __future__ import annotations

import random
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from adapters.ledger.sqlite import SqliteLedger
from chaos.servers import OpenSearchApiServer, RealMilvusServer
from coordinator.consistency import ConsistencyToken
from tests.support.milvus_servers import start_or_fail
from tests.support.read_checker import History, HistoryCursor, Observation, Violation, check, install_history
from tests.support.service_process import LOCKSTEP, free_port, stop_service, wait_for

WEBHOOK_TOKEN = "consistency-test-webhook-token-01"
DOCS = 16
# Every chunk text holds this word, so that every keyword search matches every chunk, and the
# corpus stays below the legs' window: each answer's candidates are the whole indexes.
COMMON = "lockstep"
TOPICS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot")
CHUNK_CHARS = 120
# One write request every WRITE_PAUSE_S, holding up to WRITE_DOCS_MAX documents' changes.
WRITE_PAUSE_S = 0.05
WRITE_DOCS_MAX = 3
READERS = 2
PHASE_S = {"warm": 4.0, "keyword_paused": 6.0, "between": 4.0, "after_milvus": 6.0}
HTTP_TIMEOUT_S = 30.0
SETTLE_WAIT_S = 180.0


@dataclass
class Model:
    """What the writer has sent, per document: version, paragraphs (None: deleted), metadata."""

    rng: random.Random
    versions: dict[str, int] = field(default_factory=dict)
    texts: dict[str, list[str] | None] = field(default_factory=dict)
    tags: dict[str, int] = field(default_factory=dict)
    ops: dict[str, int] = field(default_factory=dict)

    def paragraph(self) -> str:
        words = [self.rng.choice(TOPICS) for _ in range(self.rng.randint(6, 12))]
        return f"{COMMON} {' '.join(words)} {self.rng.randrange(10**6)}."

    def create(self, doc_id: str) -> dict[str, Any]:
        self.texts[doc_id] = [self.paragraph() for _ in range(self.rng.randint(1, 3))]
        return self._upsert(doc_id, "create")

    def change(self, doc_id: str) -> dict[str, Any]:
        paragraphs = self.texts[doc_id]
        if paragraphs is None:
            return self.create(doc_id)
        op = self.rng.choice(["edit", "edit", "shrink", "grow", "metadata", "delete"])
        if op == "delete":
            self.texts[doc_id] = None
            return self._event(doc_id, "delete", {"op": "delete"})
        if op == "edit":
            paragraphs[self.rng.randrange(len(paragraphs))] = self.paragraph()
        elif op == "shrink":
            del paragraphs[1:]
        elif op == "grow":
            paragraphs += [self.paragraph() for _ in range(3 - len(paragraphs))]
        else:
            self.tags[doc_id] = self.tags.get(doc_id, 0) + 1
        return self._upsert(doc_id, op)

    def _upsert(self, doc_id: str, op: str) -> dict[str, Any]:
        text = "\n\n".join(self.texts[doc_id] or [])
        return self._event(doc_id, op, {"op": "upsert", "text": text, "metadata": {"tag": self.tags.get(doc_id, 0)}})

    def _event(self, doc_id: str, op: str, body: dict[str, Any]) -> dict[str, Any]:
        self.versions[doc_id] = self.versions.get(doc_id, 0) + 1
        self.ops[op] = self.ops.get(op, 0) + 1
        return {"doc_id": doc_id, "version": self.versions[doc_id], **body}


@dataclass
class Run:
    """Everything the scenario observed."""

    observations: list[Observation] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    degraded: dict[str, int] = field(default_factory=dict)
    fenced: dict[str, int] = field(default_factory=dict)
    token: ConsistencyToken = field(default_factory=lambda: ConsistencyToken.of([]))
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[tuple[OpenSearchApiServer, RealMilvusServer]]:
    """A keyword server and a Milvus of this test's own: it pauses and kills them."""
    keyword = OpenSearchApiServer(log_path=tmp_path / "osmem.log")
    start_or_fail(keyword)
    (tmp_path / "milvus").mkdir()
    milvus = RealMilvusServer(tmp_path / "milvus")
    try:
        start_or_fail(milvus)
        yield keyword, milvus
    finally:
        milvus.stop()
        keyword.stop()


@pytest.mark.parametrize("fenced", [True, False], ids=["fenced", "unfenced"])
def test_searches_serve_only_committed_states_while_writes_and_faults_go_on(
    fenced: bool, stores: tuple[OpenSearchApiServer, RealMilvusServer], tmp_path: Path
) -> None:
    """With the fence, no answer serves a hit no committed state held while it ran, a document
    deleted before it started, or two versions of one document; without it, the checker finds
    such answers in the same scenario."""
    keyword, milvus = stores
    port = free_port()
    config = _config(tmp_path, port, keyword.url, milvus.uri)
    ledger_path = tmp_path / "ledger.db"
    SqliteLedger(ledger_path).close()
    install_history(ledger_path)
    proc = _start(config, fenced)
    base = f"http://127.0.0.1:{port}"
    run, model = Run(), Model(random.Random(23))
    stop = threading.Event()
    try:
        wait_for(lambda: _search_open(base), "POST /search open", proc)
        with httpx.Client(base_url=base, timeout=HTTP_TIMEOUT_S) as http:
            _write(http, run, [model.create(f"doc-{i}") for i in range(DOCS)])
            _settle(http, run)
        threads = [threading.Thread(target=_writer, args=(base, model, run, stop), daemon=True)]
        threads += [
            threading.Thread(target=_reader, args=(base, ledger_path, run, stop, random.Random(i)), daemon=True)
            for i in range(READERS)
        ]
        for thread in threads:
            thread.start()
        _faults(keyword, milvus, proc)
        stop.set()
        for thread in threads:
            thread.join(HTTP_TIMEOUT_S * 2)
        with httpx.Client(base_url=base, timeout=SETTLE_WAIT_S + HTTP_TIMEOUT_S) as http:
            _settle(http, run)
    finally:
        stop.set()
        keyword.resume()
        err = stop_service(proc)
    assert proc.returncode == 0, err[-3000:]
    violations = check(History.read(ledger_path), run.observations)
    _assert_scenario_happened(run, model)
    if fenced:
        assert violations == [], _shown(violations)
        assert sum(run.fenced.values()) > 0, "the fence never had anything to drop: the scenario has no teeth"
    else:
        assert violations, "the checker found nothing with the fence off: it cannot be trusted with it on"
        assert {v.kind for v in violations} & {"never_committed", "mixed_versions", "deleted_before_request"}


def _config(tmp_path: Path, port: int, keyword_url: str, milvus_uri: str) -> Path:
    config = {
        "source": {"kind": "webhook", "name": "hook", "token": WEBHOOK_TOKEN},
        "keyword": {"kind": "opensearch", "url": keyword_url, "index": "consistency", "request_timeout_s": 10},
        "vector": {"uri": milvus_uri, "collection": "consistency", "request_timeout_s": 10, "connect_timeout_s": 5},
        "ledger": {"path": str(tmp_path / "ledger.db")},
        "embedder": {"kind": "hashing"},
        "chunking": {"max_chars": CHUNK_CHARS},
        "run": {"shards": 2, "http_port": port, "batch_docs_max": 8, "audit_interval_s": 0, "grace_s": 60},
        "search": {"window": 50, "leg_timeout_s": 1.0, "consistency_wait_s": SETTLE_WAIT_S},
    }
    path = tmp_path / "lockstep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _start(config: Path, fenced: bool) -> subprocess.Popen[str]:
    extra = [] if fenced else ["--unfenced-search"]
    return subprocess.Popen(
        [*LOCKSTEP, "--log-level", "info", "run", "-c", str(config), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


def _search_open(base: str) -> bool:
    try:
        return httpx.post(f"{base}/search", json={"query": COMMON}, timeout=HTTP_TIMEOUT_S).status_code == 200
    except httpx.TransportError:
        return False


def _faults(keyword: OpenSearchApiServer, milvus: RealMilvusServer, proc: subprocess.Popen[str]) -> None:
    """Writes and reads go on throughout: a quiet spell, the keyword server paused, a quiet spell,
    Milvus killed and restarted, a quiet spell."""
    time.sleep(PHASE_S["warm"])
    keyword.pause()
    time.sleep(PHASE_S["keyword_paused"])
    keyword.resume()
    time.sleep(PHASE_S["between"])
    milvus.kill9_and_restart()
    time.sleep(PHASE_S["after_milvus"])
    assert proc.poll() is None, "the service died during the faults"


def _writer(base: str, model: Model, run: Run, stop: threading.Event) -> None:
    with httpx.Client(base_url=base, timeout=HTTP_TIMEOUT_S) as http:
        while not stop.is_set():
            docs = model.rng.sample(sorted(model.texts), model.rng.randint(1, WRITE_DOCS_MAX))
            _write(http, run, [model.change(d) for d in docs])
            stop.wait(WRITE_PAUSE_S)


def _write(http: httpx.Client, run: Run, events: list[dict[str, Any]]) -> None:
    """POST until stored (503 while the service is busy is retried: the inbox is idempotent)."""
    while True:
        response = http.post("/events", json=events, headers={"Authorization": f"Bearer {WEBHOOK_TOKEN}"})
        if response.status_code == 202:
            with run.lock:
                run.token = run.token.merge(ConsistencyToken.decode(response.json()["consistency_token"]))
            return
        assert response.status_code == 503, response.text
        time.sleep(0.2)


def _reader(base: str, ledger_path: Path, run: Run, stop: threading.Event, rng: random.Random) -> None:
    history = HistoryCursor(ledger_path)
    try:
        with httpx.Client(base_url=base, timeout=HTTP_TIMEOUT_S) as http:
            while not stop.is_set():
                query = f"{COMMON} {rng.choice(TOPICS)} {rng.choice(TOPICS)}"
                started = history.position()
                response = http.post("/search", json={"query": query, "k": 100})
                ended = history.position()
                _observe(run, response, started, ended)
    finally:
        history.close()


def _observe(run: Run, response: httpx.Response, started: int, ended: int) -> None:
    with run.lock:
        run.statuses[response.status_code] = run.statuses.get(response.status_code, 0) + 1
        if response.status_code != 200:
            return
        answer = response.json()
        run.observations.append(Observation(started, ended, tuple(answer["hits"])))
        for leg, report in answer["legs"].items():
            if report["status"] == "failed":
                run.degraded[leg] = run.degraded.get(leg, 0) + 1
        for reason, n in answer["fenced"].items():
            run.fenced[reason] = run.fenced.get(reason, 0) + n


def _settle(http: httpx.Client, run: Run) -> None:
    """Wait, through the service itself, until every change written so far is committed and visible."""
    response = http.post("/search", json={"query": COMMON, "consistent_with": run.token.encode(), "k": 1})
    assert response.status_code == 200, response.text


def _assert_scenario_happened(run: Run, model: Model) -> None:
    """The scenario did what it says: every kind of write, answers during both faults, many reads."""
    assert {"edit", "shrink", "grow", "metadata", "delete", "create"} <= set(model.ops), model.ops
    assert len(run.observations) >= 50, run.statuses
    assert run.degraded.get("keyword", 0) >= 1, f"no answer while the keyword server was paused: {run.degraded}"
    assert run.degraded.get("vector", 0) >= 1, f"no answer while Milvus was down: {run.degraded}"


def _shown(violations: list[Violation]) -> str:
    return "\n".join(f"{v.kind} {v.doc_id}: {v.detail}" for v in violations[:20])

