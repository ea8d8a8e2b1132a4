"""The ``lockstep`` command line.

Only what defines the commands is imported here: ``lockstep --help`` and every command's
``--help`` must not wait for store clients, Ray or the settings. Each command imports what it
runs inside its own body (``tests/test_cli_imports.py`` guards this; ``python -m bench.startup``
measures it).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from coordinator.crashpoints import PROTOCOL_POINTS, CrashHook, no_crash
from lockstep import audit_cli, dlq_cli, rebuild_cli, search_cli, source_cli
from lockstep.cli_errors import DebugOpt, command_errors, set_debug
from lockstep.stop_signals import EARLY_STOP, release_early

# The chaos suite's command group, plugged into lockstep's command line.
CHAOS = "chaos"


class _LockstepGroup(TyperGroup):
    """lockstep's commands, then the chaos suite's ``chaos`` group, plugged in when a command
    line first asks for it: the suite builds on lockstep, so lockstep imports it only then."""

    # ``ctx`` and the command are click's types, which Typer >= 0.29 keeps in a private module.
    def list_commands(self, ctx: Any) -> list[str]:
        listed = super().list_commands(ctx)
        return listed if CHAOS in listed else [*listed, CHAOS]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name == CHAOS and CHAOS not in self.commands:
            self.add_command(_chaos_group(), CHAOS)
        return super().get_command(ctx, cmd_name)


def _chaos_group() -> Any:
    """The ``chaos`` group exactly as ``chaos.cli.register`` adds it to a Typer app."""
    from chaos import cli as chaos_cli

    plugged = typer.Typer()
    chaos_cli.register(plugged)
    group = typer.main.get_command(plugged)
    assert isinstance(group, TyperGroup), "a Typer app with a sub-app is a group"
    return group.commands[CHAOS]


app = typer.Typer(
    cls=_LockstepGroup,
    no_args_is_help=True,
    add_completion=False,
    help="Keep a keyword and a vector index in step with their source.",
)
app.add_typer(dlq_cli.app, name="dlq")
app.add_typer(source_cli.app, name="source")
audit_cli.register(app)
rebuild_cli.register(app)
search_cli.register(app)
err = Console(stderr=True)

ConfigOpt = Annotated[
    Path, typer.Option("--config", "-c", help="YAML config file.", exists=True, dir_okay=False)
]


def _crash_hook(point: str | None) -> CrashHook:
    """Test-only: SIGKILL this process when the named protocol point is reached."""
    if point is None:
        return no_crash
    if point not in PROTOCOL_POINTS:
        raise typer.BadParameter(f"unknown crash point {point!r}; one of {', '.join(PROTOCOL_POINTS)}")

    def hook(name: str) -> None:
        if name == point:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


@app.callback()
def main(
    ctx: typer.Context,
    log_level: Annotated[str, typer.Option(help="Log level for the JSON logs on stderr.")] = "warning",
    debug: DebugOpt = False,
) -> None:
    from lockstep.logging import configure_logging

    ctx.obj = {"log_level": log_level}
    if ctx.invoked_subcommand not in ("run", "serve"):
        release_early()
    configure_logging(log_level)
    set_debug(debug)


@app.command()
def sync(
    config: ConfigOpt,
    crash_at: Annotated[str | None, typer.Option(hidden=True, help="Test-only crash point.")] = None,
) -> None:
    """Consume the source to its end, apply it to both indexes, print a JSON summary, exit.

    Exits 1 if anything went to the dead-letter queue, 2 on an error.
    """
    from coordinator.consistency import WrittenChanges
    from coordinator.sync import run_sync
    from lockstep.bootstrap import build_source
    from lockstep.progress import opened, record_progress
    from lockstep.runtime import runtime
    from lockstep.settings import load_settings

    crash = _crash_hook(crash_at)
    changes = WrittenChanges()
    with command_errors("sync"):
        settings = load_settings(config)
        with opened(err, "opening the indexes", runtime(settings, crash=crash)) as rt:
            source = build_source(settings, rt.ledger)
            try:
                with record_progress(err, "syncing") as progress:
                    stats = run_sync(
                        source,
                        rt.engine,
                        batch_events=settings.sync.batch_events,
                        progress=progress,
                        applied=changes.add,
                    )
            finally:
                source.close()
            token = changes.token(rt.ledger.get_docs(changes.doc_ids))
    summary: dict[str, object] = {
        **stats.as_dict(),
        "consistency_token": token.encode(),
        "consistency_token_docs": len(token.docs),
        "consistency_token_complete": changes.complete,
    }
    typer.echo(json.dumps(summary, sort_keys=True))
    if summary["dead_letters"]:
        raise typer.Exit(1)


@app.command()
def run(
    ctx: typer.Context,
    config: ConfigOpt,
    exit_when_idle: Annotated[
        bool, typer.Option(help="Stop once the source is read to its end and everything is committed.")
    ] = False,
    crash_at: Annotated[str | None, typer.Option(hidden=True, help="Test-only crash point.")] = None,
    unfenced_search: Annotated[
        bool, typer.Option(hidden=True, help="Test-only: POST /search serves hits without the ledger's fence.")
    ] = False,
) -> None:
    """The long-running service: shard actors on Ray, two-phase apply, /healthz /readyz /metrics, POST /search."""
    from lockstep.settings import load_settings, require_serving_token

    if crash_at is not None:
        _crash_hook(crash_at)  # validates the name
    with command_errors("run"):
        settings = load_settings(config)
        require_serving_token(settings)
        # Ray and the streaming sources come with the 'streaming' extra: imported only here.
        from lockstep.service import Service

        code = Service(
            settings,
            log_level=ctx.obj["log_level"],
            crash_at=crash_at,
            exit_when_idle=exit_when_idle,
            stop_requested=EARLY_STOP,
            unfenced_search=unfenced_search,
        ).run()
    raise typer.Exit(code)


@app.command()
def status(config: ConfigOpt) -> None:
    """Counts per index and per ledger state."""
    from lockstep.progress import opened
    from lockstep.runtime import runtime
    from lockstep.settings import load_settings

    with command_errors("status"):
        settings = load_settings(config)
        with opened(err, "opening the indexes", runtime(settings)) as rt:
            counts = {
                "ledger": rt.ledger.counts(),
                "keyword": {"kind": settings.keyword.kind, "chunks": rt.keyword.count()},
                "vector": {"kind": "milvus", "chunks": rt.vector.count()},
                "embedder": rt.embedder.model_id,
            }
    typer.echo(json.dumps(counts, indent=2, sort_keys=True))


@app.command()
def demo(
    data_dir: Annotated[
        Path, typer.Option(help="Where the demo's embedded stores live (wiped first).")
    ] = Path("./lockstep-data/demo"),
    docs: Annotated[int, typer.Option(min=10, max=5000, help="Documents in the sample corpus.")] = 300,
    embedder: Annotated[str, typer.Option(help="auto | hashing | sentence-transformers")] = "auto",
) -> None:
    """The main job on the embedded default: Tantivy + milvus-lite + SQLite ledger."""
    from lockstep import demo as demo_module

    with command_errors("demo"):
        ok = demo_module.run(data_dir, docs=docs, embedder_kind=embedder, console=Console())
    raise typer.Exit(0 if ok else 1)


@app.command()
def points() -> None:
    """List the named crash points of the apply protocol."""
    table = Table("crash point")
    for point in PROTOCOL_POINTS:
        table.add_row(point)
    Console().print(table)
