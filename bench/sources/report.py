"""Everything measured, as the Markdown the benchmark prints and writes into docs/benchmarks.md."""

from __future__ import annotations

import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.incremental import machine
from bench.results_doc import write_results
from bench.sources.runs import SOURCES, SourceRun
from bench.streaming.service import Tuning
from bench.streaming.throughput import STEADY_FROM, STEADY_TO
from bench.streaming.workload import CHUNKS_PER_DOC, DIM, PARA_CHARS
from coordinator.invariants import Violation

# The goal: a source adapter may cost at most this fraction of JSONL's rate.
OVERHEAD_GOAL = 0.20
VIOLATIONS_SHOWN_MAX = 10
DOCS_SECTION = "## Change-stream sources (`bench/sources/`)"
RESULTS_BEGIN = "<!-- bench.sources results: begin (rewritten by `python -m bench.sources`) -->"
RESULTS_END = "<!-- bench.sources results: end -->"
# The checkout whose code the services run (the benchmark's own package is in it).
ROOT = Path(__file__).resolve().parents[2]
GIT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Results:
    events: int
    seed: int
    shards: int
    tuning: Tuning
    runs: list[SourceRun]
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]

    def of(self, source: str) -> list[SourceRun]:
        return [r for r in self.runs if r.source == source]

    def mean_per_s(self, source: str) -> float:
        return statistics.fmean(r.events_per_s for r in self.of(source))

    def mean_cpu_ms(self, source: str) -> float:
        return statistics.fmean(r.cpu_ms_per_event for r in self.of(source))

    def alone_cpu_ms(self, source: str) -> float:
        return statistics.fmean(r.alone.cpu_ms_per_event for r in self.of(source))

    def alone_per_s(self, source: str) -> float:
        return statistics.fmean(r.alone.per_s for r in self.of(source))

    def intake_cpu_ms(self, source: str) -> float:
        return statistics.fmean(r.alone.intake_cpu_ms_per_event for r in self.of(source))

    def spread(self, source: str) -> float:
        """How far apart a source's runs are, as a fraction of their mean (0 with one run)."""
        rates = [r.events_per_s for r in self.of(source)]
        return (max(rates) - min(rates)) / statistics.fmean(rates)

    def ratio(self, source: str) -> float:
        return self.mean_per_s(source) / self.mean_per_s("jsonl")

    def paired_ratios(self, source: str) -> list[float]:
        """The source's rate over JSONL's in the same round, round by round."""
        base = {r.round: r.events_per_s for r in self.of("jsonl")}
        return [r.events_per_s / base[r.round] for r in self.of(source)]

    @property
    def sources(self) -> list[str]:
        return list(dict.fromkeys(r.source for r in sorted(self.runs, key=lambda r: SOURCES.index(r.source))))


def report(r: Results) -> str:
    """Everything measured, as Markdown."""
    others = [s for s in r.sources if s != "jsonl"]
    return "\n".join([
        f"### Change-stream sources vs the JSONL source (seed {r.seed})",
        "",
        machine(),
        f"- lockstep code: {code_revision()}",
        f"- load average (1/5/15 min) before: {_load(r.load_before)}; after: {_load(r.load_after)}",
        "- stores: OpenSearch-API server (osmem-server) + Milvus 2.3.5 server, SQLite ledger; sources: Tansu "
        "(Kafka API), embedded PostgreSQL 18 (pgoutput), the service's own `POST /events`",
        f"- workload per run: {r.events} upsert events of new documents, {CHUNKS_PER_DOC} chunks each "
        f"(~{PARA_CHARS} characters each), the same texts and metadata for every source, hashing embedder ({DIM} dims)",
        f"- {len({run.round for run in r.runs})} round(s), sources in opposite orders in alternate rounds; "
        f"service settings: run.shards={r.shards}, {r.tuning.describe()}",
        "",
        f"| source | events/s, steady {STEADY_FROM:.0%} to {STEADY_TO:.0%}, per round | mean | ratio to JSONL "
        "(per round) | overhead | service process CPU per event | source alone: CPU per event | "
        "source alone: events/s |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
        *(_summary_row(r, source) for source in r.sources),
        "",
        "| round | source | events/s | CPU per event | applied when the last event was read | first commit | end | "
        "mean batch write keyword / vector | how the events arrived |",
        "|--:|---|--:|--:|--:|--:|--:|--:|---|",
        *(_run_row(run) for run in r.runs),
        "",
        _noise_line(r),
        _fed_line(r),
        *(_verdict_line(r, source) for source in others),
        *(f"- after {run.source} (round {run.round}): {_check(run.violations)}" for run in r.runs),
    ])  # fmt: skip


