"""``python -m bench.streaming``'s command line: its arguments, the run, the printed and written report."""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench import streaming
from bench.streaming.phases import run_all
from bench.streaming.report import report, write_docs
from bench.streaming.service import Tuning
from lockstep.logging import configure_logging
from lockstep.settings import RunSettings

DEFAULT_EVENTS = 15_000
DEFAULT_SHARDS = (1, 2, 4)
DEFAULT_SEED = 7
DEFAULT_FRESHNESS_S = 30.0
# The package's docstring opens with what the benchmark measures; --help shows that line.
DESCRIPTION = (streaming.__doc__ or "").split("\n")[0]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = RunSettings()
    parser = argparse.ArgumentParser(prog="python -m bench.streaming", description=DESCRIPTION)
    parser.add_argument("--events", type=int, default=DEFAULT_EVENTS, help="events per throughput run")
    parser.add_argument("--shards", type=_ints, default=DEFAULT_SHARDS, help="shard counts, e.g. 1,2,4")
    parser.add_argument("--freshness-s", type=float, default=DEFAULT_FRESHNESS_S,
                        help="how long events are appended in the freshness run")  # fmt: skip
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="corpus seed")
    parser.add_argument("--batch-docs-max", type=int, default=defaults.batch_docs_max)
    parser.add_argument("--offer-batch-max", type=int, default=defaults.offer_batch_max)
    parser.add_argument("--mailbox-docs-max", type=int, default=defaults.mailbox_docs_max)
    parser.add_argument("--prepare-ahead", type=int, default=defaults.prepare_ahead,
                        help="full batches a shard prepares while one is written (0: none)")  # fmt: skip
    parser.add_argument("--audit-interval-s", type=float, default=0.0,
                        help="continuous audit in the service (0: off, as bench/audit.py measures it)")  # fmt: skip
    parser.add_argument("--docs-file", type=Path, default=Path("docs/benchmarks.md"),
                        help="the results go between this file's bench.streaming markers")  # fmt: skip
    parser.add_argument("--no-docs-file", action="store_true", help="print only")
    return parser.parse_args(argv)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def main(argv: Sequence[str] | None = None) -> int:
    """Run everything; print the Markdown report; exit 1 if an index disagrees with the source."""
    args = parse_args(argv)
    configure_logging("warning")
    tuning = Tuning(
        args.batch_docs_max, args.offer_batch_max, args.mailbox_docs_max, args.audit_interval_s, args.prepare_ahead
    )
    with tempfile.TemporaryDirectory(prefix="lockstep-bench-streaming-") as tmp:
        results, stores = run_all(Path(tmp), args, tuning)
    markdown = report(results, stores)
    print(markdown, flush=True)
    if not args.no_docs_file:
        command = "python -m bench.streaming " + " ".join(argv if argv is not None else sys.argv[1:])
        write_docs(args.docs_file, command.strip(), markdown)
    runs_ok = all(not r.violations for r in results.runs)
    return 0 if runs_ok and not results.freshness.violations else 1
