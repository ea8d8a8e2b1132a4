"""The run file: how ``lockstep run`` finds what a killed predecessor left running, and clears it.

A supervisor that kills ``lockstep run`` (systemd after its stop timeout, a container runtime)
kills its process group. Ray's actors live in process groups of their own and go on for
seconds, tens under load, holding what they had open: a milvus-lite file's lock, the Tantivy
writer lock. The next start must get past them, and must never touch a run that is alive.

So every run keeps a record of itself (``coordinator/leftovers.py``) in a directory beside its
data: beside the SQLite ledger, else the milvus-lite file, else the Tantivy directory. A
deployment with none of these keeps nothing on this machine that a leftover could hold, and
keeps no record. The record is written at start, rewritten with the processes Ray started once
they run, and removed at a clean stop. A start first judges every record there: the processes
of a dead run that still run are sent SIGKILL and waited for, at most ``LEFTOVERS_WAIT_S``.

Processes are read from /proc (Linux); where there is none, no record is kept.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog

from coordinator.leftovers import ProcessId, RunRecord, Standing, is_running, judge
from lockstep.settings import LedgerSettings, Settings

log = structlog.get_logger(__name__)

PROC = Path("/proc")
# A process sent SIGKILL is gone within milliseconds unless it sleeps in the kernel (a hung
# network filesystem): a start waits this long for a dead run's leftovers, then goes on with a
# warning (what they still hold may then refuse it, with an error of its own).
LEFTOVERS_WAIT_S = 20.0
# How often the leftovers are looked at while waiting for them to go.
LEFTOVERS_POLL_S = 0.05
# The directory of run records beside a data path: ``ledger.db`` -> ``ledger.db.lockstep-runs``.
RUNS_DIR_SUFFIX = ".lockstep-runs"


@dataclass(frozen=True)
class _Stat:
    state: str
    ppid: int
    start_ticks: int


def _stat(pid: int) -> _Stat | None:
    """Fields of /proc/PID/stat (None if there is no such process)."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces and parentheses itself.
    fields = text[text.rindex(")") + 2 :].split()
    return _Stat(state=fields[0], ppid=int(fields[1]), start_ticks=int(fields[19]))


def start_of(pid: int) -> int | None:
    """The start time of the process that has ``pid`` now; None if none runs (or a zombie)."""
    stat = _stat(pid)
    return None if stat is None or stat.state == "Z" else stat.start_ticks


