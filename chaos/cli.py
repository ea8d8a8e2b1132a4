"""``lockstep chaos run``: seeded chaos schedules with a table of what was injected and found.

``lockstep/cli.py`` plugs this group in through ``register`` when a command line first asks
for ``chaos`` (lockstep imports chaos only then: chaos builds on lockstep). Schedules run on
embedded stores (no ``-c``), on the stores of a config (``-c FILE``; with network kinds, behind
the suite's fault proxies), or on servers the suite starts itself (``--servers managed``: every
kind, process faults included). Exit 0 when every schedule held every invariant, 1 on any violation (the
failing seeds are printed with the exact replay command), 2 on a usage error (including kinds
that cannot run where the schedules go) or when a managed server does not start.

Server schedules need the ``servers`` extra (``chaos.servertier`` drives real server processes),
so that module is imported only for them: ``lockstep chaos`` and in-process schedules work on
the base install. The runner, the stores and the settings are imported by the command that runs
schedules, so that ``lockstep --help`` (which lists this group) stays quick.
"""

from __future__ import annotations

import json
import os
import shlex
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from chaos.catalogue import CATALOGUE, SERVER_KINDS, parse_kinds
from chaos.planted import PLANTED_BUGS, plant
from coordinator.errors import LockstepError
from lockstep.cli_errors import command_errors

if TYPE_CHECKING:
    from chaos.runner import RunSummary, ScheduleResult, WorkerSetup
    from lockstep.settings import Settings

app = typer.Typer(no_args_is_help=True, help="Chaos schedules: faults in, invariants checked.")
out = Console()

# Worker processes when --workers is not given: two per core (a schedule spends half its wall
# time waiting on milvus-lite), at most this many.
WORKERS_DEFAULT_MAX = 4
# With server faults each worker runs its own proxies (and, managed, its own two servers); a
# schedule mostly waits on timeouts and restarts. On 2 cores 3 workers ran the server smoke in
# 20 s, 2 in 33 s, 4 in 31 s (docs/chaos.md).
SERVER_WORKERS_DEFAULT_MAX = 3
SERVERS_CONFIG = "config"
SERVERS_MANAGED = "managed"
MILVUS_LITE = "lite"
MILVUS_2_3_5 = "2.3.5"
# Generations schedules only: a milvus-lite file in each worker's directory (beside a managed
# OpenSearch-API server).
MILVUS_FILE = "file"


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


@dataclass(frozen=True)
class Target:
    """Where a run's schedules go: how each worker sets up, and the flags a replay must repeat."""

    setup: WorkerSetup
    workers_max: int
    replay_flags: str
    # What a server of the schedules raises when it does not start (server targets only).
    start_errors: tuple[type[Exception], ...] = ()


# The options of ``chaos run``, one alias each, so the command's signature reads as a list.
_ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="lockstep YAML: the stores to run against.", dir_okay=False),
]
_SeedOpt = Annotated[int, typer.Option(help="Seed of the whole run (schedule seeds derive from it).")]
_SchedulesOpt = Annotated[int, typer.Option(min=1, help="Number of schedules.")]
_FaultsSpecOpt = Annotated[
    str,
    typer.Option(
        "--faults", help="Kinds and tiers, comma-separated: all, inproc, server, or kind names."
    ),
]
_ServersOpt = Annotated[
    str,
    typer.Option(
        help="config: the stores of -c FILE (embedded ones without it); managed: servers the "
        "suite starts itself (needed by process faults)."
    ),
]
_ManagedMilvusOpt = Annotated[
    str,
    typer.Option(
        help="With --servers managed: the Milvus server to start, lite or 2.3.5 (with "
        "--generations also file: a milvus-lite file per worker)."
    ),
]
_GenerationsOpt = Annotated[
    bool,
    typer.Option(
        "--generations",
        help="Schedules that rebuild, swap, roll back, abort and gc generations beside the live "
        "service while the faults go on (in-process kinds; an OpenSearch/Elasticsearch keyword index).",
    ),
]
_BudgetSOpt = Annotated[
    float, typer.Option("--budget-s", help="Stop starting schedules after this many seconds.")
]
_WorkersOpt = Annotated[
    int | None,
    typer.Option(
        min=1, help="Worker processes (default: two per core, at most 4; at most 3 with server kinds)."
    ),
]
_ReplayOpt = Annotated[
    int | None, typer.Option(help="Run exactly one schedule: this schedule seed, with exactly --faults.")
]
_FailFastOpt = Annotated[
    bool, typer.Option(help="Stop starting schedules after the first violation.")
]
_ReportOpt = Annotated[
    Path | None,
    typer.Option(help="Also write every schedule's result (faults injected, violations) as JSON here."),
]
_PlantBugOpt = Annotated[
    str | None, typer.Option(hidden=True, help=f"Test-only: {', '.join(PLANTED_BUGS)}.")
]
_PathOpt = Annotated[
    str | None,
    typer.Option(
        help="shard: every schedule through the streaming path (lockstep run's shard worker); "
        "batch: through lockstep sync's batch path. Default: one seed in four takes the batch "
        "path when its faults can happen there."
    ),
]


