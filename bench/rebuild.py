"""A live blue-green rebuild against a cold bulk load of the same data, side by side in one run.

    python -m bench.rebuild [--docs 10000] [--live-share 0.2] [--seed 7]

Starts its own OpenSearch-API server and Milvus 2.3.5 server (``chaos/servers.py``) and, with
``--docs`` documents of two chunks each, measures:

1. *Cold bulk load*: ``lockstep sync`` of every document into empty stores with the *target*
   embedder (the work a rebuild must do, done the plain way).
2. *Live rebuild*: a second installation is loaded with the old embedder by
   ``lockstep run --exit-when-idle`` — the path live writes take; its rate (Ray start-up
   included) is the max throughput the live share applies to — and then runs ``lockstep run``;
   edits are appended to its source at ``--live-share`` of that rate while
   ``lockstep rebuild --embedder <target>`` builds generation 2, validates it and swaps.
   Reported: the rebuild's wall time against the cold load's, and the freshness lag of the live
   edits (append → committed in every live generation's ledger) before and during the rebuild.
3. The new generation is checked against the final source state (invariants I1-I4).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from bench.incremental import machine
from bench.results_doc import write_results
from chaos.servers import OpenSearchApiServer, RealMilvusServer, free_port
from coordinator.chunking import ChunkingSettings, chunk_id, chunk_text, content_hash
from coordinator.invariants import ExpectedChunk, Violation, check_index
from lockstep.corpus import Doc, make_doc
from lockstep.settings import load_settings

DEFAULT_DOCS = 10_000
DEFAULT_LIVE_SHARE = 0.2
DEFAULT_SEED = 7
OLD_DIM, NEW_DIM = 384, 256
PARA_CHARS = 800
# Documents per load request on every path (sync, run, the rebuild's backfill): 2,500 chunk rows
# per _bulk. The OpenSearch-API server (osmem-server 0.1.6) overwrites documents that reached it
# in requests of 1,000 rows or fewer at ~0.5 s per document (20 random overwrites: ~10 s on an
# index loaded in 400- or 1,000-row requests, 0.01-0.04 s on one loaded in 2,500-row requests),
# and every live edit is an overwrite; real OpenSearch has no such cliff.
LOAD_BATCH_DOCS = 1250
# Edits appended before the rebuild starts, to measure the freshness lag without it.
BASELINE_S = 15.0
APPEND_TICK_S = 0.05
LEDGER_POLL_S = 0.05
READY_TIMEOUT_S = 180.0
CATCH_UP_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 60.0
CLI_TIMEOUT_S = 3600.0
DOCS_SECTION = "## Blue-green rebuild (`bench/rebuild.py`)"
RESULTS_BEGIN = "<!-- bench.rebuild results: begin (rewritten by `python -m bench.rebuild`) -->"
RESULTS_END = "<!-- bench.rebuild results: end -->"
LOCKSTEP = [sys.executable, "-m", "lockstep", "--log-level", "warning"]


def make_docs(n: int, seed: int) -> list[Doc]:
    rng = random.Random(seed)
    return [make_doc(rng, i, paragraphs=2, para_chars=PARA_CHARS) for i in range(n)]


def event_line(doc: Doc) -> str:
    return json.dumps({"op": "upsert", "doc_id": doc.doc_id, "version": doc.version, "text": doc.text,
                       "metadata": doc.metadata}) + "\n"


def edit(doc: Doc, version: int, rng: random.Random) -> Doc:
    """A new version of ``doc`` whose second paragraph changed (one chunk re-embedded)."""
    body = list(doc.paragraphs)
    body[-1] = f"{body[-1][: PARA_CHARS // 2]} Revised {version}: {rng.random():.6f}."
    return replace(doc, version=version, paragraphs=tuple(body))


@dataclass
class Install:
    base: Path
    name: str
    url: str
    uri: str
    dim: int
    port: int = field(default_factory=free_port)

    @property
    def config(self) -> Path:
        return self.base / "lockstep.yaml"

    @property
    def events(self) -> Path:
        return self.base / "events.jsonl"

    @property
    def ledger(self) -> Path:
        return self.base / "ledger.db"

    def write(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        config = {
            "source": {"kind": "jsonl", "path": str(self.events), "name": "bench"},
            "keyword": {"kind": "opensearch", "url": self.url, "index": f"rb-{self.name}"},
            "vector": {"uri": self.uri, "collection": f"rb_{self.name}"},
            "ledger": {"kind": "sqlite", "path": str(self.ledger)},
            "embedder": {"kind": "hashing", "dim": self.dim},
            "sync": {"batch_events": LOAD_BATCH_DOCS},
            "rebuild": {"batch_docs": LOAD_BATCH_DOCS},
            "run": {"shards": 2, "http_port": self.port, "audit_interval_s": 0, "batch_docs_max": LOAD_BATCH_DOCS},
        }
        self.config.write_text(yaml.safe_dump(config), encoding="utf-8")


def lockstep(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LOCKSTEP, *args], capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
                          check=False, stdin=subprocess.DEVNULL)


def timed_cli(*args: str, json_out: bool = True) -> tuple[float, dict[str, Any]]:
    """Run a lockstep command; its wall time and (``json_out``) the JSON it printed."""
    started = time.monotonic()
    result = lockstep(*args)
    seconds = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError(f"lockstep {' '.join(args)} failed:\n{result.stderr[-4000:]}")
    return seconds, json.loads(result.stdout) if json_out else {}


class LagLog:
    """Append time of each (doc, version) and when every live generation's ledger held it."""

    def __init__(self) -> None:
        self.appended: dict[tuple[str, int], float] = {}
        self.committed: dict[tuple[str, int], float] = {}
        self.lock = threading.Lock()

    def pending(self) -> list[tuple[str, int]]:
        with self.lock:
            return [k for k in self.appended if k not in self.committed]

    def lags_between(self, start: float, end: float) -> list[float]:
        with self.lock:
            return sorted(self.committed[k] - t for k, t in self.appended.items()
                          if k in self.committed and start <= t < end)


