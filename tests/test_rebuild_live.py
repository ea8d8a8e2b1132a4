"""A rebuild next to a running `lockstep run` whose source keeps growing: liveness, on every Milvus server.

The service follows a JSONL file that a producer keeps appending to; `lockstep rebuild` changes
the model (another dimension) and the chunking meanwhile. The producer is at-least-once, as real
ones are: it sends some events again, and when the service switches to writing both generations
it re-sends everything since the rebuild began (a reconnect). Such events are duplicates in the
active generation and, for documents the new generation has not caught up with yet, news there.
Whatever the timing, the rebuild must end; once the producer stops, every event must be
committed in the live generation within a bound, the checkpoint must reach the end of the file,
and no intent may be left prepared in any generation.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest

from adapters.ledger.registry import registry_for
from chaos.servers import free_port
from coordinator.generations import GenState
from lockstep.bootstrap import build_ledger
from lockstep.settings import Settings, load_settings
from tests.test_rebuild import (
    LOCKSTEP,
    _check_generation,
    _config,
    _ready,
    _service_story,
    _start_service,
    _text,
    _wait,
    _write_history,
)

# The rebuild must end within this (a liveness bound: healthy runs take well under a minute).
REBUILD_BOUND_S = 240.0
# After the producer stops, every event must be committed and the checkpoint at the end within this.
QUIESCENCE_S = 90.0
# The producer's pace and the documents it edits (some of them new ones).
WRITES_PER_S = 25.0
WRITER_DOCS = 400
# Share of events sent again, picked among the last few sent.
RESENT_SHARE = 0.1
RESENT_FROM_LAST = 50
# While the service switches, each write re-sends the event written this long before it.
ECHO_LAG_S = 1.0
# Writes that keep flowing after the swap, so the new live generation takes live writes too.
WRITES_AFTER_SWAP_S = 3.0
# How often the test looks at the registry for the rebuild's progress and the service's switch.
WATCH_POLL_S = 0.1
# A graceful stop of the service must end within this, else it is killed.
STOP_S = 120.0


class _Producer:
    """Appends upserts and deletes with rising versions to the service's JSONL file (seeded) and
    sends some events again. While ``echoing``, each write also re-sends the event written
    ECHO_LAG_S before it: a producer whose acknowledgements stall retries what it sent."""

    def __init__(self, path: Path, final: dict[str, dict[str, Any] | None], seed: int) -> None:
        self.path, self.final, self.rng = path, final, random.Random(seed)
        self.versions = {doc: 5 for doc in final}
        self.sent: list[dict[str, Any]] = []
        self.resent = 0
        self.echoed = 0
        self.echoing = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="jsonl-producer", daemon=True)

    def _new_event(self) -> dict[str, Any]:
        doc = f"doc-{self.rng.randrange(WRITER_DOCS):03d}"
        version = self.versions.get(doc, 5) + 1
        self.versions[doc] = version
        if self.rng.random() < 0.1:
            return {"op": "delete", "doc_id": doc, "version": version}
        return {"op": "upsert", "doc_id": doc, "version": version, "text": _text(self.rng.randrange(80), version),
                "metadata": {"team": "live"}}

    def _next(self) -> list[dict[str, Any]]:
        again = []
        if self.sent and self.rng.random() < RESENT_SHARE:
            again.append(self.rng.choice(self.sent[-RESENT_FROM_LAST:]))
        lag = round(ECHO_LAG_S * WRITES_PER_S)
        if self.echoing.is_set() and len(self.sent) >= lag:
            again.append(self.sent[-lag])
            self.echoed += 1
        self.resent += len(again)
        event = self._new_event()
        self.sent.append(event)
        self.final[event["doc_id"]] = event if event["op"] == "upsert" else None
        return [*again, event]

    def _loop(self) -> None:
        with self.path.open("a") as out:
            while not self.stop.wait(1 / WRITES_PER_S):
                out.write("".join(json.dumps(e) + "\n" for e in self._next()))
                out.flush()

    def __enter__(self) -> _Producer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


def _lag(config: Path, final: dict[str, dict[str, Any] | None], producer: _Producer) -> list[str]:
    """What keeps the service from being caught up: events not committed in the live generation,
    a checkpoint short of the end of the file, intents left prepared in any generation."""
    settings = load_settings(config)
    home = build_ledger(settings)
    problems: list[str] = []
    try:
        gens = registry_for(home).all()
        end = (config.parent / "events.jsonl").stat().st_size
        checkpoint = home.get_checkpoint("events")
        if checkpoint != str(end):
            problems.append(f"checkpoint {checkpoint} short of the end of the file ({end})")
        for gen in (g for g in gens if g.live):
            problems += _generation_lag(settings, home, gen.number, gen.state is GenState.ACTIVE, final, producer)
    finally:
        home.close()
    return problems


def _generation_lag(settings: Settings, home: Any, number: int, is_live: bool,
                    final: dict[str, dict[str, Any] | None], producer: _Producer) -> list[str]:
    ledger = home if number == 1 else build_ledger(settings, generation=number)
    try:
        problems = [f"generation {number}: intent {i.doc_id}@v{i.version} prepared, done {sorted(i.done)}"
                    for i in ledger.pending()]
        return problems + (_not_committed(ledger, final, producer) if is_live else [])
    finally:
        if ledger is not home:
            ledger.close()


def _not_committed(ledger: Any, final: dict[str, dict[str, Any] | None], producer: _Producer) -> list[str]:
    docs = ledger.get_docs(final)
    out = []
    for doc, event in final.items():
        want = producer.versions.get(doc, 5) if event is None else int(event["version"])
        state = docs.get(doc)
        if state is None or state.version != want or state.deleted != (event is None):
            have = None if state is None else f"v{state.version}{' deleted' if state.deleted else ''}"
            out.append(f"{doc}: committed {have}, source v{want}{' deleted' if event is None else ''}")
    return out


def _echo_until_the_switch(
    config: Path, rebuild: subprocess.Popen[str], producer: _Producer, pid: int, deadline: float
) -> None:
    """Watch the registry: from the moment the rebuild registers generation 2 until the service
    writes both generations, the producer echoes (so the service's first batches after its
    switch hold duplicates of events generation 1 committed and generation 2 has not seen)."""
    home = build_ledger(load_settings(config))
    registry = registry_for(home)
    try:
        while rebuild.poll() is None and time.monotonic() < deadline:
            if not producer.echoing.is_set() and any(g.number == 2 for g in registry.all()):
                producer.echoing.set()
            service = [n for owner, n in registry.writers().items() if f"#{pid}-" in owner]
            if producer.echoing.is_set() and service == [(1, 2)]:
                producer.echoing.clear()
                return
            time.sleep(WATCH_POLL_S)
    finally:
        producer.echoing.clear()
        home.close()


@pytest.mark.parametrize("milvus", ["lite_server", "real_milvus"])
def test_a_rebuild_under_live_appends_ends_and_every_event_lands_in_the_live_generation(
    tmp_path: Path, opensearch_api_url: str, milvus: str, request: pytest.FixtureRequest
) -> None:
    """A rebuild to another dimension and chunking next to a service whose at-least-once
    producer keeps appending finishes, and then every event is committed in the live
    generation, the checkpoint reaches the end of the file and no generation holds an intent."""
    seed = random.randrange(2**32)
    server = request.getfixturevalue(milvus)
    name = f"rb-appends-{uuid.uuid4().hex[:6]}"
    port = free_port()
    config = _config(
        tmp_path,
        keyword={"kind": "opensearch", "url": opensearch_api_url, "index": name},
        vector={"uri": server.uri, "collection": name.replace("-", "_")},
        run={"shards": 2, "http_port": port, "audit_interval_s": 0, "grace_s": 30},
    )
    final = _write_history(tmp_path, 40)
    log = tmp_path / "run.log"
    service = _start_service(config, log)
    try:
        _wait(lambda: _ready(port), "the service to be ready", explain=lambda: _service_story(service, log))
        with _Producer(tmp_path / "events.jsonl", final, seed) as producer:
            rebuilt = _rebuild_beside(config, producer, service, log, seed)
            time.sleep(WRITES_AFTER_SWAP_S)
        assert producer.echoed > 0, "the producer echoed its events while the service switched"
        _wait(lambda: not _lag(config, final, producer), f"every event committed in generation 2 (seed {seed})",
              timeout_s=QUIESCENCE_S,
              explain=lambda: "\n".join(_lag(config, final, producer)[:20]) + "\n" + _service_story(service, log))
        assert json.loads(rebuilt)["swap"]["generation"] == 2
        _check_generation(config, 2, final)
        _check_generation(config, 1, final)  # the standby generation was kept in step
    finally:
        _stop(service)


def _rebuild_beside(config: Path, producer: _Producer, service: subprocess.Popen[bytes], log: Path,
                    seed: int) -> str:
    """Run the rebuild (model and chunking change) while the producer writes; its report."""
    rebuild = subprocess.Popen(
        [*LOCKSTEP, "rebuild", "-c", str(config), "--embedder", "hashing:dim=48", "--chunking", "max_chars=1200"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL, env=dict(os.environ),
    )
    deadline = time.monotonic() + REBUILD_BOUND_S
    try:
        _echo_until_the_switch(config, rebuild, producer, service.pid, deadline)
        out, err = rebuild.communicate(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        rebuild.kill()
        rebuild.communicate()
        pytest.fail(f"seed {seed}: the rebuild did not end within {REBUILD_BOUND_S} s\n"
                    + "\n".join(_lag(config, producer.final, producer)[:20]) + "\n" + _service_story(service, log))
    assert rebuild.returncode == 0, f"seed {seed}: " + err[-3000:] + "\n" + _service_story(service, log)
    return out


def _stop(service: subprocess.Popen[bytes]) -> None:
    """SIGTERM (drain, checkpoint, exit); SIGKILL of the service and every process it started if
    it does not end within STOP_S."""
    service.send_signal(signal.SIGTERM)
    try:
        service.wait(timeout=STOP_S)
    except subprocess.TimeoutExpired:
        root = psutil.Process(service.pid)
        for child in [*root.children(recursive=True), root]:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        service.wait()
