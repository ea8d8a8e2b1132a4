"""How many schedules the suite needs to catch each planted bug: the table in docs/chaos.md.

For every planted bug and every plan seed, the CI smoke's plan (``plan_specs`` over the
in-process kinds) runs in order with ``fail_fast``; the answer is the position of the first
schedule whose violations report the bug (``Plant.caught``). Schedules are submitted in plan
order and every one submitted before a failure still finishes, so the first failing position is
exact however many workers run.

    python -m chaos.teeth --seeds 20251126,1,2,3,4 --schedules 200 --workers 4
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

import typer

from chaos.catalogue import INPROC_KINDS
from chaos.planted import PLANTS
from chaos.runner import plan_specs, run_schedules

# Wall seconds one bug and seed may take: the CI smoke's budget.
BUDGET_S = 300.0


@dataclass(frozen=True)
class Catch:
    """Where one plan first reported one bug (``schedules`` None: not within the plan)."""

    bug: str
    seed: int
    schedules: int | None
    invariant: str


def first_catch(bug: str, seed: int, schedules: int, workers: int) -> Catch:
    """Run the plan of ``seed`` with ``bug`` planted until the first schedule reports it."""
    specs = plan_specs(seed, schedules, INPROC_KINDS, bug)
    order = {s.seed: i for i, s in enumerate(specs)}
    summary = run_schedules(specs, workers=workers, budget_s=BUDGET_S, fail_fast=True)
    plant = PLANTS[bug]
    caught = sorted((order[r.seed], plant.caught(r.violations)) for r in summary.results if plant.caught(r.violations))
    if not caught:
        return Catch(bug, seed, None, "")
    at, lines = caught[0]
    return Catch(bug, seed, at + 1, lines[0].split(" ", 1)[0])


def table(catches: Sequence[Catch], seeds: Sequence[int]) -> str:
    """A markdown table: per bug, the median schedules to catch it and what reported it."""
    rows = ["| planted bug | reported as | schedules to catch (per seed) | median |", "|---|---|---|---|"]
    for bug in dict.fromkeys(c.bug for c in catches):
        mine = [c for c in catches if c.bug == bug]
        per_seed = [c.schedules for c in mine]
        found = [n for n in per_seed if n is not None]
        median = f"{statistics.median(found):g}" if len(found) == len(per_seed) else "not caught"
        names = ", ".join(sorted({c.invariant for c in mine if c.invariant}))
        shown = ", ".join("-" if n is None else str(n) for n in per_seed)
        rows.append(f"| `{bug}` | {names} | {shown} | {median} |")
    return "\n".join(rows) + f"\n\nseeds {', '.join(map(str, seeds))}\n"


def main(
    seeds: Annotated[str, typer.Option(help="Plan seeds, comma-separated.")] = "20251126,1,2,3,4",
    schedules: Annotated[int, typer.Option(help="Schedules per plan (the CI smoke's 200).")] = 200,
    workers: Annotated[int, typer.Option(help="Worker processes.")] = 4,
    bugs: Annotated[str, typer.Option(help="Planted bugs, comma-separated (default: all).")] = "",
) -> None:
    """Print the planted-bug table of docs/chaos.md."""
    chosen = [b for b in bugs.split(",") if b] or list(PLANTS)
    plan_seeds = [int(s) for s in seeds.split(",")]
    catches = []
    for bug in chosen:
        for seed in plan_seeds:
            catches.append(first_catch(bug, seed, schedules, workers))
            print(catches[-1], file=sys.stderr, flush=True)
    print(table(catches, plan_seeds))


if __name__ == "__main__":
    typer.run(main)