def poll_ledgers(inst: Install, log: LagLog, stop: threading.Event) -> None:
    """A version counts as committed once every ledger file that exists holds it (or newer)."""
    while not stop.wait(LEDGER_POLL_S):
        pending = log.pending()
        if not pending:
            continue
        ledgers = [p for p in (inst.ledger, inst.ledger.with_name("ledger.g2.db")) if p.exists()]
        versions: list[dict[str, int]] = []
        for path in ledgers:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
                ids = sorted({d for d, _ in pending})
                rows = db.execute(
                    f"SELECT doc_id, version FROM documents WHERE doc_id IN ({','.join('?' * len(ids))})", ids
                ).fetchall()
                versions.append(dict(rows))
        now = time.monotonic()
        with log.lock:
            for doc_id, version in pending:
                if all(v.get(doc_id, 0) >= version for v in versions):
                    log.committed[(doc_id, version)] = now


def append_paced(inst: Install, docs: list[Doc], rate_per_s: float, log: LagLog, stop: threading.Event,
                 rng: random.Random, latest: dict[str, Doc]) -> None:
    started = time.monotonic()
    written = 0
    with inst.events.open("a", encoding="utf-8") as out:
        while not stop.is_set():
            due = int((time.monotonic() - started) * rate_per_s) + 1
            batch = []
            for _ in range(due - written):
                doc = latest[rng.choice(docs).doc_id]
                new = edit(doc, doc.version + 1, rng)
                latest[new.doc_id] = new
                batch.append(new)
            out.writelines(event_line(d) for d in batch)
            out.flush()
            now = time.monotonic()
            with log.lock:
                log.appended.update(((d.doc_id, d.version), now) for d in batch)
            written = due
            time.sleep(APPEND_TICK_S)


