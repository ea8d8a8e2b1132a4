"""``lockstep dlq list|show|replay|drop``: look at, retry and discard dead letters."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from coordinator.errors import InvalidEvent, LockstepError
from coordinator.events import event_from_dict
from lockstep.bootstrap import build_ledger, runtime
from lockstep.settings import load_settings

# Rows shown by `dlq list` unless --limit says otherwise.
LIST_ROWS_DEFAULT = 50

app = typer.Typer(
    no_args_is_help=True, help="The dead-letter queue: events lockstep could not apply, with reasons."
)
ConfigOpt = Annotated[
    Path, typer.Option("--config", "-c", help="YAML config file.", exists=True, dir_okay=False)
]


@app.command("list")
def list_letters(
    config: ConfigOpt,
    limit: Annotated[int, typer.Option(min=1)] = LIST_ROWS_DEFAULT,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Dead letters, oldest first: id, source, document, version, attempts, reason."""
    ledger = build_ledger(load_settings(config))
    letters = ledger.dead_letters(limit=limit)
    ledger.close()
    if as_json:
        typer.echo(
            json.dumps(
                [
                    {
                        "id": i,
                        "source": d.source,
                        "doc_id": d.doc_id,
                        "version": d.version,
                        "attempts": d.attempts,
                        "reason": d.reason,
                    }
                    for i, d in letters
                ]
            )
        )
        return
    table = Table("id", "source", "doc_id", "version", "attempts", "reason", title="dead letters")
    for letter_id, d in letters:
        table.add_row(str(letter_id), d.source, str(d.doc_id), str(d.version), str(d.attempts), d.reason)
    Console().print(table)


@app.command()
def show(config: ConfigOpt, letter_id: int) -> None:
    """One dead letter in full, payload included."""
    ledger = build_ledger(load_settings(config))
    found = ledger.dead_letter(letter_id)
    ledger.close()
    if found is None:
        typer.echo(f"no dead letter {letter_id}", err=True)
        raise typer.Exit(2)
    letter, created_at = found
    typer.echo(
        json.dumps(
            {
                "id": letter_id,
                "source": letter.source,
                "doc_id": letter.doc_id,
                "version": letter.version,
                "attempts": letter.attempts,
                "reason": letter.reason,
                "created_at": dt.datetime.fromtimestamp(created_at, dt.UTC).isoformat(),
                "payload": letter.payload,
            },
            indent=2,
        )
    )


@app.command()
def replay(
    config: ConfigOpt,
    letter_ids: Annotated[list[int] | None, typer.Argument()] = None,
    all_letters: Annotated[bool, typer.Option("--all")] = False,
) -> None:
    """Apply dead letters again through the normal path. A letter whose payload is now a valid
    event is removed and applied (a new letter records it if it fails again); one that still is not
    valid stays, with its attempts counted. Needs exclusive use of embedded stores: stop
    `lockstep run` first when it uses them."""
    settings = load_settings(config)
    with runtime(settings) as rt:
        ids = [i for i, _ in rt.ledger.dead_letters(limit=10**9)] if all_letters else list(letter_ids or [])
        replayed = failed = 0
        for letter_id in ids:
            found = rt.ledger.dead_letter(letter_id)
            if found is None:
                continue
            try:
                event = event_from_dict(json.loads(found[0].payload))
            except (InvalidEvent, json.JSONDecodeError) as exc:
                rt.ledger.retry_failed(letter_id, f"replay: {getattr(exc, 'reason', exc)}")
                failed += 1
                continue
            rt.ledger.drop_dead_letters([letter_id])
            try:
                rt.engine.apply([event])
            except LockstepError as exc:
                typer.echo(f"letter {letter_id}: {exc}", err=True)
                raise typer.Exit(2) from exc
            replayed += 1
        dead_after = rt.engine.stats.dead_letters
    typer.echo(json.dumps({"replayed": replayed, "still_invalid": failed, "dead_lettered_again": dead_after}))
    raise typer.Exit(1 if failed or dead_after else 0)


@app.command()
def drop(config: ConfigOpt, letter_ids: Annotated[list[int], typer.Argument()]) -> None:
    """Discard dead letters for good (after deciding they need no replay)."""
    ledger = build_ledger(load_settings(config))
    dropped = ledger.drop_dead_letters(letter_ids)
    ledger.close()
    typer.echo(json.dumps({"dropped": dropped}))
