"""Every planted bug of chaos/planted.py is reported by the invariant that guards what it breaks,
within the CI smoke's own plan and budget (tests/test_chaos_smoke.py: its seed, schedules over
the in-process kinds, worker processes and budget), and the failing schedule's seed replays it.

A plan stops at its first violation (``fail_fast``): a violation that does not report the bug
(another invariant, a crash) fails the test too, so a planted bug cannot pass by breaking
something else first."""

from __future__ import annotations

from pathlib import Path

import pytest

from chaos.catalogue import INPROC_KINDS
from chaos.planted import PLANTED_BUGS, PLANTS
from chaos.runner import ScheduleResult, ScheduleSpec, plan_specs, run_schedule, run_schedules
from tests.test_chaos_smoke import SMOKE_BUDGET_S, SMOKE_SCHEDULES, SMOKE_SEED, SMOKE_WORKERS


def _replay_command(result: ScheduleResult, bug: str) -> str:
    return f"lockstep chaos run --replay {result.seed} --faults {','.join(result.faults)} --plant-bug {bug}"


@pytest.mark.parametrize("bug", PLANTED_BUGS)
def test_each_planted_bug_is_reported_by_its_invariant_within_the_ci_budget(bug: str, tmp_path: Path) -> None:
    """With this bug planted, the CI smoke's plan reports a violation of the invariant that guards
    what the bug breaks before its budget ends, and that schedule's seed and kinds, replayed,
    report it again."""
    plant = PLANTS[bug]
    specs = plan_specs(SMOKE_SEED, SMOKE_SCHEDULES, INPROC_KINDS, bug)
    summary = run_schedules(
        specs, workers=SMOKE_WORKERS, budget_s=SMOKE_BUDGET_S, base_dir=tmp_path, fail_fast=True
    )
    order = {s.seed: i for i, s in enumerate(specs)}
    failed = sorted((r for r in summary.results if not r.ok), key=lambda r: order[r.seed])
    assert failed, f"{bug}: no violation in {len(summary.results)} schedules"
    first = failed[0]
    assert plant.caught(first.violations), (
        f"{bug}: schedule {order[first.seed] + 1} failed otherwise ({_replay_command(first, bug)}): "
        + "\n".join(first.violations[:10])
    )
    (tmp_path / "replay").mkdir()
    replayed = run_schedule(ScheduleSpec(first.seed, first.faults, bug), tmp_path / "replay")
    assert plant.caught(replayed.violations), f"{_replay_command(first, bug)} did not report {bug} again"
