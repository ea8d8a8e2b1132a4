"""The CI chaos smoke: 200 seeded schedules over every in-process fault kind, within a bounded
budget, with zero violations; and a planted bug that the same budget catches."""

from __future__ import annotations

from pathlib import Path

import typer
from typer.testing import CliRunner

from chaos import cli as chaos_cli
from chaos.catalogue import INPROC_KINDS
from chaos.planted import KEYWORD_DROPS_DELETES
from chaos.runner import plan_specs, run_schedules

SMOKE_SEED = 20_251_126
SMOKE_SCHEDULES = 200
# About five minutes on two busy cores; a schedule takes ~1 s of wall time, four run at once.
SMOKE_BUDGET_S = 300.0
SMOKE_WORKERS = 4


def test_two_hundred_schedules_hold_every_invariant_and_inject_every_kind(tmp_path: Path) -> None:
    """All 200 schedules finish within budget, none violates an invariant, every kind was injected."""
    specs = plan_specs(SMOKE_SEED, SMOKE_SCHEDULES, INPROC_KINDS)
    summary = run_schedules(specs, workers=SMOKE_WORKERS, budget_s=SMOKE_BUDGET_S, base_dir=tmp_path)
    failed = [(r.seed, r.faults, r.violations[:3]) for r in summary.results if not r.ok]
    assert failed == [], f"replay with lockstep chaos run --replay SEED --faults ...: {failed}"
    assert len(summary.results) == SMOKE_SCHEDULES, f"budget ran out after {len(summary.results)} schedules"
    missing = [k for k in INPROC_KINDS if summary.injected[k] == 0]
    assert missing == [], f"never injected: {missing}"


def test_a_planted_bug_is_found_within_the_ci_budget(tmp_path: Path) -> None:
    """With the keyword index dropping deletes, the CI plan finds a violation before its budget ends."""
    specs = plan_specs(SMOKE_SEED, SMOKE_SCHEDULES, INPROC_KINDS, KEYWORD_DROPS_DELETES)
    summary = run_schedules(
        specs, workers=SMOKE_WORKERS, budget_s=SMOKE_BUDGET_S, base_dir=tmp_path, fail_fast=True
    )
    assert summary.violations > 0
    found = {v.split(" ", 1)[0] for r in summary.results for v in r.violations}
    assert found & {"I1", "I3", "audit:ghost"}, found


def test_the_cli_prints_the_table_and_exits_1_with_the_failing_seed() -> None:
    """`lockstep chaos run` exits 0 when clean and 1 with a replay line when a planted bug bites."""
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
