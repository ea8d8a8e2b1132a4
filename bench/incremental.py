"""Incremental sync against a full rebuild, measured side by side in one run.

    python -m bench.incremental [--docs 10000] [--model-docs 300] [--seed 7]

Part 1 (hashing embedder; this module starts its own OpenSearch-API server and Milvus 2.3.5
server): a generated help-center corpus is loaded through the real apply path, a churn round
(edits, deletes, new documents, shrinks, metadata-only changes) is applied incrementally, and
the same final state is rebuilt from scratch into a fresh index, collection, ledger and
embedding cache, as a nightly rebuild would. Both results are checked against the source
(invariants I1-I4).

Part 2 (the local model, sentence-transformers, on the embedded stores: Tantivy + a milvus-lite
file): the same comparison on a subset of the corpus.

Each round is what one ``lockstep sync`` does: build the runtime from settings, consume the
JSONL source from its checkpoint, close. "Texts embedded" counts texts sent to the model; the
minimum is computed independently from the corpus: the distinct chunk texts of the new state
whose content hash no earlier state had (so no cache could have held them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from importlib.metadata import version
from pathlib import Path

from adapters.keyword.settings import KeywordSettings
from adapters.vector.settings import VectorSettings
from chaos.servers import OpenSearchApiServer, RealMilvusServer
from coordinator.chunking import ChunkingSettings, chunk_id, chunk_text, content_hash
from coordinator.events import ChangeEvent, Op, event_to_dict
from coordinator.invariants import ExpectedChunk, Violation, check_index
from coordinator.sync import run_sync
from lockstep.bootstrap import build_source
from lockstep.corpus import Doc, edit_one_paragraph, make_doc, retag, shrink
from lockstep.logging import configure_logging
from lockstep.runtime import runtime
from lockstep.settings import EmbedderSettings, JsonlSourceSettings, LedgerSettings, Settings

DEFAULT_DOCS = 10_000
DEFAULT_MODEL_DOCS = 300
DEFAULT_SEED = 7
# Corpus shape: 4-6 body paragraphs of at most PARA_CHARS characters. Two such paragraphs never
# fit in one 1000-character chunk and the short title joins the first one, so each body
# paragraph is exactly one chunk (about 5 chunks per document, 50k for 10k documents).
PARAGRAPHS = (4, 6)
PARA_CHARS = 800
# The goal the incremental round is measured against: at least this many times faster than a rebuild.
SPEEDUP_GOAL = 20.0
VIOLATIONS_SHOWN_MAX = 10


@dataclass(frozen=True)
class ChurnMix:
    """One churn round, as fractions of the corpus (at least one document of each kind)."""

    edited: float = 0.01
    deleted: float = 0.005
    added: float = 0.005
    shrunk: float = 0.002
    retagged: float = 0.002

    def counts(self, docs: int) -> dict[str, int]:
        return {f.name: max(1, round(docs * getattr(self, f.name))) for f in fields(self)}


@dataclass(frozen=True)
class Churn:
    """The source after a churn round, and the events that lead there."""

    final: dict[str, Doc]
    deleted: set[str]
    events: list[ChangeEvent]
    composition: dict[str, int]


@dataclass(frozen=True)
class RoundResult:
    """One ``lockstep sync`` run: wall time, the engine's counters, texts sent to the model.

    ``wall_s`` covers the whole run (building the runtime: clients, index and collection checks,
    model load; consuming; closing); ``sync_s`` only consuming the source (``run_sync``).
    """

    events: int
    wall_s: float
    sync_s: float
    stats: dict[str, int]
    embedded_texts: int


@dataclass(frozen=True)
class Comparison:
    """Initial load, incremental churn round and full rebuild of one corpus, with their checks."""

    title: str
    stores: str
    docs: int
    chunks_initial: int
    chunks_final: int
    churn: Churn
    initial: RoundResult
    incremental: RoundResult
    rebuild: RoundResult
    minimum_initial: int
    minimum_incremental: int
    minimum_rebuild: int
    incremental_violations: list[Violation]
    rebuild_violations: list[Violation]


SettingsFactory = Callable[[str], Settings]


# --- the corpus and its churn ------------------------------------------------------------------


def make_docs(n: int, seed: int) -> dict[str, Doc]:
    """``n`` documents of the benchmark's shape, deterministic in ``seed``."""
    rng = random.Random(seed)
    docs = (make_doc(rng, i, paragraphs=rng.randint(*PARAGRAPHS), para_chars=PARA_CHARS) for i in range(n))
    return {d.doc_id: d for d in docs}


