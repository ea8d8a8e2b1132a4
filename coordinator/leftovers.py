"""What a killed ``lockstep run`` leaves behind, and how a later start tells it from a live run.

Pure: what the operating system reports about processes comes in as plain values (``lockstep/
leftovers.py`` reads it and acts on the verdicts).

A run keeps a *run record* beside its data: the machine it runs on, its own process (the
owner) and the processes it started (Ray's GCS and raylet, the workers hosting its actors). A
process is named by its PID *and* its start time, so that a PID the system has since given to
an unrelated process is never taken for the one recorded. A later start judges every record:

- recorded on another machine (another boot, or another PID namespace: a container restarted
  on the same volume): its PIDs mean nothing here; the record is left alone;
- owner still running: a live run (perhaps paused); nothing of it is touched;
- owner gone: a dead incarnation; those of its processes still running are leftovers to clear.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

# A record file larger than this is not one lockstep wrote (a run starts a few dozen processes).
RECORD_BYTES_MAX = 1024 * 1024


@dataclass(frozen=True)
class ProcessId:
    """A process as the OS names it at one moment: its PID and its start time (clock ticks since
    boot, which no other process started later can share)."""

    pid: int
    start_ticks: int


@dataclass(frozen=True)
class RunRecord:
    """One ``lockstep run``: the machine (boot and PID namespace), its owner and what it started."""

    machine: str
    owner: ProcessId
    processes: tuple[ProcessId, ...] = ()

    def encode(self) -> str:
        return json.dumps({
            "machine": self.machine,
            "owner": [self.owner.pid, self.owner.start_ticks],
            "processes": [[p.pid, p.start_ticks] for p in self.processes],
        })

    @classmethod
    def decode(cls, text: str) -> RunRecord | None:
        """The record, or None for text that is not one (a file cut short, written by hand)."""
        if len(text) > RECORD_BYTES_MAX:
            return None
        try:
            raw = json.loads(text)
            return cls(
                machine=_text(raw["machine"]),
                owner=_process(raw["owner"]),
                processes=tuple(_process(p) for p in raw["processes"]),
            )
        except (ValueError, TypeError, KeyError):
            return None


class Standing(Enum):
    """What a record says about its run, seen from this machine."""

    FOREIGN = "foreign"  # recorded on another machine: nothing here can be judged
    ALIVE = "alive"  # the owner runs: a live run
    DEAD = "dead"  # the owner is gone: its processes still running are leftovers


@dataclass(frozen=True)
class Verdict:
    standing: Standing
    # Processes of a dead run that still run (always empty unless DEAD).
    leftovers: tuple[ProcessId, ...] = ()


# The start time (ticks since boot) of the process that has this PID now, None if there is none
# (a zombie counts as none: it holds no file and no lock any more).
StartOf = Callable[[int], int | None]


def is_running(process: ProcessId, start_of: StartOf) -> bool:
    """Whether this very process still runs (its PID now names a process started when it was)."""
    return start_of(process.pid) == process.start_ticks


def judge(record: RunRecord, machine: str, start_of: StartOf) -> Verdict:
    """The standing of ``record``'s run, judged on ``machine`` (where ``start_of`` looks)."""
    if record.machine != machine:
        return Verdict(Standing.FOREIGN)
    if is_running(record.owner, start_of):
        return Verdict(Standing.ALIVE)
    leftovers = tuple(p for p in dict.fromkeys(record.processes) if is_running(p, start_of))
    return Verdict(Standing.DEAD, leftovers)


def _process(raw: object) -> ProcessId:
    if not isinstance(raw, list) or len(raw) != 2 or not all(type(v) is int for v in raw):
        raise ValueError(f"not a [pid, start_ticks] pair: {raw!r}")
    pid, start_ticks = raw
    if pid <= 0 or start_ticks < 0:
        raise ValueError(f"not a [pid, start_ticks] pair: {raw!r}")
    return ProcessId(pid, start_ticks)


def _text(raw: object) -> str:
    if not isinstance(raw, str) or not raw:
        raise ValueError(f"not a machine name: {raw!r}")
    return raw
