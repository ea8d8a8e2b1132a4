"""``lockstep chaos run``: seeded chaos schedules with a table of what was injected and found.

Registered on the main app by ``chaos.cli.register(app)``. Exit 0 when every schedule held every
invariant, 1 on any violation (the failing seeds are printed for an exact replay with
``--replay SEED``), 2 on a usage error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from chaos.catalogue import CATALOGUE, INPROC_KINDS, SERVER_KINDS, parse_kinds
from chaos.deployment import DeploymentOpener
from chaos.planted import PLANTED_BUGS
from chaos.runner import EmbeddedStores, RunSummary, ScheduleResult, ScheduleSpec, plan_specs, run_schedules
from lockstep.settings import load_settings

app = typer.Typer(no_args_is_help=True, help="Chaos schedules: faults in, invariants checked.")
out = Console()

# Worker processes when --workers is not given: two per core (a schedule spends half its wall
# time waiting on milvus-lite), at most this many.
WORKERS_DEFAULT_MAX = 4


def register(parent: typer.Typer) -> None:
    """Add ``chaos`` (``run``, ``faults``) to the main ``lockstep`` app."""
    parent.add_typer(app, name="chaos")


@app.command()
def faults() -> None:
    """List every fault kind: name, family, tier and what it does."""
    table = Table("kind", "family", "tier", "what")
    for kind in CATALOGUE:
        table.add_row(kind.name, kind.family, kind.tier, kind.what)
    out.print(table)


@app.command()
def run(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="lockstep YAML: the stores to run against.", dir_okay=False),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the whole run (schedule seeds derive from it).")] = 1,
    schedules: Annotated[int, typer.Option(min=1, help="Number of schedules.")] = 200,
    faults_spec: Annotated[
        str, typer.Option("--faults", help="all, inproc, server, or a comma-separated list of kinds.")
    ] = "inproc",
    budget_s: Annotated[
        float, typer.Option("--budget-s", help="Stop starting schedules after this many seconds.")
    ] = 300.0,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Worker processes (default: two per core, at most 4).")
    ] = None,
    replay: Annotated[
        int | None, typer.Option(help="Run exactly one schedule: this schedule seed, with exactly --faults.")
    ] = None,
    fail_fast: Annotated[
        bool, typer.Option(help="Stop starting schedules after the first violation.")
    ] = False,
    plant_bug: Annotated[
        str | None, typer.Option(hidden=True, help=f"Test-only: {', '.join(PLANTED_BUGS)}.")
    ] = None,
) -> None:
    """Run N seeded schedules; print one row per schedule and the seeds of any failure; exit 1 on a violation."""
    try:
        kinds = parse_kinds(faults_spec)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    server = [k for k in kinds if k in SERVER_KINDS]
    if server:
        out.print(
            f"[yellow]server-tier kinds run in tests/test_chaos_servers.py, not here: {', '.join(server)}[/yellow]"
        )
    inproc = tuple(k for k in kinds if k in INPROC_KINDS)
    if replay is not None:
        specs = [ScheduleSpec(replay, inproc, plant_bug)]
    else:
        specs = plan_specs(seed, schedules, inproc, plant_bug)
    opener = DeploymentOpener(load_settings(config)) if config is not None else None
    summary = run_schedules(
        specs,
        workers=workers or min(2 * (os.cpu_count() or 1), WORKERS_DEFAULT_MAX),
        budget_s=budget_s,
        fail_fast=fail_fast,
        open_stores=opener or EmbeddedStores.open,
    )
    _print(summary)
    raise typer.Exit(1 if summary.violations else 0)


def _print(summary: RunSummary) -> None:
    table = Table("schedule seed", "faults injected", "events", "violations", "s")
    for r in sorted(summary.results, key=lambda r: r.seed):
        table.add_row(str(r.seed), _injected(r), str(r.events), str(len(r.violations)), f"{r.wall_s:.1f}")
    out.print(table)
    totals = summary.injected
    out.print(
        f"schedules {len(summary.results)}, faults injected {sum(totals.values())} "
        f"({len(totals)} kinds), violations {summary.violations}, wall {summary.wall_s:.0f} s"
        + (" (budget exhausted)" if summary.budget_exhausted else "")
    )
    for r in summary.results:
        if not r.ok:
            out.print(
                f"[red]FAILED seed {r.seed}[/red] (replay: lockstep chaos run --replay {r.seed} "
                f"--faults {','.join(r.faults)}{_bug_flag(r)})"
            )
            for line in r.violations[:10]:
                out.print(f"  {line}")


def _injected(result: ScheduleResult) -> str:
    return ", ".join(f"{k} x{v}" for k, v in result.injected.items())


def _bug_flag(result: ScheduleResult) -> str:
    bug = result.details.get("planted_bug")
    return f" --plant-bug {bug}" if bug else ""
