"""The `lockstep` command line, run as a real process against the embedded default stores."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from adapters.keyword.es_compat_proxy import EsCompatProxy, ProxyRequest, Reply
from adapters.ledger.sqlite import SqliteLedger
from chaos.servers import free_port
from coordinator.crashpoints import PROTOCOL_POINTS
from coordinator.errors import ConfigError
from coordinator.events import TEXT_BYTES_MAX
from coordinator.invariants import ExpectedChunk, check_index
from lockstep.cli_errors import EXTRA_OF_MODULE
from lockstep.runtime import runtime
from lockstep.settings import load_settings

LOCKSTEP = [sys.executable, "-m", "lockstep"]
CLI_TIMEOUT_S = 300
# Commands that read a config; each must refuse a bad one in one line (dlq's are the lead's).
CONFIG_COMMANDS = [
    ["sync"], ["status"], ["audit"], ["reconcile"], ["rebuild"], ["gc"], ["generations"], ["run"],
    ["source", "resnapshot"], ["dlq", "list"], ["dlq", "show", "1"], ["dlq", "replay", "--all"], ["dlq", "drop", "1"],
    ["search", "anything"], ["serve"],
]


def _config(tmp_path: Path, **overrides: Any) -> Path:
    config = {
        "source": {"kind": "jsonl", "path": str(tmp_path / "events.jsonl"), "name": "events"},
        "keyword": {"kind": "tantivy", "path": str(tmp_path / "tantivy")},
        "vector": {"uri": str(tmp_path / "milvus.db")},
        "ledger": {"path": str(tmp_path / "ledger.db")},
        "embedder": {"kind": "hashing"},
        "chunking": {"max_chars": 80},
        "sync": {"batch_events": 4},
        **overrides,
    }
    path = tmp_path / "lockstep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _write_events(tmp_path: Path, *lines: str | dict[str, Any], mode: str = "a") -> None:
    with (tmp_path / "events.jsonl").open(mode + "b") as out:
        for line in lines:
            raw = line if isinstance(line, str) else json.dumps(line)
            out.write(raw.encode("utf-8", "surrogateescape") + b"\n")


def _lockstep(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LOCKSTEP, *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


def _doc(doc_id: str, version: int, paragraphs: int = 3, **meta: Any) -> dict[str, Any]:
    text = "\n\n".join(f"{doc_id} paragraph {i} about refunds and invoices" for i in range(paragraphs))
    return {"op": "upsert", "doc_id": doc_id, "version": version, "text": text, "metadata": meta}


def _assert_indexes_equal(config: Path, live: dict[str, dict[str, Any]], deleted: set[str]) -> None:
    settings = load_settings(config)
    from coordinator.chunking import chunk_id, chunk_text, content_hash

    expected = {
        chunk_id(d, i): ExpectedChunk(chunk_id(d, i), content_hash(t))
        for d, ev in live.items()
        for i, t in enumerate(chunk_text(ev["text"], settings.chunking.to_domain()))
    }
    with runtime(settings) as rt:
        violations = [
            *check_index("keyword", expected, deleted, list(rt.keyword.scan())),
            *check_index("vector", expected, deleted, list(rt.vector.scan())),
        ]
        assert rt.ledger.counts()["pending_intents"] == 0
    assert violations == [], "\n".join(map(str, violations))


def test_sync_prints_a_json_summary_and_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    """sync applies everything, prints the summary keys, and a second run applies only new events."""
    config = _config(tmp_path)
    _write_events(tmp_path, _doc("a", 1), _doc("b", 1), {"op": "delete", "doc_id": "c", "version": 1})
    first = _lockstep("sync", "-c", str(config))
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert {
        "events",
        "upserted_chunks",
        "deleted_chunks",
        "skipped_chunks",
        "stale_events",
        "embed_calls",
        "dead_letters",
    } <= summary.keys()
    assert (
        summary["events"] == 3
        and summary["dead_letters"] == 0
        and summary["embed_calls"] == summary["upserted_chunks"]
    )
    edited = _doc("a", 2)
    edited["text"] = edited["text"].replace("paragraph 1", "paragraph one")
    _write_events(tmp_path, edited)
    second = json.loads(_lockstep("sync", "-c", str(config)).stdout)
    assert second["events"] == 1 and second["embed_calls"] == 1 and second["skipped_chunks"] == 2
    _assert_indexes_equal(config, {"a": edited, "b": _doc("b", 1)}, {"c"})


def test_bad_input_goes_to_the_dead_letter_queue_and_the_rest_is_applied(tmp_path: Path) -> None:
    """Malformed lines are dead-lettered with their reasons, sync exits 1, good events still land."""
    config = _config(tmp_path)
    oversize = {
        "op": "upsert",
        "doc_id": "big",
        "version": 1,
        "text": "x" * (TEXT_BYTES_MAX + 1),
        "metadata": {},
    }
    _write_events(
        tmp_path,
        _doc("good-1", 1),
        "{not json",
        {"op": "rename", "doc_id": "x", "version": 1},
        {"op": "upsert", "doc_id": "y", "text": "no version"},
        oversize,
        '{"op": "upsert", "doc_id": "z", "version": 1, "text": "bad \udcff byte"}',
        _doc("good-2", 1),
    )
    result = _lockstep("sync", "-c", str(config))
    assert result.returncode == 1, result.stderr
    assert json.loads(result.stdout)["dead_letters"] == 5
    reasons = [letter.reason for _, letter in SqliteLedger(tmp_path / "ledger.db").dead_letters(limit=10)]
    assert len(reasons) == 5
    for needle in ("JSON", "unknown op", "missing version", "larger than", "UTF-8"):
        assert any(needle in r for r in reasons), f"no dead letter mentions {needle!r}: {reasons}"
    _assert_indexes_equal(config, {"good-1": _doc("good-1", 1), "good-2": _doc("good-2", 1)}, set())


@pytest.mark.parametrize("point", PROTOCOL_POINTS)
def test_a_kill_at_any_crash_point_converges_on_the_next_sync(tmp_path: Path, point: str) -> None:
    """SIGKILL at each protocol boundary, then a plain rerun: both indexes equal the source."""
    config = _config(tmp_path)
    live = {f"d{i}": _doc(f"d{i}", 1) for i in range(10)}
    _write_events(tmp_path, *live.values())
    crashed = _lockstep("sync", "-c", str(config), "--crash-at", point)
    assert crashed.returncode == -9, f"not killed at {point}: {crashed.stderr[-2000:]}"
    shrunk = _doc("d3", 2, paragraphs=1)
    live["d3"] = shrunk
    _write_events(tmp_path, shrunk, {"op": "delete", "doc_id": "d4", "version": 2})
    del live["d4"]
    rerun = _lockstep("sync", "-c", str(config))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    _assert_indexes_equal(config, live, {"d4"})


def test_status_reports_counts_per_index_and_ledger_state(tmp_path: Path) -> None:
    """status shows ledger states and both indexes' chunk counts."""
    config = _config(tmp_path)
    _write_events(
        tmp_path, _doc("a", 1), _doc("b", 1, paragraphs=2), {"op": "delete", "doc_id": "b", "version": 2}
    )
    assert _lockstep("sync", "-c", str(config)).returncode == 0
    status = json.loads(_lockstep("status", "-c", str(config)).stdout)
    assert status["ledger"]["live_docs"] == 1 and status["ledger"]["tombstones"] == 1
    assert status["keyword"]["chunks"] == status["vector"]["chunks"] == status["ledger"]["chunks"] == 3


