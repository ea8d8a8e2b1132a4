"""`lockstep chaos run -c FILE` on every mix of embedded and server stores, with several workers.

An embedded side (a Tantivy directory, a milvus-lite file) runs in each worker's own work
directory, never at the configured path (a milvus-lite file admits one process, and the
configured one is the user's); a server side gets a schedule index or collection of its own,
dropped afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pymilvus import MilvusClient

from tests.test_chaos_servers import chaos_run, write_config

# The configured names: the run must neither create nor touch them.
USER_INDEX = "chaos-mix-kb"
USER_COLLECTION = "chaos_mix_kb"
MIX_SEED = 11
MIX_SCHEDULES = 2
MIX_WORKERS = 2
KEYWORDS = ("tantivy", "opensearch")
VECTORS = ("file", "lite_server", "real_milvus")


def _keyword(kind: str, tmp_path: Path, opensearch_api_url: str) -> str:
    if kind == "tantivy":
        return f"{{kind: tantivy, path: '{tmp_path / 'kb-tantivy'}'}}"
    return f"{{kind: opensearch, url: '{opensearch_api_url}', index: {USER_INDEX}}}"


def _vector(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> tuple[str, str | None]:
    """The config's vector entry, and the server's URI (None for a file)."""
    if kind == "file":
        return f"{{uri: '{tmp_path / 'kb.db'}', collection: {USER_COLLECTION}}}", None
    uri = str(request.getfixturevalue(kind).uri)
    return f"{{uri: '{uri}', collection: {USER_COLLECTION}}}", uri


@pytest.mark.parametrize("vector_kind", VECTORS)
@pytest.mark.parametrize("keyword_kind", KEYWORDS)
def test_every_mix_of_embedded_and_server_stores_runs_with_several_workers(
    tmp_path: Path, keyword_kind: str, vector_kind: str, opensearch_api_url: str, request: pytest.FixtureRequest
) -> None:
    """Schedules across two workers hold every invariant with this keyword index and this vector
    store; the configured Tantivy directory and milvus-lite file are never created, and no
    schedule index or collection is left on a server."""
    vector, vector_uri = _vector(vector_kind, tmp_path, request)
    config = write_config(tmp_path / "lockstep.yaml", _keyword(keyword_kind, tmp_path, opensearch_api_url), vector)
    result, report = chaos_run(
        "-c", str(config), "--seed", str(MIX_SEED), "--schedules", str(MIX_SCHEDULES),
        "--workers", str(MIX_WORKERS), report=tmp_path / "report.json",
    )
    failed = [(r["seed"], r["violations"][:2]) for r in report.get("results", []) if r["violations"]]
    assert result.exit_code == 0, f"{result.output[-3000:]}\n{failed}"
    assert report["schedules"] == MIX_SCHEDULES and report["violations"] == 0
    assert all(r["injected"] for r in report["results"]), "every schedule injected a fault"
    assert not (tmp_path / "kb-tantivy").exists() and not (tmp_path / "kb.db").exists()
    if keyword_kind == "opensearch":
        assert _schedule_indexes(opensearch_api_url) == []
    if vector_uri is not None:
        client = MilvusClient(uri=vector_uri)
        try:
            assert [c for c in client.list_collections() if c.startswith(USER_COLLECTION)] == []
        finally:
            client.close()


@pytest.mark.parametrize(
    ("keyword_kind", "vector_kind", "kinds"),
    [("opensearch", "file", "http_429,net_reset_after_send")],
)
def test_network_faults_hit_the_server_side_of_a_mixed_config_and_the_embedded_side_stays_local(
    tmp_path: Path, keyword_kind: str, vector_kind: str, kinds: str, opensearch_api_url: str,
    request: pytest.FixtureRequest,
) -> None:
    """With one side embedded, network kinds run through the proxy in front of the other (the
    only proxy that injects), and the embedded side still runs in each worker's directory."""
    vector, _ = _vector(vector_kind, tmp_path, request)
    config = write_config(tmp_path / "lockstep.yaml", _keyword(keyword_kind, tmp_path, opensearch_api_url), vector)
    result, report = chaos_run(
        "-c", str(config), "--seed", str(MIX_SEED), "--schedules", str(MIX_WORKERS), "--faults", kinds,
        "--workers", str(MIX_WORKERS), report=tmp_path / "report.json",
    )
    assert result.exit_code == 0, result.output[-3000:]
    assert report["schedules"] == MIX_WORKERS and report["violations"] == 0
    assert [k for k in kinds.split(",") if not report["injected"].get(k)] == []
    proxies = {p for r in report["results"] for p in r["details"]["injected_by_proxy"]}
    server_side = "keyword" if keyword_kind == "opensearch" else "vector"
    assert proxies and all(p.startswith(server_side) for p in proxies), proxies
    assert not (tmp_path / "kb-tantivy").exists() and not (tmp_path / "kb.db").exists()


def _schedule_indexes(url: str) -> list[Any]:
    import httpx

    indexes = json.loads(httpx.get(f"{url}/_cat/indices?format=json", timeout=10).text)
    return [i["index"] for i in indexes if i["index"].startswith(USER_INDEX)]
