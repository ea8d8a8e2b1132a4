"""Search quality and speed: fenced hybrid search against the raw two-engine queries.

    python -m bench.search [--docs 600] [--combos 60] [--rounds 3] [--seed 7] [--pairs embedded,servers]

*Corpus, labeled.* The help-center generator (``lockstep/corpus.py``) titles each document "How
to <verb> your <thing>"; a query names a (verb, thing) pair and its relevant documents are those
whose title has both, so every query's answer is known. Each pair is asked twice: *lexical*
("how to reset password") and *paraphrased* with other words for both ("restore login secret"),
which BM25 cannot match and a sentence model can. No public IR collection ships inside a package
reachable here (BEIR and ir_datasets download their data), so the generated set is the only one.

*Quality*: recall@10 and nDCG@10 (binary relevance, per document: ``per_doc``) of the keyword,
vector (the local model, all-MiniLM-L6-v2) and hybrid modes of lockstep's fenced search.

*Speed*, side by side in one run, on the same queries, alternating query by query: the fenced
hybrid search (both legs in parallel, one ledger read, the fence, RRF) against the *raw* path:
the same two engine calls through the same clients, in parallel, fused client-side with the same
RRF, no ledger. Query vectors are cached for both (a warm-up pass embeds each query once). One
client, sequential: p50, p99 and queries per second. On the embedded default (Tantivy + a
milvus-lite file + SQLite) and on the servers (the OpenSearch-API server + Milvus 2.3.5 of the
benchmark's own, SQLite ledger). Results go to docs/benchmarks.md ("Search").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.results_doc import write_results
from coordinator.chunking import content_hash
from coordinator.events import ChangeEvent, Op
from coordinator.fusion import rrf
from coordinator.search import KEYWORD, VECTOR, Mode, SearchRequest, SearchService
from lockstep.api import Lockstep
from lockstep.corpus import Doc, make_corpus
from lockstep.logging import configure_logging
from lockstep.runtime import open_search
from lockstep.settings import load_settings

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
SECTION = "## Search (`bench/search.py`)"
BEGIN, END = "<!-- bench.search results begin -->", "<!-- bench.search results end -->"
K = 10
# Chunks as the default config cuts them: a document's title and first paragraph share chunk 0.
CHUNK_CHARS = 1000
# Goals of the issue: fenced p50 within 1.15x of raw, p99 within 1.3x.
P50_GOAL, P99_GOAL = 1.15, 1.3

# Other words for every verb and thing of the generator: a paraphrased query shares none of a
# relevant title's words (stop words aside).
VERB_WORDS = {
    "reset": "restore", "update": "modify", "cancel": "stop", "download": "save a copy of",
    "verify": "confirm", "change": "alter", "enable": "switch on", "remove": "get rid of",
    "request": "ask for", "review": "look over",
}
THING_WORDS = {
    "invoice": "bill", "refund": "money back", "credit card": "bank card", "subscription": "plan renewal",
    "VAT receipt": "tax slip", "payment method": "way to pay", "password": "login secret",
    "two-factor login": "2FA sign-in", "email address": "mail account", "profile": "personal page",
    "username": "handle", "session": "signed-in period", "parcel": "package", "tracking number": "shipment code",
    "courier": "delivery driver", "delivery window": "arrival slot", "customs form": "border paperwork",
    "address label": "shipping sticker", "return label": "send-back sticker", "exchange": "swap",
    "damaged item": "broken product", "refund window": "money back period", "warranty": "guarantee",
    "restocking fee": "return charge", "webhook": "HTTP callback", "API token": "access key",
    "Slack app": "chat integration", "calendar sync": "schedule syncing", "SSO": "single sign-on",
    "CSV export": "spreadsheet download", "data deletion": "erasing records", "audit log": "activity history",
    "encryption": "scrambling of data", "access role": "permission level", "IP allowlist": "trusted address list",
    "privacy request": "personal data inquiry",
}


# The generator's titles: "How to <verb> your <thing> (<index>)".
_TITLE = re.compile(r"How to (?P<verb>\w+) your (?P<thing>.+) \(\d+\)")


@dataclass(frozen=True)
class Query:
    text: str
    style: str
    relevant: frozenset[str]


def labeled_corpus(docs: int, combos: int, seed: int) -> tuple[list[Doc], list[Query]]:
    """Documents and queries whose relevant documents are known (see the module docstring)."""
    corpus = make_corpus(docs, seed=seed)
    by_pair: dict[tuple[str, str], set[str]] = {}
    for doc in corpus:
        title = _TITLE.fullmatch(doc.metadata["title"])
        assert title is not None, doc.metadata["title"]
        by_pair.setdefault((title["verb"], title["thing"]), set()).add(doc.doc_id)
    chosen = random.Random(seed).sample(sorted(by_pair), min(combos, len(by_pair)))
    queries = []
    for verb, thing in chosen:
        relevant = frozenset(by_pair[(verb, thing)])
        queries.append(Query(f"how to {verb} {thing}", "lexical", relevant))
        queries.append(Query(f"{VERB_WORDS[verb]} {THING_WORDS[thing]}", "paraphrased", relevant))
    return corpus, queries


# --- metrics ---------------------------------------------------------------------------------------


def recall_at(ranked: Sequence[str], relevant: frozenset[str], k: int = K) -> float:
    return len(set(ranked[:k]) & relevant) / len(relevant)


def ndcg_at(ranked: Sequence[str], relevant: frozenset[str], k: int = K) -> float:
    dcg = sum(1 / math.log2(i + 2) for i, d in enumerate(ranked[:k]) if d in relevant)
    ideal = sum(1 / math.log2(i + 2) for i in range(min(k, len(relevant))))
    return dcg / ideal


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


# --- the two engine pairs --------------------------------------------------------------------------


@contextmanager
def engine_pair(name: str, workdir: Path) -> Iterator[dict[str, Any]]:
    """The keyword and vector sections of one pair (servers started here, stopped after)."""
    if name == "embedded":
        yield {"keyword": {"path": str(workdir / "tantivy")}, "vector": {"uri": str(workdir / "milvus.db")}}
        return
    from chaos.servers import OpenSearchApiServer, RealMilvusServer

    keyword = OpenSearchApiServer(log_path=workdir / "osmem.log")
    keyword.start()
    (workdir / "milvus").mkdir()
    milvus = RealMilvusServer(workdir / "milvus")
    try:
        milvus.start()
        yield {"keyword": {"kind": "opensearch", "url": keyword.url, "index": "bench-search"},
               "vector": {"uri": milvus.uri, "collection": "bench_search"}}
    finally:
        milvus.stop()
        keyword.stop()


def write_config(workdir: Path, stores: dict[str, Any], embedder: str) -> Path:
    config = {**stores, "ledger": {"path": str(workdir / "ledger.db")}, "embedder": {"kind": embedder},
              "chunking": {"max_chars": CHUNK_CHARS}}
    path = workdir / "lockstep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def seed_embeddings(ledger: Path, donor: Path | None) -> None:
    """Copy another pair's embedding cache, so that the same texts are not embedded twice."""
    if donor is None:
        return
    from adapters.ledger.sqlite import SqliteLedger

    SqliteLedger(ledger).close()
    with sqlite3.connect(ledger) as db:
        db.execute("ATTACH DATABASE ? AS donor", (str(donor),))
        db.execute("INSERT OR IGNORE INTO embeddings SELECT * FROM donor.embeddings")
        db.commit()