def _summary_row(r: Results, source: str) -> str:
    rates = " / ".join(f"{run.events_per_s:.1f}" for run in r.of(source))
    paired = " / ".join(f"{x:.2f}" for x in r.paired_ratios(source))
    overhead = "" if source == "jsonl" else f"{1 - r.ratio(source):.0%}"
    cpu = f"{r.mean_cpu_ms(source):.2f} ms"
    if source != "jsonl":
        cpu += f" ({r.mean_cpu_ms(source) - r.mean_cpu_ms('jsonl'):+.2f} ms)"
    alone = f"{r.alone_cpu_ms(source):.3f} ms"
    if r.intake_cpu_ms(source):
        alone += f" (+ {r.intake_cpu_ms(source):.3f} ms intake)"
    return (f"| {source} | {rates} | {r.mean_per_s(source):.1f} | {r.ratio(source):.2f} ({paired}) | "
            f"{overhead} | {cpu} | {alone} | {r.alone_per_s(source):.0f} |")  # fmt: skip


def _run_row(run: SourceRun) -> str:
    w = run.write_s_mean
    return (f"| {run.round} | {run.source} | {run.events_per_s:.1f} | {run.cpu_ms_per_event:.2f} ms | "
            f"{run.applied_when_all_read:.0%} | {run.first_commit_s:.1f} s | {run.wall_s:.1f} s | {w['keyword']:.2f} s / {w['vector']:.2f} s | "
            f"{run.note} |")  # fmt: skip


def _noise_line(r: Results) -> str:
    if len(r.of("jsonl")) < 2:
        return "- noise: one round only, so no run-to-run figure: use `--rounds 2` or more before believing a ratio"
    spreads = ", ".join(f"{s} {r.spread(s):.0%}" for s in r.sources)
    return (f"- noise: the same source's runs differ by up to (max - min) / mean = {spreads}; the JSONL "
            "baseline's spread is the run's own noise floor for every ratio")  # fmt: skip


def _fed_line(r: Results) -> str:
    late = [x for x in r.runs if x.applied_when_all_read > STEADY_FROM]
    if not late:
        worst = max(x.applied_when_all_read for x in r.runs)
        return (f"- every service had read all the events of its source before the steady window began (by "
                f"{worst:.0%} applied at the latest): no measured rate was limited by reading its source")  # fmt: skip
    runs = ", ".join(f"{x.source} (round {x.round}) at {x.applied_when_all_read:.0%} applied" for x in late)
    return (f"- still reading its source inside the steady window (full mailboxes hold the reader back too: "
            f"compare with JSONL): {runs}")  # fmt: skip


def _verdict_line(r: Results, source: str) -> str:
    overhead = 1 - r.ratio(source)
    verdict = f"goal ≤ {OVERHEAD_GOAL:.0%} met" if overhead <= OVERHEAD_GOAL else "goal NOT met"
    extra_ms = r.alone_cpu_ms(source) + r.intake_cpu_ms(source) - r.alone_cpu_ms("jsonl")
    share = extra_ms * r.mean_per_s("jsonl") / 1000
    return (f"- {source}: {r.mean_per_s(source):.1f} / {r.mean_per_s('jsonl'):.1f} = **{r.ratio(source):.2f}** "
            f"of JSONL's rate, overhead {overhead:.0%} ({verdict}). The adapter alone costs {extra_ms:+.3f} ms "
            f"CPU per event beyond JSONL's: at JSONL's mean rate, {share:.1%} of one core")  # fmt: skip


def code_revision() -> str:
    """The commit of ``ROOT`` and the tracked files changed since, as the services run it."""
    try:
        rev = _git("rev-parse", "--short", "HEAD").strip()
        changed = [line[3:] for line in _git("status", "--porcelain", "--untracked-files=no").splitlines()]
    except (OSError, subprocess.SubprocessError):
        return f"{ROOT} (not a git checkout)"
    return f"commit {rev}" + (f", with uncommitted changes to {', '.join(changed)}" if changed else "")


def _git(*args: str) -> str:
    done = subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=True
    )
    return done.stdout


def _load(load: tuple[float, float, float]) -> str:
    return " / ".join(f"{x:.2f}" for x in load)


def _check(violations: list[Violation]) -> str:
    if not violations:
        return "both indexes equal the expected documents (I1-I4 hold on every chunk)"
    shown = "; ".join(str(v) for v in violations[:VIOLATIONS_SHOWN_MAX])
    return f"**{len(violations)} violations**: {shown}"


def write_docs(path: Path, command: str, markdown: str) -> None:
    write_results(path, command, markdown, section=DOCS_SECTION, begin=RESULTS_BEGIN, end=RESULTS_END)
