"""``lockstep source ...``: maintenance of change sources that keep state of their own.

``lockstep source resnapshot -c FILE`` is the recovery path of the Postgres logical replication
source after its slot was lost (dropped, or invalidated because the WAL it needed was removed):
it re-creates the slot with an exported snapshot, re-reads every table inside that snapshot,
deletes the documents the ledger holds but the tables no longer do, applies all of it through
the normal two-phase path (embedding only chunks the cache lacks), and records the new slot's
position, after which ``lockstep run`` streams from it again. Stop ``lockstep run`` first: the
indexes and the ledger are written here, and the slot serves one reader at a time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from lockstep.cli_errors import command_errors

app = typer.Typer(no_args_is_help=True, help="Maintenance of change sources (Postgres logical replication).")
err = Console(stderr=True)

ConfigOpt = Annotated[
    Path, typer.Option("--config", "-c", help="YAML config file.", exists=True, dir_okay=False)
]


@app.command()
def resnapshot(config: ConfigOpt) -> None:
    """Re-create the replication slot, re-read the tables and delete documents they no longer hold.

    Prints a JSON summary; exits 1 if anything went to the dead-letter queue, 2 on an error.
    """
    from coordinator.sync import run_sync
    from lockstep.bootstrap import build_pg_logical_source
    from lockstep.progress import opened, record_progress
    from lockstep.runtime import runtime
    from lockstep.settings import PgLogicalSourceSettings, load_settings

    with command_errors("source resnapshot"):
        settings = load_settings(config)
        src = settings.source
        if not isinstance(src, PgLogicalSourceSettings):
            raise typer.BadParameter("resnapshot needs a `source` of kind postgres_logical", param_hint="--config")
        with opened(err, "opening the indexes", runtime(settings)) as rt:
            source = build_pg_logical_source(src, rt.ledger, resnapshot=True)
            try:
                with record_progress(err, "re-snapshotting") as progress:
                    stats = run_sync(source, rt.engine, batch_events=settings.sync.batch_events, progress=progress)
            finally:
                source.close()
            checkpoint = rt.ledger.get_checkpoint(src.name)
    summary = {**stats.as_dict(), "slot": src.slot, "checkpoint": checkpoint}
    typer.echo(json.dumps(summary, sort_keys=True))
    if summary["dead_letters"]:
        raise typer.Exit(1)
