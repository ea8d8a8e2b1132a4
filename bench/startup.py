"""Start-up of the command line: ``lockstep --help``, ``import lockstep.cli`` and a no-op ``lockstep sync``.

    python -m bench.startup [--repeat 5] [--embedder auto|hashing|sentence-transformers]

Every measurement is a fresh interpreter (a subprocess) run ``--repeat`` times; the table shows
the median wall time, the fastest and slowest run, and the median CPU time of the process (user +
system, its reaped children's included: on a loaded machine wall time grows, CPU time much less).

*Setup*, not measured: a temp dir holding the embedded default as ``lockstep demo`` lays it out
(a Tantivy directory, a milvus-lite file, a SQLite ledger, a JSONL source) and a config naming
them, then one ``lockstep sync`` that creates the stores and applies ``SETUP_DOCS`` documents,
then one round of every measured command. Every measured sync then finds nothing new in the
source (checked: it reads no event). The processes cache their bytecode in the temp dir
(``PYTHONPYCACHEPREFIX``; ``PYTHONDONTWRITEBYTECODE`` is dropped), and the unmeasured round fills
it: an installed lockstep runs from cached bytecode, not from sources compiled at each start.

The no-op sync is measured whole (``lockstep sync -c FILE``) and by phases, in a fresh
interpreter that takes the command's steps with a clock between them (``--phases FILE``):

1. imports: the command line (and the logging set-up its callback does), what ``sync`` imports
   when it runs, and the adapter modules of the embedded stores (their builders import them on
   first use);
2. the settings; the embedder (with the local model: torch and the model's weights);
3. each store opened alone — ledger (with the generation registry), keyword, vector — built,
   ensured and closed;
4. the command's own ``runtime`` (every store and the embedder again, as ``sync`` opens them),
   the apply (``run_sync``, here reading an empty tail) and the close.

Start-up is the whole no-op sync less its apply. Goals: ``--help`` within ``HELP_GOAL_S``,
start-up within ``STARTUP_GOAL_S``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lockstep.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
HELP_GOAL_S = 0.5
STARTUP_GOAL_S = 1.5
REPEAT_DEFAULT = 5
# Documents the setup sync applies, so that the measured syncs open stores that hold something.
SETUP_DOCS = 20
# One process. A no-op sync that loads the local model on a loaded machine takes ~20 s; the first
# one also compiles torch's bytecode into the empty cache (minutes on 2 busy cores).
RUN_TIMEOUT_S = 900
# Where the measured processes keep their bytecode, under the temp dir (see run_python).
PYCACHE = "pycache"


@dataclass(frozen=True)
class Run:
    """One process: its wall and CPU seconds and what it printed."""

    wall_s: float
    cpu_s: float
    stdout: str


@dataclass(frozen=True)
class Measured:
    label: str
    runs: list[Run]

    @property
    def wall_s(self) -> float:
        return statistics.median(r.wall_s for r in self.runs)

    @property
    def cpu_s(self) -> float:
        return statistics.median(r.cpu_s for r in self.runs)

    def spread(self) -> str:
        walls = [r.wall_s for r in self.runs]
        return f"{min(walls):.2f} to {max(walls):.2f}"


def run_python(args: Sequence[str], cwd: Path) -> Run:
    """``python ARGS`` in ``cwd`` with this checkout first on the path; raises if it fails. Its
    CPU time is the growth of this process's reaped children's time (runs are one at a time)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env |= {"PYTHONPATH": str(ROOT), "PYTHONPYCACHEPREFIX": str(cwd / PYCACHE), "HF_HUB_OFFLINE": "1"}
    cpu_before = _children_cpu_s()
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )
    wall_s = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"python {' '.join(args)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return Run(wall_s, _children_cpu_s() - cpu_before, done.stdout)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --- setup ---------------------------------------------------------------------------------------


