"""Generations under chaos (`lockstep chaos run --generations`): every story on every vector store kind.

The CI smoke of docs/chaos.md ("Generations"): a rebuild, a swap, a rollback, a gc, a killed
rebuild resumed and one aborted, next to a live service taking events under in-process faults,
on a milvus-lite server, a milvus-lite file and Milvus 2.3.5; then proof that the schedules
find the dual-apply defects of issue 17, and the usage errors.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from pymilvus import MilvusClient

from adapters.keyword.settings import KeywordSettings
from chaos import gen_live
from chaos.gen_schedules import STORIES, run_generation_schedule
from chaos.gen_stores import GenStores
from chaos.runner import ScheduleSpec
from coordinator.multi_apply import MultiEngine
from coordinator.ports import Fence, Intent, SourceRecord
from tests.test_chaos_servers import chaos_run, write_config

SMOKE_SEED = 20251126
# Each story twice on the milvus-lite server, each kind below forced once: store and embedder
# faults, a crash of the service, redeliveries and late events.
SMOKE_KINDS = (
    "lockstep_crash", "keyword_down", "vector_lost_ack", "embed_5xx", "replay_checkpoint",
    "duplicate", "late_upsert_after_delete", "poison_document", "truncate", "vector_down",
)  # fmt: skip
# One schedule per story on a milvus-lite file; on Milvus 2.3.5 (seconds per collection
# created, loaded and dropped) the first three stories, which swap, roll back and gc: the
# aliases and drops of the real server (the killed rebuilds are told on the other two kinds).
KIND_SCHEDULES = len(STORIES)
REAL_MILVUS_SCHEDULES = 3
SMOKE_WORKERS = 2
# The whole CLI run, servers' start included, must end within this (a liveness bound).
CLI_TIMEOUT_S = 600
USER_INDEX = "gens-user-kb"
USER_COLLECTION = "gens_user_kb"


def _cli(*args: str, report: Path) -> dict[str, Any]:
    """`lockstep chaos run --generations ARGS` as a user's CI runs it; its JSON report."""
    result = subprocess.run(
        [sys.executable, "-m", "lockstep", "chaos", "run", "--generations", *args, "--report", str(report)],
        capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    parsed: dict[str, Any] = json.loads(report.read_text())
    return parsed


def _assert_every_story_held(report: dict[str, Any], schedules: int) -> None:
    assert report["schedules"] == schedules and report["violations"] == 0, report["failed_seeds"]
    told = STORIES[:schedules]
    assert {r["details"]["story"] for r in report["results"]} == set(told)
    assert report["injected"].get("generation_switch", 0) >= schedules, "the service switched in every schedule"
    if {"resume", "abort"} & set(told):
        assert report["injected"].get("rebuild_crash", 0) >= 1, "a rebuild was killed at a crash point"


def test_the_generations_smoke_tells_every_story_under_faults_on_a_milvus_lite_server(tmp_path: Path) -> None:
    """Ten schedules on a milvus-lite server and an OpenSearch-API server the workers start: every
    story told, every forced kind injected, a rebuild killed and resumed, every invariant held."""
    report = _cli("--servers", "managed", "--seed", str(SMOKE_SEED), "--schedules", str(2 * len(STORIES)),
                  "--faults", ",".join(SMOKE_KINDS), "--workers", str(SMOKE_WORKERS), report=tmp_path / "r.json")
    _assert_every_story_held(report, 2 * len(STORIES))
    assert [k for k in SMOKE_KINDS if not report["injected"].get(k)] == []
    resumed = [r for r in report["results"] if r["details"]["story"] == "resume"]
    assert any(r["details"]["rebuild_runs"] > 1 for r in resumed), "a killed rebuild was run again"


def test_generations_schedules_run_on_a_milvus_lite_file(tmp_path: Path) -> None:
    """One schedule per story on a milvus-lite file in the worker's directory."""
    report = _cli("--servers", "managed", "--managed-milvus", "file", "--seed", str(SMOKE_SEED),
                  "--schedules", str(KIND_SCHEDULES), "--workers", "1", report=tmp_path / "r.json")
    _assert_every_story_held(report, KIND_SCHEDULES)


def test_generations_schedules_run_on_milvus_2_3_5_through_a_config(
    tmp_path: Path, opensearch_api_url: str, real_milvus: Any
) -> None:
    """A swap, a rollback and a gc on the Milvus 2.3.5 server and the OpenSearch-API server a
    config names; each schedule leaves no index or collection of any generation behind."""
    config = write_config(
        tmp_path / "lockstep.yaml",
        f"{{kind: opensearch, url: '{opensearch_api_url}', index: {USER_INDEX}}}",
        f"{{uri: '{real_milvus.uri}', collection: {USER_COLLECTION}}}",
    )
    report = _cli("-c", str(config), "--seed", str(SMOKE_SEED), "--schedules", str(REAL_MILVUS_SCHEDULES),
                  "--workers", str(SMOKE_WORKERS), report=tmp_path / "r.json")
    _assert_every_story_held(report, REAL_MILVUS_SCHEDULES)
    indexes = httpx.get(f"{opensearch_api_url}/_cat/indices?format=json", timeout=10).json()
    assert [i["index"] for i in indexes if i["index"].startswith(USER_INDEX)] == []
    client = MilvusClient(uri=real_milvus.uri)
    try:
        assert [c for c in client.list_collections() if c.startswith(USER_COLLECTION)] == []
    finally:
        client.close()


class _ActiveOnly(MultiEngine):
    """The dual apply before issue 17's fix, planted: it hands back and drives only what the
    active generation prepared, and a retry drives whatever it is given in the active one."""

    def prepare_some(
        self, records: Sequence[SourceRecord], fence: Fence | None = None
    ) -> tuple[list[Intent], list[str]]:
        intents, held = super().prepare_some(records, fence)
        active = {i.doc_id for i in self.primary.ledger.pending()}
        return [i for i in intents if i.doc_id in active], held

    def drive(self, intents: Sequence[Intent], fence: Fence | None = None) -> None:
        docs = {i.doc_id for i in intents}
        self.primary.drive(intents, fence)
        for engine in self.engines[1:]:
            engine.drive([i for i in engine.ledger.pending() if i.doc_id in docs], fence)


# Schedules of `plan_generation_specs(7, 20, inproc)` that meet the planted defect, and what each
# finds: the intent it left behind driven only because a live document waited on it
# (`adopted`), or the shard stopped when it drove generation 2's intent into generation 1.
PLANTED_FINDS = [
    (ScheduleSpec(434439589176, ("duplicate", "vector_lost_ack", "poison_document", "late_upsert_after_delete")),
     "adopted "),
    (ScheduleSpec(262293031820, ("embed_5xx", "delete_before_create", "replay_checkpoint", "delay")), "adopted "),
    (ScheduleSpec(641520749045, ("delete_before_create", "malformed_vector", "pk_change", "duplicate")),
     "neither committed nor superseded"),
]


@pytest.mark.parametrize(("spec", "finding"), PLANTED_FINDS, ids=["rollback", "swap", "swap-stopped"])
def test_generations_schedules_find_a_dual_apply_that_leaves_a_generations_intents_undriven(
    tmp_path: Path, opensearch_api_url: str, spec: ScheduleSpec, finding: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With issue 17's defect planted in the live service, these schedules find it: an intent it
    left prepared in the new generation, driven only after a live document waited on it, or the
    shard stopped for driving generation 2's intent into generation 1; fixed, they hold everything."""
    stores = GenStores(KeywordSettings(kind="opensearch", url=opensearch_api_url, index="gens-planted"), None)
    monkeypatch.setattr(gen_live, "MultiEngine", _ActiveOnly)
    planted = run_generation_schedule(spec, tmp_path / "planted", stores=stores)
    assert any(finding in v for v in planted.violations), planted.violations[:5]
    monkeypatch.undo()
    fixed = run_generation_schedule(spec, tmp_path / "fixed", stores=stores)
    assert fixed.violations == []


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--servers", "managed", "--faults", "net_latency"], "in-process kinds only"),
        (["--servers", "managed", "--managed-milvus", "3.0"], "--managed-milvus"),
        ([], "needs an OpenSearch/Elasticsearch keyword index"),
        (["-c", "{tantivy_config}"], "a Tantivy index admits one writer"),
    ],
)
def test_generations_schedules_refuse_what_they_cannot_run(tmp_path: Path, args: list[str], said: str) -> None:
    """Server kinds, an unknown Milvus, no keyword server and a Tantivy config exit 2 with the reason."""
    config = write_config(tmp_path / "t.yaml", f"{{kind: tantivy, path: '{tmp_path / 'kw'}'}}", f"{{uri: '{tmp_path / 'm.db'}'}}")
    result, _ = chaos_run("--generations", *[a.replace("{tantivy_config}", str(config)) for a in args])
    assert result.exit_code == 2, result.output
    assert said in " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split()), result.output
