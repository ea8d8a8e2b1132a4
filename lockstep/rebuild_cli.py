"""``lockstep rebuild``, ``lockstep gc`` and ``lockstep generations``.

The rebuild, the settings and the stores are imported by the commands that use them, so that
``lockstep --help`` stays quick.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import structlog
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from coordinator.chunking import ChunkingSettings
from coordinator.generations import Generation, active
from lockstep.cli_errors import command_errors
from lockstep.progress import spinner

if TYPE_CHECKING:
    from lockstep.rebuild import Rebuild
    from lockstep.settings import EmbedderSettings, Settings

log = structlog.get_logger(__name__)
out = Console()
err = Console(stderr=True)

# A non-terminal run (CI, a Kubernetes Job) logs backfill progress this often instead of a bar.
PROGRESS_LOG_INTERVAL_S = 10.0

ConfigOpt = Annotated[
    Path, typer.Option("--config", "-c", help="YAML config file.", exists=True, dir_okay=False)
]


def register(app: typer.Typer) -> None:
    app.command()(rebuild)
    app.command()(gc)
    app.command()(generations)


def rebuild(
    config: ConfigOpt,
    embedder: Annotated[
        str | None,
        typer.Option(help="New embedder: KIND[:key=value,...], e.g. hashing:dim=128 or sentence-transformers."),
    ] = None,
    chunking: Annotated[
        str | None, typer.Option(help="New chunking: key=value,... e.g. max_chars=800,overlap_chars=80.")
    ] = None,
    swap: Annotated[bool, typer.Option(help="Swap the aliases once the new generation is validated.")] = True,
    rollback: Annotated[bool, typer.Option("--rollback", help="Point readers back at the previous generation.")] = False,
    abort: Annotated[bool, typer.Option("--abort", help="Drop the generation being built.")] = False,
    crash_after_batches: Annotated[
        int | None, typer.Option(hidden=True, help="Test only: SIGKILL after N backfill batches.")
    ] = None,
) -> None:
    """Build a new generation beside the live one, validate it, swap the aliases to it.

    Live writes reach both generations while the new one is built; a full audit validates it
    before the swap. Re-running after a crash resumes where it stopped.

    Without --embedder/--chunking the config's own settings are the target (edit the config,
    then rebuild); with either, the active generation's settings are changed by the options.
    """
    with command_errors("rebuild"), _rebuild(config) as (settings, rb):
        rb.crash_after_batches = crash_after_batches
        if rollback or abort:
            result: dict[str, Any] = {"rollback": rb.rollback()} if rollback else {"aborted": rb.abort()}
            typer.echo(json.dumps(result, indent=2, sort_keys=True))
            return
        target_embedder, target_chunking = _targets(settings, rb.generations(), embedder, chunking)
        with _progress() as progress:
            report = rb.run(target_embedder, target_chunking, swap=swap, progress=progress)
    typer.echo(json.dumps(report.as_json(), indent=2, sort_keys=True))


def gc(
    config: ConfigOpt,
    retention_s: Annotated[
        float | None, typer.Option(help="Override rebuild.retention_s (0 drops every standby now).")
    ] = None,
) -> None:
    """Drop standby generations older than the retention period, and aborted ones."""
    with command_errors("gc"), _rebuild(config) as (settings, rb):
        keep = settings.rebuild.retention_s if retention_s is None else retention_s
        dropped = rb.gc(now=time.time(), retention_s=keep)
    typer.echo(json.dumps({"dropped": dropped}))


def generations(
    config: ConfigOpt,
    as_json: Annotated[bool, typer.Option("--json", help="Print the registry as JSON.")] = False,
) -> None:
    """The generation registry: which generation readers see, which are kept, which are built."""
    with command_errors("generations"), _rebuild(config) as (_, rb):
        gens = rb.generations()
        writers = rb.registry.writers()
    if as_json:
        typer.echo(json.dumps([g.to_json() for g in gens], indent=2, sort_keys=True))
        return
    table = Table("gen", "state", "keyword index", "collection", "model", "chunking", "backfilled")
    for g in gens:
        table.add_row(str(g.number), g.state.value, g.keyword_index, g.vector_collection, g.model_id,
                      g.chunking.fingerprint, "done" if g.backfill_done else str(g.backfilled_docs))
    out.print(table)
    # Who applies live changes, and to which generations (a rebuild validates once all write it).
    live_writers = Table("live writer", "writes generations")
    for owner, numbers in writers.items():
        live_writers.add_row(owner, "starting" if numbers is None else ", ".join(map(str, numbers)))
    out.print(live_writers if writers else "no live writers")


# --- helpers -------------------------------------------------------------------------------------


def _targets(
    settings: Settings, gens: list[Generation], embedder: str | None, chunking: str | None
) -> tuple[EmbedderSettings, ChunkingSettings]:
    from lockstep.bootstrap import generation_embedder_settings
    from lockstep.settings import EmbedderSettings

    if embedder is None and chunking is None:
        return settings.embedder, settings.chunking.to_domain()
    current = active(gens)
    es = generation_embedder_settings(settings, current)
    if embedder is not None:
        kind, _, rest = embedder.partition(":")
        es = EmbedderSettings(**{**_kv(rest, "--embedder"), "kind": kind, "api_key": settings.embedder.api_key})
    cs = current.chunking
    if chunking is not None:
        values = {"max_chars": cs.max_chars, "overlap_chars": cs.overlap_chars, **_kv(chunking, "--chunking")}
        try:
            cs = ChunkingSettings(int(values["max_chars"]), int(values["overlap_chars"]))
        except (KeyError, ValueError) as exc:
            raise typer.BadParameter(f"--chunking: {exc}") from exc
    return es, cs


def _kv(text: str, option: str) -> dict[str, Any]:
    pairs: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{option}: expected key=value, got {item!r}")
        pairs[key.strip()] = value.strip()
    return pairs


@contextmanager
def _rebuild(config: Path) -> Iterator[tuple[Settings, Rebuild]]:
    from lockstep.rebuild import Rebuild
    from lockstep.settings import load_settings

    settings = load_settings(config)
    with spinner(err, "opening the generations"):
        rb = Rebuild(settings)
    try:
        yield settings, rb
    finally:
        rb.close()


@contextmanager
def _progress() -> Iterator[Callable[[int, int], None]]:
    """A bar with ETA on a terminal; otherwise a log line every PROGRESS_LOG_INTERVAL_S (none
    for a backfill shorter than that)."""
    columns = [TextColumn("backfill"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    started = time.monotonic()
    last = [started]
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("backfill", total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)
            now = time.monotonic()
            if not err.is_terminal and now - last[0] >= PROGRESS_LOG_INTERVAL_S:
                last[0] = now
                rate = done / max(now - started, 1e-9)
                eta = (total - done) / rate if rate > 0 else None
                log.warning("backfill progress", done=done, total=total,
                            eta_s=None if eta is None else round(eta, 1))

        yield advance