def load(config: Path, corpus: list[Doc]) -> float:
    """Write the corpus through lockstep; returns the seconds it took (setup, not measured)."""
    started = time.monotonic()
    with Lockstep.open(config) as ls:
        receipt = ls.write(ChangeEvent(Op.UPSERT, d.doc_id, d.version, d.text, d.metadata) for d in corpus)
    assert receipt.applied_events == len(corpus), receipt
    return time.monotonic() - started


# --- quality ----------------------------------------------------------------------------------------


def quality(service: SearchService, queries: list[Query]) -> dict[str, dict[str, float]]:
    """recall@10 and nDCG@10 per mode and query style (all, lexical, paraphrased)."""
    out: dict[str, dict[str, float]] = {}
    for mode in (Mode.KEYWORD, Mode.VECTOR, Mode.HYBRID):
        scores: dict[str, list[tuple[float, float]]] = {"all": [], "lexical": [], "paraphrased": []}
        for query in queries:
            result = service.search(SearchRequest(query.text, k=K, mode=mode, per_doc=True))
            ranked = [d.doc_id for d in result.docs]
            pair = (recall_at(ranked, query.relevant), ndcg_at(ranked, query.relevant))
            scores["all"].append(pair)
            scores[query.style].append(pair)
        for style, pairs in scores.items():
            out[f"{mode.value}/{style}"] = {
                "recall@10": round(statistics.fmean(p[0] for p in pairs), 4),
                "ndcg@10": round(statistics.fmean(p[1] for p in pairs), 4),
            }
    return out