def test_secrets_from_the_environment_never_reach_the_logs(tmp_path: Path, opensearch_api_url: str) -> None:
    """A password given by environment variable is used but never printed, even at debug level."""
    secret = "s3cr3t-Pa55word-never-logged"
    config = _config(
        tmp_path,
        keyword={
            "kind": "opensearch",
            "url": opensearch_api_url,
            "index": "cli-secrets",
            "username": "lockstep",
        },
    )
    _write_events(tmp_path, _doc("a", 1))
    result = _lockstep(
        "--log-level", "debug", "sync", "-c", str(config), env={"LOCKSTEP_KEYWORD__PASSWORD": secret}
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "POST" in result.stderr or "bulk" in result.stderr.lower(), "debug logs were not produced at all"
    assert secret not in result.stdout + result.stderr


def test_config_errors_exit_2_with_a_clear_message(tmp_path: Path) -> None:
    """An invalid config is refused at start-up with exit status 2."""
    config = tmp_path / "bad.yaml"
    config.write_text("keyword: {kind: opensearch}\n")
    result = _lockstep("status", "-c", str(config))
    assert result.returncode == 2 and "url" in result.stderr


def test_demo_proves_both_indexes_equal_the_source(tmp_path: Path) -> None:
    """The README's main job runs end to end on the embedded default, ends in agreement and
    writes nothing to stderr."""
    result = _lockstep("demo", "--data-dir", str(tmp_path / "demo"), "--docs", "40", "--embedder", "hashing")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "both indexes equal the source" in result.stdout
    assert "stale events ignored" in result.stdout
    assert result.stderr == ""


def test_sync_from_a_sql_table_follows_updates_soft_and_hard_deletes(tmp_path: Path) -> None:
    """A SQL table source: watermark picks up edits, deleted_at tombstones and vanished rows."""
    import sqlalchemy as sa

    url = f"sqlite:///{tmp_path / 'kb.sqlite'}"
    engine = sa.create_engine(url)
    with engine.begin() as db:
        db.exec_driver_sql(
            "CREATE TABLE articles (id TEXT PRIMARY KEY, body TEXT, lang TEXT, updated_at TIMESTAMP, deleted_at TIMESTAMP)"
        )
        for i in range(6):
            db.exec_driver_sql(
                "INSERT INTO articles VALUES (?, ?, 'en', ?, NULL)",
                (f"a{i}", f"article {i} about invoices\n\nsecond part {i}", f"2026-01-01 00:00:0{i}"),
            )
    source = {"kind": "sql", "url": url, "table": "articles", "text_column": "body", "metadata_columns": ["lang"],
              "deleted_at_column": "deleted_at"}
    config = _config(tmp_path, source=source)
    first = _lockstep("sync", "-c", str(config))
    assert first.returncode == 0, first.stderr[-2000:]
    assert json.loads(first.stdout)["applied_events"] == 6
    with engine.begin() as db:
        db.exec_driver_sql("UPDATE articles SET body = 'rewritten', updated_at = '2026-01-02 00:00:00' WHERE id = 'a1'")
        db.exec_driver_sql("UPDATE articles SET deleted_at = '2026-01-02', updated_at = '2026-01-02 00:00:01' WHERE id = 'a2'")
        db.exec_driver_sql("DELETE FROM articles WHERE id = 'a3'")
    second = _lockstep("sync", "-c", str(config))
    assert second.returncode == 0, second.stderr[-2000:]
    assert json.loads(second.stdout)["applied_events"] == 3
    live = {f"a{i}": {"text": f"article {i} about invoices\n\nsecond part {i}"} for i in (0, 4, 5)}
    live["a1"] = {"text": "rewritten"}
    _assert_indexes_equal(config, live, {"a2", "a3"})


def test_sync_from_a_folder_follows_new_changed_and_removed_files(tmp_path: Path) -> None:
    """A folder source: new and edited files are applied, removed files deleted from both indexes."""
    docs = tmp_path / "docs"
    (docs / "guides").mkdir(parents=True)
    (docs / "guides" / "refunds.md").write_text("# Refunds\n\nWithin 30 days.")
    (docs / "shipping.txt").write_text("Parcels leave within 24 hours.")
    config = _config(tmp_path, source={"kind": "folder", "path": str(docs)})
    assert _lockstep("sync", "-c", str(config)).returncode == 0
    (docs / "guides" / "refunds.md").write_text("# Refunds\n\nWithin 14 days now.")
    (docs / "shipping.txt").unlink()
    second = _lockstep("sync", "-c", str(config))
    assert second.returncode == 0, second.stderr[-2000:]
    assert json.loads(second.stdout)["applied_events"] == 2
    _assert_indexes_equal(config, {"guides/refunds.md": {"text": "# Refunds\n\nWithin 14 days now."}}, {"shipping.txt"})


def test_dlq_list_show_replay_and_drop(tmp_path: Path) -> None:
    """Dead letters can be listed, shown, replayed once their payload is a valid event, and dropped."""
    config = _config(tmp_path)
    _write_events(tmp_path, _doc("good", 1), "{broken", {"op": "upsert", "doc_id": "nv", "text": "no version"})
    assert _lockstep("sync", "-c", str(config)).returncode == 1
    ledger = SqliteLedger(tmp_path / "ledger.db")
    from coordinator.model import DeadLetter

    ledger.add_dead_letters([DeadLetter("events", "embedding failed: timeout", json.dumps(_doc("late", 1)),
                                        doc_id="late", version=1)])
    listed = json.loads(_lockstep("dlq", "list", "-c", str(config), "--json").stdout)
    assert [entry["doc_id"] for entry in listed] == [None, "nv", "late"]
    shown = json.loads(_lockstep("dlq", "show", "-c", str(config), str(listed[1]["id"])).stdout)
    assert shown["reason"] == "missing version" and "no version" in shown["payload"] and shown["created_at"]
    replayed = _lockstep("dlq", "replay", "-c", str(config), "--all")
    assert json.loads(replayed.stdout) == {
        "replayed": 1, "stale": 0, "still_invalid": 2, "dead_lettered_again": 0, "consumed": 0, "unknown": 0
    }
    after = {e["doc_id"]: e for e in json.loads(_lockstep("dlq", "list", "-c", str(config), "--json").stdout)}
    assert set(after) == {None, "nv"} and after["nv"]["attempts"] == 2
    dropped = _lockstep("dlq", "drop", "-c", str(config), *(str(e["id"]) for e in after.values()))
    assert json.loads(dropped.stdout) == {"dropped": 2, "not_found": []}
    assert json.loads(_lockstep("dlq", "list", "-c", str(config), "--json").stdout) == []
    _assert_indexes_equal(config, {"good": _doc("good", 1), "late": _doc("late", 1)}, set())


def test_documented_defaults_hold_for_sections_the_config_gives_in_part(tmp_path: Path) -> None:
    """keyword: {path} is Tantivy there, keyword: {index} Tantivy at the documented default path,
    vector: {collection} the documented milvus-lite file; a url without a kind is refused by name."""
    config = tmp_path / "partial.yaml"
    config.write_text(yaml.safe_dump({"keyword": {"path": "kw"}, "vector": {"collection": "c"}}))
    settings = load_settings(config)
    assert (settings.keyword.kind, settings.keyword.path) == ("tantivy", "kw")
    assert (settings.vector.uri, settings.vector.collection) == ("./lockstep-data/milvus.db", "c")
    config.write_text(yaml.safe_dump({"keyword": {"index": "kb"}}))
    assert load_settings(config).keyword.path == "./lockstep-data/tantivy"
    config.write_text(yaml.safe_dump({"keyword": {"url": "http://search:9200"}}))
    with pytest.raises(ConfigError, match="set `kind` to opensearch or elasticsearch"):
        load_settings(config)


def test_a_normal_sync_and_run_write_nothing_to_stderr(tmp_path: Path) -> None:
    """A sync with the local model (`auto`) and a `run` on Ray leave stderr empty: no model
    loading bars, no Ray notices, no third-party tracebacks."""
    with_model, on_ray = tmp_path / "model", tmp_path / "ray"
    for home in (with_model, on_ray):
        home.mkdir()
        _write_events(home, _doc("a", 1), _doc("b", 1))
    synced = _lockstep("sync", "-c", str(_config(with_model, embedder={"kind": "auto"})))
    assert synced.returncode == 0 and synced.stderr == "", synced.stderr[-3000:]
    assert json.loads(synced.stdout)["upserted_chunks"] == 6
    run_config = _config(on_ray, run={"shards": 1, "http_port": 0, "audit_interval_s": 0})
    ran = _lockstep("run", "-c", str(run_config), "--exit-when-idle")
    assert ran.returncode == 0 and ran.stderr == "", ran.stderr[-3000:]


def _said(stderr: str) -> list[str]:
    """What stderr says to a person: every line but lockstep's JSON log lines."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("{")]


class BasicAuthGateway(EsCompatProxy):
    """The OpenSearch-API server behind HTTP basic auth, as a reverse proxy in front of a cluster
    puts it: a request without the right credentials gets 401 with no body (HEAD has none anyway)."""

    def __init__(self, upstream_url: str, username: str, password: str) -> None:
        super().__init__(upstream_url)
        self.expected = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()

    def before_upstream(self, request: ProxyRequest) -> Reply | None:
        given = {k.lower(): v for k, v in request.headers}.get("authorization")
        if given == self.expected:
            return None
        return Reply(401, b"", (("WWW-Authenticate", 'Basic realm="search"'),))


@pytest.mark.parametrize("kind", ["opensearch", "elasticsearch"])
def test_an_http_error_of_the_keyword_store_shows_its_status_and_reason(
    tmp_path: Path, opensearch_api_url: str, kind: str
) -> None:
    """A 401 without a body is reported as `HTTP 401 Unauthorized` in one line, exit 2, and the
    password that was refused appears nowhere."""
    password = "not-the-right-Pa55word"
    with BasicAuthGateway(opensearch_api_url, "lockstep", "the-right-one") as gateway:
        keyword = {"kind": kind, "url": gateway.url, "index": f"cli-401-{kind}", "username": "lockstep"}
        config = _config(tmp_path, keyword=keyword)
        _write_events(tmp_path, _doc("a", 1))
        result = _lockstep("sync", "-c", str(config), env={"LOCKSTEP_KEYWORD__PASSWORD": password})
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = _said(result.stderr)
    assert line.startswith(f"sync failed: {kind} ") and line.endswith("HTTP 401 Unauthorized"), line
    assert password not in result.stdout + result.stderr


def test_a_store_that_is_down_is_one_line_and_exit_2_and_debug_shows_the_traceback(tmp_path: Path) -> None:
    """status against a Milvus server nobody runs exits 2 with one line naming the store and a
    hint; --debug prints the traceback above that same line."""
    config = _config(tmp_path, vector={"uri": f"http://127.0.0.1:{free_port()}", "connect_timeout_s": 1})
    plain = _lockstep("status", "-c", str(config))
    assert plain.returncode == 2, plain.stderr[-3000:]
    [line] = _said(plain.stderr)
    assert _is_milvus_down_line(line), line
    debug = _lockstep("--debug", "status", "-c", str(config))
    assert debug.returncode == 2
    assert "Traceback (most recent call last)" in debug.stderr
    assert _is_milvus_down_line(debug.stderr.splitlines()[-1]), debug.stderr[-3000:]


def _is_milvus_down_line(line: str) -> bool:
    return line.startswith("status failed: milvus connect failed") and line.endswith(
        "(is milvus up and reachable?)"
    )


@pytest.mark.parametrize("command", CONFIG_COMMANDS, ids=" ".join)
def test_every_command_refuses_a_bad_config_in_one_line(tmp_path: Path, command: list[str]) -> None:
    """A config with two mistakes: exit 2 and one line naming both keys and rules, without
    pydantic's links or a traceback."""
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"keyword": {"kind": "opensearch"}, "chunking": {"max_chars": 0}}))
    result = _lockstep(*command, "-c", str(config))
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = result.stderr.splitlines()
    assert line.startswith(f"config error: invalid config {config}: "), line
    assert "keyword: an opensearch keyword index needs `url`" in line
    assert "chunking.max_chars: Input should be greater than or equal to 1" in line