def write_embedded_default(work: Path, embedder: str) -> Path:
    """The config of the embedded default in ``work`` (``lockstep demo``'s layout) and a source
    holding ``SETUP_DOCS`` documents; returns the config's path."""
    from coordinator.events import ChangeEvent, Op, event_to_dict
    from lockstep.corpus import make_corpus

    events = work / "events.jsonl"
    lines = [ChangeEvent(Op.UPSERT, d.doc_id, d.version, d.text, d.metadata) for d in make_corpus(SETUP_DOCS)]
    events.write_text("".join(json.dumps(event_to_dict(e)) + "\n" for e in lines), encoding="utf-8")
    config = work / "lockstep.yaml"
    config.write_text(
        f"source: {{kind: jsonl, path: '{events}', name: startup}}\n"
        f"keyword: {{kind: tantivy, path: '{work / 'tantivy'}'}}\n"
        f"vector: {{uri: '{work / 'milvus.db'}'}}\n"
        f"ledger: {{path: '{work / 'ledger.db'}'}}\n"
        f"embedder: {{kind: {embedder}}}\n",
        encoding="utf-8",
    )
    return config


def last_json(run: Run) -> dict[str, Any]:
    """The last line of the process's stdout that is a JSON object (a store's server process may
    write to the same stdout)."""
    for line in reversed(run.stdout.splitlines()):
        if line.startswith("{"):
            found: dict[str, Any] = json.loads(line)
            return found
    raise ValueError(f"no JSON object in the output: {run.stdout[-500:]!r}")


def sync_events(run: Run) -> int:
    """Events a ``lockstep sync`` read, from its JSON summary."""
    events = last_json(run)["events"]
    assert isinstance(events, int), events
    return events


# --- the phases of a no-op sync, in a fresh interpreter (``--phases FILE``) -------------------------


class Laps:
    """Seconds between successive ``lap`` calls, by name."""

    def __init__(self) -> None:
        self.laps: list[tuple[str, float]] = []
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps.append((name, now - self._last))
        self._last = now


def phases(config: Path) -> dict[str, object]:
    """Take ``lockstep sync``'s steps with a clock between them; the laps and the events read."""
    laps = Laps()
    import lockstep.cli  # noqa: F401 (timed: the command line itself)
    from lockstep.logging import configure_logging

    # As the command line's callback does before any command (and JSON logs stay off stdout).
    configure_logging("warning")
    laps.lap("import lockstep.cli, configure logging")
    from coordinator.sync import run_sync
    from lockstep.bootstrap import build_source
    from lockstep.runtime import runtime
    from lockstep.settings import load_settings

    laps.lap("import what sync runs (settings; the runtime, with pymilvus, pandas and gRPC)")
    import adapters.keyword.tantivy_index
    import adapters.sources.jsonl
    import adapters.vector.milvus  # noqa: F401 (timed: pymilvus, with pandas and gRPC)

    laps.lap("import the embedded stores' adapters not loaded yet")
    settings = load_settings(config)
    laps.lap("settings")
    _open_stores_alone(settings, laps)
    with runtime(settings) as rt:
        laps.lap("runtime: every store and the embedder again, as sync opens them")
        source = build_source(settings, rt.ledger)
        stats = run_sync(source, rt.engine, batch_events=settings.sync.batch_events)
        source.close()
        laps.lap("apply (run_sync)")
    laps.lap("close")
    return {"laps": laps.laps, "events": stats.as_dict()["events"]}


def _open_stores_alone(settings: Settings, laps: Laps) -> None:
    """The embedder, then each store opened, ensured and closed on its own."""
    from adapters.ledger.registry import registry_for
    from lockstep.bootstrap import (
        build_embedder,
        build_keyword,
        build_ledger,
        build_vector,
        keyword_settings,
        vector_settings,
    )
    from lockstep.runtime import active_generation

    embedder = build_embedder(settings.embedder)
    laps.lap(f"embedder ({embedder.model_id})")
    ledger = build_ledger(settings)
    gen = active_generation(registry_for(ledger).all())
    ledger.close()
    laps.lap("ledger alone (SQLite, with the generation registry)")
    keyword = build_keyword(keyword_settings(settings, gen))
    keyword.ensure()
    keyword.close()
    laps.lap("keyword alone (Tantivy)")
    vector = build_vector(vector_settings(settings, gen), dim=embedder.dim, model_id=embedder.model_id)
    vector.ensure()
    vector.close()
    laps.lap("vector alone (milvus-lite)")


# --- the measurements ------------------------------------------------------------------------------

HELP = "lockstep --help"
SYNC = "lockstep sync, no-op (whole process)"
PHASES = "the same steps by phases (whole process)"


