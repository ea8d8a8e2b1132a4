"""Everything measured, as the Markdown the benchmark prints and writes into docs/benchmarks.md."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import cpu
from bench.incremental import machine
from bench.results_doc import write_results
from bench.streaming.ceiling import Ceiling
from bench.streaming.cpu_parts import CPU_PARTS
from bench.streaming.freshness import FRESHNESS_LOAD, LAG_WINDOW_S, FreshnessRun, percentile
from bench.streaming.keyword_latency import StoreLatency
from bench.streaming.service import Tuning
from bench.streaming.throughput import STEADY_FROM, STEADY_TO, ThroughputRun
from bench.streaming.workload import CHUNKS_PER_DOC, DIM, PARA_CHARS
from coordinator.invariants import Violation

# A raw keyword request slower than this counts as a write stall in the freshness report.
STALL_S = 0.5
# Goals of the issue.
RATIO_GOAL = 0.70
LAG_P99_GOAL_S = 2.0
VIOLATIONS_SHOWN_MAX = 10
DOCS_SECTION = "## Streaming service (`bench/streaming/`)"
RESULTS_BEGIN = "<!-- bench.streaming results: begin (rewritten by `python -m bench.streaming`) -->"
RESULTS_END = "<!-- bench.streaming results: end -->"


@dataclass(frozen=True)
class Results:
    events: int
    seed: int
    tuning: Tuning
    ceiling: Ceiling
    runs: list[ThroughputRun]
    freshness: FreshnessRun
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    # The keyword store alone, fed as the freshness run fed it (None if it made no write).
    keyword_latency: StoreLatency | None = None

    @property
    def best(self) -> ThroughputRun:
        return max(self.runs, key=lambda r: r.events_per_s)


def report(r: Results, stores: str) -> str:
    """Everything measured, as Markdown."""
    c, f = r.ceiling, r.freshness
    ratio = r.best.events_per_s / c.events_per_s
    p99 = f.percentile_s(0.99)
    return "\n".join([
        f"### Streaming service vs raw-client ceiling (seed {r.seed})",
        "",
        machine(),
        f"- load average (1/5/15 min) before: {_load(r.load_before)}; after: {_load(r.load_after)}",
        f"- stores: {stores}",
        f"- workload: {r.events} upsert events of new documents, {CHUNKS_PER_DOC} chunks each "
        f"({CHUNKS_PER_DOC * r.events} chunk rows, ~{PARA_CHARS} characters each), hashing embedder ({DIM} dims)",
        f"- service settings: {r.tuning.describe()}",
        "",
        "| measurement | rows/s | events/s | ratio to ceiling |",
        "|---|--:|--:|--:|",
        *_ceiling_rows(c, r.runs),
        *(_run_row(run, c) for run in r.runs),
        "",
        *_cpu_table(r.runs),
        f"| freshness run ({f.shards} shard(s), {f.target_per_s:.0f} events/s = {FRESHNESS_LOAD:.0%} of the best "
        f"rate, {f.appended} events over {f.append_s:.1f} s) | value |",
        "|---|--:|",
        f"| lag append → committed, p50 | {f.percentile_s(0.5):.3f} s |",
        f"| lag append → committed, p99 | {p99:.3f} s |",
        f"| lag append → committed, max | {f.lags_s[-1]:.3f} s |",
        f"| service histogram (read → commit): p50 / p99 bucket | ≤ {f.service_p50_le_s} s / ≤ {f.service_p99_le_s} s |",
        *(f"| {side} batch writes: count, mean events per write, mean duration | {n}, "
          f"{f.appended / n:.0f}, {f.write_s_mean.get(side, 0.0):.3f} s |" for side, n in f.writes.items() if n),
        "",
        *_lag_windows(f),
        *_store_latency(r.keyword_latency),
        f"- best sustained rate / ceiling (the median of {len(c.slower_rates)} raw measurements): "
        f"{r.best.events_per_s:.1f} / {c.events_per_s:.1f} = **{ratio:.3f}** "
        f"({_verdict(ratio >= RATIO_GOAL, f'goal ≥ {RATIO_GOAL} met', 'goal NOT met')})",
        f"- freshness p99 at half of max throughput: **{p99:.2f} s** "
        f"({_verdict(p99 <= LAG_P99_GOAL_S, f'goal ≤ {LAG_P99_GOAL_S:.0f} s met', 'goal NOT met')})",
        *(f"- after {run.shards} shard(s): {_check(run.violations)}" for run in r.runs),
        f"- after the freshness run: {_check(f.violations)}",
    ])  # fmt: skip


def _store_latency(k: StoreLatency | None) -> list[str]:
    """The keyword store's own request durations under the freshness run's write pattern."""
    if k is None:
        return []
    slow = k.slow(STALL_S)
    return [
        f"The keyword store alone, fed as the freshness run fed it ({len(k.seconds)} raw `_bulk` requests of "
        f"{k.rows_per_request} rows at {k.requests_per_s:.1f}/s, fresh index):",
        "",
        "| raw request duration | p50 | p99 | max | requests over " + f"{STALL_S:.1f} s |",
        "|---|--:|--:|--:|--:|",
        f"| {k.store} | {k.percentile_s(0.5):.3f} s | {k.percentile_s(0.99):.3f} s | {max(k.seconds):.3f} s "
        f"| {len(slow)}{': ' + ', '.join(f'#{i} {t:.2f} s' for i, t in slow[:8]) if slow else ''} |",
        "",
    ]


def _lag_windows(f: FreshnessRun) -> list[str]:
    """Lag by when the events were appended: a slow start reads differently from a stall."""
    windows = f.windows()
    if len(windows) < 2:
        return []
    return [
        f"Lag of the events appended in each {LAG_WINDOW_S:.0f} s window of the freshness run:",
        "",
        "| appended from | events | p50 | p99 | max |",
        "|--:|--:|--:|--:|--:|",
        *(f"| {start:.0f} s | {len(lags)} | {percentile(lags, 0.5):.3f} s | {percentile(lags, 0.99):.3f} s "
          f"| {lags[-1]:.3f} s |" for start, lags in windows),
        "",
    ]  # fmt: skip


def _ceiling_rows(c: Ceiling, runs: Sequence[ThroughputRun]) -> list[str]:
    size = f"{c.rows_per_request} rows per request"
    median = c.events_per_s * CHUNKS_PER_DOC
    return [
        f"| raw {c.keyword.store} alone, {size} | {c.keyword.rows_per_s:.0f} | "
        f"{c.keyword.rows_per_s / CHUNKS_PER_DOC:.1f} | |",
        f"| raw {c.vector.store} alone, {size} | {c.vector.rows_per_s:.0f} | "
        f"{c.vector.rows_per_s / CHUNKS_PER_DOC:.1f} | |",
        *(f"| raw {r.store} alone again, right before the {run.shards}-shard run | {r.rows_per_s:.0f} | "
          f"{r.rows_per_s / CHUNKS_PER_DOC:.1f} | |" for run in runs if (r := run.raw_before) is not None),
        f"| **ceiling: median of the {len(c.slower_rates)} measurements of the slower store alone "
        f"({c.slower.store})** | {median:.0f} | **{c.events_per_s:.1f}** | 1.00 |",
        f"| raw, both stores at once (keyword {c.both_keyword.rows_per_s:.0f} rows/s, vector "
        f"{c.both_vector.rows_per_s:.0f} rows/s): the slower | "
        f"{c.both_events_per_s * CHUNKS_PER_DOC:.0f} | {c.both_events_per_s:.1f} | "
        f"{c.both_events_per_s / c.events_per_s:.2f} |",
    ]


def _run_row(run: ThroughputRun, c: Ceiling) -> str:
    label = (f"lockstep run, {run.shards} shard(s): steady {STEADY_FROM:.0%} to {STEADY_TO:.0%} of events "
             f"({run.steady_s:.1f} s; first commit at {run.ready_s:.1f} s, exit at {run.wall_s:.1f} s; "
             f"mean batch write keyword {run.write_s_mean['keyword']:.2f} s, "
             f"vector {run.write_s_mean['vector']:.2f} s)")  # fmt: skip
    paired = run.paired_ratio()
    if paired is not None:
        label += f"; {paired:.2f} of the raw rate measured just before it"
    rate = run.events_per_s
    return f"| {label} | {rate * CHUNKS_PER_DOC:.0f} | {rate:.1f} | {rate / c.events_per_s:.2f} |"


def _cpu_table(runs: Sequence[ThroughputRun]) -> list[str]:
    """Cores each part used in each run's steady window; nothing if no run has the figures."""
    measured = [run for run in runs if run.cpu_cores]
    if not measured:
        return []
    return [
        f"Cores used in each run's steady window, of {os.cpu_count()} (`bench/cpu.py`; {cpu.OTHER}: "
        "everything else that ran; a process that ended inside the window is not counted):",
        "",
        f"| run | {' | '.join(CPU_PARTS)} |",
        f"|---|{'--:|' * len(CPU_PARTS)}",
        *(_cpu_row(run) for run in measured),
        "",
    ]


def _cpu_row(run: ThroughputRun) -> str:
    return f"| {run.shards} shard(s) | " + " | ".join(f"{run.cpu_cores.get(p, 0.0):.2f}" for p in CPU_PARTS) + " |"


def _load(load: tuple[float, float, float]) -> str:
    return " / ".join(f"{x:.2f}" for x in load)


def _verdict(ok: bool, yes: str, no: str) -> str:
    return yes if ok else no


def _check(violations: list[Violation]) -> str:
    if not violations:
        return "both indexes equal the source (I1-I4 hold on every chunk)"
    shown = "; ".join(str(v) for v in violations[:VIOLATIONS_SHOWN_MAX])
    return f"**{len(violations)} violations**: {shown}"


def write_docs(path: Path, command: str, markdown: str) -> None:
    write_results(path, command, markdown, section=DOCS_SECTION, begin=RESULTS_BEGIN, end=RESULTS_END)
