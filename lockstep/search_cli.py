"""``lockstep search`` and ``lockstep serve``: the read path from the command line.

``lockstep search`` opens the ledger and both indexes read-only and answers one query (a Rich
table, or ``--json`` as ``POST /search`` answers). Exit 0 with an answer (a degraded one says so
on stderr), 2 on any error, a consistency token whose changes did not arrive in time included.
When the configuration's milvus-lite file is held by another process (a running ``lockstep
run``), the query goes to that service's ``POST /search`` instead; if nothing answers there, the
command says so in one line.

The settings, the stores and the HTTP client are imported by the commands that use them, so
that ``lockstep --help`` stays quick.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from coordinator.consistency import ConsistencyToken
from coordinator.errors import ConsistencyTimeout, InvalidSearch, LockstepError
from coordinator.search import Mode, SearchRequest
from lockstep.cli_errors import command_errors
from lockstep.stop_signals import EARLY_STOP

if TYPE_CHECKING:
    import httpx

    from lockstep.settings import Settings

out = Console()
err = Console(stderr=True)

# Characters of a hit's text shown in the table.
TEXT_SHOWN_CHARS = 90
# The request to a running service's POST /search: a consistency wait (search.consistency_wait_s,
# at most 300 s) plus the search itself.
FORWARD_TIMEOUT_S = 330.0

ConfigOpt = Annotated[
    Path, typer.Option("--config", "-c", help="YAML config file.", exists=True, dir_okay=False)
]


def register(app: typer.Typer) -> None:
    """Add ``search`` and ``serve`` to the main ``lockstep`` app."""
    app.command()(search)
    app.command()(serve)


def search(
    config: ConfigOpt,
    query: Annotated[str, typer.Argument(help="What to look for.")],
    k: Annotated[int, typer.Option("-k", min=1, max=1000, help="Hits (or documents) to return.")] = 10,
    mode: Annotated[Mode, typer.Option(help="hybrid (both legs, fused), keyword or vector.")] = Mode.HYBRID,
    filters: Annotated[
        list[str] | None,
        typer.Option("--filter", help="key=value on metadata (repeatable); value read as JSON if it is a scalar."),
    ] = None,
    per_doc: Annotated[bool, typer.Option("--per-doc", help="One row per document: its best chunk.")] = False,
    consistent_with: Annotated[
        str | None, typer.Option("--consistent-with", help="A consistency token: wait for its changes first.")
    ] = None,
    require_both: Annotated[
        bool, typer.Option("--require-both", help="Fail rather than answer from one leg when the other is down.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON answer of POST /search.")] = False,
) -> None:
    """Consistent hybrid search: BM25 and vectors fused by rank, every hit checked against the ledger."""
    from lockstep.settings import load_settings

    with command_errors("search"):
        settings = load_settings(config)
        request = SearchRequest(
            query=query,
            k=k,
            mode=mode,
            where=parse_filters(filters or []),
            per_doc=per_doc,
            consistent_with=None if consistent_with is None else ConsistencyToken.decode(consistent_with),
            require_both=require_both,
        )
        answer = _answer(settings, request)
    _print(answer, as_json)


def serve(config: ConfigOpt) -> None:
    """A read-only search server (POST /search, /healthz, /readyz, /metrics): no source, no writes."""
    from lockstep.settings import load_settings

    with command_errors("serve"):
        settings = load_settings(config)
        from lockstep.serve import SearchServer

        code = SearchServer(settings, stop_requested=EARLY_STOP).run()
    raise typer.Exit(code)


def parse_filters(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; a value that reads as a JSON scalar (3, true, null, "x") is that."""
    where: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--filter takes key=value, not {item!r}")
        where[key] = _scalar(raw)
    return where


def _scalar(raw: str) -> Any:
    try:
        value = json.loads(raw)
    except ValueError:
        return raw
    return value if value is None or isinstance(value, str | int | float | bool) else raw


def _answer(settings: Settings, request: SearchRequest) -> dict[str, Any]:
    from lockstep.runtime import open_search
    from lockstep.search_wire import result_to_json

    holder = _lite_file_holder(settings)
    if holder is not None:
        return _forward(settings, request, holder)
    runtime = open_search(settings)
    try:
        result = runtime.service.search(request)
    finally:
        runtime.close()
    return result_to_json(result, request, runtime.generation)


