"""``lockstep dlq list|show|replay|drop``: look at, retry and discard dead letters."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from coordinator.errors import InvalidEvent
from coordinator.events import ChangeEvent, event_from_dict, loads_event_json
from coordinator.model import DeadLetter
from coordinator.planner import plan
from coordinator.ports import DeadLetterQueue
from lockstep.cli_errors import command_errors

if TYPE_CHECKING:
    from lockstep.runtime import Runtime

# Rows shown by `dlq list` unless --limit says otherwise.
LIST_ROWS_DEFAULT = 50
# Letters read per page when walking the whole queue (`replay --all`).
PAGE_LETTERS_MAX = 1000
# Characters of a reason shown in the `dlq list` table (the JSON and `show` hold all of it).
REASON_SHOWN_CHARS_MAX = 120

app = typer.Typer(
    no_args_is_help=True,
    help="The dead-letter queue: records and events lockstep could not apply, kept whole with their reasons.",
)
ConfigOpt = Annotated[
    Path, typer.Option("--config", "-c", help="YAML config file.", exists=True, dir_okay=False)
]
IdsArg = Annotated[list[int], typer.Argument(help="Letter IDs, as `lockstep dlq list` shows them.", show_default=False)]


@contextmanager
def _queue(config: Path) -> Iterator[DeadLetterQueue]:
    """The dead-letter queue (it lives in the home ledger), closed when the command is done."""
    from lockstep.bootstrap import build_ledger
    from lockstep.settings import load_settings

    ledger = build_ledger(load_settings(config))
    try:
        yield ledger
    finally:
        ledger.close()


@app.command("list")
@command_errors("dlq list")
def list_letters(
    config: ConfigOpt,
    limit: Annotated[int, typer.Option(min=1, help="Show at most this many letters, oldest first.")] = LIST_ROWS_DEFAULT,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array instead of a table.")] = False,
) -> None:
    """Dead letters, oldest first: id, source, position, document, version, attempts, reasons."""
    with _queue(config) as dlq:
        letters = dlq.dead_letters(limit=limit)
    if as_json:
        typer.echo(json.dumps([_summary(i, d) for i, d in letters], ensure_ascii=False))
        return
    table = Table("id", "source", "position", "doc_id", "version", "attempts", "reason", title="dead letters")
    for letter_id, d in letters:
        reason = d.reason if not d.history else f"{d.reason} | last: {d.history[-1].reason}"
        table.add_row(
            str(letter_id), d.source, str(d.position or ""), str(d.doc_id or ""), str(d.version or ""),
            str(d.attempts), reason[:REASON_SHOWN_CHARS_MAX],
        )  # fmt: skip
    Console().print(table)


@app.command()
@command_errors("dlq show")
def show(config: ConfigOpt, letter_id: Annotated[int, typer.Argument(help="The letter's ID.")]) -> None:
    """One dead letter in full: the original record, its position, every reason and attempt."""
    with _queue(config) as dlq:
        found = dlq.dead_letter(letter_id)
    if found is None:
        typer.echo(f"no dead letter {letter_id} (see `lockstep dlq list`)", err=True)
        raise typer.Exit(1)
    letter, created_at = found
    shown = _summary(letter_id, letter) | {
        "created_at": _iso(created_at),
        "history": [{"at": _iso(a.at), "reason": a.reason} for a in letter.history],
        "encoding": letter.encoding.value,
        "truncated": letter.truncated,
        "payload": letter.payload,
    }
    typer.echo(json.dumps(shown, indent=2, ensure_ascii=False))


@dataclass
class _Replay:
    """What a replay did, letter by letter."""

    replayed: int = 0
    stale: int = 0
    still_invalid: int = 0
    dead_lettered_again: int = 0
    consumed: int = 0
    unknown: int = 0

    @property
    def failed(self) -> bool:
        return bool(self.still_invalid or self.dead_lettered_again or self.consumed or self.unknown)


@app.command()
@command_errors("dlq replay")
def replay(
    config: ConfigOpt,
    letter_ids: Annotated[
        list[int] | None, typer.Argument(help="Letter IDs to replay.", show_default=False)
    ] = None,
    all_letters: Annotated[bool, typer.Option("--all", help="Replay every letter in the queue.")] = False,
) -> None:
    """Offer dead letters again, exactly as recorded, through the normal path.

    A letter whose record is now a valid event is applied. It leaves the queue if it was applied or is superseded by a newer version (stale); it stays, with this attempt's reason added to its history, if it fails again, if its record still is not a valid event (undecodable bytes are never decoded lossily), or if a store's refusal consumed its version (send a newer version from the source).

    Exits 0 when every letter left the queue, 1 when some stayed or were not found, 2 on an error. Needs exclusive use of embedded stores: stop `lockstep run` first when it uses them.
    """
    if not letter_ids and not all_letters:
        raise typer.BadParameter("name letter IDs, or pass --all")
    from lockstep.runtime import runtime
    from lockstep.settings import load_settings

    settings = load_settings(config)
    outcome = _Replay()
    with runtime(settings) as rt:
        ids = list(_all_ids(rt.home)) if all_letters else list(letter_ids or [])
        for letter_id in ids:
            _replay_one(rt, letter_id, outcome)
    typer.echo(json.dumps(vars(outcome)))
    raise typer.Exit(1 if outcome.failed else 0)


def _replay_one(rt: Runtime, letter_id: int, outcome: _Replay) -> None:
    dlq: DeadLetterQueue = rt.home
    found = dlq.dead_letter(letter_id)
    if found is None:
        typer.echo(f"no dead letter {letter_id} (see `lockstep dlq list`)", err=True)
        outcome.unknown += 1
        return
    letter = found[0]
    try:
        event = _event(letter)
    except InvalidEvent as exc:
        dlq.record_attempt(letter_id, f"replay: {exc.reason}")
        outcome.still_invalid += 1
        return
    newest = _newest_id(dlq, letter_id)
    stale_before = rt.engine.stats.stale_events
    rt.engine.apply([event])
    again = dlq.dead_letters(limit=PAGE_LETTERS_MAX, after_id=newest)
    if again:
        # The engine dead-lettered the event anew: the reason joins the original letter instead.
        for _, new in again:
            dlq.record_attempt(letter_id, f"replay: {new.reason}")
        dlq.drop_dead_letters([i for i, _ in again])
        outcome.dead_lettered_again += 1
        return
    if rt.engine.stats.stale_events > stale_before and _consumed(rt, event):
        dlq.record_attempt(
            letter_id,
            f"replay: version {event.version} of {event.doc_id!r} was consumed when a store refused it "
            "(the indexes hold the version before it); send a newer version from the source",
        )
        outcome.consumed += 1
        return
    dlq.drop_dead_letters([letter_id])
    if rt.engine.stats.stale_events > stale_before:
        outcome.stale += 1
    else:
        outcome.replayed += 1


def _consumed(rt: Runtime, event: ChangeEvent) -> bool:
    """Whether the ledger holds the event's version without its content: a store refused it and
    the indexes were brought back to the version before (``coordinator/restore.py``)."""
    state = rt.ledger.get_docs([event.doc_id]).get(event.doc_id)
    if state is None or state.version != event.version:
        return False
    applied = plan(event, None, rt.generations[0].generation.chunking).after
    assert applied is not None, "an event planned against no state applies"
    held = (state.deleted, state.metadata_hash, [c.content_hash for c in state.chunks])
    return held != (applied.deleted, applied.metadata_hash, [c.content_hash for c in applied.chunks])


def _event(letter: DeadLetter) -> ChangeEvent:
    """The letter's record parsed exactly as the JSONL source parses a line; InvalidEvent if it
    is not (yet) a valid event."""
    data = letter.record_bytes()
    if letter.truncated:
        raise InvalidEvent("the record was cut to its first bytes (longer than any valid event)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEvent(f"invalid UTF-8 at byte {exc.start} of the record") from exc
    try:
        raw = loads_event_json(text.removeprefix("\ufeff"))
    except json.JSONDecodeError as exc:
        raise InvalidEvent(
            f"not a lockstep event (invalid JSON: {exc.msg} at column {exc.colno}); records of "
            f"{letter.source!r} that are not in the JSONL event schema are fixed at their source"
        ) from exc
    except RecursionError as exc:
        raise InvalidEvent("invalid JSON: nested too deeply") from exc
    return event_from_dict(raw, position=letter.position)


def _newest_id(dlq: DeadLetterQueue, from_id: int) -> int:
    newest = from_id
    while page := dlq.dead_letters(limit=PAGE_LETTERS_MAX, after_id=newest):
        newest = page[-1][0]
    return newest


def _all_ids(dlq: DeadLetterQueue) -> Iterator[int]:
    """Every letter ID now in the queue (letters added meanwhile are not replayed again)."""
    ids: list[int] = []
    while page := dlq.dead_letters(limit=PAGE_LETTERS_MAX, after_id=ids[-1] if ids else 0):
        ids.extend(i for i, _ in page)
    yield from ids


@app.command()
@command_errors("dlq drop")
def drop(config: ConfigOpt, letter_ids: IdsArg) -> None:
    """Discard dead letters for good (after deciding they need no replay).

    Exits 1 if some of the IDs name no letter."""
    with _queue(config) as dlq:
        missing = [i for i in letter_ids if dlq.dead_letter(i) is None]
        dropped = dlq.drop_dead_letters(letter_ids)
    for letter_id in missing:
        typer.echo(f"no dead letter {letter_id} (see `lockstep dlq list`)", err=True)
    typer.echo(json.dumps({"dropped": dropped, "not_found": missing}))
    if missing:
        raise typer.Exit(1)


def _summary(letter_id: int, d: DeadLetter) -> dict[str, Any]:
    return {
        "id": letter_id,
        "source": d.source,
        "position": d.position,
        "doc_id": d.doc_id,
        "version": d.version,
        "attempts": d.attempts,
        "reason": d.reason,
        "last_reason": d.history[-1].reason if d.history else d.reason,
    }


def _iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat()

