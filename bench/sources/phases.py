"""The benchmark's runs in order: every source, round after round, each on fresh stores."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from bench.sources.report import Results
from bench.sources.runs import MEASURES, Plan
from bench.sources.servers import started_stores, started_streams
from bench.streaming.progress import say
from bench.streaming.service import Tuning
from bench.streaming.workload import make_docs


def schedule(sources: Sequence[str], rounds: int) -> list[tuple[int, str]]:
    """(round, source) in run order: JSONL and the chosen sources each round, the order reversed
    every other round, so that a machine getting busier or quieter favours no source."""
    order = ["jsonl", *(s for s in sources if s != "jsonl")]
    return [(r, s) for r in range(1, rounds + 1) for s in (order if r % 2 else order[::-1])]


def measure(work: Path, args: argparse.Namespace, tuning: Tuning) -> Results:
    """Start the sources' servers, then run each source, round after round, on fresh stores."""
    load_before = os.getloadavg()
    docs = make_docs(args.events, args.seed)
    say("starting Tansu and Postgres")
    runs = []
    with started_streams(work) as streams:
        for round_, source in schedule(args.sources, args.rounds):
            say(f"{source}, round {round_}: starting a fresh OpenSearch-API server and Milvus 2.3.5")
            with started_stores(work / f"stores_{source}_r{round_}") as stores:
                plan = Plan(work, streams, stores, docs, args.shards, tuning, args)
                runs.append(MEASURES[source](plan, round_))
    return Results(args.events, args.seed, args.shards, tuning, runs, load_before, os.getloadavg())