def test_only_run_asks_for_the_webhook_token_and_keyword_path_alone_means_tantivy(tmp_path: Path) -> None:
    """With a webhook source and no token, the commands that serve no HTTP work (a keyword
    section with only `path` is Tantivy there); `run` refuses in one line naming the variable."""
    tantivy = tmp_path / "kw"
    config = _config(tmp_path, source={"kind": "webhook"}, keyword={"path": str(tantivy)})
    synced = _lockstep("sync", "-c", str(config))
    assert synced.returncode == 0, synced.stderr[-3000:]
    assert json.loads(synced.stdout)["events"] == 0
    status = _lockstep("status", "-c", str(config))
    assert status.returncode == 0, status.stderr[-3000:]
    assert json.loads(status.stdout)["keyword"] == {"kind": "tantivy", "chunks": 0} and tantivy.is_dir()
    for command in (["audit", "--json"], ["generations"], ["reconcile", "--dry-run"]):
        result = _lockstep(*command, "-c", str(config))
        assert result.returncode == 0, f"{command}: {result.stderr[-3000:]}"
    run = _lockstep("run", "-c", str(config))
    assert run.returncode == 2
    assert run.stderr.splitlines() == [
        "config error: source.token is required to serve POST /events: set LOCKSTEP_SOURCE__TOKEN "
        "(at least 16 characters) (see docs/configuration.md)"
    ]


