"""No secret ever reaches stdout, stderr, a log line, the ledger or the dead-letter queue.

A distinct secret is planted in every secret setting (through the environment, as the docs
advise, so the config file holds none), then every kind of failure is provoked: stores and an
embedder that refuse with 401 while echoing the request (Authorization header included) back in
their error body, a 400 that dead-letters documents, and unreachable Milvus, Postgres, SQL, Kafka
and logical-replication endpoints. Every command's output and every file lockstep wrote are
scanned for each secret, and for the base64 form of basic-auth credentials."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.echo_server import EchoServer
from tests.support.service_process import free_port

LOCKSTEP = [sys.executable, "-m", "lockstep"]
CLI_TIMEOUT_S = 180

SECRETS = {
    "LOCKSTEP_KEYWORD__PASSWORD": "kw-pass-Zq81cVtR",
    "LOCKSTEP_KEYWORD__API_KEY": "kw-apikey-Yp42LsWe",
    "LOCKSTEP_VECTOR__TOKEN": "vec-token-Xn63KmQa",
    "LOCKSTEP_VECTOR__PASSWORD": "vec-pass-Wm94JdPz",
    "LOCKSTEP_EMBEDDER__API_KEY": "sk-emb-Vk15HfNx9c2b7a",
    "ledger_password": "pg-pass-Uj26GcMy",
    "sql_password": "sql-pass-Th37FbLw",
    "logical_password": "pgl-pass-Sg48EaKv",
    "LOCKSTEP_SOURCE__SASL_PASSWORD": "kafka-pass-Rf59DzJu",
    "LOCKSTEP_SOURCE__TOKEN": "webhook-token-Qe60CyHt-long-enough",
}
KEYWORD_USER = "lockstep-user"
VECTOR_USER = "milvus-user"


def _forms() -> dict[str, str]:
    """Every secret, and how a client may spell it on the wire (basic auth is base64)."""
    forms = dict(SECRETS)
    for name, user in (("LOCKSTEP_KEYWORD__PASSWORD", KEYWORD_USER), ("LOCKSTEP_VECTOR__PASSWORD", VECTOR_USER)):
        forms[f"{name} (basic)"] = base64.b64encode(f"{user}:{SECRETS[name]}".encode()).decode()
    return forms


class Scanner:
    """Runs lockstep commands and keeps everything they print, for the final scan."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.outputs: list[tuple[str, str]] = []

    def run(self, config: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*LOCKSTEP, "--log-level", "debug", *args, "-c", str(config)],
            capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False,
            stdin=subprocess.DEVNULL, env={**os.environ, **env},
        )  # fmt: skip
        self.outputs.append((f"{config.parent.name}: {' '.join(args)}", done.stdout + done.stderr))
        return done

    def leaks(self) -> list[str]:
        found = []
        for where, text in self.outputs:
            found += [f"{name} in the output of {where}" for name, s in _forms().items() if s in text]
        for path in self.tmp_path.rglob("*"):
            if path.is_file() and path.suffix not in (".yaml", ".jsonl"):
                data = path.read_bytes()
                found += [f"{name} in {path}" for name, s in _forms().items() if s.encode() in data]
        return found


@pytest.fixture
def scanner(tmp_path: Path) -> Iterator[Scanner]:
    scan = Scanner(tmp_path)
    yield scan
    assert scan.leaks() == []


@pytest.fixture
def refusing() -> Iterator[EchoServer]:
    server = EchoServer(status=401)
    yield server
    server.close()