def commands(config: Path) -> dict[str, list[str]]:
    """What each measured process runs (``python -m lockstep`` is the ``lockstep`` executable)."""
    return {
        "python -c pass (the interpreter alone)": ["-c", "pass"],
        'python -c "import lockstep.cli"': ["-c", "import lockstep.cli"],
        HELP: ["-m", "lockstep", "--help"],
        SYNC: ["-m", "lockstep", "sync", "-c", str(config)],
        PHASES: ["-m", "bench.startup", "--phases", str(config)],
    }


def measure(config: Path, work: Path, repeat: int) -> list[Measured]:
    """Every command ``repeat`` times, taken in turn so that a change of load meets them all."""
    runs: dict[str, list[Run]] = {label: [] for label in commands(config)}
    for _ in range(repeat):
        for label, args in commands(config).items():
            runs[label].append(run_python(args, work))
    for run in runs[SYNC]:
        assert sync_events(run) == 0, "a measured sync found events: it was not a no-op"
    for run in runs[PHASES]:
        assert last_json(run)["events"] == 0, "the phases run found events"
    return [Measured(label, r) for label, r in runs.items()]


def median_laps(runs: list[Run]) -> list[tuple[str, float]]:
    """Each phase's median over the runs, in the order they ran."""
    per_run = [last_json(r)["laps"] for r in runs]
    names = [name for name, _ in per_run[0]]
    return [(name, statistics.median(laps[i][1] for laps in per_run)) for i, name in enumerate(names)]


# --- the report ----------------------------------------------------------------------------------


def report(measured: list[Measured], laps: list[tuple[str, float]], header: str) -> str:
    by_label = {m.label: m for m in measured}
    apply_s = dict(laps)["apply (run_sync)"]
    startup_s = by_label[SYNC].wall_s - apply_s
    rows = [
        "| measurement | wall s (median) | fastest to slowest | CPU s (median) | goal s | wall / goal |",
        "|---|---|---|---|---|---|",
    ]
    for m in measured:
        goal = HELP_GOAL_S if m.label == HELP else None
        rows.append(_row(m.label, m.wall_s, m.spread(), f"{m.cpu_s:.2f}", goal))
    rows.append(_row("start-up of the no-op sync (whole less its apply)", startup_s, "", "", STARTUP_GOAL_S))
    phase_rows = ["| phase of the no-op sync | s (median) |", "|---|---|"]
    phase_rows += [f"| {name} | {seconds:.3f} |" for name, seconds in laps]
    phase_rows.append(
        f"| sum of the phases (the interpreter's own start not included) | {sum(s for _, s in laps):.3f} |"
    )
    return "\n".join([header, "", *rows, "", *phase_rows])


def _row(label: str, wall_s: float, spread: str, cpu: str, goal_s: float | None) -> str:
    if goal_s is None:
        return f"| {label} | {wall_s:.3f} | {spread} | {cpu} | | |"
    verdict = "meets" if wall_s <= goal_s else "misses"
    return f"| {label} | {wall_s:.3f} | {spread} | {cpu} | {goal_s} | {wall_s / goal_s:.2f} ({verdict}) |"


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f} (1 min), {five:.2f} (5 min)"


def run(repeat: int, embedder: str) -> str:
    """Set up the embedded default in a temp dir, measure, and return the report."""
    with tempfile.TemporaryDirectory(prefix="lockstep-startup-") as tmp:
        work = Path(tmp)
        config = write_embedded_default(work, embedder)
        setup = run_python(["-m", "lockstep", "sync", "-c", str(config)], work)
        assert sync_events(setup) == SETUP_DOCS, "the setup sync applies every document"
        measure(config, work, 1)  # fills the bytecode cache; not measured
        load_before = _load()
        measured = measure(config, work, repeat)
        load_after = _load()
    laps = median_laps(next(m for m in measured if m.label == PHASES).runs)
    header = (
        f"lockstep start-up: median of {repeat} runs each, embedder {embedder!r} "
        f"(setup sync of {SETUP_DOCS} documents: {setup.wall_s:.2f} s, not measured). "
        f"{os.cpu_count()} cores; load average {load_before} before, {load_after} after."
    )
    return report(measured, laps, header)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=REPEAT_DEFAULT, help="runs of each command")
    parser.add_argument("--embedder", default="auto", choices=["auto", "hashing", "sentence-transformers"],
                        help="the config's embedder (auto, the default's, is the local model when installed)")  # fmt: skip
    parser.add_argument("--phases", type=Path, metavar="CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phases is not None:
        print(json.dumps(phases(args.phases)))
        return 0
    print(run(args.repeat, args.embedder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