@app.command()
def run(
    config: _ConfigOpt = None,
    seed: _SeedOpt = 1,
    schedules: _SchedulesOpt = 200,
    faults_spec: _FaultsSpecOpt = "inproc",
    servers: _ServersOpt = SERVERS_CONFIG,
    managed_milvus: _ManagedMilvusOpt = MILVUS_LITE,
    generations: _GenerationsOpt = False,
    budget_s: _BudgetSOpt = 300.0,
    workers: _WorkersOpt = None,
    replay: _ReplayOpt = None,
    fail_fast: _FailFastOpt = False,
    report: _ReportOpt = None,
    plant_bug: _PlantBugOpt = None,
    path: _PathOpt = None,
) -> None:
    """Run N seeded schedules; print one row per schedule and the seeds of any failure; exit 1 on a violation.

    Server kinds need servers: -c FILE naming OpenSearch/Elasticsearch and/or a Milvus server
    (network kinds, through the suite's proxies), or --servers managed (every kind); both need
    the servers extra.
    """
    from chaos.gen_schedules import plan_generation_specs
    from chaos.runner import ScheduleSpec, plan_specs, run_schedules

    try:
        kinds = parse_kinds(faults_spec)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--faults") from exc
    kinds = _check_path(path, kinds, plant_bug, faults_spec)
    with command_errors("chaos run"):
        if generations:
            target = _generations_target(config, servers, managed_milvus, kinds, plant_bug)
        else:
            target = _target(config, servers, managed_milvus, kinds)
        if replay is not None:
            specs = [ScheduleSpec(replay, kinds, plant_bug, path)]
        elif generations:
            specs = plan_generation_specs(seed, schedules, kinds)
        else:
            specs = plan_specs(seed, schedules, kinds, plant_bug, path)
        try:
            summary = run_schedules(
                specs,
                workers=workers or min(2 * (os.cpu_count() or 1), target.workers_max),
                budget_s=budget_s,
                fail_fast=fail_fast,
                setup=target.setup,
            )
        except target.start_errors as exc:
            out.print(f"[red]a server the suite manages did not start:[/red] {exc}")
            raise typer.Exit(2) from exc
        _print(summary, target.replay_flags)
        if report is not None:
            _write_report(report, summary, target.replay_flags)
        raise typer.Exit(1 if summary.violations else 0)


def _check_path(path: str | None, kinds: tuple[str, ...], plant_bug: str | None, faults_spec: str) -> tuple[str, ...]:
    """The kinds the path's schedules draw from; a usage error (exit 2) for an unknown planted
    bug, or a path that is unknown or that a kind named by name or the bug cannot take (a tier,
    such as the default ``inproc``, leaves out the kinds that only the shard path meets)."""
    from chaos.runner import PATHS, SHARD_ONLY_KINDS, SHARD_PATH

    if plant_bug is not None and plant_bug not in PLANTED_BUGS:
        raise typer.BadParameter(f"one of {', '.join(PLANTED_BUGS)}", param_hint="--plant-bug")
    if path is None or path == SHARD_PATH:
        return kinds
    if path not in PATHS:
        raise typer.BadParameter(f"one of {', '.join(PATHS)}", param_hint="--path")
    named = {part.strip() for part in faults_spec.split(",")}
    shard_only = [k for k in kinds if k in SHARD_ONLY_KINDS and k in named]
    if shard_only:
        raise typer.BadParameter(f"only the shard path meets {', '.join(shard_only)}", param_hint="--path")
    if plant_bug is not None and plant(plant_bug).shard_only:
        raise typer.BadParameter(f"{plant_bug} lives on the shard path only", param_hint="--path")
    return tuple(k for k in kinds if k not in SHARD_ONLY_KINDS)


