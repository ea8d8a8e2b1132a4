"""Server-tier faults through ``lockstep chaos run``: network faults against the servers a config
names (the suite's proxies in front of them, the user's own index untouched), Milvus 2.3.5
killed -9 on servers the suite manages, and the usage errors for kinds that cannot run where the
schedules go. Every server kind's own test is in tests/test_chaos_smoke.py (the server smoke).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import typer
from pymilvus import MilvusClient
from typer.testing import CliRunner

from adapters.keyword.es_compat_proxy import EsCompatProxy
from adapters.keyword.opensearch import OpenSearchKeywordIndex
from adapters.keyword.settings import KeywordSettings
from adapters.vector.settings import VectorSettings
from chaos import cli as chaos_cli
from chaos.planted import KEYWORD_DROPS_DELETES
from chaos.rig import EMBED_DIM
from chaos.servers import MilvusLiteServer
from chaos.servertier import create_index_with_gc
from coordinator.model import ChunkDelete, IndexedChunk, ItemStatus
from lockstep.bootstrap import build_vector

# The user's own index and collection: the chaos run must leave both exactly as they were.
USER_INDEX = "chaos-user-kb"
USER_COLLECTION = "chaos_user_kb"
USER_CHUNK = IndexedChunk("user-doc:chunk-0", "user-doc", 0, "the user's text", "h-user", 7)
# Network kinds against the configured servers; seed 3 sends faults down both proxied sides.
DEPLOYMENT_SEED = 3
DEPLOYMENT_KINDS = (
    "net_reset_before_send",
    "net_reset_after_send",
    "net_blackhole",
    "http_429",
    "bulk_item_429",
    "late_upsert_after_tombstone_gc",
)
REAL_MILVUS_SCHEDULE_SEED = 9800


def chaos_run(*args: str, report: Path | None = None) -> tuple[Any, dict[str, Any]]:
    """``lockstep chaos run ARGS`` in this process; the CLI result and its JSON report (if any).

    The command is registered on an app of its own: lockstep's root callback would point the
    log output at CliRunner's temporary stream, which later tests would then write to, closed.
    """
    extra = ["--report", str(report)] if report is not None else []
    cli = typer.Typer()
    cli.callback()(lambda: None)
    chaos_cli.register(cli)
    result = CliRunner().invoke(cli, ["chaos", "run", *args, *extra])
    parsed = json.loads(report.read_text()) if report is not None and report.exists() else {}
    return result, parsed


def write_config(path: Path, keyword: str, vector: str) -> Path:
    path.write_text(f"keyword: {keyword}\nvector: {vector}\n", encoding="utf-8")
    return path


@pytest.fixture
def user_stores(opensearch_api_url: str, lite_server: MilvusLiteServer) -> Any:
    """The user's real index and collection, each holding one chunk, on the session's servers."""
    keyword = OpenSearchKeywordIndex(
        KeywordSettings(kind="opensearch", url=opensearch_api_url, index=USER_INDEX)
    )
    vector = build_vector(VectorSettings(uri=lite_server.uri, collection=USER_COLLECTION), dim=EMBED_DIM)
    keyword.ensure()
    vector.ensure()
    keyword.upsert([USER_CHUNK])
    vector.upsert([IndexedChunk(**{**USER_CHUNK.__dict__, "vector": [0.25] * EMBED_DIM})])
    yield keyword, vector
    for store in (keyword, vector):
        store.drop()
        store.close()


def test_network_faults_run_against_the_configured_servers_and_leave_the_users_index_alone(
    tmp_path: Path, opensearch_api_url: str, lite_server: MilvusLiteServer, user_stores: Any
) -> None:
    """`chaos run -c FILE` injects network faults on both proxied connections, holds every invariant,
    and leaves the configured index and collection as they were, with no schedule index left behind."""
    config = write_config(
        tmp_path / "lockstep.yaml",
        f"{{kind: opensearch, url: '{opensearch_api_url}', index: {USER_INDEX}}}",
        f"{{uri: '{lite_server.uri}', collection: {USER_COLLECTION}}}",
    )
    result, report = chaos_run(
        "-c",
        str(config),
        "--seed",
        str(DEPLOYMENT_SEED),
        "--schedules",
        str(len(DEPLOYMENT_KINDS)),
        "--faults",
        ",".join(DEPLOYMENT_KINDS),
        "--workers",
        "2",
        report=tmp_path / "report.json",
    )
    assert result.exit_code == 0, result.output
    assert report["violations"] == 0 and report["schedules"] == len(DEPLOYMENT_KINDS)
    assert [k for k in DEPLOYMENT_KINDS if not report["injected"].get(k)] == []
    sides = {side for r in report["results"] for side in r["details"]["injected_by_proxy"]}
    assert sides == {"keyword_http", "keyword_tcp", "vector_tcp"}, sides
    keyword, vector = user_stores
    assert [(c.chunk_id, c.version) for c in keyword.scan()] == [(USER_CHUNK.chunk_id, USER_CHUNK.version)]
    assert [(c.chunk_id, c.version) for c in vector.scan()] == [(USER_CHUNK.chunk_id, USER_CHUNK.version)]
    indexes = json.loads(_get(f"{opensearch_api_url}/_cat/indices?format=json"))
    assert [i["index"] for i in indexes if i["index"].startswith(f"{USER_INDEX}-chaos-")] == []
    client = MilvusClient(uri=lite_server.uri)
    assert [c for c in client.list_collections() if c.startswith(f"{USER_COLLECTION}_chaos_")] == []
    client.close()


def test_a_planted_bug_is_found_behind_the_proxies_and_the_replay_names_the_config(
    tmp_path: Path, opensearch_api_url: str, lite_server: MilvusLiteServer
) -> None:
    """With the keyword index dropping deletes, a network-fault schedule against the configured
    servers exits 1, and its replay command repeats -c FILE."""
    config = write_config(
        tmp_path / "lockstep.yaml",
        f"{{kind: opensearch, url: '{opensearch_api_url}', index: chaos-user-bug}}",
        f"{{uri: '{lite_server.uri}', collection: chaos_user_bug}}",
    )
    result, report = chaos_run(
        "-c",
        str(config),
        "--seed",
        "5",
        "--schedules",
        "1",
        "--faults",
        "net_reset_after_send",
        "--plant-bug",
        KEYWORD_DROPS_DELETES,
        report=tmp_path / "report.json",
    )
    assert result.exit_code == 1, result.output
    found = {v.split(" ", 1)[0] for r in report["results"] for v in r["violations"]}
    assert found & {"I1", "I3", "audit:ghost"}, found
    [failed] = report["results"]
    assert failed["replay"] == (
        f"lockstep chaos run --replay {failed['seed']} --faults net_reset_after_send -c {config} "
        f"--plant-bug {KEYWORD_DROPS_DELETES}"
    )
    assert "FAILED seed" in result.output


def test_elasticsearch_answers_pass_through_the_fault_proxies(
    tmp_path: Path, es_compat_proxy: EsCompatProxy, lite_server: MilvusLiteServer
) -> None:
    """An Elasticsearch config runs behind the fault proxies (its client's product check still
    passes): whole-request and per-item 429s are injected and every invariant holds."""
    config = write_config(
        tmp_path / "lockstep.yaml",
        f"{{kind: elasticsearch, url: '{es_compat_proxy.url}', index: chaos-user-es}}",
        f"{{uri: '{lite_server.uri}', collection: chaos_user_es}}",
    )
    kinds = ("bulk_item_429", "http_429")
    result, report = chaos_run(
        "-c",
        str(config),
        "--seed",
        "4",
        "--schedules",
        "2",
        "--faults",
        ",".join(kinds),
        "--workers",
        "2",
        report=tmp_path / "report.json",
    )
    assert result.exit_code == 0, result.output
    assert report["violations"] == 0
    assert {k: report["injected"].get(k, 0) > 0 for k in kinds} == dict.fromkeys(kinds, True)


def test_real_milvus_survives_kill9_and_restart(tmp_path: Path) -> None:
    """`--servers managed --managed-milvus 2.3.5`: kill -9 of the real Milvus 2.3.5 server
    mid-schedule, restart on the same data; lockstep converges and the repair embeds nothing."""
    result, report = chaos_run(
        "--servers",
        "managed",
        "--managed-milvus",
        "2.3.5",
        "--replay",
        str(REAL_MILVUS_SCHEDULE_SEED),
        "--faults",
        "vector_server_kill9,reorder",
        report=tmp_path / "report.json",
    )
    assert result.exit_code == 0, result.output
    [schedule] = report["results"]
    assert schedule["injected"].get("vector_server_kill9") == 1, schedule["injected"]
    assert schedule["violations"] == []
    assert schedule["details"]["reconciled"]["texts_embedded"] == 0


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--faults", "store_pause"], "--servers managed"),
        (["--faults", "server"], "servers are needed by late_upsert_after_tombstone_gc, net_latency"),
        (["--servers", "managed", "-c", "{os_config}"], "give one of them"),
        (
            ["-c", "{os_config}", "--faults", "vector_server_kill9,net_latency"],
            "process faults (vector_server_kill9) kill, wipe or pause a server",
        ),
        (
            ["-c", "{tantivy_config}", "--faults", "http_429"],
            "an opensearch or elasticsearch keyword index in the config is needed by http_429",
        ),
        (
            ["-c", "{embedded_config}", "--faults", "net_latency"],
            "a keyword or vector server in the config is needed by net_latency",
        ),
        (["-c", "{tls_config}", "--faults", "net_latency"], "TLS"),
        (["--servers", "elsewhere"], "--servers"),
        (["--managed-milvus", "2.3.5"], "needs --servers managed"),
    ],
)
def test_kinds_that_cannot_run_where_the_schedules_go_are_a_usage_error(
    tmp_path: Path, args: list[str], says: str
) -> None:
    """Process faults off managed servers, network faults without a server to sit in front of, and
    contradictory options all exit 2 with a message saying why, before any schedule runs."""
    configs = {
        "os_config": write_config(
            tmp_path / "os.yaml",
            "{kind: opensearch, url: 'http://127.0.0.1:9', index: kb}",
            "{uri: 'http://127.0.0.1:9', collection: kb}",
        ),
        "tantivy_config": write_config(
            tmp_path / "tantivy.yaml",
            f"{{kind: tantivy, path: '{tmp_path / 'kw'}'}}",
            "{uri: 'http://127.0.0.1:9', collection: kb}",
        ),
        "embedded_config": write_config(
            tmp_path / "embedded.yaml",
            f"{{kind: tantivy, path: '{tmp_path / 'kw'}'}}",
            f"{{uri: '{tmp_path / 'm.db'}'}}",
        ),
        "tls_config": write_config(
            tmp_path / "tls.yaml",
            "{kind: opensearch, url: 'https://search.example:9200', index: kb}",
            "{uri: 'http://127.0.0.1:9', collection: kb}",
        ),
    }
    argv = [a.format(**{k: str(v) for k, v in configs.items()}) for a in args]
    result, _ = chaos_run(*argv, "--schedules", "1")
    assert result.exit_code == 2, result.output
    assert says in re.sub(r"[\s│]+", " ", result.output), result.output
    assert "schedule seed" not in result.output


def test_the_test_index_forgets_tombstones_so_only_the_ledger_stops_a_late_upsert(
    opensearch_api_url: str,
) -> None:
    """With index.gc_deletes=0s the OpenSearch index alone accepts an older upsert after a delete."""
    create_index_with_gc(opensearch_api_url, "chaos-gc-probe")
    index = OpenSearchKeywordIndex(
        KeywordSettings(kind="opensearch", url=opensearch_api_url, index="chaos-gc-probe")
    )
    chunk = IndexedChunk("d:chunk-0", "d", 0, "text", "h", 5)
    try:
        index.upsert([chunk])
        index.delete([ChunkDelete("d:chunk-0", 6)])
        [late] = index.upsert([IndexedChunk("d:chunk-0", "d", 0, "old", "h0", 3)]).items
        assert late.status is ItemStatus.APPLIED, "the tombstone window is not short: the fault would be fake"
    finally:
        index.drop()
        index.close()


def _get(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as reply:
        return bytes(reply.read())
