"""Blue-green rebuilds: generations, backfill, validation, alias swap, rollback, gc, resume."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from milvus_lite.server_manager import server_manager_instance
from pymilvus import MilvusClient

from adapters.keyword.tantivy_index import alias_target as tantivy_alias_target
from adapters.ledger.registry import registry_for
from chaos.servers import free_port
from coordinator.chunking import ChunkingSettings, chunk_id, chunk_text, content_hash
from coordinator.errors import ConfigError
from coordinator.invariants import ExpectedChunk, check_index
from lockstep.bootstrap import build_embedder, build_generation, build_ledger, build_vector, vector_settings
from lockstep.rebuild import Rebuild
from lockstep.runtime import runtime
from lockstep.settings import EmbedderSettings, load_settings

LOCKSTEP = [sys.executable, "-m", "lockstep"]
CLI_TIMEOUT_S = 300


def _config(tmp_path: Path, **overrides: Any) -> Path:
    config = {
        "source": {"kind": "jsonl", "path": str(tmp_path / "events.jsonl"), "name": "events"},
        "keyword": {"kind": "tantivy", "path": str(tmp_path / "tantivy")},
        "vector": {"uri": str(tmp_path / "milvus.db")},
        "ledger": {"path": str(tmp_path / "ledger.db")},
        "embedder": {"kind": "hashing", "dim": 32},
        "chunking": {"max_chars": 120},
        "sync": {"batch_events": 50},
        "rebuild": {"batch_docs": 10},
        **overrides,
    }
    path = tmp_path / "lockstep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _lockstep(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LOCKSTEP, *args], capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False,
        stdin=subprocess.DEVNULL, env=dict(os.environ),
    )


def _text(doc: int, version: int) -> str:
    # Paragraphs shared by many documents (boilerplate) and paragraphs of their own.
    return "\n\n".join(
        [f"Shared policy paragraph {p % 4} about refunds, invoices and shipping." for p in range(3)]
        + [f"Document {doc} version {version} paragraph {p} tells its own story." for p in range(doc % 5 + 1)]
    )


def _write_history(tmp_path: Path, docs: int) -> dict[str, dict[str, Any] | None]:
    """Upserts, edits and deletes; returns each document's final state (None: deleted)."""
    final: dict[str, dict[str, Any] | None] = {}
    with (tmp_path / "events.jsonl").open("a") as out:
        for version in (1, 2):
            for d in range(docs):
                if version == 2 and d % 3:
                    continue
                event = {"op": "upsert", "doc_id": f"doc-{d:03d}", "version": version, "text": _text(d, version),
                         "metadata": {"team": f"t{d % 2}"}}
                out.write(json.dumps(event) + "\n")
                final[event["doc_id"]] = event
        for d in range(0, docs, 7):
            out.write(json.dumps({"op": "delete", "doc_id": f"doc-{d:03d}", "version": 5}) + "\n")
            final[f"doc-{d:03d}"] = None
    return final


def _expected(final: dict[str, dict[str, Any] | None], chunking: ChunkingSettings) -> tuple[dict[str, ExpectedChunk], set[str]]:
    expected = {
        chunk_id(d, i): ExpectedChunk(chunk_id(d, i), content_hash(t))
        for d, ev in final.items() if ev is not None
        for i, t in enumerate(chunk_text(ev["text"], chunking))
    }
    return expected, {d for d, ev in final.items() if ev is None}


def _hashes(final: dict[str, dict[str, Any] | None], chunking: ChunkingSettings) -> set[str]:
    return {content_hash(t) for ev in final.values() if ev is not None for t in chunk_text(ev["text"], chunking)}