def _config(directory: Path, **sections: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    events = directory / "events.jsonl"
    events.write_text('{"op":"upsert","doc_id":"d1","version":1,"text":"a document"}\n')
    config = {
        "source": {"kind": "jsonl", "path": str(events)},
        "keyword": {"kind": "tantivy", "path": str(directory / "tantivy")},
        "vector": {"uri": str(directory / "milvus.db")},
        "ledger": {"path": str(directory / "ledger.db")},
        "embedder": {"kind": "hashing"},
        **sections,
    }
    path = directory / "lockstep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _env(*names: str) -> dict[str, str]:
    return {name: SECRETS[name] for name in names}


def test_store_and_embedder_refusals_echoing_credentials_leak_nothing(
    tmp_path: Path, scanner: Scanner, refusing: EchoServer
) -> None:
    """A keyword store (basic auth, then an API key) and an embedder that answer 401 with the
    request echoed back: every command fails with a message, and no credential is anywhere."""
    keyword = {"kind": "opensearch", "url": refusing.url, "username": KEYWORD_USER, "request_timeout_s": 5}
    basic = _config(tmp_path / "basic", keyword=keyword)
    for command in (["sync"], ["status"], ["audit"], ["reconcile"]):
        done = scanner.run(basic, _env("LOCKSTEP_KEYWORD__PASSWORD"), *command)
        assert done.returncode != 0, (command, done.stderr[-1500:])
    for command in (["generations", "--json"], ["dlq", "list"]):
        scanner.run(basic, _env("LOCKSTEP_KEYWORD__PASSWORD"), *command)
    assert any("401" in out for _, out in scanner.outputs), "the refusal's status is shown"

    api_key = _config(tmp_path / "api-key", keyword={k: v for k, v in keyword.items() if k != "username"})
    assert scanner.run(api_key, _env("LOCKSTEP_KEYWORD__API_KEY"), "sync").returncode != 0

    embedder = {"kind": "openai", "base_url": refusing.url, "model": "m", "dim": 8, "timeout_s": 5}
    refused = _config(tmp_path / "embedder-401", embedder=embedder)
    done = scanner.run(refused, _env("LOCKSTEP_EMBEDDER__API_KEY"), "sync")
    assert done.returncode == 2, done.stderr[-1500:]
    assert scanner.run(refused, {}, "dlq", "list", "--json").stdout.strip() == "[]", "a 401 dead-lettered a document"


def test_documents_dead_lettered_by_an_echoing_embedder_hold_no_credential(tmp_path: Path, scanner: Scanner) -> None:
    """An embedder answering 400 (the input's fault) with the request echoed: the documents are
    dead-lettered, and neither their reasons nor the ledger hold the key."""
    server = EchoServer(status=400)
    try:
        embedder = {"kind": "openai", "base_url": server.url, "model": "m", "dim": 8, "timeout_s": 5}
        config = _config(tmp_path / "embedder-400", embedder=embedder)
        done = scanner.run(config, _env("LOCKSTEP_EMBEDDER__API_KEY"), "sync")
    finally:
        server.close()
    assert done.returncode == 1, done.stderr[-1500:]
    listed = scanner.run(config, {}, "dlq", "list", "--json")
    assert '"d1"' in listed.stdout and "400" in listed.stdout
    assert scanner.run(config, {}, "dlq", "show", "1").returncode == 0


def test_unreachable_servers_with_credentials_leak_nothing(tmp_path: Path, scanner: Scanner) -> None:
    """Milvus (token, then user and password), a Postgres ledger, a SQL table, logical
    replication and Kafka (SASL) at ports nobody listens on, and a webhook source: every
    failure is reported without its credentials."""
    closed = free_port()
    vector = {"uri": f"http://127.0.0.1:{closed}", "connect_timeout_s": 2, "request_timeout_s": 2}
    token = _config(tmp_path / "milvus-token", vector=vector)
    assert scanner.run(token, _env("LOCKSTEP_VECTOR__TOKEN"), "sync").returncode != 0
    userpass = _config(tmp_path / "milvus-user", vector={**vector, "user": VECTOR_USER})
    assert scanner.run(userpass, _env("LOCKSTEP_VECTOR__PASSWORD"), "status").returncode != 0

    dsn = f"postgresql://lockstep:{SECRETS['ledger_password']}@127.0.0.1:{closed}/lockstep"
    ledger = _config(tmp_path / "pg-ledger", ledger={"kind": "postgres", "connect_timeout_s": 2})
    for command in ("sync", "status", "dlq"):
        args = ["dlq", "list"] if command == "dlq" else [command]
        assert scanner.run(ledger, {"LOCKSTEP_LEDGER__DSN": dsn}, *args).returncode != 0

    sql_url = f"postgresql+psycopg://reader:{SECRETS['sql_password']}@127.0.0.1:{closed}/app"
    sql = _config(tmp_path / "sql", source={"kind": "sql", "table": "docs"})
    assert scanner.run(sql, {"LOCKSTEP_SOURCE__URL": sql_url}, "sync").returncode != 0

    logical_dsn = f"postgresql://repl:{SECRETS['logical_password']}@127.0.0.1:{closed}/app"
    logical = _config(
        tmp_path / "logical",
        source={"kind": "postgres_logical", "tables": ["docs"], "connect_timeout_s": 2, "outage_max_s": 3},
    )
    assert scanner.run(logical, {"LOCKSTEP_SOURCE__DSN": logical_dsn}, "sync").returncode != 0

    kafka = _config(
        tmp_path / "kafka",
        source={
            "kind": "kafka", "bootstrap_servers": [f"127.0.0.1:{closed}"], "topics": ["t"],
            "security_protocol": "SASL_PLAINTEXT", "sasl_username": "k", "assignment_wait_s": 3,
            "request_timeout_s": 3, "session_timeout_s": 6, "tables": {"docs": {"doc_id": "{id}", "text_columns": ["t"]}},
        },
    )  # fmt: skip
    assert scanner.run(kafka, _env("LOCKSTEP_SOURCE__SASL_PASSWORD"), "sync").returncode != 0

    webhook = _config(tmp_path / "webhook", source={"kind": "webhook"})
    for command in (["status"], ["dlq", "list"], ["generations", "--json"]):
        scanner.run(webhook, _env("LOCKSTEP_SOURCE__TOKEN"), *command)
