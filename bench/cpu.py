"""Where the CPU goes during a benchmark window: per-process CPU time from ``/proc``, grouped.

Linux only. A snapshot reads every process's user + system time (``/proc/<pid>/stat``) and the
machine's busy and idle time (``/proc/stat``); the cores each group used between two snapshots
are the difference over the wall time between them. A process that starts inside the window
counts from zero; one that ends inside it is left out (its time is not in the later snapshot),
so a group's share is a lower bound when its processes come and go.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")
IDLE = "idle"
OTHER = "rest of the machine"


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    session: int
    cpu_s: float
    cmdline: str


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds so far per grouped process, and the machine's busy and idle seconds."""

    at: float
    by_pid: dict[int, tuple[str, float]]
    machine_busy_s: float
    machine_idle_s: float


# Decides a process's group from its info and the table of all processes (for ancestry);
# None leaves the process out.
Classifier = Callable[[ProcInfo, Mapping[int, ProcInfo]], str | None]


def read_proc(pid: int) -> ProcInfo | None:
    """One process's info, or None if it is gone (or unreadable)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    # The command name (in parentheses) may hold spaces or parentheses: split after the last ')'.
    fields = stat.rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    cmdline = raw.replace(b"\0", b" ").decode("utf-8", "replace").strip()
    return ProcInfo(pid, int(fields[1]), int(fields[3]), ticks / CLOCK_TICKS_PER_S, cmdline)


def processes() -> dict[int, ProcInfo]:
    table = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (info := read_proc(int(entry.name))) is not None:
            table[info.pid] = info
    return table


def machine_seconds() -> tuple[float, float]:
    """(busy, idle) seconds summed over all CPUs since boot; iowait counts as idle."""
    values = [int(v) for v in (PROC / "stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / CLOCK_TICKS_PER_S, idle / CLOCK_TICKS_PER_S


def snapshot(classify: Classifier) -> CpuSnapshot:
    table = processes()
    busy, idle = machine_seconds()
    by_pid = {pid: (group, info.cpu_s) for pid, info in table.items() if (group := classify(info, table))}
    return CpuSnapshot(time.monotonic(), by_pid, busy, idle)


def descends_from(info: ProcInfo, ancestor: int, table: Mapping[int, ProcInfo]) -> bool:
    """``info`` is ``ancestor`` or one of its descendants (walking parent IDs in ``table``)."""
    seen: set[int] = set()
    current: ProcInfo | None = info
    while current is not None and current.pid not in seen:
        if current.pid == ancestor:
            return True
        seen.add(current.pid)
        current = table.get(current.ppid)
    return False


def cores(a: CpuSnapshot, b: CpuSnapshot) -> dict[str, float]:
    """Cores each group used from ``a`` to ``b`` (CPU seconds / wall seconds); the machine's busy
    cores no group accounts for under ``OTHER`` (the kernel's own work included), its idle cores
    under ``IDLE``."""
    wall_s = b.at - a.at
    if wall_s <= 0:
        raise ValueError("the second snapshot must be later than the first")
    used: dict[str, float] = {}
    for pid, (group, cpu_s) in b.by_pid.items():
        # A Ray worker's group may change (ray::IDLE becomes an actor): the window's time goes
        # to the group it ends in.
        before = a.by_pid.get(pid)
        start_s = before[1] if before is not None else 0.0
        used[group] = used.get(group, 0.0) + max(0.0, cpu_s - start_s) / wall_s
    busy = (b.machine_busy_s - a.machine_busy_s) / wall_s
    used[OTHER] = max(0.0, busy - sum(used.values()))
    used[IDLE] = (b.machine_idle_s - a.machine_idle_s) / wall_s
    return used