def make_churn(docs: dict[str, Doc], seed: int, mix: ChurnMix = ChurnMix()) -> Churn:
    """Apply ``mix`` to disjoint random documents; new documents get fresh indexes."""
    rng = random.Random(seed + 1)
    counts = mix.counts(len(docs))
    ids = sorted(docs)
    rng.shuffle(ids)
    picks = _split(ids, [counts["edited"], counts["shrunk"], counts["retagged"], counts["deleted"]])
    final = dict(docs)
    changed = [edit_one_paragraph(rng, docs[i], PARA_CHARS) for i in picks[0]]
    changed += [shrink(docs[i]) for i in picks[1]]
    changed += [retag(docs[i]) for i in picks[2]]
    changed += [
        make_doc(rng, len(docs) + n, paragraphs=rng.randint(*PARAGRAPHS), para_chars=PARA_CHARS)
        for n in range(counts["added"])
    ]
    final.update((d.doc_id, d) for d in changed)
    deletes = [ChangeEvent(Op.DELETE, i, docs[i].version + 1) for i in picks[3]]
    for doc_id in picks[3]:
        del final[doc_id]
    events = [upsert_event(d) for d in changed] + deletes
    rng.shuffle(events)
    return Churn(final, set(picks[3]), events, counts)


def _split(ids: Sequence[str], sizes: Sequence[int]) -> list[list[str]]:
    out, start = [], 0
    for size in sizes:
        out.append(list(ids[start : start + size]))
        start += size
    return out


def upsert_event(doc: Doc) -> ChangeEvent:
    return ChangeEvent(Op.UPSERT, doc.doc_id, doc.version, doc.text, doc.metadata)


def chunk_texts(docs: Iterable[Doc], chunking: ChunkingSettings) -> list[str]:
    return [t for d in docs for t in chunk_text(d.text, chunking)]


def distinct_hashes(docs: Iterable[Doc], chunking: ChunkingSettings) -> set[str]:
    return {content_hash(t) for t in chunk_texts(docs, chunking)}


def expected_chunks(docs: Iterable[Doc], chunking: ChunkingSettings) -> dict[str, ExpectedChunk]:
    return {
        (cid := chunk_id(d.doc_id, i)): ExpectedChunk(cid, content_hash(t))
        for d in docs
        for i, t in enumerate(chunk_text(d.text, chunking))
    }


# --- one lockstep installation ------------------------------------------------------------------


def server_settings(work: Path, opensearch_url: str, milvus_uri: str) -> SettingsFactory:
    """Settings of an installation on the servers; each name gets its own index, collection, ledger."""

    def make(name: str) -> Settings:
        return Settings(
            source=JsonlSourceSettings(path=str(work / name / "events.jsonl"), name="bench"),
            keyword=KeywordSettings(kind="opensearch", url=opensearch_url, index=f"bench-{name}"),
            vector=VectorSettings(uri=milvus_uri, collection=f"bench_{name}"),
            ledger=LedgerSettings(path=str(work / name / "ledger.db")),
            embedder=EmbedderSettings(kind="hashing"),
        )

    return make


def embedded_settings(work: Path, embedder_kind: str) -> SettingsFactory:
    """Settings of an installation on the embedded stores (Tantivy + a milvus-lite file)."""

    def make(name: str) -> Settings:
        base = work / name
        return Settings(
            source=JsonlSourceSettings(path=str(base / "events.jsonl"), name="bench"),
            keyword=KeywordSettings(kind="tantivy", path=str(base / "tantivy")),
            vector=VectorSettings(uri=str(base / "milvus.db")),
            ledger=LedgerSettings(path=str(base / "ledger.db")),
            embedder=EmbedderSettings.model_validate({"kind": embedder_kind}),
        )

    return make