def _target(config: Path | None, servers: str, managed_milvus: str, kinds: tuple[str, ...]) -> Target:
    """Where the schedules run; a usage error (exit 2) when the kinds cannot run there."""
    from chaos.deployment import DeploymentOpener
    from chaos.runner import StoresSetup

    if servers not in (SERVERS_CONFIG, SERVERS_MANAGED):
        raise typer.BadParameter(f"one of {SERVERS_CONFIG}, {SERVERS_MANAGED}", param_hint="--servers")
    if managed_milvus not in (MILVUS_LITE, MILVUS_2_3_5):
        raise typer.BadParameter(f"one of {MILVUS_LITE}, {MILVUS_2_3_5}", param_hint="--managed-milvus")
    if servers == SERVERS_MANAGED:
        return _managed(config, managed_milvus)
    if managed_milvus != MILVUS_LITE:
        raise typer.BadParameter("--managed-milvus needs --servers managed", param_hint="--managed-milvus")
    server_kinds = [k for k in kinds if k in SERVER_KINDS]
    if config is None:
        if server_kinds:
            raise typer.BadParameter(
                f"servers are needed by {', '.join(server_kinds)}: give -c FILE naming your "
                "OpenSearch/Elasticsearch and Milvus servers (network kinds), or --servers managed (every kind)",
                param_hint="--faults",
            )
        return Target(StoresSetup(), WORKERS_DEFAULT_MAX, "")
    settings = _settings(config)
    flags = f" -c {shlex.quote(str(config))}"
    if not server_kinds:
        return Target(StoresSetup(DeploymentOpener(settings)), WORKERS_DEFAULT_MAX, flags)
    from chaos.servers import ServerStartError
    from chaos.servertier import ServerTierSetup, refusal

    refused = refusal(server_kinds, settings)
    if refused is not None:
        raise typer.BadParameter(refused, param_hint="--faults")
    setup = ServerTierSetup(deployment=settings)
    return Target(setup, SERVER_WORKERS_DEFAULT_MAX, flags, (ServerStartError,))


def _generations_target(
    config: Path | None, servers: str, managed_milvus: str, kinds: tuple[str, ...], plant_bug: str | None
) -> Target:
    """Where generations schedules run: servers the workers start, or a config's stores."""
    from chaos.gen_schedules import GenerationsSetup
    from chaos.gen_stores import GenStores

    refused = [k for k in kinds if k in SERVER_KINDS]
    if refused or plant_bug:
        what = ", ".join(refused) if refused else f"--plant-bug {plant_bug}"
        raise typer.BadParameter(f"generations schedules take in-process kinds only, not {what}", param_hint="--faults")
    if servers == SERVERS_MANAGED:
        if config is not None:
            raise typer.BadParameter("give --servers managed or -c FILE, not both", param_hint="--servers")
        if managed_milvus not in (MILVUS_LITE, MILVUS_2_3_5, MILVUS_FILE):
            raise typer.BadParameter(f"one of {MILVUS_LITE}, {MILVUS_2_3_5}, {MILVUS_FILE}", param_hint="--managed-milvus")
        flags = f" --generations --servers managed --managed-milvus {managed_milvus}"
        return Target(GenerationsSetup(managed=managed_milvus), SERVER_WORKERS_DEFAULT_MAX, flags, _start_errors())
    if config is None:
        raise typer.BadParameter(
            "generations schedules rebuild beside a live service, which needs an OpenSearch/Elasticsearch "
            "keyword index: give --servers managed (--managed-milvus lite, 2.3.5 or file) or -c FILE",
            param_hint="--generations",
        )
    settings = _settings(config)
    if settings.keyword.kind not in ("opensearch", "elasticsearch"):
        raise typer.BadParameter(
            "a Tantivy index admits one writer, and a rebuild writes the new generation beside the live "
            "service: generations schedules need an OpenSearch/Elasticsearch keyword index",
            param_hint="--config",
        )
    stores = GenStores(settings.keyword, None if settings.vector.is_embedded else settings.vector)
    flags = f" --generations -c {shlex.quote(str(config))}"
    return Target(GenerationsSetup(stores=stores), SERVER_WORKERS_DEFAULT_MAX, flags)