# --- speed ------------------------------------------------------------------------------------------


def raw_hybrid(service: SearchService, pool: ThreadPoolExecutor) -> Callable[[str], list[str]]:
    """The raw path: both engines' queries through the same clients, in parallel, fused by RRF."""
    window = service.params.window

    def search(query: str) -> list[str]:
        digest = content_hash(query)

        def vector_leg() -> list[str]:
            vector = service.embedder.embed_hashed([(digest, query)])[digest]
            return [h.chunk_id for h in service.vector.search_hits(vector, window)]

        keyword = pool.submit(lambda: [h.chunk_id for h in service.keyword.search_hits(query, window)])
        vector = pool.submit(vector_leg)
        legs = {KEYWORD: keyword.result(), VECTOR: vector.result()}
        return [f.chunk_id for f in rrf(legs, k=service.params.rrf_k, weights=service.params.weights)[:K]]

    return search


def speed(service: SearchService, queries: list[Query], rounds: int) -> dict[str, Any]:
    """Fenced and raw latencies, measured query by query in alternation, ``rounds`` times over."""
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="bench-raw")
    raw = raw_hybrid(service, pool)
    fenced_hits = 0
    for query in queries:  # warm-up: every query vector cached, every client connected
        service.search(SearchRequest(query.text, k=K))
        raw(query.text)
    timings: dict[str, list[float]] = {"fenced": [], "raw": []}
    for round_no in range(rounds):
        for i, query in enumerate(queries):
            order = ("fenced", "raw") if (i + round_no) % 2 == 0 else ("raw", "fenced")
            for path in order:
                started = time.perf_counter()
                if path == "fenced":
                    fenced_hits += sum(service.search(SearchRequest(query.text, k=K)).fenced.values())
                else:
                    raw(query.text)
                timings[path].append(time.perf_counter() - started)
    pool.shutdown()
    stats: dict[str, Any] = {path: _latency(values) for path, values in timings.items()}
    stats["ratio_p50"] = round(stats["fenced"]["p50_ms"] / stats["raw"]["p50_ms"], 3)
    stats["ratio_p99"] = round(stats["fenced"]["p99_ms"] / stats["raw"]["p99_ms"], 3)
    stats["fenced_out_hits"] = fenced_hits
    return stats


def _latency(values: list[float]) -> dict[str, float]:
    return {
        "searches": len(values),
        "p50_ms": round(percentile(values, 0.5) * 1000, 2),
        "p99_ms": round(percentile(values, 0.99) * 1000, 2),
        "mean_ms": round(statistics.fmean(values) * 1000, 2),
        "qps": round(len(values) / sum(values), 1),
    }


# --- the run ----------------------------------------------------------------------------------------