def machine() -> str | None:
    """This boot and PID namespace (PIDs mean the same processes only within both), or None
    where /proc cannot tell."""
    try:
        boot = (PROC / "sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat(PROC / "self/ns/pid").st_ino
    except OSError:
        return None
    return f"{boot}/pidns:{namespace}"


def this_process() -> ProcessId | None:
    pid = os.getpid()
    ticks = start_of(pid)
    return None if ticks is None else ProcessId(pid, ticks)


def descendants(pid: int) -> tuple[ProcessId, ...]:
    """Every running process that ``pid`` started, that those started, and so on."""
    children: dict[int, list[ProcessId]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        stat = _stat(int(entry.name))
        if stat is not None and stat.state != "Z":
            children.setdefault(stat.ppid, []).append(ProcessId(int(entry.name), stat.start_ticks))
    found: list[ProcessId] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child.pid)
    return tuple(found)


def runs_dir(settings: Settings) -> Path | None:
    """Where the run records of this deployment live, or None if it keeps no data here."""
    paths = []
    if isinstance(settings.ledger, LedgerSettings):
        paths.append(settings.ledger.path)
    if settings.vector.is_embedded:
        paths.append(settings.vector.uri)
    if settings.keyword.path is not None:
        paths.append(settings.keyword.path)
    if not paths:
        return None
    first = Path(paths[0]).absolute()
    return first.parent / f"{first.name}{RUNS_DIR_SUFFIX}"


class RunFile:
    """This run's record (see the module docstring); ``path`` None keeps none."""

    def __init__(self, path: Path | None, record: RunRecord | None) -> None:
        self.path = path
        self._record = record

    def note_children(self) -> None:
        """Add every process this one has started so far (Ray's, once they run)."""
        if self.path is None or self._record is None:
            return
        started = dict.fromkeys((*self._record.processes, *descendants(self._record.owner.pid)))
        self._record = RunRecord(self._record.machine, self._record.owner, tuple(started))
        self.write()

    def write(self) -> None:
        assert self.path is not None and self._record is not None
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(self._record.encode())
        # A rename: a kill mid-write leaves the previous record whole, never half of one.
        partial.replace(self.path)

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def clear_dead_runs(settings: Settings) -> None:
    """Kill what dead runs beside this deployment's data left running (see ``clear_leftovers``);
    for any command about to open its embedded stores."""
    directory, here = runs_dir(settings), machine()
    if directory is not None and here is not None and directory.is_dir():
        clear_leftovers(directory, here)


@contextlib.contextmanager
def run_file(settings: Settings) -> Iterator[RunFile]:
    """Clear what dead runs beside this data left running, then keep this run's record until the
    run ends (a clean end removes it; a kill leaves it for the next start to judge)."""
    clear_dead_runs(settings)
    directory, here, me = runs_dir(settings), machine(), this_process()
    if directory is None or here is None or me is None:
        yield RunFile(None, None)
        return
    directory.mkdir(parents=True, exist_ok=True)
    own = RunFile(directory / f"{me.pid}-{me.start_ticks}.json", RunRecord(here, me))
    own.write()
    try:
        yield own
    finally:
        own.remove()


def clear_leftovers(directory: Path, here: str, wait_s: float = LEFTOVERS_WAIT_S) -> None:
    """Judge every run record in ``directory``: kill what dead runs left running (a record is
    removed once nothing of its run runs); live runs and other machines' records stay as they are."""
    for path in sorted(directory.glob("*.json")):
        record = _read(path)
        if record is None:
            log.warning("not a run record; removed", path=str(path))
            path.unlink(missing_ok=True)
            continue
        verdict = judge(record, here, start_of)
        if verdict.standing is Standing.ALIVE:
            log.info("another lockstep run beside this data is alive; left alone", pid=record.owner.pid)
        elif verdict.standing is Standing.DEAD and _clear(record, verdict.leftovers, wait_s):
            path.unlink(missing_ok=True)


def _read(path: Path) -> RunRecord | None:
    try:
        return RunRecord.decode(path.read_text())
    except (OSError, UnicodeDecodeError):
        return None


def _clear(record: RunRecord, leftovers: tuple[ProcessId, ...], wait_s: float) -> bool:
    """SIGKILL ``leftovers`` and wait for them to go; whether they went within ``wait_s``."""
    if not leftovers:
        log.info("a previous run ended without stopping; nothing of it still runs", owner_pid=record.owner.pid)
        return True
    pids = [p.pid for p in leftovers]
    log.warning("a previous run ended without stopping; killing the processes it left running",
                owner_pid=record.owner.pid, pids=pids)
    for process in leftovers:
        _kill(process)
    started = time.monotonic()
    while (running := [p for p in leftovers if is_running(p, start_of)]) and time.monotonic() - started < wait_s:
        time.sleep(LEFTOVERS_POLL_S)
    if running:
        log.error("processes of a previous run still run; going on without them gone",
                  owner_pid=record.owner.pid, pids=[p.pid for p in running], waited_s=wait_s)
        return False
    log.info("the previous run's leftovers are gone", owner_pid=record.owner.pid, pids=pids,
                waited_s=round(time.monotonic() - started, 3))
    return True


def _kill(process: ProcessId) -> None:
    """SIGKILL ``process`` if it is still that very process (a pidfd pins the PID between the
    check and the signal, so a PID reused meanwhile is never hit)."""
    try:
        handle = os.pidfd_open(process.pid)
    except ProcessLookupError:
        return
    except OSError as exc:
        log.warning("cannot open a leftover process; not killed", pid=process.pid, error=str(exc))
        return
    try:
        if is_running(process, start_of):
            signal.pidfd_send_signal(handle, signal.SIGKILL)
    except ProcessLookupError:
        return
    except OSError as exc:
        log.warning("cannot kill a leftover process", pid=process.pid, error=str(exc))
    finally:
        os.close(handle)