def verify(inst: Install, latest: dict[str, Doc], generation: int) -> list[Violation]:
    from lockstep.runtime import runtime

    settings = load_settings(inst.config)
    with runtime(settings) as rt:
        parts = {p.generation.number: p for p in rt.generations}[generation]
        chunking: ChunkingSettings = parts.generation.chunking
        expected = {chunk_id(d.doc_id, i): ExpectedChunk(chunk_id(d.doc_id, i), content_hash(t))
                    for d in latest.values() for i, t in enumerate(chunk_text(d.text, chunking))}
        return [*check_index("keyword", expected, set(), list(parts.keyword.scan())),
                *check_index("vector", expected, set(), list(parts.vector.scan()))]


def percentile(values: Sequence[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


@dataclass
class Results:
    docs: int
    cold_s: float
    cold_rate: float
    service_rate: float
    live_rate: float
    rebuild_s: float
    rebuild_report: dict[str, Any]
    baseline_lags: list[float]
    rebuild_lags: list[float]
    edits: int
    violations: list[Violation]


def run(work: Path, docs_n: int, live_share: float, seed: int) -> Results:
    osmem = OpenSearchApiServer(log_path=work / "osmem.log")
    (work / "milvus").mkdir()
    milvus = RealMilvusServer(work / "milvus")
    osmem.start()
    milvus.start()
    try:
        docs = make_docs(docs_n, seed)
        cold = Install(work / "cold", "cold", osmem.url, milvus.uri, NEW_DIM)
        live = Install(work / "live", "live", osmem.url, milvus.uri, OLD_DIM)
        for inst in (cold, live):
            inst.write()
            inst.events.write_text("".join(event_line(d) for d in docs), encoding="utf-8")
        _say(f"cold bulk load of {docs_n} documents (hashing {NEW_DIM}-d)")
        cold_s, _ = timed_cli("sync", "-c", str(cold.config))
        cold_rate = docs_n / cold_s
        _say(f"cold load {cold_s:.1f} s = {cold_rate:.0f} docs/s; loading the live installation ({OLD_DIM}-d)")
        service_s, _ = timed_cli("run", "-c", str(live.config), "--exit-when-idle", json_out=False)
        service_rate = docs_n / service_s
        _say(f"the live service loaded it in {service_s:.1f} s = {service_rate:.0f} docs/s (its max throughput)")

        log, stop_append, stop_poll = LagLog(), threading.Event(), threading.Event()
        latest = {d.doc_id: d for d in docs}
        rng = random.Random(seed + 1)
        live_rate = live_share * service_rate
        with (live.base / "run.log").open("ab") as out:
            service = subprocess.Popen([*LOCKSTEP, "run", "-c", str(live.config)], stdin=subprocess.DEVNULL,
                                       stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_ready(live.port, service)
            poller = threading.Thread(target=poll_ledgers, args=(live, log, stop_poll), daemon=True)
            appender = threading.Thread(target=append_paced,
                                        args=(live, docs, live_rate, log, stop_append, rng, latest), daemon=True)
            poller.start()
            appender.start()
            base_from = time.monotonic()
            time.sleep(BASELINE_S)
            rebuild_from = time.monotonic()
            _say(f"rebuild to hashing {NEW_DIM}-d with live edits at {live_rate:.0f}/s")
            rebuild_s, report = timed_cli("rebuild", "-c", str(live.config), "--embedder", f"hashing:dim={NEW_DIM}")
            rebuild_to = time.monotonic()
            stop_append.set()
            appender.join()
            deadline = time.monotonic() + CATCH_UP_TIMEOUT_S
            while log.pending() and time.monotonic() < deadline:
                time.sleep(LEDGER_POLL_S)
            stop_poll.set()
            poller.join()
        finally:
            service.send_signal(signal.SIGTERM)
            try:
                service.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(service.pid, signal.SIGKILL)
                service.wait()
        violations = verify(live, latest, 2)
        return Results(docs_n, cold_s, cold_rate, service_rate, live_rate, rebuild_s, report,
                       log.lags_between(base_from, rebuild_from), log.lags_between(rebuild_from, rebuild_to),
                       len(log.appended), violations)
    finally:
        milvus.stop()
        osmem.stop()


def _wait_ready(port: int, service: subprocess.Popen[bytes]) -> None:
    import httpx

    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline and service.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the live service did not become ready")


def report(r: Results) -> str:
    ratio = r.rebuild_s / r.cold_s
    rr = r.rebuild_report
    lines = [
        f"Machine: {machine()}",
        "",
        "| measurement | value |",
        "|---|---|",
        f"| documents (2 chunks each) | {r.docs:,} |",
        f"| cold bulk load (`lockstep sync`, empty stores, hashing {NEW_DIM}-d) | {r.cold_s:.1f} s ({r.cold_rate:.0f} docs/s) |",
        f"| live rebuild (`lockstep rebuild --embedder hashing:dim={NEW_DIM}`: backfill + validate + swap) | {r.rebuild_s:.1f} s |",
        f"| rebuild time / cold load time | **{ratio:.2f}** |",
        f"| max throughput of the live path (`lockstep run --exit-when-idle` loading the old generation) | {r.service_rate:.0f} docs/s |",
        f"| live edits during the run (at {r.live_rate:.0f}/s = {r.live_rate / r.service_rate:.0%} of max) | {r.edits:,} |",
        f"| freshness lag before the rebuild, p50 / p99 | {percentile(r.baseline_lags, 0.5):.2f} s / {percentile(r.baseline_lags, 0.99):.2f} s ({len(r.baseline_lags)} edits) |",
        f"| freshness lag during the rebuild (both generations), p50 / p99 / max | {percentile(r.rebuild_lags, 0.5):.2f} s / {percentile(r.rebuild_lags, 0.99):.2f} s / {max(r.rebuild_lags, default=float('nan')):.2f} s ({len(r.rebuild_lags)} edits) |",
        f"| rebuild phases | backfill {rr['seconds'].get('backfill', 0):.1f} s, wait for the live service to write "
        f"generation 2 too {rr['seconds'].get('writers_switch', 0):.1f} s ({len(rr.get('live_writers', []))} live "
        f"writer(s)), validate {rr['seconds'].get('validate', 0):.1f} s |",
        f"| embed calls of the rebuild | {rr['embed_calls']:,} |",
        f"| validation audit rounds | {len(rr['audit_rounds'])} (last clean: {rr['audit_rounds'][-1]['clean'] if rr['audit_rounds'] else '-'}); "
        f"documents found per round: {_found_per_round(rr['audit_rounds'])} |",
        f"| generation 2 vs final source (I1-I4) | {'clean' if not r.violations else f'{len(r.violations)} violations'} |",
    ]
    return "\n".join(lines)


def write_docs(path: Path, command: str, markdown: str) -> None:
    write_results(path, command, markdown, section=DOCS_SECTION, begin=RESULTS_BEGIN, end=RESULTS_END)


def _say(message: str) -> None:
    print(f"-- {message}", file=sys.stderr, flush=True)


def _found_per_round(rounds: list[dict[str, Any]]) -> str:
    """Each audit round's drift, as the sum of the keyword index's findings (a document can be
    counted in several categories; the trend is what matters)."""
    return ", ".join(str(sum(r["counts"].get("keyword", {}).values())) for r in rounds) or "-"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=DEFAULT_DOCS)
    parser.add_argument("--live-share", type=float, default=DEFAULT_LIVE_SHARE)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--no-docs", action="store_true", help="Do not rewrite docs/benchmarks.md.")
    parser.add_argument("--work", type=Path, help="Keep every file here (default: a temporary directory).")
    args = parser.parse_args(argv)
    if args.work is not None:
        args.work.mkdir(parents=True)
        results = run(args.work, args.docs, args.live_share, args.seed)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-rebuild-") as tmp:
            results = run(Path(tmp), args.docs, args.live_share, args.seed)
    markdown = report(results)
    print(markdown)
    if not args.no_docs:
        command = "python -m bench.rebuild" + ("" if args.docs == DEFAULT_DOCS else f" --docs {args.docs}")
        write_docs(Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md", command, markdown)
    return 0 if not results.violations else 1


if __name__ == "__main__":
    raise SystemExit(main())