def test_the_missing_extra_hints_name_every_extra_of_pyproject() -> None:
    """Each package an extra of pyproject.toml brings (dev aside) maps to that extra in the
    one-line hint, and the hint names no other package."""
    extras = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    declared = {
        re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("-", "_"): extra
        for extra, requirements in extras.items()
        if extra != "dev"
        for requirement in requirements
    }
    assert declared == EXTRA_OF_MODULE


def test_audit_prints_a_readable_summary_and_the_right_verdict_for_each_document(tmp_path: Path) -> None:
    """The audit's last line says in words what it scanned (or, sampling, checked); --doc calls a
    live document live and a deleted one forgotten."""
    config = _config(tmp_path)
    _write_events(tmp_path, _doc("a", 1), _doc("b", 1), {"op": "delete", "doc_id": "b", "version": 2})
    assert _lockstep("sync", "-c", str(config)).returncode == 0
    audit = _lockstep("audit", "-c", str(config))
    assert audit.returncode == 0, audit.stderr[-3000:]
    summary = audit.stdout.splitlines()[-1]
    assert re.fullmatch(
        r"clean — scanned 1 ledger document \(3 chunks\), 3 keyword chunks, 3 vector chunks in [0-9.]+ s",
        summary,
    ), summary
    sampled = _lockstep("audit", "-c", str(config), "--sample", "1", "--seed", "1")
    checked = sampled.stdout.splitlines()[-1]
    assert re.fullmatch(r"clean — checked 1 document in [0-9.]+ s", checked), sampled.stdout
    live = _lockstep("audit", "-c", str(config), "--doc", "a")
    assert live.returncode == 0 and "verdict: live at version 1: not deleted" in live.stdout, live.stdout
    assert "forgotten" not in live.stdout
    gone = _lockstep("audit", "-c", str(config), "--doc", "b")
    assert gone.returncode == 0 and "verdict: forgotten everywhere" in gone.stdout, gone.stdout
