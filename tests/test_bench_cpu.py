"""bench/cpu.py: per-process CPU from /proc, grouped, as the streaming benchmark reports it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from bench import cpu

BUSY = "while True: pass"
# CPU seconds the busy tree must be charged, and how long the test waits for them at most.
BUSY_CPU_S = 0.3
BUSY_CPU_WAIT_S = 60.0
# A shell that starts a busy Python child: the child must count for the shell's group.
BUSY_GRANDCHILD = f'{sys.executable} -c "{BUSY}"'


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        os.killpg(p.pid, signal.SIGKILL)  # the whole group: the shell's busy child too
        p.wait()


def test_a_busy_process_tree_is_charged_to_its_group_and_a_sleeper_to_almost_nothing(
    children: list[subprocess.Popen[bytes]],
) -> None:
    busy = subprocess.Popen(["/bin/sh", "-c", BUSY_GRANDCHILD], start_new_session=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    children += [busy, sleeper]
    time.sleep(0.5)  # let the shell start its child

    def classify(info: cpu.ProcInfo, table: Mapping[int, cpu.ProcInfo]) -> str | None:
        if cpu.descends_from(info, busy.pid, table):
            return "busy"
        return "sleeper" if info.pid == sleeper.pid else None

    before = cpu.snapshot(classify)
    assert sum(group == "busy" for group, _ in before.by_pid.values()) == 2, "the shell and its child"
    # On a loaded machine the busy child gets a small share of a core, so wait for CPU seconds
    # rather than for wall time: the sleeper must stay near zero however long that takes.
    deadline = time.monotonic() + BUSY_CPU_WAIT_S
    while True:
        time.sleep(0.5)
        after = cpu.snapshot(classify)
        used = cpu.cores(before, after)
        busy_cpu_s = used["busy"] * (after.at - before.at)
        if busy_cpu_s >= BUSY_CPU_S or time.monotonic() > deadline:
            break

    assert busy_cpu_s >= BUSY_CPU_S, used
    assert used["sleeper"] < 0.05, used
    assert used[cpu.IDLE] >= 0.0 and used[cpu.OTHER] >= 0.0
    # The machine's busy and idle cores add up to at most its CPU count (rounding aside).
    assert sum(used.values()) <= (os.cpu_count() or 1) + 0.1, used


def snap(at: float, busy_s: float, idle_s: float, **by_pid: tuple[str, float]) -> cpu.CpuSnapshot:
    return cpu.CpuSnapshot(at, {int(k[1:]): v for k, v in by_pid.items()}, busy_s, idle_s)


def test_cores_counts_new_processes_from_zero_and_the_rest_of_the_machine_as_other() -> None:
    a = snap(10.0, 100.0, 50.0, p1=("shards", 5.0), p2=("writers", 1.0))
    b = snap(12.0, 103.0, 51.0, p1=("shards", 6.0), p2=("writers", 1.5), p3=("writers", 0.25))

    used = cpu.cores(a, b)

    assert used["shards"] == pytest.approx(0.5)
    assert used["writers"] == pytest.approx(0.375)  # (0.5 + 0.25 new) / 2 s
    assert used[cpu.OTHER] == pytest.approx(1.5 - 0.875)  # 3 busy CPU seconds over 2 s
    assert used[cpu.IDLE] == pytest.approx(0.5)


def test_a_process_that_changes_group_is_charged_to_its_new_group_for_the_window_only() -> None:
    a = snap(0.0, 0.0, 0.0, p7=("Ray system", 4.0))
    b = snap(1.0, 1.0, 0.0, p7=("shards", 4.5))

    used = cpu.cores(a, b)

    assert used == {"shards": pytest.approx(0.5), cpu.OTHER: pytest.approx(0.5), cpu.IDLE: 0.0}


def test_cores_needs_a_later_second_snapshot() -> None:
    a = snap(5.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="later"):
        cpu.cores(a, a)


def test_read_proc_parses_a_command_name_holding_spaces_and_parentheses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc = tmp_path / "4242"
    proc.mkdir()
    ticks = cpu.CLOCK_TICKS_PER_S
    fields = ["S", "17", "4242", "99", *["0"] * 7, str(3 * ticks), str(ticks), *["0"] * 30]
    (proc / "stat").write_text(f"4242 (ray::Odd (x) name) {' '.join(fields)}\n")
    (proc / "cmdline").write_bytes(b"ray::ShardActor\0--flag\0")
    monkeypatch.setattr(cpu, "PROC", tmp_path)

    info = cpu.read_proc(4242)

    assert info == cpu.ProcInfo(4242, 17, 99, 4.0, "ray::ShardActor --flag")
    assert cpu.read_proc(4243) is None, "a process that is gone reads as None"