def run(pairs: list[str], docs: int, combos: int, rounds: int, seed: int, embedder: str) -> dict[str, Any]:
    corpus, queries = labeled_corpus(docs, combos, seed)
    result: dict[str, Any] = {
        "machine": _machine(), "docs": len(corpus), "queries": len(queries), "rounds": rounds, "seed": seed,
        "relevant_per_query": round(statistics.fmean(len(q.relevant) for q in queries), 2), "pairs": {},
    }
    donor: Path | None = None
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        for name in pairs:
            workdir = Path(tmp) / name
            workdir.mkdir()
            with engine_pair(name, workdir) as stores:
                config = write_config(workdir, stores, embedder)
                seed_embeddings(workdir / "ledger.db", donor)
                load_s = load(config, corpus)
                runtime = open_search(load_settings(config))
                try:
                    result["pairs"][name] = {
                        "load_s": round(load_s, 1),
                        "model": runtime.service.embedder.model_id,
                        "quality": quality(runtime.service, queries),
                        "speed": speed(runtime.service, queries, rounds),
                    }
                finally:
                    runtime.close()
            donor = donor or workdir / "ledger.db"
    result["machine"]["loadavg_end"] = os.getloadavg()
    return result


def _machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg()}


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"Machine: {m['platform']}, {m['cpus']} CPUs, Python {m['python']}; load average "
        f"{', '.join(f'{x:.1f}' for x in m['loadavg_start'])} at the start and "
        f"{', '.join(f'{x:.1f}' for x in m['loadavg_end'])} at the end (the machine is shared with other work).",
        f"{r['docs']} documents, {r['queries']} queries (half lexical, half paraphrased), "
        f"{r['relevant_per_query']} relevant documents per query on average, seed {r['seed']}.",
        "",
    ]
    for name, p in r["pairs"].items():
        lines += [f"### {name} ({p['model']}; corpus written in {p['load_s']} s, not measured)", "",
                  "| mode | recall@10 | nDCG@10 | lexical recall / nDCG | paraphrased recall / nDCG |",
                  "|---|---|---|---|---|"]
        q = p["quality"]
        for mode in ("keyword", "vector", "hybrid"):
            lines.append(
                f"| {mode} | {q[f'{mode}/all']['recall@10']} | {q[f'{mode}/all']['ndcg@10']} | "
                f"{q[f'{mode}/lexical']['recall@10']} / {q[f'{mode}/lexical']['ndcg@10']} | "
                f"{q[f'{mode}/paraphrased']['recall@10']} / {q[f'{mode}/paraphrased']['ndcg@10']} |"
            )
        s = p["speed"]
        lines += ["", "| path | searches | p50 | p99 | mean | queries/s (one client) |", "|---|---|---|---|---|---|"]
        for path in ("fenced", "raw"):
            t = s[path]
            lines.append(f"| {path} | {t['searches']} | {t['p50_ms']} ms | {t['p99_ms']} ms | {t['mean_ms']} ms | {t['qps']} |")
        p50_ok = "met" if s["ratio_p50"] <= P50_GOAL else "not met"
        p99_ok = "met" if s["ratio_p99"] <= P99_GOAL else "not met"
        lines += ["", f"fenced / raw: p50 {s['ratio_p50']}x (goal ≤ {P50_GOAL}x, {p50_ok}), "
                      f"p99 {s['ratio_p99']}x (goal ≤ {P99_GOAL}x, {p99_ok}); hits fenced out: {s['fenced_out_hits']}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=600)
    parser.add_argument("--combos", type=int, default=60, help="(verb, thing) pairs asked, twice each.")
    parser.add_argument("--rounds", type=int, default=3, help="Timed passes over the queries.")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--pairs", default="embedded,servers")
    parser.add_argument("--embedder", default="sentence-transformers")
    parser.add_argument("--no-write", action="store_true", help="Do not write docs/benchmarks.md.")
    args = parser.parse_args()
    configure_logging("warning")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run(args.pairs.split(","), args.docs, args.combos, args.rounds, args.seed, args.embedder)
    print(json.dumps(result, indent=2))
    if not args.no_write:
        command = "python -m bench.search " + " ".join(
            f"--{k} {v}" for k, v in (("docs", args.docs), ("combos", args.combos), ("rounds", args.rounds),
                                      ("seed", args.seed), ("pairs", args.pairs)))
        write_results(RESULTS, command, markdown(result), section=SECTION, begin=BEGIN, end=END)


if __name__ == "__main__":
    main()

