"""``lockstep audit`` and ``lockstep reconcile``: the cross-index auditor and its repairs.

Registered on the main app by ``register(app)``. Exit status, usable as a CI gate: 0 when every
side agrees, 1 when drift was found (or, for ``reconcile``, remains), 2 on any error. Any
exception maps to 2 (``command_errors``), not only lockstep's own, because an auditor that crashed
must never be read as "drift found" (Typer's default for an uncaught exception is 1). The JSON
schema of ``--json`` is documented in docs/audit.md. The settings and the stores are imported by
the commands that open them, so that ``lockstep --help`` stays quick.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from coordinator.audit import INDEX_CATEGORIES, INDEXES, Auditor, AuditResult, evidence
from coordinator.ports import ListableSource
from coordinator.reconcile import REPAIR_OPS_PER_S, RateLimiter, Reconciler
from lockstep.cli_errors import DebugOpt, command_errors, set_debug

if TYPE_CHECKING:
    from lockstep.runtime import Runtime
    from lockstep.settings import Settings

# Exit 2, on any error, is command_errors' (lockstep.cli_errors.EXIT_ERROR).
EXIT_CLEAN, EXIT_DRIFT = 0, 1
# Source kinds that can list their current state (the audit's reference); the others are streams.
LISTABLE_SOURCE_KINDS = frozenset({"folder", "sql"})

err = Console(stderr=True)

ConfigOpt = Annotated[
    Path, typer.Option("--config", "-c", help="YAML config file.", exists=True, dir_okay=False)
]


def register(app: typer.Typer) -> None:
    """Add ``audit`` and ``reconcile`` to the main ``lockstep`` app."""
    app.command()(audit)
    app.command()(reconcile)


def audit(
    config: ConfigOpt,
    as_json: Annotated[bool, typer.Option("--json", help="Print the documented JSON report.")] = False,
    full: Annotated[bool, typer.Option("--full", help="Audit every chunk (the default).")] = False,
    sample: Annotated[int | None, typer.Option(min=1, help="Audit N random documents.")] = None,
    since: Annotated[
        str | None, typer.Option(help="Audit documents the ledger changed since T (ISO-8601 or Unix s).")
    ] = None,
    doc: Annotated[str | None, typer.Option(help="Deletion evidence for one document.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of --sample's random choice.")] = None,
    hash_text: Annotated[
        bool, typer.Option(help="Hash every stored text (finds texts edited behind lockstep's back).")
    ] = True,
) -> None:
    """Compare source, ledger, keyword and vector index; exit 0 clean, 1 drift, 2 error."""
    modes = [m for m in (full, sample is not None, since is not None, doc is not None) if m]
    if len(modes) > 1:
        raise typer.BadParameter("choose one of --full, --sample, --since, --doc")
    from lockstep.settings import load_settings

    with command_errors("audit"), _auditor(load_settings(config), hash_text) as auditor:
        started = time.monotonic()
        if doc is not None:
            _finish_doc(auditor.document(doc), doc, as_json)
        result = _run_mode(auditor, sample, since, seed)
        report = result.report.as_json() | {"elapsed_s": round(time.monotonic() - started, 3)}
    _print_report(report, as_json)
    raise typer.Exit(EXIT_CLEAN if report["clean"] else EXIT_DRIFT)


def reconcile(
    config: ConfigOpt,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the repair plan, change nothing.")
    ] = False,
    max_ops: Annotated[int | None, typer.Option(min=1, help="Do at most N chunk writes.")] = None,
    ops_per_s: Annotated[
        float, typer.Option(min=0.001, help="Rate limit, chunk writes per second.")
    ] = REPAIR_OPS_PER_S,
) -> None:
    """Audit, then repair through the ledgered apply path; prints a JSON summary.

    Exit 0 when nothing is left to repair, 1 when findings remain (or in a dry run, when there
    is anything to repair), 2 on error.
    """
    from lockstep.settings import load_settings

    with command_errors("reconcile"):
        settings = load_settings(config)
        summary = _reconcile(settings, dry_run, max_ops, ops_per_s)
    typer.echo(json.dumps(summary, indent=2, sort_keys=True))
    left = summary["audit"]["clean"] is False if dry_run else summary["remaining_findings"] > 0
    left = left or bool(summary["unrepairable"])
    raise typer.Exit(EXIT_DRIFT if left or summary["skipped_for_budget"] else EXIT_CLEAN)


# --- helpers -------------------------------------------------------------------------------------


def _reconcile(settings: Settings, dry_run: bool, max_ops: int | None, ops_per_s: float) -> dict[str, Any]:
    from lockstep.progress import opened
    from lockstep.runtime import runtime

    with opened(err, "opening the indexes", runtime(settings)) as rt, _source(settings, rt) as source:
        auditor = _make_auditor(settings, rt, source, hash_text=True)
        reconciler = Reconciler(
            auditor=auditor,
            # Repairs go to the generation readers see; a standby is audited by its own rebuild.
            engine=rt.generations[0].engine,
            ledger=rt.ledger,
            keyword=rt.keyword,
            vector=rt.vector,
            chunking=rt.generations[0].generation.chunking,
            limiter=RateLimiter(ops_per_s),
        )
        return reconciler.run(dry_run=dry_run, max_ops=max_ops).as_json()


def _run_mode(auditor: Auditor, sample: int | None, since: str | None, seed: int | None) -> AuditResult:
    if sample is not None:
        return auditor.sample(sample, random.Random(seed))
    if since is not None:
        return auditor.since(_parse_since(since))
    return auditor.full()


def _finish_doc(result: AuditResult, doc_id: str, as_json: bool) -> None:
    view = result.views[doc_id]
    proof = evidence(view, [f for f in result.findings if f.doc_id == doc_id])
    if as_json:
        typer.echo(json.dumps(proof, indent=2, sort_keys=True))
    else:
        _print_evidence(proof)
    raise typer.Exit(EXIT_CLEAN if proof["clean"] else EXIT_DRIFT)


def _parse_since(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError as exc:
        raise typer.BadParameter(f"--since {value!r} is neither Unix seconds nor ISO-8601") from exc


@contextmanager
def _auditor(settings: Settings, hash_text: bool) -> Iterator[Auditor]:
    from lockstep.progress import opened
    from lockstep.runtime import runtime

    with opened(err, "opening the indexes", runtime(settings)) as rt, _source(settings, rt) as source:
        yield _make_auditor(settings, rt, source, hash_text=hash_text)


@contextmanager
def _source(settings: Settings, rt: Runtime) -> Iterator[ListableSource | None]:
    """The configured source if it can list its current state (else the ledger is the reference)."""
    if settings.source is None or settings.source.kind not in LISTABLE_SOURCE_KINDS:
        # Event streams cannot list their current state; building one would connect to a
        # broker or a replication slot for nothing.
        yield None
        return
    from lockstep.bootstrap import build_source

    source = build_source(settings, rt.ledger)
    try:
        yield source if isinstance(source, ListableSource) else None
    finally:
        source.close()


def _make_auditor(
    settings: Settings, rt: Runtime, source: ListableSource | None, *, hash_text: bool
) -> Auditor:
    name = settings.source.name if source is not None and settings.source is not None else "ledger"
    return Auditor(
        ledger=rt.ledger,
        keyword=rt.keyword,
        vector=rt.vector,
        source=source,
        chunking=rt.generations[0].generation.chunking,
        reference_name=name,
        hash_text=hash_text,
    )


def _print_report(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(report, indent=2, sort_keys=True))
        return
    out = Console()
    table = Table(
        "category", *INDEXES, title=f"lockstep audit ({report['mode']}, reference: {report['reference']})"
    )
    for category in INDEX_CATEGORIES:
        table.add_row(category.value, *(str(report["counts"][s][category.value]) for s in INDEXES))
    table.add_row("ledger_drift", str(report["counts"]["ledger_drift"]), "")
    table.add_row("cross_index", str(report["counts"]["cross_index"]), "")
    out.print(table)
    _print_examples(out, report["examples"])
    verdict = "[green]clean[/green]" if report["clean"] else "[red]drift found[/red]"
    out.print(f"{verdict} — {_scope_text(report)} in {report['elapsed_s']} s", soft_wrap=True)


def _scope_text(report: dict[str, Any]) -> str:
    """What the audit looked at, in words: what a full audit scanned (``scanned``), or how many
    documents a sample or a since-audit checked (their ``scanned`` is empty)."""
    scanned: dict[str, int | None] = report["scanned"]
    if not scanned:
        return f"checked {_count(report['documents_checked'], 'document')}"
    parts = []
    if scanned.get("source_docs") is not None:
        bad = scanned.get("source_bad_rows") or 0
        unreadable = f" ({_count(bad, 'unreadable row')})" if bad else ""
        parts.append(_count(scanned["source_docs"], "source document") + unreadable)
    ledger_chunks = _count(scanned.get("ledger_chunks"), "chunk")
    parts.append(f"{_count(scanned.get('ledger_docs'), 'ledger document')} ({ledger_chunks})")
    parts += [_count(scanned.get(f"{side}_chunks"), f"{side} chunk") for side in INDEXES]
    return "scanned " + ", ".join(parts)


def _count(n: int | None, noun: str) -> str:
    return f"{n or 0} {noun}{'' if n == 1 else 's'}"


def _print_examples(out: Console, examples: dict[str, Any]) -> None:
    def rows() -> Iterator[tuple[str, str, dict[str, str]]]:
        for side in INDEXES:
            for category, items in examples[side].items():
                yield from ((side, category, item) for item in items)
        for category in ("ledger_drift", "cross_index"):
            yield from (("", category, item) for item in examples[category])

    show: Callable[[dict[str, str]], str] = lambda i: f"{i['chunk_id'] or i['doc_id']}: {i['detail']}"  # noqa: E731
    for side, category, item in rows():
        out.print(f"  {side or '-'} {category}: {show(item)}")


def _print_evidence(proof: dict[str, Any]) -> None:
    out = Console(soft_wrap=True)
    out.print(f"document {proof['doc_id']!r}")
    out.print(f"  source : {_source_text(proof['source'])}")
    ledger = proof["ledger"]
    version = "" if ledger["version"] is None else f" at version {ledger['version']}"
    out.print(f"  ledger : {ledger['state']}{version}, {_count(ledger['chunks'], 'chunk')}")
    for side in INDEXES:
        ids = ", ".join(c["chunk_id"] for c in proof[side]["chunks"])
        out.print(f"  {side:<7}: {_count(proof[side]['count'], 'chunk')}" + (f" ({ids})" if ids else ""))
    out.print(f"  verdict: {_doc_verdict(proof)}")
    for finding in proof["findings"]:
        where = finding["chunk_id"] or finding["doc_id"]
        out.print(f"  [red]{finding['category']}[/red] ({finding['side']}) {where}: {finding['detail']}")


def _source_text(source: dict[str, Any]) -> str:
    if not source["listable"]:
        return "not listable (an event stream): the ledger is the reference"
    if not source["present"]:
        return "absent"
    return "present" + ("" if source["version"] is None else f" at version {source['version']}")


def _doc_verdict(proof: dict[str, Any]) -> str:
    """What the evidence says about the document: live, forgotten, or deleted with remnants."""
    if proof["forgotten"]:
        return "forgotten everywhere (no chunk in either index, nothing live in the ledger)"
    if proof["ledger"]["state"] == "live":
        return f"live at version {proof['ledger']['version']}: not deleted, so nothing to forget"
    if proof["source"]["present"]:
        return "still at the source: not deleted there, so nothing to forget yet"
    held = [f"{side} ({_count(proof[side]['count'], 'chunk')})" for side in INDEXES if proof[side]["count"]]
    return f"NOT forgotten: deleted, but still held by {', '.join(held)}"


# A stand-alone app, so that ``python -m lockstep.audit_cli audit -c FILE`` works before (and
# independently of) the main app registering these commands.
app = typer.Typer(no_args_is_help=True, add_completion=False, help="Audit and reconcile lockstep's indexes.")


@app.callback()
def _main(
    log_level: Annotated[str, typer.Option(help="Log level for the JSON logs on stderr.")] = "warning",
    debug: DebugOpt = False,
) -> None:
    from lockstep.logging import configure_logging

    configure_logging(log_level)
    set_debug(debug)


register(app)

if __name__ == "__main__":
    app()