def append_events(settings: Settings, events: Iterable[ChangeEvent]) -> None:
    """What the upstream producer does: append the events to the source's JSONL file."""
    assert isinstance(settings.source, JsonlSourceSettings)
    path = Path(settings.source.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as out:
        out.writelines(json.dumps(event_to_dict(e)) + "\n" for e in events)


def sync_round(settings: Settings, events: Sequence[ChangeEvent]) -> RoundResult:
    """Append ``events``, then time one ``lockstep sync``: build, consume to the end, close."""
    append_events(settings, events)
    started = time.perf_counter()
    with runtime(settings) as rt:
        source = build_source(settings, rt.ledger)
        sync_started = time.perf_counter()
        try:
            stats = run_sync(source, rt.engine, batch_events=settings.sync.batch_events)
        finally:
            source.close()
        sync_s = time.perf_counter() - sync_started
        embedded = rt.embedder.embed_calls
    wall_s = time.perf_counter() - started
    return RoundResult(len(events), wall_s, sync_s, stats.as_dict(), embedded)


def verify(settings: Settings, docs: dict[str, Doc], deleted: set[str]) -> list[Violation]:
    """I1-I4 of both indexes of an installation against the source's ``docs``."""
    expected = expected_chunks(docs.values(), settings.chunking.to_domain())
    with runtime(settings) as rt:
        return [
            *check_index("keyword", expected, deleted, list(rt.keyword.scan())),
            *check_index("vector", expected, deleted, list(rt.vector.scan())),
        ]


# --- the experiment ----------------------------------------------------------------------------


def compare(title: str, stores: str, make_settings: SettingsFactory, docs: int, seed: int) -> Comparison:
    """Initial load, incremental churn round, full rebuild of the final state; verify both."""
    chunking = make_settings("live").chunking.to_domain()
    corpus = make_docs(docs, seed)
    churn = make_churn(corpus, seed)
    live, fresh = make_settings("live"), make_settings("rebuild")
    _say(f"[{title}] initial load of {docs} documents")
    initial = sync_round(live, [upsert_event(d) for d in corpus.values()])
    _say(f"[{title}] churn round of {len(churn.events)} events")
    incremental = sync_round(live, churn.events)
    incremental_violations = verify(live, churn.final, churn.deleted)
    _say(f"[{title}] full rebuild of {len(churn.final)} documents")
    rebuild = sync_round(fresh, [upsert_event(d) for d in churn.final.values()])
    rebuild_violations = verify(fresh, churn.final, churn.deleted)
    before, after = (
        distinct_hashes(corpus.values(), chunking),
        distinct_hashes(churn.final.values(), chunking),
    )
    return Comparison(
        title, stores, docs,
        len(chunk_texts(corpus.values(), chunking)), len(chunk_texts(churn.final.values(), chunking)),
        churn, initial, incremental, rebuild,
        len(before), len(after - before), len(after),
        incremental_violations, rebuild_violations,
    )  # fmt: skip


def _say(message: str) -> None:
    print(f"-- {message}", file=sys.stderr, flush=True)


# --- the report ----------------------------------------------------------------------------------


def report(c: Comparison) -> str:
    """The comparison as Markdown: the setup, one row per round, the verdicts."""
    mix = ", ".join(f"{n} {kind}" for kind, n in c.churn.composition.items())
    speedup = c.rebuild.wall_s / c.incremental.wall_s
    lines = [
        f"### {c.title}",
        "",
        f"- stores: {c.stores}",
        f"- documents: {c.docs} (after churn: {len(c.churn.final)}); chunks: {c.chunks_initial} "
        f"(after churn: {c.chunks_final})",
        f"- churn round: {len(c.churn.events)} events: {mix}",
        "",
        "| round | events | chunks written | of which metadata-only | chunks deleted | chunks skipped "
        "| texts embedded | minimum | run_sync (s) | wall time (s) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        _row("initial load", c.initial, c.minimum_initial),
        _row("incremental churn round", c.incremental, c.minimum_incremental),
        _row("full rebuild (fresh index, collection, ledger, cache)", c.rebuild, c.minimum_rebuild),
        "",
        f"- incremental embed calls vs minimum: {c.incremental.embedded_texts} vs {c.minimum_incremental} "
        f"({_verdict(c.incremental.embedded_texts == c.minimum_incremental, 'exactly equal', 'NOT equal')})",
        f"- rebuild / incremental wall time: {c.rebuild.wall_s:.2f} s / {c.incremental.wall_s:.2f} s = "
        f"**{speedup:.1f}x** ({_verdict(speedup >= SPEEDUP_GOAL, f'goal >= {SPEEDUP_GOAL:.0f}x met', 'goal NOT met')})",
        f"- rebuild / incremental run_sync time only: {c.rebuild.sync_s:.2f} s / {c.incremental.sync_s:.2f} s = "
        f"{c.rebuild.sync_s / c.incremental.sync_s:.1f}x",
        f"- after the incremental round: {_check(c.incremental_violations)}",
        f"- after the full rebuild: {_check(c.rebuild_violations)}",
    ]
    return "\n".join(lines)


def _row(label: str, r: RoundResult, minimum: int) -> str:
    s = r.stats
    cells = [r.events, s["upserted_chunks"], s["rewritten_chunks"], s["deleted_chunks"], s["skipped_chunks"]]
    return (
        f"| {label} | "
        + " | ".join(map(str, cells))
        + f" | {r.embedded_texts} | {minimum} | {r.sync_s:.2f} | {r.wall_s:.2f} |"
    )


def _verdict(ok: bool, yes: str, no: str) -> str:
    return yes if ok else no


def _check(violations: list[Violation]) -> str:
    if not violations:
        return "both indexes equal the source (I1-I4 hold on every chunk)"
    shown = "; ".join(str(v) for v in violations[:VIOLATIONS_SHOWN_MAX])
    return f"**{len(violations)} violations**: {shown}"


def machine() -> str:
    """The machine and the versions the figures were measured with, as Markdown."""
    return "\n".join([
        f"- CPU: {_cpu_model()}, {os.cpu_count()} cores (nproc); RAM: {_ram_gib():.1f} GiB",
        f"- Python {platform.python_version()} on {platform.system()} {platform.machine()}",
        f"- Milvus server {RealMilvusServer.version} (PyPI `milvus`), osmem-server {OpenSearchApiServer.version()}",
        f"- pymilvus {version('pymilvus')}, milvus-lite {version('milvus-lite')}, tantivy {version('tantivy')}, "
        f"opensearch-py {version('opensearch-py')}, sentence-transformers {version('sentence-transformers')}, "
        f"torch {version('torch')}",
    ])  # fmt: skip


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _ram_gib() -> float:
    for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / (1024 * 1024)
    return 0.0


# --- entry point ---------------------------------------------------------------------------------


def run_servers_part(work: Path, docs: int, seed: int) -> Comparison:
    """Part 1: hashing embedder on the OpenSearch-API server and Milvus 2.3.5, started here."""
    _say("starting the OpenSearch-API server and Milvus 2.3.5")
    (work / "milvus").mkdir(parents=True)
    with (
        OpenSearchApiServer(log_path=work / "osmem.log") as search,
        RealMilvusServer(work / "milvus") as milvus,
    ):
        stores = f"OpenSearch-API server at {search.url} + Milvus 2.3.5 at {milvus.uri}, SQLite ledger"
        return compare(
            "hashing embedder, servers", stores, server_settings(work, search.url, milvus.uri), docs, seed
        )


def run_model_part(work: Path, docs: int, seed: int) -> Comparison:
    """Part 2: the local model (all-MiniLM-L6-v2) on the embedded stores."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    stores = "Tantivy + milvus-lite file (embedded), SQLite ledger"
    make = embedded_settings(work, "sentence-transformers")
    return compare("local model (sentence-transformers all-MiniLM-L6-v2), embedded", stores, make, docs, seed)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.incremental", description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=DEFAULT_DOCS, help="documents in the servers part")
    parser.add_argument("--model-docs", type=int, default=DEFAULT_MODEL_DOCS,
                        help="documents in the local-model part (0 skips it)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="corpus and churn seed")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run both parts; print the Markdown report; exit 1 if an index disagrees with the source."""
    args = parse_args(argv)
    # Per-batch debug lines would interleave with the report; warnings still show.
    configure_logging("warning")
    results: list[Comparison] = []
    with tempfile.TemporaryDirectory(prefix="lockstep-bench-") as tmp:
        work = Path(tmp)
        results.append(run_servers_part(work / "servers", args.docs, args.seed))
        print(f"## Incremental sync vs full rebuild (seed {args.seed})\n\n{machine()}\n", flush=True)
        print(report(results[0]) + "\n", flush=True)
        if args.model_docs > 0:
            results.append(run_model_part(work / "model", args.model_docs, args.seed))
            print(report(results[1]) + "\n", flush=True)
    consistent = all(not (c.incremental_violations or c.rebuild_violations) for c in results)
    return 0 if consistent else 1


if __name__ == "__main__":
    sys.exit(main())
