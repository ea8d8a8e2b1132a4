"""``lockstep demo``: the main job end to end on the embedded default, with nothing to install.

Indexes a generated help-center corpus into Tantivy + a milvus-lite file through the SQLite
ledger, applies a scripted round of edits, deletes, shrinks, metadata-only changes and stale
replays, searches both indexes, and proves both indexes equal the source.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from rich.console import Console
from rich.table import Table

from adapters.keyword.settings import KeywordSettings
from adapters.vector.settings import VectorSettings
from coordinator.chunking import chunk_id, chunk_text, content_hash
from coordinator.events import ChangeEvent, Op, event_to_dict
from coordinator.invariants import ExpectedChunk, Violation, check_index
from coordinator.sync import run_sync
from lockstep.bootstrap import build_source
from lockstep.corpus import Doc, edit_one_paragraph, make_corpus, retag, shrink
from lockstep.progress import opened, record_progress, spinner
from lockstep.runtime import Runtime, runtime
from lockstep.settings import EmbedderSettings, JsonlSourceSettings, LedgerSettings, Settings, SyncConfig

QUERY = "how do I reset my password"
# Events per apply batch: small enough that the bar moves during the initial load (one batch of
# the default 500 would be a single jump after the whole wait), big enough to cost little.
DEMO_BATCH_EVENTS = 50


def demo_settings(data_dir: Path, embedder_kind: str) -> Settings:
    return Settings(
        source=JsonlSourceSettings(path=str(data_dir / "events.jsonl"), name="demo"),
        keyword=KeywordSettings(kind="tantivy", path=str(data_dir / "tantivy")),
        vector=VectorSettings(uri=str(data_dir / "milvus.db")),
        ledger=LedgerSettings(path=str(data_dir / "ledger.db")),
        embedder=EmbedderSettings.model_validate({"kind": embedder_kind}),
        sync=SyncConfig(batch_events=DEMO_BATCH_EVENTS),
    )


def run(data_dir: Path, *, docs: int, embedder_kind: str, console: Console) -> bool:
    """Run the demo; True when both indexes equal the source at the end."""
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    settings = demo_settings(data_dir, embedder_kind)
    corpus = {d.doc_id: d for d in make_corpus(docs)}
    deleted: set[str] = set()
    with opened(console, "opening the embedded stores and the embedder", runtime(settings)) as rt:
        console.print(
            f"[bold]lockstep demo[/bold]: {docs} documents, embedder [cyan]{rt.embedder.model_id}[/cyan]"
        )
        initial = _sync(rt, settings, [_upsert(d) for d in corpus.values()], console, "initial load")
        changes, replays = _scripted_round(corpus, deleted)
        edits = _sync(rt, settings, changes, console, "edit round")
        stale = _sync(rt, settings, replays, console, "replays")
        _print_stats(console, initial, edits, stale)
        _print_search(console, rt)
        with spinner(console, "checking both indexes against the source"):
            violations = _verify(rt, settings, corpus, deleted)
    _print_verdict(console, violations)
    return not violations


def _upsert(doc: Doc) -> ChangeEvent:
    return ChangeEvent(Op.UPSERT, doc.doc_id, doc.version, doc.text, doc.metadata)


def _scripted_round(corpus: dict[str, Doc], deleted: set[str]) -> tuple[list[ChangeEvent], list[ChangeEvent]]:
    """Edits, deletes, shrinks, metadata-only changes, then stale replays of older versions."""
    rng = random.Random(11)
    ids = sorted(corpus)
    rng.shuffle(ids)
    events: list[ChangeEvent] = []
    originals = [corpus[i] for i in ids[:5]]
    for doc_id in ids[:10]:
        corpus[doc_id] = edit_one_paragraph(rng, corpus[doc_id])
        events.append(_upsert(corpus[doc_id]))
    for doc_id in ids[10:13]:
        corpus[doc_id] = shrink(corpus[doc_id])
        events.append(_upsert(corpus[doc_id]))
    for doc_id in ids[13:18]:
        corpus[doc_id] = retag(corpus[doc_id])
        events.append(_upsert(corpus[doc_id]))
    for doc_id in ids[18:23]:
        doc = corpus.pop(doc_id)
        deleted.add(doc_id)
        events.append(ChangeEvent(Op.DELETE, doc_id, doc.version + 1))
    # A consumer restart replays older events; a late upsert arrives for a deleted document.
    replays = [_upsert(d) for d in originals]
    replays.append(ChangeEvent(Op.UPSERT, ids[18], 1, "a late, older copy that must not come back", {}))
    return events, replays


def _sync(
    rt: Runtime, settings: Settings, events: list[ChangeEvent], console: Console, label: str
) -> dict[str, int]:
    assert isinstance(settings.source, JsonlSourceSettings)
    with Path(settings.source.path).open("a", encoding="utf-8") as out:
        out.writelines(json.dumps(event_to_dict(e)) + "\n" for e in events)
    before = rt.engine.stats.as_dict()
    source = build_source(settings, rt.ledger)
    with record_progress(console, label, total=len(events)) as progress:
        run_sync(source, rt.engine, batch_events=settings.sync.batch_events, progress=progress)
    source.close()
    return {k: v - before[k] for k, v in rt.engine.stats.as_dict().items()}


def _print_stats(console: Console, *rounds: dict[str, int]) -> None:
    table = Table("", "initial load", "edit round", "stale replays", title="what lockstep did")
    rows = {
        "events": "events read",
        "applied_events": "documents changed",
        "embed_calls": "texts embedded",
        "cache_hits": "vectors reused from cache",
        "upserted_chunks": "chunks written",
        "rewritten_chunks": "  of which metadata-only",
        "skipped_chunks": "chunks skipped (unchanged)",
        "deleted_chunks": "chunks deleted",
        "stale_events": "stale events ignored",
        "dead_letters": "dead letters",
    }
    for key, label in rows.items():
        table.add_row(label, *(str(r[key]) for r in rounds))
    console.print(table)


def _print_search(console: Console, rt: Runtime) -> None:
    table = Table("index", "chunk", "text", title=f"search: {QUERY!r}")
    for hit in rt.keyword.search(QUERY, 3):
        table.add_row("keyword", hit.chunk_id, hit.text[:70].replace("\n", " "))
    [vector] = rt.embedder.embed_hashed([(content_hash(QUERY), QUERY)]).values()
    for hit in rt.vector.search(vector, 3):
        table.add_row("vector", hit.chunk_id, hit.text[:70].replace("\n", " "))
    console.print(table)


def _verify(rt: Runtime, settings: Settings, corpus: dict[str, Doc], deleted: set[str]) -> list[Violation]:
    chunking = settings.chunking.to_domain()
    expected = {
        chunk_id(d.doc_id, i): ExpectedChunk(chunk_id(d.doc_id, i), content_hash(t))
        for d in corpus.values()
        for i, t in enumerate(chunk_text(d.text, chunking))
    }
    return [
        *check_index("keyword", expected, deleted, list(rt.keyword.scan())),
        *check_index("vector", expected, deleted, list(rt.vector.scan())),
    ]


def _print_verdict(console: Console, violations: list[Violation]) -> None:
    if not violations:
        console.print("[bold green]both indexes equal the source[/bold green] (I1-I4 hold on every chunk)")
        return
    console.print(f"[bold red]{len(violations)} violations[/bold red]")
    for v in violations[:20]:
        console.print(f"  {v}")