def _start_errors() -> tuple[type[Exception], ...]:
    from chaos.servers import ServerStartError

    return (ServerStartError,)


def _managed(config: Path | None, managed_milvus: str) -> Target:
    if config is not None:
        raise typer.BadParameter(
            "--servers managed starts its own stores; -c FILE names yours: give one of them",
            param_hint="--servers",
        )
    from chaos.servers import ServerStartError
    from chaos.servertier import ServerTierSetup

    real = managed_milvus == MILVUS_2_3_5
    flags = " --servers managed" + (f" --managed-milvus {MILVUS_2_3_5}" if real else "")
    return Target(ServerTierSetup(real_milvus=real), SERVER_WORKERS_DEFAULT_MAX, flags, (ServerStartError,))


def _settings(config: Path) -> Settings:
    from lockstep.settings import load_settings

    try:
        return load_settings(config)
    except LockstepError as exc:
        raise typer.BadParameter(str(exc), param_hint="--config") from exc


def _print(summary: RunSummary, replay_flags: str) -> None:
    from chaos.runner import headline

    table = Table("schedule seed", "faults injected", "events", "violations", "s")
    for r in sorted(summary.results, key=lambda r: r.seed):
        table.add_row(str(r.seed), _injected(r), str(r.events), str(len(r.violations)), f"{r.wall_s:.1f}")
    out.print(table)
    out.print(
        headline(len(summary.results), summary.injected, summary.violations, summary.wall_s)
        + (" (budget exhausted)" if summary.budget_exhausted else "")
    )
    out.print(_kinds_table(summary))
    for r in summary.results:
        if not r.ok:
            out.print(f"[red]FAILED seed {r.seed}[/red] (replay: {_replay(r, replay_flags)})")
            for line in r.violations[:10]:
                out.print(f"  {line}")


def _kinds_table(summary: RunSummary) -> Table:
    """Per fault kind: how many times it was injected and in how many schedules."""
    schedules = Counter(kind for r in summary.results for kind in r.injected)
    table = Table("fault kind", "injected", "schedules")
    for kind, count in sorted(summary.injected.items()):
        table.add_row(kind, str(count), str(schedules[kind]))
    return table


def _replay(result: ScheduleResult, replay_flags: str) -> str:
    """The command that runs exactly this schedule again, where it ran."""
    return (
        f"lockstep chaos run --replay {result.seed} --faults {','.join(result.faults)}"
        f"{replay_flags}{_bug_flag(result)}"
    )


def _write_report(path: Path, summary: RunSummary, replay_flags: str) -> None:
    """The run as JSON, each failing schedule with its replay command."""
    data = summary.as_json()
    replays = {r.seed: _replay(r, replay_flags) for r in summary.results if not r.ok}
    for result in data["results"]:
        if result["seed"] in replays:
            result["replay"] = replays[result["seed"]]
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")


def _injected(result: ScheduleResult) -> str:
    return ", ".join(f"{k} x{v}" for k, v in result.injected.items())


def _bug_flag(result: ScheduleResult) -> str:
    """The flags beyond seed and kinds that a replay needs: a planted bug, a path given by hand."""
    bug = result.details.get("planted_bug")
    path = result.details.get("forced_path")
    return (f" --plant-bug {bug}" if bug else "") + (f" --path {path}" if path else "")