def _lite_file_holder(settings: Settings) -> int | None:
    if not settings.vector.is_embedded:
        return None
    from adapters.vector.milvus import lite_holder

    return lite_holder(settings.vector.uri)


def _forward(settings: Settings, request: SearchRequest, holder: int) -> dict[str, Any]:
    """Ask the running service that holds the milvus-lite file (on run.http_host:run.http_port)."""
    import httpx

    from lockstep.search_http import SEARCH_PATH
    from lockstep.search_wire import request_to_json

    host = "127.0.0.1" if settings.run.http_host in ("0.0.0.0", "::", "") else settings.run.http_host
    url = f"http://{host}:{settings.run.http_port}{SEARCH_PATH}"
    headers = {}
    if settings.search.token is not None:
        headers["Authorization"] = f"Bearer {settings.search.token.get_secret_value()}"
    try:
        response = httpx.post(url, json=request_to_json(request), headers=headers, timeout=FORWARD_TIMEOUT_S)
    except httpx.TransportError as exc:
        raise LockstepError(
            f"the milvus-lite file {settings.vector.uri} is held by process {holder} (a running `lockstep run`?), "
            f"and nothing answers POST /search at {url} ({type(exc).__name__}): search through that service, "
            "or stop it"
        ) from exc
    return _forwarded(response)


def _forwarded(response: httpx.Response) -> dict[str, Any]:
    try:
        body: dict[str, Any] = response.json()
    except ValueError:
        body = {"error": response.text[:300]}
    if response.status_code == 504:
        _fail_pending(body)
    if response.status_code == 400:
        raise InvalidSearch(str(body.get("error")))
    if response.status_code != 200:
        raise LockstepError(f"POST /search answered {response.status_code}: {body.get('error')}")
    return body


def _fail_pending(body: dict[str, Any]) -> None:
    raise ConsistencyTimeout(str(body.get("error")), pending=tuple(
        (str(p["doc_id"]), int(p["version"]), str(p["why"])) for p in body.get("pending", [])
    ))


def _print(answer: dict[str, Any], as_json: bool) -> None:
    if answer.get("degraded"):
        failed = [f"{leg}: {r['error']}" for leg, r in answer["legs"].items() if r["status"] == "failed"]
        err.print(f"[yellow]degraded: answered from one leg only[/] ({'; '.join(failed)})", highlight=False)
    if as_json:
        typer.echo(json.dumps(answer, ensure_ascii=False, sort_keys=True))
        return
    out.print(_docs_table(answer) if "docs" in answer else _hits_table(answer["hits"]))
    out.print(_summary(answer), highlight=False)


def _hits_table(hits: list[dict[str, Any]]) -> Table:
    table = Table("#", "score", "document", "chunk", "version", "keyword", "vector", "text")
    for rank, hit in enumerate(hits, start=1):
        table.add_row(str(rank), f"{hit['score']:.4f}", hit["doc_id"], str(hit["chunk_index"]), str(hit["version"]),
                      _rank(hit, "keyword"), _rank(hit, "vector"), _shown(hit["text"]))
    return table


def _docs_table(answer: dict[str, Any]) -> Table:
    table = Table("#", "score", "document", "best chunk", "other chunks (keyword/vector rank)", "text")
    for rank, doc in enumerate(answer["docs"], start=1):
        best = doc["best"]
        others = ", ".join(
            f"{s['chunk_index']} ({s['ranks'].get('keyword', '-')}/{s['ranks'].get('vector', '-')})"
            for s in doc["siblings"]
        )
        table.add_row(str(rank), f"{doc['score']:.4f}", doc["doc_id"], str(best["chunk_index"]), others or "-",
                      _shown(best["text"]))
    return table


def _rank(hit: dict[str, Any], leg: str) -> str:
    return str(hit["ranks"].get(leg, "-"))


def _shown(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= TEXT_SHOWN_CHARS else flat[: TEXT_SHOWN_CHARS - 1] + "…"


def _summary(answer: dict[str, Any]) -> str:
    fenced = ", ".join(f"{n} {reason}" for reason, n in answer["fenced"].items()) or "none"
    position = answer["ledger_position"]
    checkpoints = ", ".join(f"{s} at {p}" for s, p in position["checkpoints"].items()) or "no source checkpoint"
    return (
        f"{len(answer['hits'])} hit(s); fenced out: {fenced}; generation {position['generation']}, {checkpoints}"
        + (f"; waited {answer['waited_s']} s for the token" if answer["waited_s"] else "")
    )
