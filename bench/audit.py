"""Full audit of 200,000 chunks in both real servers, against a bare scan of the slower store.

    python -m bench.audit [--chunks 200000] [--drift 0.001] [--seed 7]

Starts its own OpenSearch-API server and Milvus 2.3.5 server (``chaos.servers``). *Setup*, not
measured: documents of ``CHUNKS_PER_DOC`` chunks are written straight through the adapters
(keyword ``upsert``, vector ``upsert`` with seeded random unit vectors) and recorded in the
SQLite ledger through its own two-phase protocol (prepare, mark both sides, commit), which is
what a sync would leave behind, minus the embedding. Then, measured:

1. a bare scan of each store (``scan(with_text=True)``, the same read the audit does, in this
   process) — the slower one is the yardstick;
2. ``lockstep audit --json`` as a subprocess on the clean system: wall time, and its peak RSS
   from ``os.wait4`` (the child's own rusage);
3. the same after drifting ``--drift`` of the chunks behind lockstep's back (half deleted from
   Milvus, half with their keyword text edited at the same version), checking the audit finds
   exactly those.

Results replace the block between the markers of docs/benchmarks.md's "Audit" section.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from adapters.keyword.opensearch import OpenSearchKeywordIndex
from adapters.keyword.settings import KeywordSettings
from adapters.ledger.sqlite import SqliteLedger
from adapters.vector.settings import VectorSettings
from bench.results_doc import write_results
from chaos.servers import OpenSearchApiServer, RealMilvusServer
from coordinator.chunking import chunk_id, content_hash
from coordinator.model import ChunkDelete, ChunkState, DocState, IndexedChunk
from coordinator.ports import ChunkIndex, Intent
from lockstep.bootstrap import build_vector
from lockstep.logging import configure_logging

DEFAULT_CHUNKS = 200_000
DEFAULT_DRIFT = 0.001
DEFAULT_SEED = 7
CHUNKS_PER_DOC = 4
# About the size of a real help-center chunk; texts dominate what a scan transfers.
CHUNK_CHARS = 400
# Vector dimension of the setup: the audit never reads vectors, so a small one loads faster.
DIM = 64
# Documents per setup write (4,000 chunks: four keyword bulks and four Milvus upserts).
LOAD_BATCH_DOCS = 1000
AUDIT_TIMEOUT_S = 1800
SPEED_GOAL = 0.5
RSS_GOAL_MB = 300
WORDS = ("refund", "invoice", "shipping", "parcel", "account", "password", "order", "return", "tax", "card")
RESULTS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
SECTION = "## Audit (`bench/audit.py`)"
BEGIN = "<!-- bench.audit results: begin (rewritten by `python -m bench.audit`) -->"
END = "<!-- bench.audit results: end -->"


def _text(rng: random.Random, doc: int, index: int) -> str:
    words = [rng.choice(WORDS) for _ in range(CHUNK_CHARS // 7)]
    return f"doc {doc} chunk {index}: " + " ".join(words)[:CHUNK_CHARS]


def _vector(rng: random.Random) -> list[float]:
    return [rng.uniform(0.01, 1.0) for _ in range(DIM)]


def _doc_chunks(rng: random.Random, doc: int) -> list[IndexedChunk]:
    doc_id = f"doc-{doc:07d}"
    return [
        IndexedChunk(chunk_id(doc_id, i), doc_id, i, t, content_hash(t), 1, {"n": doc})
        for i, t in ((i, _text(rng, doc, i)) for i in range(CHUNKS_PER_DOC))
    ]


def _load(docs: int, keyword: ChunkIndex, vector: ChunkIndex, ledger: SqliteLedger, seed: int) -> float:
    """Setup: write every chunk to both stores and commit the matching ledger states."""
    rng = random.Random(seed)
    started = time.monotonic()
    for first in range(0, docs, LOAD_BATCH_DOCS):
        per_doc = [_doc_chunks(rng, d) for d in range(first, min(first + LOAD_BATCH_DOCS, docs))]
        chunks = [c for doc in per_doc for c in doc]
        keyword.upsert(chunks)
        vector.upsert([replace(c, vector=_vector(rng)) for c in chunks])
        intents = [_intent(doc) for doc in per_doc]
        ledger.prepare(intents)
        keys = [(i.doc_id, i.version) for i in intents]
        for side in ("keyword", "vector"):
            ledger.mark_done(side, keys)
        ledger.commit(keys, frozenset({"keyword", "vector"}))
        print(f"  loaded {first + len(per_doc):>7} docs", file=sys.stderr, end="\r")
    return time.monotonic() - started


def _intent(chunks: list[IndexedChunk]) -> Intent:
    states = tuple(ChunkState(c.chunk_id, c.chunk_index, c.content_hash, c.version) for c in chunks)
    after = DocState(chunks[0].doc_id, 1, False, states, "meta", f"source-{chunks[0].doc_id}")
    # The texts stay out of the setup's intents: only the committed state matters here.
    return Intent(after.doc_id, 1, (), (), after)


def _timed(call: Callable[[], Any]) -> tuple[float, Any]:
    started = time.monotonic()
    result = call()
    return time.monotonic() - started, result


def _bare_scan(index: ChunkIndex) -> int:
    return sum(1 for _ in index.scan(with_text=True))


# Runs the real CLI and, at exit, records the process's own peak RSS (VmHWM). ``ru_maxrss`` of a
# child cannot be used: Linux carries the parent's high-water mark over fork + exec, so it would
# report this (large) benchmark process instead of the audit.
_AUDIT_WRAPPER = """
import atexit, runpy, sys
PEAK_PATH = sys.argv[1]
def _peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            open(PEAK_PATH, "w").write(line.split()[1])
atexit.register(_peak)
sys.argv = ["lockstep.audit_cli", *sys.argv[2:]]
runpy.run_module("lockstep.audit_cli", run_name="__main__")
"""


def _audit_subprocess(config: Path) -> tuple[float, float, dict[str, Any]]:
    """(wall s, peak RSS MB, report) of ``lockstep audit --json`` run as its own process."""
    out, peak = config.parent / "audit.json", config.parent / "peak-kb"
    args = [str(peak), "audit", "-c", str(config), "--json"]
    started = time.monotonic()
    with out.open("w") as stdout:
        done = subprocess.run(
            [sys.executable, "-c", _AUDIT_WRAPPER, *args],
            stdout=stdout,
            stdin=subprocess.DEVNULL,
            timeout=AUDIT_TIMEOUT_S,
            check=False,
        )
    wall_s = time.monotonic() - started
    if done.returncode not in (0, 1):
        raise RuntimeError(f"audit exited {done.returncode}")
    return wall_s, int(peak.read_text()) / 1024, json.loads(out.read_text())


def _drift(docs: int, fraction: float, keyword: ChunkIndex, vector: ChunkIndex, seed: int) -> int:
    """Delete half the drifted chunks from Milvus and edit the other half's keyword text."""
    rng = random.Random(seed + 1)
    total = max(2, round(docs * CHUNKS_PER_DOC * fraction))
    picked = rng.sample(range(docs * CHUNKS_PER_DOC), total)
    ids = [chunk_id(f"doc-{p // CHUNKS_PER_DOC:07d}", p % CHUNKS_PER_DOC) for p in picked]
    vector.delete([ChunkDelete(cid, 2) for cid in ids[: total // 2]])
    held = keyword.get(ids[total // 2 :])
    keyword.upsert(
        [
            IndexedChunk(
                c.chunk_id,
                c.doc_id,
                c.chunk_index,
                "edited behind lockstep's back",
                c.content_hash,
                c.version,
                c.metadata or {},
                overwrite_equal=True,
            )
            for c in held.values()
        ]
    )
    return total


def _config(work: Path, os_url: str, milvus_uri: str) -> Path:
    config = {
        "keyword": {"kind": "opensearch", "url": os_url, "index": "bench-audit"},
        "vector": {"uri": milvus_uri, "collection": "bench_audit", "request_timeout_s": 120},
        "ledger": {"path": str(work / "ledger.db")},
        "embedder": {"kind": "hashing", "dim": DIM},
    }
    path = work / "lockstep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(chunks: int, drift: float, seed: int) -> dict[str, Any]:
    docs = chunks // CHUNKS_PER_DOC
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
        work = Path(tmp)
        (work / "milvus").mkdir()
        with (
            OpenSearchApiServer(log_path=work / "os.log") as search,
            RealMilvusServer(work / "milvus") as milvus,
        ):
            config = _config(work, search.url, milvus.uri)
            keyword = OpenSearchKeywordIndex(
                KeywordSettings(kind="opensearch", url=search.url, index="bench-audit")
            )
            vector = build_vector(
                VectorSettings(uri=milvus.uri, collection="bench_audit", request_timeout_s=120), dim=DIM
            )
            ledger = SqliteLedger(work / "ledger.db")
            keyword.ensure()
            vector.ensure()
            load_s = _load(docs, keyword, vector, ledger, seed)
            ledger.close()
            kw_s, kw_n = _timed(lambda: _bare_scan(keyword))
            vec_s, vec_n = _timed(lambda: _bare_scan(vector))
            clean_s, clean_rss, clean = _audit_subprocess(config)
            drifted = _drift(docs, drift, keyword, vector, seed)
            drift_s, drift_rss, dirty = _audit_subprocess(config)
            keyword.close()
            vector.close()
    slower_s = max(kw_s, vec_s)
    return {
        "chunks": docs * CHUNKS_PER_DOC,
        "load_s": round(load_s, 1),
        "keyword_scan_s": round(kw_s, 2),
        "keyword_scanned": kw_n,
        "vector_scan_s": round(vec_s, 2),
        "vector_scanned": vec_n,
        "audit_clean_s": round(clean_s, 2),
        "audit_clean_report_s": clean["elapsed_s"],
        "audit_clean_ok": clean["clean"],
        "speed_vs_slower_scan": round(slower_s / clean_s, 2),
        "peak_rss_mb": round(max(clean_rss, drift_rss), 1),
        "drifted_chunks": drifted,
        "audit_drift_s": round(drift_s, 2),
        "drift_found": {
            "keyword_stale": dirty["counts"]["keyword"]["stale"],
            "vector_missing": dirty["counts"]["vector"]["missing"],
            "cross_index": dirty["counts"]["cross_index"],
        },
        "divergent_buckets": dirty["buckets"]["divergent"],
    }


def _markdown(r: dict[str, Any]) -> str:
    speed_ok = "met" if r["speed_vs_slower_scan"] >= SPEED_GOAL else "NOT met"
    rss_ok = "met" if r["peak_rss_mb"] <= RSS_GOAL_MB else "NOT met"
    return f"""{r["chunks"]:,} chunks ({CHUNKS_PER_DOC} per document, ~{CHUNK_CHARS} characters each) in the
OpenSearch-API server and the Milvus 2.3.5 server, ledger on SQLite; {platform.machine()}, {os.cpu_count()} CPUs,
Python {platform.python_version()}, {time.strftime("%Y-%m-%d")}. Setup (bulk writes straight through the adapters
and the ledger's prepare/mark/commit, not measured): {r["load_s"]} s.

| measurement | value |
|---|---|
| bare scan, keyword (OpenSearch-API, texts included) | {r["keyword_scan_s"]} s ({r["keyword_scanned"]:,} chunks) |
| bare scan, vector (Milvus 2.3.5, texts included) | {r["vector_scan_s"]} s ({r["vector_scanned"]:,} chunks) |
| full audit, clean system (`lockstep audit --json`, whole process) | {r["audit_clean_s"]} s (report: {r["audit_clean_report_s"]} s), clean: {r["audit_clean_ok"]} |
| speed vs a bare scan of the slower store (goal ≥ {SPEED_GOAL}) | {r["speed_vs_slower_scan"]} ({speed_ok}) |
| peak RSS of the audit process (goal ≤ {RSS_GOAL_MB} MB) | {r["peak_rss_mb"]} MB ({rss_ok}) |
| full audit with {r["drifted_chunks"]} drifted chunks (0.1 %) | {r["audit_drift_s"]} s, {r["divergent_buckets"]} divergent buckets of 4,096 |
| drift found | {r["drift_found"]} |"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=DEFAULT_CHUNKS)
    parser.add_argument("--drift", type=float, default=DEFAULT_DRIFT)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--no-write", action="store_true", help="Do not rewrite docs/benchmarks.md.")
    args = parser.parse_args()
    configure_logging("warning")
    result = run(args.chunks, args.drift, args.seed)
    print(json.dumps(result, indent=2))
    if not args.no_write:
        command = "python -m bench.audit " + " ".join(sys.argv[1:])
        write_results(RESULTS, command.strip(), _markdown(result), section=SECTION, begin=BEGIN, end=END)


if __name__ == "__main__":
    main()
