"""A document that passes lockstep's own checks but that a store refuses at write time (an
operator narrowed the index behind lockstep's back): it is dead-lettered whole, both indexes are
brought back to its last committed state (or cleared) in the same pass, the rest of the batch
commits, nothing is left pending, and the audit is clean without a reconcile.

Each store refuses for real: Milvus (milvus-lite and 2.3.5) a VARCHAR longer than the
collection's ``max_length`` (the whole upsert request fails, so lockstep must find the
document), the OpenSearch-API server a metadata key under a strict mapping (one item fails)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from pymilvus import DataType, MilvusClient

from adapters.ledger.sqlite import SqliteLedger
from lockstep.settings import load_settings
from tests.support.milvus_servers import RealMilvus
from tests.support.raw_stores import documents, read_keyword, read_vector
from tests.support.service_process import free_port, ready, start_service, stop_service, wait_for

LOCKSTEP = [sys.executable, "-m", "lockstep"]
CLI_TIMEOUT_S = 300
# The narrowed text field: chunks longer than this many bytes are refused by Milvus.
NARROW_TEXT_BYTES = 64
SHORT = "a short text"
LONG = "a text far longer than the narrowed field allows " * 3


def _lockstep(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LOCKSTEP, *args], capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False,
        stdin=subprocess.DEVNULL, env={**os.environ},
    )  # fmt: skip


def _event(doc_id: str, version: int, text: str, **metadata: Any) -> dict[str, Any]:
    return {"op": "upsert", "doc_id": doc_id, "version": version, "text": text, "metadata": metadata}


def _append(path: Path, *events: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as out:
        out.writelines(json.dumps(e) + "\n" for e in events)


def _config(tmp_path: Path, keyword: dict[str, Any], vector: dict[str, Any]) -> Path:
    config = {
        "source": {"kind": "jsonl", "path": str(tmp_path / "events.jsonl"), "name": "events"},
        "keyword": keyword,
        "vector": vector,
        "ledger": {"path": str(tmp_path / "ledger.db")},
        "embedder": {"kind": "hashing", "dim": 8},
        "chunking": {"max_chars": 1000},
        "sync": {"batch_events": 100},
    }
    path = tmp_path / "lockstep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _narrow_collection(uri: str, name: str) -> None:
    """lockstep's collection schema, with the text field narrowed to NARROW_TEXT_BYTES."""
    client = MilvusClient(uri=uri)
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("chunk_id", DataType.VARCHAR, is_primary=True, max_length=1024)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=8)
    schema.add_field("doc_id", DataType.VARCHAR, max_length=1024)
    schema.add_field("chunk_index", DataType.INT64)
    schema.add_field("text", DataType.VARCHAR, max_length=NARROW_TEXT_BYTES)
    schema.add_field("content_hash", DataType.VARCHAR, max_length=64)
    schema.add_field("version", DataType.INT64)
    schema.add_field("metadata", DataType.JSON)
    index = client.prepare_index_params()
    index.add_index("vector", index_type="AUTOINDEX", metric_type="COSINE")
    client.create_collection(name, schema=schema, index_params=index, consistency_level="Strong")
    client.close()
    if uri.endswith(".db"):
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(uri)


def _strict_metadata_index(url: str, index: str) -> None:
    """lockstep's keyword mapping, with metadata strict: any metadata key is refused per item."""
    mapping = {
        "dynamic": "strict",
        "properties": {
            "chunk_id": {"type": "keyword"}, "doc_id": {"type": "keyword"}, "chunk_index": {"type": "integer"},
            "text": {"type": "text"}, "content_hash": {"type": "keyword"}, "version": {"type": "long"},
            "metadata": {"type": "object", "dynamic": "strict", "properties": {}},
        },
    }  # fmt: skip
    httpx.put(f"{url}/{index}", json={"mappings": mapping}, timeout=30.0).raise_for_status()


def _letters(config: Path) -> list[Any]:
    ledger = SqliteLedger(load_settings(config).ledger.path)  # type: ignore[union-attr]
    try:
        return [letter for _, letter in ledger.dead_letters(limit=100)]
    finally:
        ledger.close()