def _report(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr[-3000:]
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def _generations(config: Path) -> list[dict[str, Any]]:
    result = _lockstep("generations", "-c", str(config), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    gens: list[dict[str, Any]] = json.loads(result.stdout)
    return gens


def _check_generation(config: Path, number: int, final: dict[str, dict[str, Any] | None]) -> None:
    """Both indexes of generation ``number`` hold exactly the final state, cut its own way."""
    settings = load_settings(config)
    with runtime(settings) as rt:
        parts = {p.generation.number: p for p in rt.generations}[number]
        expected, deleted = _expected(final, parts.generation.chunking)
        violations = [
            *check_index("keyword", expected, deleted, list(parts.keyword.scan())),
            *check_index("vector", expected, deleted, list(parts.vector.scan())),
        ]
        pending = parts.ledger.pending()
        assert pending == [], f"{len(pending)} pending intents: {[(i.doc_id, i.version, sorted(i.done)) for i in pending[:10]]}"
    # The in-process milvus-lite server holds the file until released; the next CLI needs it.
    if settings.vector.is_embedded:
        server_manager_instance.release_server(settings.vector.uri)
    assert violations == [], "\n".join(map(str, violations[:20]))


def test_a_chunking_only_rebuild_embeds_only_texts_never_seen_and_swaps_and_rolls_back(tmp_path: Path) -> None:
    config = _config(tmp_path)
    final = _write_history(tmp_path, 60)
    assert _lockstep("sync", "-c", str(config)).returncode == 0
    old, new = ChunkingSettings(120), ChunkingSettings(70)
    # Generation 1 embedded every chunk text it ever saw (versions 1 and 2), so only the texts
    # the new cut produces and no version ever produced need the model.
    seen_before = {content_hash(t) for line in (tmp_path / "events.jsonl").read_text().splitlines()
                   if (ev := json.loads(line))["op"] == "upsert" for t in chunk_text(ev["text"], old)}
    unseen = _hashes(final, new) - seen_before
    assert unseen, "the test needs a cut that produces new chunk texts"

    report = _report(_lockstep("rebuild", "-c", str(config), "--chunking", "max_chars=70"))

    assert report["generation"] == 2 and report["previous"] == 1
    assert report["embed_calls"] == len(unseen)
    assert report["audit_rounds"][-1]["clean"] is True
    assert report["swap"]["keyword_switched_at"] <= report["swap"]["vector_switched_at"]
    assert str(tantivy_alias_target(f"{tmp_path / 'tantivy'}.live")).rstrip("/") == f"{tmp_path / 'tantivy'}-g2"
    states = {g["number"]: g["state"] for g in _generations(config)}
    assert states == {1: "standby", 2: "active"}
    _check_generation(config, 2, final)
    # The audit and the reconciler look at the generation readers see, cut its own way.
    audited = _lockstep("audit", "-c", str(config), "--json")
    assert audited.returncode == 0, audited.stdout[-2000:] + audited.stderr[-2000:]

    # Live writes after the swap reach both generations (the standby is kept for a rollback).
    with (tmp_path / "events.jsonl").open("a") as out:
        edit = {"op": "upsert", "doc_id": "doc-001", "version": 9, "text": _text(1, 9), "metadata": {}}
        out.write(json.dumps(edit) + "\n")
    final["doc-001"] = edit
    assert _lockstep("sync", "-c", str(config)).returncode == 0
    _check_generation(config, 2, final)
    _check_generation(config, 1, final)

    rolled = _report(_lockstep("rebuild", "-c", str(config), "--rollback"))
    assert rolled["rollback"]["generation"] == 1
    assert str(tantivy_alias_target(f"{tmp_path / 'tantivy'}.live")).rstrip("/") == str(tmp_path / "tantivy")
    assert {g["number"]: g["state"] for g in _generations(config)} == {1: "active", 2: "standby"}

    dropped = _report(_lockstep("gc", "-c", str(config), "--retention-s", "0"))
    assert dropped == {"dropped": [2]}
    assert not (tmp_path / "tantivy-g2").exists()
    assert {g["number"]: g["state"] for g in _generations(config)} == {1: "active", 2: "dropped"}
    _check_generation(config, 1, final)


def test_a_model_change_never_mixes_vectors(tmp_path: Path) -> None:
    queries = tmp_path / "queries.txt"
    # Each query names one document's own number, so both generations must find that document.
    queries.write_text("5\n11\n\n13\n")
    config = _config(tmp_path, rebuild={"batch_docs": 10, "queries_path": str(queries), "queries_k": 5})
    final = _write_history(tmp_path, 20)
    assert _lockstep("sync", "-c", str(config)).returncode == 0
    report = _report(_lockstep("rebuild", "-c", str(config), "--embedder", "hashing:dim=48"))
    # A new model embeds every distinct chunk text once; the cache of the old model is no help.
    assert report["embed_calls"] == len(_hashes(final, ChunkingSettings(120)))
    # The query set ran on both generations: the same chunks, so the keyword side agrees;
    # the vector side is another model's opinion, reported as a share in [0, 1].
    overlap = report["query_overlap"]
    assert overlap["queries"] == 3 and overlap["k"] == 5
    assert overlap["keyword_overlap_mean"] == 1.0
    assert all(0.0 <= q["vector_overlap"] <= 1.0 for q in overlap["per_query"])
    _check_generation(config, 2, final)

    settings = load_settings(config)
    gens = {g.number: g for g in Rebuild(settings).generations()}
    old_model = build_embedder(EmbedderSettings(kind="hashing", dim=32))
    home = build_ledger(settings)
    try:
        with pytest.raises(ConfigError, match="refusing to write vectors"):
            build_generation(settings, gens[2], home, source_name="x", inner=old_model)
    finally:
        home.close()
    # The collection itself remembers its model: even a client that skips the ledger is refused.
    index = build_vector(vector_settings(settings, gens[2]), dim=48, model_id="another-model")
    try:
        with pytest.raises(ConfigError, match="another-model"):
            index.ensure()
    finally:
        index.close()
        server_manager_instance.release_server(settings.vector.uri)


def test_a_rebuild_killed_mid_backfill_resumes_without_re_embedding(tmp_path: Path) -> None:
    config = _config(tmp_path)
    final = _write_history(tmp_path, 80)
    assert _lockstep("sync", "-c", str(config)).returncode == 0

    killed = _lockstep("rebuild", "-c", str(config), "--embedder", "hashing:dim=40", "--crash-after-batches", "3")
    assert killed.returncode == -9, killed.stderr[-2000:]
    gen2 = {g["number"]: g for g in _generations(config)}[2]
    assert gen2["state"] == "building" and not gen2["backfill_done"] and gen2["backfilled_docs"] == 30

    with sqlite3.connect(tmp_path / "ledger.db") as db:
        embedded_before = db.execute(
            "SELECT COUNT(*) FROM embeddings WHERE model LIKE 'hashing-v%-d40%'"
        ).fetchone()[0]
    assert embedded_before > 0

    report = _report(_lockstep("rebuild", "-c", str(config), "--embedder", "hashing:dim=40"))
    assert report["resumed_from"] == gen2["backfill_position"]
    assert report["backfilled_docs"] == len(final) - 30
    assert report["embed_calls"] == len(_hashes(final, ChunkingSettings(120))) - embedded_before
    _check_generation(config, 2, final)


@pytest.mark.parametrize("operation", ["abort", "gc"])
def test_an_abort_or_gc_drops_a_generation_only_once_no_live_writer_writes_it(tmp_path: Path, operation: str) -> None:
    """A running service writes generation 2 until its next registry poll: the abort (or gc of
    the standby) records the generation as no longer live at once, but drops its stores only
    after the service announced a set without it. Dropped sooner, the service's writes there
    would fail for good and its drain before switching would never end."""
    from lockstep.generation_parts import WRITER_TTL_S

    config = _config(tmp_path)
    _write_history(tmp_path, 12)
    assert _lockstep("sync", "-c", str(config)).returncode == 0
    settings = load_settings(config)
    built = Rebuild(settings)
    try:
        report = built.run(settings.embedder, ChunkingSettings(70), swap=operation == "gc")
        if operation == "gc":
            built.rollback()  # generation 2 becomes the standby that gc drops
        built.registry.announce("old-service", [1, 2], WRITER_TTL_S)
    finally:
        built.close()
    dropped_number, let_go = report.generation, "aborted" if operation == "abort" else "retired"
    polls: list[tuple[str, bool]] = []

    def poll(_seconds: float) -> None:
        """The service's view while the operation waits: it switches at the third poll."""
        state = {g.number: g.state.value for g in registry.all()}[dropped_number]
        polls.append((state, (tmp_path / "tantivy-g2").exists() and (tmp_path / "ledger.g2.db").exists()))
        if len(polls) == 3:
            registry.announce("old-service", [1], WRITER_TTL_S)

    dropper = Rebuild(settings, sleep=poll)
    registry = dropper.registry
    try:
        outcome = dropper.abort() if operation == "abort" else dropper.gc(now=time.time(), retention_s=0.0)
        assert outcome == (dropped_number if operation == "abort" else [dropped_number])
        states = {g.number: g.state.value for g in registry.all()}
    finally:
        registry.withdraw("old-service")
        dropper.close()
    server_manager_instance.release_server(settings.vector.uri)
    assert polls == [(let_go, True)] * 3, "no longer live at once, stores kept while written"
    assert states == {1: "active", 2: "dropped"}
    assert not (tmp_path / "tantivy-g2").exists() and not (tmp_path / "ledger.g2.db").exists()


# --- a live rebuild under `lockstep run`, with readers querying the aliases throughout ----------


def _start_service(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([*LOCKSTEP, "--log-level", "info", "run", "-c", str(config)], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _wait(predicate: Any, what: str, timeout_s: float = 120.0, explain: Any = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}" + (f"\n{explain()}" if explain else ""))


def _service_story(service: subprocess.Popen[bytes], log: Path, check: Any = None) -> str:
    """What a failed wait needs to be diagnosed from CI's output alone: whether the service is
    still running, why the check fails, and the service's warnings and errors."""
    lines = [f"service exit code: {service.poll()}"]
    if check is not None:
        try:
            check()
            lines.append("the check passes now")
        except AssertionError as exc:
            lines.append(f"the check fails: {str(exc)[:3000]}")
    notable = [line for line in log.read_text(errors="replace").splitlines()
               if any(word in line for word in ('"warning"', '"error"', "Traceback", "Error", "generations changed"))]
    lines.append("service log (warnings, errors, switches; last 60):")
    lines.extend(line[:400] for line in notable[-60:])
    return "\n".join(lines)


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


class _Readers:
    """Queries both aliases in a loop, as a search front end would; counts every failure."""

    def __init__(self, os_url: str, kw_alias: str, milvus_uri: str, vec_alias: str) -> None:
        self.os_url, self.kw_alias, self.vec_alias = os_url, kw_alias, vec_alias
        self.milvus = MilvusClient(uri=milvus_uri)
        self.queries = 0
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        with httpx.Client(timeout=10) as http:
            while not self.stop.is_set():
                try:
                    r = http.get(f"{self.os_url}/{self.kw_alias}/_search", params={"q": "text:refunds", "size": 5})
                    if r.status_code != 200 or r.json()["hits"]["total"]["value"] == 0:
                        self.failures.append(f"keyword: {r.status_code} {r.text[:200]}")
                    rows = self.milvus.query(collection_name=self.vec_alias, filter="version >= 0", limit=5,
                                             output_fields=["chunk_id"])
                    if not rows:
                        self.failures.append("vector: no rows through the alias")
                except Exception as exc:  # every kind of failure counts
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                self.queries += 1
                time.sleep(0.02)

    def __enter__(self) -> _Readers:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        self.milvus.close()


def test_a_live_rebuild_never_fails_a_query_and_ends_equal_to_the_source(
    tmp_path: Path, opensearch_api_url: str, lite_server: Any
) -> None:
    port = free_port()
    name = f"rb-live-{uuid.uuid4().hex[:6]}"
    config = _config(
        tmp_path,
        keyword={"kind": "opensearch", "url": opensearch_api_url, "index": name},
        vector={"uri": lite_server.uri, "collection": name.replace("-", "_")},
        run={"shards": 2, "http_port": port, "audit_interval_s": 0, "grace_s": 30},
    )
    final = _write_history(tmp_path, 80)
    assert _lockstep("sync", "-c", str(config)).returncode == 0
    kw_alias, vec_alias = f"{name}-live", f"{name.replace('-', '_')}_live"
    service = _start_service(config, tmp_path / "run.log")
    stop_writes = threading.Event()
    rng = random.Random(3)

    def write_live() -> None:
        version = 10
        with (tmp_path / "events.jsonl").open("a") as out:
            while not stop_writes.is_set():
                doc = f"doc-{rng.randrange(80):03d}"
                version += 1
                event = {"op": "upsert", "doc_id": doc, "version": version, "text": _text(rng.randrange(80), version),
                         "metadata": {"team": "live"}}
                out.write(json.dumps(event) + "\n")
                out.flush()
                final[doc] = event
                time.sleep(0.05)

    try:
        _wait(lambda: _ready(port), "the service to be ready")
        writer = threading.Thread(target=write_live, daemon=True)
        with _Readers(opensearch_api_url, kw_alias, lite_server.uri, vec_alias) as readers:
            writer.start()
            rebuilt = _lockstep("rebuild", "-c", str(config), "--chunking", "max_chars=70")
            assert rebuilt.returncode == 0, rebuilt.stderr[-3000:] + "\n" + _service_story(service, tmp_path / "run.log")
            time.sleep(3)  # writes keep flowing after the swap
            stop_writes.set()
            writer.join()
            _wait(lambda: _generation_equals(config, 2, final), "generation 2 to catch up with the last writes",
                  explain=lambda: _service_story(service, tmp_path / "run.log",
                                                 lambda: _check_generation(config, 2, final)))
            queries_during = readers.queries
        report = _report(rebuilt)
        assert report["swap"]["generation"] == 2 and report["audit_rounds"][-1]["clean"] is True
        assert readers.failures == [], readers.failures[:5]
        assert queries_during > 20
        targets = httpx.get(f"{opensearch_api_url}/_alias/{kw_alias}").json()
        assert list(targets) == [f"{name}-g2"]
        _check_generation(config, 1, final)  # the standby generation was kept in step
        # The running service noticed generation 2 and wrote both generations through the
        # two-phase path (it does not restart for anything else), and validation waited for it.
        assert "switching shard actors" in (tmp_path / "run.log").read_text()
        assert [w for w in report["live_writers"] if f"#{service.pid}-" in w], report["live_writers"]

        rolled = _report(_lockstep("rebuild", "-c", str(config), "--rollback"))
        assert rolled["rollback"]["generation"] == 1
        expected_old, _ = _expected(final, ChunkingSettings(120))
        httpx.post(f"{opensearch_api_url}/{name}/_refresh")
        count = httpx.get(f"{opensearch_api_url}/{kw_alias}/_count").json()["count"]
        assert count == len(expected_old)
    finally:
        stop_writes.set()
        service.send_signal(signal.SIGTERM)
        try:
            service.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(service.pid, signal.SIGKILL)
            service.wait()
    home = build_ledger(load_settings(config))
    try:
        assert registry_for(home).writers() == {}, "the stopped service withdrew its announcement"
    finally:
        home.close()


def test_validation_waits_until_every_live_writer_writes_the_new_generation(
    tmp_path: Path, opensearch_api_url: str, lite_server: Any
) -> None:
    """A writer still writing generation 1 only (a service that has not switched yet) holds
    validation: a commit it makes to generation 1 meanwhile reaches generation 2 before the
    swap. Without the wait, validation would have read generation 1 before that commit."""
    from coordinator.events import ChangeEvent, Op
    from lockstep.generation_parts import WRITER_TTL_S

    config, final, settings = _synced_on_servers(tmp_path, "rb-wait", opensearch_api_url, lite_server.uri)
    rebuild = Rebuild(settings)
    registry = rebuild.registry
    registry.announce("old-service", [1], WRITER_TTL_S)  # running, switched to nothing yet
    listed = _lockstep("generations", "-c", str(config))
    assert listed.returncode == 0 and "old-service" in listed.stdout, listed.stdout + listed.stderr
    backfilled = threading.Event()
    outcome: dict[str, Any] = {}

    def progress(done: int, total: int) -> None:
        if done and done == total:
            backfilled.set()

    def run() -> None:
        try:
            outcome["report"] = rebuild.run(settings.embedder, ChunkingSettings(70), progress=progress)
        except BaseException as exc:  # reported by the assertions below
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    held_s = 4.0
    try:
        assert backfilled.wait(timeout=120), outcome
        time.sleep(held_s / 2)
        gen1 = next(g for g in registry.all() if g.number == 1)
        old_side = build_generation(settings, gen1, rebuild.home, source_name="events")
        edit = ChangeEvent(Op.UPSERT, "doc-004", 40, _text(4, 40), {"team": "late"})
        old_side.engine.apply([edit])  # the old service commits to generation 1 only
        old_side.close(keep_ledger=True)
        final["doc-004"] = {"text": edit.text}
        time.sleep(held_s / 2)
        assert thread.is_alive() and outcome == {}, outcome
        assert next(g for g in registry.all() if g.number == 2).state.value == "building", "swapped too early"
        registry.announce("old-service", [1, 2], WRITER_TTL_S)  # it switched
        thread.join(timeout=300)
    finally:
        registry.withdraw("old-service")
        thread.join(timeout=300)
        rebuild.close()
    server_manager_instance.release_server(settings.vector.uri)
    assert "error" not in outcome, outcome
    report = outcome["report"]
    assert report.live_writers == ["old-service"]
    assert report.seconds["writers_switch"] >= held_s / 2
    assert report.audit_rounds[-1]["clean"] is True and report.swap is not None
    _check_generation(config, 2, final)


def _synced_on_servers(
    tmp_path: Path, prefix: str, opensearch_url: str, milvus_uri: str
) -> tuple[Path, dict[str, dict[str, Any] | None], Any]:
    """An installation on the OpenSearch-API and milvus-lite servers (names unique to the test),
    loaded by `lockstep sync` with 30 documents' history: its config, final states and settings."""
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    config = _config(
        tmp_path,
        keyword={"kind": "opensearch", "url": opensearch_url, "index": name},
        vector={"uri": milvus_uri, "collection": name.replace("-", "_")},
    )
    final = _write_history(tmp_path, 30)
    assert _lockstep("sync", "-c", str(config)).returncode == 0
    return config, final, load_settings(config)


def _generation_equals(config: Path, number: int, final: dict[str, dict[str, Any] | None]) -> bool:
    try:
        _check_generation(config, number, final)
    except AssertionError:
        return False
    return True


def test_validation_repairs_what_the_new_generation_missed_before_it_swaps(tmp_path: Path) -> None:
    """Writes that reached only generation 1 (e.g. while no service watched the registry) are
    found by the validating audit and given to generation 2 at their own versions."""
    from coordinator.events import ChangeEvent, Op

    config = _config(tmp_path)
    final = _write_history(tmp_path, 30)
    assert _lockstep("sync", "-c", str(config)).returncode == 0
    first = _report(_lockstep("rebuild", "-c", str(config), "--embedder", "hashing:dim=24", "--no-swap"))
    assert first["swap"] is None and first["audit_rounds"][-1]["clean"] is True

    settings = load_settings(config)
    with runtime(settings) as rt:
        gen1 = {p.generation.number: p for p in rt.generations}[1]
        added = ChangeEvent(Op.UPSERT, "doc-new", 4, _text(99, 4), {"team": "x"})
        edited = ChangeEvent(Op.UPSERT, "doc-001", 30, _text(1, 30), {"team": "y"})
        removed = ChangeEvent(Op.DELETE, "doc-002", 30)
        never_seen = ChangeEvent(Op.DELETE, "doc-ghost", 7)  # a delete of a document never upserted
        gen1.engine.apply([added, edited, removed, never_seen])  # generation 1 only
    server_manager_instance.release_server(settings.vector.uri)
    final["doc-new"] = {"text": added.text}
    final["doc-001"] = {"text": edited.text}
    final["doc-002"] = None

    second = _report(_lockstep("rebuild", "-c", str(config), "--embedder", "hashing:dim=24"))
    assert second["audit_rounds"][0]["clean"] is False
    assert second["audit_rounds"][-1]["clean"] is True and second["swap"]["generation"] == 2
    _check_generation(config, 2, final)
    home = build_ledger(settings)
    try:
        g2 = build_ledger(settings, generation=2)
        states = g2.get_docs(["doc-new", "doc-001", "doc-002", "doc-ghost"])
        g2.close()
    finally:
        home.close()
    assert (states["doc-new"].version, states["doc-001"].version) == (4, 30)
    assert states["doc-002"].deleted and states["doc-002"].version == 30
    # Nothing of doc-ghost is in either generation's indexes, so no audit sees it; its tombstone
    # is copied anyway, or generation 2 would take a late upsert of it at version 6.
    assert states["doc-ghost"].deleted and states["doc-ghost"].version == 7
    assert second["tombstones_caught_up"] == 2  # doc-ghost and doc-002


def test_a_document_a_live_write_holds_is_set_aside_and_the_rest_of_its_batch_goes_on(
    tmp_path: Path, opensearch_api_url: str, lite_server: Any
) -> None:
    """The live service has an intent in flight in the new generation for one document of the
    backfill's first batch: the other nine are copied at once, that one is copied (or found
    current) after the live write commits, and the generation ends equal to the source."""
    from coordinator.events import ChangeEvent, Op

    config, final, settings = _synced_on_servers(tmp_path, "rb-aside", opensearch_api_url, lite_server.uri)
    live = ChangeEvent(Op.UPSERT, "doc-001", 9, _text(1, 9), {"team": "t1"})
    with runtime(settings) as rt:  # the live write reached generation 1 ...
        rt.generations[0].engine.apply([live])
    server_manager_instance.release_server(settings.vector.uri)
    final["doc-001"] = {"text": live.text}

    rebuild = Rebuild(settings)
    try:
        new_chunking = ChunkingSettings(70)
        gen = rebuild.begin(settings.embedder, new_chunking)
        live_side = build_generation(settings, gen, rebuild.home, source_name="events")
        in_flight: list[Any] = []
        seen: dict[str, Any] = {}

        def progress(done: int, total: int) -> None:
            if not done and not in_flight:  # the backfill starts: the live write is in flight
                in_flight.extend(live_side.engine.prepare([live]))  # in generation 2 too
            elif done and not seen:
                seen["pending"] = [i.doc_id for i in live_side.ledger.pending()]
                seen["committed"] = sorted(live_side.ledger.get_docs([f"doc-{d:03d}" for d in range(11)]))
                live_side.engine.drive(in_flight)  # the service finishes its write

        report = rebuild.run(settings.embedder, new_chunking, progress=progress)
        live_side.close(keep_ledger=False)
    finally:
        rebuild.close()
    server_manager_instance.release_server(settings.vector.uri)
    assert seen["pending"] == ["doc-001"]
    # The first batch's other documents (doc-000 is a tombstone) did not wait for doc-001.
    assert seen["committed"] == [f"doc-{d:03d}" for d in range(11) if d != 1 and d < 10]
    assert report.audit_rounds[-1]["clean"] is True and report.swap is not None
    _check_generation(config, 2, final)


def test_generations_on_the_postgres_ledger_share_leases_checkpoints_and_cache_with_home(
    tmp_path: Path, pg_schema: Any
) -> None:
    import psycopg

    config = _config(tmp_path, ledger={"kind": "postgres", "dsn": pg_schema.dsn, "schema": pg_schema.name})
    final = _write_history(tmp_path, 25)
    assert _lockstep("sync", "-c", str(config)).returncode == 0
    report = _report(_lockstep("rebuild", "-c", str(config), "--chunking", "max_chars=70"))
    assert report["swap"]["generation"] == 2
    _check_generation(config, 2, final)
    g2 = f"{pg_schema.name}_g2"
    with psycopg.connect(pg_schema.dsn) as conn:
        tables = {r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (g2,))}
    # Its own documents, intents and applied versions; the rest is home's.
    assert {"documents", "intents", "applied"} <= tables
    assert not tables & {"checkpoints", "dead_letters", "shard_leases", "embeddings"}

    assert _report(_lockstep("rebuild", "-c", str(config), "--rollback"))["rollback"]["generation"] == 1
    assert _report(_lockstep("gc", "-c", str(config), "--retention-s", "0")) == {"dropped": [2]}
    with psycopg.connect(pg_schema.dsn) as conn:
        left = conn.execute("SELECT 1 FROM information_schema.schemata WHERE schema_name = %s", (g2,)).fetchone()
    assert left is None
    _check_generation(config, 1, final)


def test_validation_waits_for_a_rechecked_documents_live_write_to_land(tmp_path: Path) -> None:
    """A document whose live write is prepared in a generation is on its way: the settle before
    a recheck waits for its commit (here 1.5 pauses later, so one fixed pause would not do)
    instead of rechecking it mid-flight; a newer edit of the same document, started meanwhile,
    does not hold the settle up (documents edited continuously would never settle)."""
    from adapters.ledger.sqlite import SqliteLedger
    from coordinator.apply import SIDES
    from coordinator.events import ChangeEvent, Op
    from coordinator.planner import plan
    from coordinator.rebuild.validate import VALIDATE_SETTLE_S, settle

    home, new = SqliteLedger(tmp_path / "home.db"), SqliteLedger(tmp_path / "g2.db")
    try:
        intent = plan(ChangeEvent(Op.UPSERT, "d1", 3, "in flight", {}), None, ChunkingSettings()).to_intent()
        new.prepare([intent])
        landed = threading.Event()

        def land() -> None:
            time.sleep(1.5 * VALIDATE_SETTLE_S)
            keys = [("d1", 3)]
            new.mark_done("keyword", keys)
            new.mark_done("vector", keys)
            new.commit(keys, SIDES)
            landed.set()
            newer = plan(ChangeEvent(Op.UPSERT, "d1", 4, "edited again", {}), new.get_docs(["d1"])["d1"],
                         ChunkingSettings()).to_intent()
            new.prepare([newer])

        writer = threading.Thread(target=land)
        writer.start()
        started = time.monotonic()
        settle(["d1", "d2"], [home, new], clock=time.monotonic, sleep=time.sleep)
        assert landed.is_set(), "the settle returned while the live write was still in flight"
        writer.join()
        assert time.monotonic() - started < 30, "the newer edit held the settle up"
        assert [(i.doc_id, i.version) for i in new.pending()] == [("d1", 4)]
    finally:
        home.close()
        new.close()
