"""Judging a killed run's record: live runs, dead runs' leftovers, reused PIDs, other machines."""

from __future__ import annotations

import pytest

from coordinator.leftovers import ProcessId, RunRecord, Standing, judge

HERE = "boot-1/pidns:4026531836"
OWNER = ProcessId(100, 5000)
RAYLET = ProcessId(101, 5010)
ACTOR = ProcessId(150, 5200)


# What the OS reports in each case: PID -> start ticks of the process that has the PID now.
def test_a_run_whose_owner_still_runs_is_alive_and_nothing_of_it_is_a_leftover() -> None:
    """An owner found with its own start time is a live run (perhaps paused): nothing to clear."""
    record = RunRecord(HERE, OWNER, (RAYLET, ACTOR))
    running = {100: 5000, 101: 5010, 150: 5200}
    assert judge(record, HERE, running.get).standing is Standing.ALIVE
    assert judge(record, HERE, running.get).leftovers == ()


def test_the_processes_of_a_dead_owner_that_still_run_are_its_leftovers() -> None:
    """Owner gone: exactly those recorded processes still running (same PID and start) are leftovers."""
    record = RunRecord(HERE, OWNER, (RAYLET, ACTOR))
    verdict = judge(record, HERE, {150: 5200}.get)
    assert verdict.standing is Standing.DEAD
    assert verdict.leftovers == (ACTOR,)


def test_a_reused_pid_is_never_taken_for_the_process_recorded() -> None:
    """A PID that now names a process started at another time is neither the owner nor a leftover."""
    record = RunRecord(HERE, OWNER, (RAYLET, ACTOR))
    running = {100: 9000, 150: 9100, 101: 5010}
    verdict = judge(record, HERE, running.get)
    assert verdict.standing is Standing.DEAD, "the owner's PID was reused: the owner is gone"
    assert verdict.leftovers == (RAYLET,)


def test_a_record_made_on_another_boot_or_pid_namespace_is_left_alone() -> None:
    """PIDs from another boot or container mean nothing here: no verdict of alive or dead."""
    record = RunRecord("boot-0/pidns:1", OWNER, (ACTOR,))
    verdict = judge(record, HERE, {150: 5200}.get)
    assert verdict.standing is Standing.FOREIGN and verdict.leftovers == ()


def test_a_process_recorded_twice_is_a_leftover_once() -> None:
    """A run records its processes again as it starts more; each leftover is listed once."""
    record = RunRecord(HERE, OWNER, (ACTOR, RAYLET, ACTOR))
    verdict = judge(record, HERE, {150: 5200, 101: 5010}.get)
    assert verdict.leftovers == (ACTOR, RAYLET)


def test_a_record_reads_back_as_written() -> None:
    """encode and decode are inverse."""
    record = RunRecord(HERE, OWNER, (RAYLET, ACTOR))
    assert RunRecord.decode(record.encode()) == record


@pytest.mark.parametrize(
    "text",
    [
        "",
        '{"machine": "m", "owner": [1, 2], "proc',  # cut short
        '{"machine": "m", "owner": [1, 2]}',  # no processes
        '{"machine": "", "owner": [1, 2], "processes": []}',
        '{"machine": "m", "owner": [0, 2], "processes": []}',
        '{"machine": "m", "owner": [1, -2], "processes": []}',
        '{"machine": "m", "owner": [true, 2], "processes": []}',
        '{"machine": "m", "owner": [1, 2], "processes": [[3]]}',
        '{"machine": "m", "owner": "1", "processes": []}',
        "[]",
    ],
)
def test_text_that_is_not_a_record_decodes_to_none(text: str) -> None:
    """A file cut short or not written by lockstep is no record (never a crash, never a PID)."""
    assert RunRecord.decode(text) is None
