"""The CI chaos smoke: 1,000 seeded schedules over every in-process fault kind, with zero
violations, through both paths (shard worker, run_sync); the planted bugs that the same plan
catches are tests/test_chaos_planted.py's; and the server smoke, `lockstep chaos run --servers
managed` over a mix of all 32 fault kinds, in which each server kind (network, process, tombstone)
must report its own injection. Both smokes' schedule counts, faults per kind and wall times go to
the session's "chaos runs" summary (tests/support/chaos_report.py), so CI's log shows them."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from chaos import cli as chaos_cli
from chaos.catalogue import INPROC_KINDS, KINDS, SERVER_KINDS, parse_kinds
from chaos.planted import KEYWORD_DROPS_DELETES
from chaos.runner import BATCH_PATH, SHARD_PATH, plan_specs, run_schedules
from tests.support.chaos_report import record_run

SMOKE_SEED = 20_251_126
SMOKE_SCHEDULES = 1_000
# One worker per core: with the stores each worker reuses a schedule keeps its core busy (about
# 0.3 s of CPU), so more workers only take turns (docs/chaos.md has the wall times).
SMOKE_WORKERS = 2
# Not a speed requirement (wall time is reported, never asserted): a bound on a run that hangs,
# far above the ~3 minutes the smoke takes on two cores, below the test's own timeout.
SMOKE_BUDGET_S = 1_080.0
SMOKE_TIMEOUT_S = 1_200
# The server smoke: each of the 32 schedules forces one kind (the 12 server kinds first, then the
# 20 in-process ones) and draws up to 3 more from all 32, so every kind runs, mixed with others.
SERVER_SMOKE_FAULTS = "server,inproc"
SERVER_SMOKE_SCHEDULES = len(KINDS)
# Each worker runs its own OpenSearch-API server and milvus-lite server; a schedule mostly waits
# (timeouts, pauses, restarts), so on two cores three workers are the fastest (docs/chaos.md).
SERVER_SMOKE_WORKERS = 3
# 20-40 s on two cores; the budget leaves room for a much slower machine.
SERVER_SMOKE_BUDGET_S = 180.0
# The budget stops new schedules; running ones finish, and the servers stop, within this.
SERVER_SMOKE_TIMEOUT_S = 400.0


@pytest.mark.timeout(SMOKE_TIMEOUT_S)
def test_a_thousand_schedules_hold_every_invariant_and_inject_every_kind(request: pytest.FixtureRequest) -> None:
    """All 1,000 schedules run, none violates an invariant, every kind was injected, and both
    paths ran: the shard worker's and run_sync's."""
    specs = plan_specs(SMOKE_SEED, SMOKE_SCHEDULES, INPROC_KINDS)
    summary = run_schedules(specs, workers=SMOKE_WORKERS, budget_s=SMOKE_BUDGET_S)
    record_run(
        request.config, "in-process smoke", len(summary.results), summary.injected, summary.violations, summary.wall_s
    )
    failed = [(r.seed, r.faults, r.violations[:3]) for r in summary.results if not r.ok]
    assert failed == [], f"replay with lockstep chaos run --replay SEED --faults ...: {failed}"
    assert len(summary.results) == SMOKE_SCHEDULES, f"budget ran out after {len(summary.results)} schedules"
    missing = [k for k in INPROC_KINDS if summary.injected[k] == 0]
    assert missing == [], f"never injected: {missing}"
    paths = Counter(r.details["path"] for r in summary.results)
    assert paths[SHARD_PATH] > 0 and paths[BATCH_PATH] > 0, paths


def test_the_cli_prints_the_table_and_exits_1_with_the_failing_seed() -> None:
    """`lockstep chaos run` exits 0 when clean and 1 with a replay line when a planted bug bites;
    `--path batch` runs the batch path, and refuses (exit 2) a kind only the shard path meets."""
    app = typer.Typer()
    app.callback()(lambda: None)
    chaos_cli.register(app)
    runner = CliRunner()
    clean = runner.invoke(app, ["chaos", "run", "--seed", "5", "--schedules", "3", "--workers", "2"])
    assert clean.exit_code == 0, clean.output
    assert "violations 0" in clean.output and "schedule seed" in clean.output
    broken = runner.invoke(
        app,
        [
            "chaos",
            "run",
            "--seed",
            "5",
            "--schedules",
            "2",
            "--workers",
            "2",
            "--plant-bug",
            KEYWORD_DROPS_DELETES,
        ],
    )
    assert broken.exit_code == 1, broken.output
    assert "FAILED seed" in broken.output and "--replay" in broken.output
    batch = runner.invoke(app, ["chaos", "run", "--seed", "5", "--schedules", "2", "--workers", "2", "--path", "batch"])
    assert batch.exit_code == 0, batch.output
    refused = runner.invoke(app, ["chaos", "run", "--path", "batch", "--faults", "poison_document"])
    assert refused.exit_code == 2 and "only the shard path" in refused.output, refused.output


@pytest.fixture(scope="module")
def server_smoke(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """One `python -m lockstep chaos run --servers managed` over the server smoke's plan (a separate
    process, exactly as a user's CI runs it): the finished process and its JSON report."""
    report = tmp_path_factory.mktemp("server-smoke") / "report.json"
    args = [
        sys.executable,
        "-m",
        "lockstep",
        "chaos",
        "run",
        "--servers",
        "managed",
        "--seed",
        str(SMOKE_SEED),
        "--schedules",
        str(SERVER_SMOKE_SCHEDULES),
        "--faults",
        SERVER_SMOKE_FAULTS,
        "--workers",
        str(SERVER_SMOKE_WORKERS),
        "--budget-s",
        str(SERVER_SMOKE_BUDGET_S),
        "--report",
        str(report),
    ]
    done = subprocess.run(
        args, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=SERVER_SMOKE_TIMEOUT_S
    )
    data = json.loads(report.read_text()) if report.exists() else {}
    if data:
        record_run(
            request.config, "server smoke", data["schedules"], data["injected"], data["violations"], data["wall_s"]
        )
    return done, data


