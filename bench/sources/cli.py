"""``python -m bench.sources``'s command line: its arguments, the run, the printed and written report."""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench import sources
from bench.sources.phases import measure
from bench.sources.report import report, write_docs
from bench.sources.runs import SOURCES
from bench.streaming.service import Tuning
from lockstep.logging import configure_logging
from lockstep.settings import RunSettings

DEFAULT_EVENTS = 5_000
DEFAULT_SEED = 7
# Every source runs this often, in opposite orders in alternate rounds: on a shared 2-core
# machine one run of each cannot tell a 20 % overhead from the machine's own swings.
DEFAULT_ROUNDS = 2
# The service's own default: what a deployment that sets nothing runs with.
DEFAULT_SHARDS = RunSettings().shards
DEFAULT_KAFKA_PARTITIONS = 4
# Small transactions, as an application writing rows one business change at a time would;
# each transaction is one version and one checkpoint position for the source.
DEFAULT_PG_ROWS_PER_TXN = 10
# Requests of 1,000 events (~1.7 MB): few enough round trips that one client outruns the service.
DEFAULT_POST_BATCH_EVENTS = 1_000
# The package's docstring opens with what the benchmark measures; --help shows that line.
DESCRIPTION = (sources.__doc__ or "").split("\n")[0]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = RunSettings()
    parser = argparse.ArgumentParser(prog="python -m bench.sources", description=DESCRIPTION)
    parser.add_argument("--events", type=int, default=DEFAULT_EVENTS, help="events per run")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="runs of every source")
    parser.add_argument("--shards", type=int, default=DEFAULT_SHARDS, help="run.shards of every service")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="corpus seed")
    parser.add_argument("--sources", type=_sources, default=SOURCES,
                        help="comma-separated, from jsonl,kafka,postgres,webhook (JSONL always runs)")  # fmt: skip
    parser.add_argument("--kafka-partitions", type=int, default=DEFAULT_KAFKA_PARTITIONS)
    parser.add_argument("--pg-rows-per-txn", type=int, default=DEFAULT_PG_ROWS_PER_TXN)
    parser.add_argument("--post-batch-events", type=int, default=DEFAULT_POST_BATCH_EVENTS)
    parser.add_argument("--batch-docs-max", type=int, default=defaults.batch_docs_max)
    parser.add_argument("--offer-batch-max", type=int, default=defaults.offer_batch_max)
    parser.add_argument("--mailbox-docs-max", type=int, default=defaults.mailbox_docs_max)
    parser.add_argument("--audit-interval-s", type=float, default=0.0,
                        help="continuous audit in the service (0: off, as bench/streaming/ runs it)")  # fmt: skip
    parser.add_argument("--docs-file", type=Path, default=Path("docs/benchmarks.md"),
                        help="the results go between this file's bench.sources markers")  # fmt: skip
    parser.add_argument("--no-docs-file", action="store_true", help="print only")
    return parser.parse_args(argv)


def _sources(text: str) -> tuple[str, ...]:
    chosen = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = set(chosen) - set(SOURCES)
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown sources {sorted(unknown)}; choose from {','.join(SOURCES)}"
        )
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    """Run everything; print the Markdown report; exit 1 if an index disagrees with its source."""
    args = parse_args(argv)
    configure_logging("warning")
    tuning = Tuning(args.batch_docs_max, args.offer_batch_max, args.mailbox_docs_max, args.audit_interval_s)
    with tempfile.TemporaryDirectory(prefix="lockstep-bench-sources-") as tmp:
        results = measure(Path(tmp), args, tuning)
    markdown = report(results)
    print(markdown, flush=True)
    if not args.no_docs_file:
        command = "python -m bench.sources " + " ".join(argv if argv is not None else sys.argv[1:])
        write_docs(args.docs_file, command.strip(), markdown)
    return 0 if all(not run.violations for run in results.runs) else 1