def _docs(config: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    settings = load_settings(config)
    return documents(read_keyword(settings)), documents(read_vector(settings))


def _assert_clean(config: Path) -> None:
    ledger = SqliteLedger(load_settings(config).ledger.path)  # type: ignore[union-attr]
    try:
        assert ledger.counts()["pending_intents"] == 0
    finally:
        ledger.close()
    audit = _lockstep("audit", "-c", str(config), "--json")
    assert audit.returncode == 0, audit.stdout[-2000:] + audit.stderr[-2000:]


@pytest.fixture(params=["lite-file", "milvus-2.3.5"])
def narrow_vector(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    name = f"narrow_{uuid.uuid4().hex[:8]}"
    if request.param == "lite-file":
        uri = str(tmp_path / "milvus.db")
    else:
        server: RealMilvus = request.getfixturevalue("real_milvus")
        uri = server.uri
    _narrow_collection(uri, name)
    return {"uri": uri, "collection": name}


def test_a_document_the_vector_index_refuses_is_restored_in_both_and_the_batch_commits(
    tmp_path: Path, narrow_vector: dict[str, Any]
) -> None:
    """Milvus refuses a whole upsert request for one long chunk: the request is split until the
    refused documents are found, they are dead-lettered with their whole event, the keyword
    index gets back what it held (an edit) or loses what it took (a new document), the other
    documents of the batch commit, and the audit is clean at once. A redelivery of the refused
    version is a duplicate; a newer version applies as usual."""
    config = _config(tmp_path, {"kind": "tantivy", "path": str(tmp_path / "tantivy")}, narrow_vector)
    events = tmp_path / "events.jsonl"
    _append(events, _event("keep", 1, SHORT), _event("edit", 1, SHORT, acl="a"))
    assert _lockstep("sync", "-c", str(config)).returncode == 0
    _append(
        events,
        _event("edit", 2, LONG, acl="b"), _event("new", 1, LONG), _event("keep", 2, "an edit that fits"),
        _event("after", 1, SHORT),
    )  # fmt: skip
    refused = _lockstep("sync", "-c", str(config))
    assert refused.returncode == 1, refused.stderr[-3000:]
    assert json.loads(refused.stdout)["dead_letters"] == 2
    letters = {letter.doc_id: letter for letter in _letters(config)}
    assert set(letters) == {"edit", "new"}
    assert json.loads(letters["edit"].payload) == _event("edit", 2, LONG, acl="b")
    assert letters["edit"].position is not None and "vector index refused" in letters["edit"].reason
    for docs in _docs(config):
        assert {d: (t, m) for d, (_, t, m) in docs.items()} == {
            "keep": ("an edit that fits", [{}]), "edit": (SHORT, [{"acl": "a"}]), "after": (SHORT, [{}]),
        }  # fmt: skip
    _assert_clean(config)

    ledger = SqliteLedger(tmp_path / "ledger.db")
    ledger.set_checkpoint("events", "0")
    ledger.close()
    again = _lockstep("sync", "-c", str(config))
    assert again.returncode == 0 and json.loads(again.stdout)["dead_letters"] == 0, again.stdout
    _append(events, _event("edit", 3, "a newer text that fits", acl="c"))
    assert _lockstep("sync", "-c", str(config)).returncode == 0
    for docs in _docs(config):
        assert docs["edit"][1:] == ("a newer text that fits", [{"acl": "c"}]) and docs["edit"][0] == 3
    _assert_clean(config)


def test_a_document_the_keyword_index_refuses_per_item_is_restored_in_both(
    tmp_path: Path, opensearch_api_url: str, real_milvus: RealMilvus
) -> None:
    """The OpenSearch-API server refuses one item (a metadata key under a strict mapping): the
    vector index, which took it, is brought back to the committed state, a new document is
    cleared from it, and the rest of the batch commits; a replay of the letter fails again and
    keeps the letter, adds its reason to the letter's history and keeps the first reason: the
    refusal consumed the version (the indexes hold the one before it)."""
    suffix = uuid.uuid4().hex[:8]
    index = f"strict-{suffix}"
    _strict_metadata_index(opensearch_api_url, index)
    config = _config(
        tmp_path,
        {"kind": "opensearch", "url": opensearch_api_url, "index": index},
        {"uri": real_milvus.uri, "collection": f"strict_{suffix}"},
    )
    events = tmp_path / "events.jsonl"
    _append(events, _event("meta", 1, SHORT), _event("keep", 1, SHORT))
    assert _lockstep("sync", "-c", str(config)).returncode == 0
    _append(events, _event("meta", 2, "edited", acl="x"), _event("fresh", 1, SHORT, acl="y"), _event("after", 1, SHORT))
    refused = _lockstep("sync", "-c", str(config))
    assert refused.returncode == 1, refused.stderr[-3000:]
    letters = {letter.doc_id: letter for letter in _letters(config)}
    assert set(letters) == {"meta", "fresh"} and "keyword index refused" in letters["meta"].reason
    for docs in _docs(config):
        assert {d: (t, m) for d, (_, t, m) in docs.items()} == {
            "meta": (SHORT, [{}]), "keep": (SHORT, [{}]), "after": (SHORT, [{}]),
        }  # fmt: skip
    _assert_clean(config)

    replay = _lockstep("dlq", "replay", "-c", str(config), "--all")
    assert replay.returncode == 1 and json.loads(replay.stdout)["consumed"] == 2, replay.stdout
    after = {letter.doc_id: letter for letter in _letters(config)}
    assert after["meta"].reason == letters["meta"].reason and after["meta"].attempts == 2
    assert [a.reason for a in after["meta"].history if "was consumed when a store refused it" in a.reason]
    _assert_clean(config)


def test_a_refusal_in_the_running_service_restores_both_indexes_and_the_shard_keeps_going(
    tmp_path: Path, real_milvus: RealMilvus
) -> None:
    """The same refusal inside `lockstep run` (shard actors on Ray, events POSTed to the
    webhook): the refused documents are dead-lettered and restored, the shard neither dies nor
    stalls (events after them are applied), the service stays ready and stops with exit 0."""
    vector = {"uri": real_milvus.uri, "collection": f"narrow_{uuid.uuid4().hex[:8]}"}
    _narrow_collection(vector["uri"], vector["collection"])
    port = free_port()
    config = _config(tmp_path, {"kind": "tantivy", "path": str(tmp_path / "tantivy")}, vector)
    raw = yaml.safe_load(config.read_text())
    raw["source"] = {"kind": "webhook", "name": "hook", "token": TOKEN}
    raw["run"] = {"shards": 1, "http_port": port, "audit_interval_s": 0}
    config.write_text(yaml.safe_dump(raw))
    base = f"http://127.0.0.1:{port}"
    proc = start_service(config)
    try:
        wait_for(lambda: ready(base), "ready", proc)
        _post(base, _event("keep", 1, SHORT), _event("edit", 1, SHORT, acl="a"))
        wait_for(lambda: _versions(config, "keep", "edit") == {"keep": 1, "edit": 1}, "the first events", proc)
        _post(base, _event("edit", 2, LONG), _event("new", 1, LONG), _event("after", 1, SHORT))
        _post(base, _event("later", 1, SHORT))
        wait_for(lambda: _versions(config, "after", "later") == {"after": 1, "later": 1}, "events after the refusals", proc)
        assert len(_letters(config)) == 2 and ready(base)
    finally:
        err = stop_service(proc)
    assert proc.returncode == 0, err[-3000:]
    for docs in _docs(config):
        assert {d: t for d, (_, t, _) in docs.items()} == {"keep": SHORT, "edit": SHORT, "after": SHORT, "later": SHORT}
    _assert_clean(config)


TOKEN = "refusals-token-" + "r" * 20


def _post(base: str, *events: dict[str, Any]) -> None:
    body = "".join(json.dumps(e) + "\n" for e in events).encode()
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/x-ndjson"}
    response = httpx.post(f"{base}/events", content=body, headers=headers, timeout=30.0)
    assert response.status_code == 202, response.text


def _versions(config: Path, *doc_ids: str) -> dict[str, int]:
    ledger = SqliteLedger(load_settings(config).ledger.path)  # type: ignore[union-attr]
    try:
        return {d: s.version for d, s in ledger.get_docs(doc_ids).items()}
    finally:
        ledger.close()