def test_the_server_smoke_holds_every_invariant_and_injects_every_kind(
    server_smoke: tuple[subprocess.CompletedProcess[str], dict[str, Any]],
) -> None:
    """All server-smoke schedules run on managed servers within budget, exit 0 with no violation,
    and every one of the 32 kinds was injected, the 12 server kinds included."""
    done, report = server_smoke
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert report["schedules"] == SERVER_SMOKE_SCHEDULES, f"budget ran out: {report['schedules']}"
    assert report["violations"] == 0 and report["failed_seeds"] == []
    assert [k for k in KINDS if not report["injected"].get(k)] == []


@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_each_server_kind_is_injected_by_the_schedule_it_was_forced_into(
    server_smoke: tuple[subprocess.CompletedProcess[str], dict[str, Any]], kind: str
) -> None:
    """The smoke schedule planned around this server kind reports injecting it and held every
    invariant; after a store lost data the reconciler's rebuild embedded nothing."""
    kinds = parse_kinds(SERVER_SMOKE_FAULTS)
    spec = plan_specs(SMOKE_SEED, SERVER_SMOKE_SCHEDULES, kinds)[kinds.index(kind)]
    [schedule] = [r for r in server_smoke[1]["results"] if r["seed"] == spec.seed]
    assert schedule["injected"].get(kind, 0) > 0, f"{kind} was not injected: {schedule['injected']}"
    assert schedule["violations"] == []
    if kind in ("vector_server_kill9", "keyword_server_data_loss"):
        assert schedule["details"]["reconciled"]["texts_embedded"] == 0


def test_a_keyword_data_loss_is_rebuilt_by_the_reconciler(
    server_smoke: tuple[subprocess.CompletedProcess[str], dict[str, Any]],
) -> None:
    """Every smoke schedule whose OpenSearch-API server lost its data had the keyword side rewritten
    by the reconciler (repairs or re-driven intents), so the data loss was real."""
    lost = [r for r in server_smoke[1]["results"] if r["injected"].get("keyword_server_data_loss")]
    assert lost, "no schedule lost keyword data"
    rebuilt = [r["details"]["reconciled"] for r in lost]
    assert all(s["repairs"] or s["redrives"] for s in rebuilt), rebuilt
