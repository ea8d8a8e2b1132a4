"""What a killed run leaves, on real processes: the run file, its clearing, actors ending with
their driver, and a milvus-lite file opened once its holder is gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from milvus_lite.server_manager import server_manager_instance

from adapters.vector.settings import VectorSettings
from coordinator.leftovers import ProcessId, RunRecord
from lockstep.bootstrap import build_vector
from lockstep.leftovers import (
    clear_dead_runs,
    clear_leftovers,
    descendants,
    machine,
    run_file,
    runs_dir,
    start_of,
    this_process,
)
from lockstep.settings import Settings

# A process that sleeps until killed (longer than any test here takes).
SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]
# How long a test gives a process to reach a state (start, exit) before failing.
PROCESS_WAIT_S = 30.0
# An actor's driver watch checks every DRIVER_WATCH_S; this bounds its end, Python's start included.
ACTOR_END_BOUND_S = 15.0


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; every one still running is killed at the end."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _sleeper(processes: list[subprocess.Popen[bytes]]) -> tuple[subprocess.Popen[bytes], ProcessId]:
    proc = subprocess.Popen(SLEEPER, stdin=subprocess.DEVNULL)
    processes.append(proc)
    ticks = start_of(proc.pid)
    assert ticks is not None
    return proc, ProcessId(proc.pid, ticks)


def _gone_owner(processes: list[subprocess.Popen[bytes]]) -> ProcessId:
    """A process that ran and has ended (reaped), as a dead run's owner."""
    proc, pid = _sleeper(processes)
    proc.kill()
    proc.wait()
    return pid


def _here() -> str:
    here = machine()
    assert here is not None, "these tests need /proc"
    return here


def _wait_until(predicate: object, what: str, bound_s: float = PROCESS_WAIT_S) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + bound_s
    while not predicate():
        assert time.monotonic() < deadline, f"not within {bound_s} s: {what}"
        time.sleep(0.05)


def test_a_dead_runs_leftovers_are_killed_and_a_live_runs_processes_are_not(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """Of two records, the one whose owner is gone has its running processes killed and its file
    removed; the one whose owner runs keeps its processes and its file."""
    leftover_proc, leftover = _sleeper(processes)
    live_owner_proc, live_owner = _sleeper(processes)
    live_child_proc, live_child = _sleeper(processes)
    dead = tmp_path / "dead.json"
    dead.write_text(RunRecord(_here(), _gone_owner(processes), (leftover,)).encode())
    alive = tmp_path / "alive.json"
    alive.write_text(RunRecord(_here(), live_owner, (live_child,)).encode())

    clear_leftovers(tmp_path, _here())

    assert leftover_proc.wait(timeout=PROCESS_WAIT_S) == -signal.SIGKILL
    assert live_owner_proc.poll() is None and live_child_proc.poll() is None, "a live run was touched"
    assert not dead.exists() and alive.exists()


def test_a_process_whose_pid_was_reused_is_not_killed(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """A recorded PID now held by a process started at another time is left running."""
    stranger_proc, stranger = _sleeper(processes)
    reused = ProcessId(stranger.pid, stranger.start_ticks - 1)
    (tmp_path / "dead.json").write_text(RunRecord(_here(), _gone_owner(processes), (reused,)).encode())

    clear_leftovers(tmp_path, _here())

    assert stranger_proc.poll() is None
    assert not (tmp_path / "dead.json").exists(), "nothing of that run runs: its record goes"


def test_a_record_of_another_machine_is_left_alone(tmp_path: Path, processes: list[subprocess.Popen[bytes]]) -> None:
    """PIDs recorded under another boot or PID namespace are not looked up here: nothing is killed."""
    proc, pid = _sleeper(processes)
    record = tmp_path / "other.json"
    record.write_text(RunRecord("another-boot/pidns:1", _gone_owner(processes), (pid,)).encode())

    clear_leftovers(tmp_path, _here())

    assert proc.poll() is None and record.exists()


def test_the_run_file_records_this_run_and_what_it_started_and_goes_at_a_clean_end(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """Beside the SQLite ledger, the record names this process and, once noted, its children;
    a clean end removes it."""
    settings = Settings.model_validate({"ledger": {"path": str(tmp_path / "ledger.db")},
                                        "vector": {"uri": str(tmp_path / "milvus.db")},
                                        "keyword": {"kind": "tantivy", "path": str(tmp_path / "tantivy")}})
    directory = runs_dir(settings)
    assert directory == tmp_path / "ledger.db.lockstep-runs"
    with run_file(settings) as own:
        assert own.path is not None and own.path.parent == directory
        record = RunRecord.decode(own.path.read_text())
        assert record is not None and record.owner == this_process() and record.processes == ()
        _, child = _sleeper(processes)
        own.note_children()
        record = RunRecord.decode(own.path.read_text())
        assert record is not None and child in record.processes
    assert list(directory.iterdir()) == []


def test_clearing_dead_runs_for_a_command_kills_what_a_dead_run_beside_its_data_left(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """What `sync` or another command would call before opening the stores: a dead run's
    leftover beside the ledger is killed; with no records there, nothing happens."""
    settings = Settings.model_validate({"ledger": {"path": str(tmp_path / "ledger.db")}})
    clear_dead_runs(settings)  # no record directory yet
    directory = runs_dir(settings)
    assert directory is not None
    directory.mkdir()
    leftover_proc, leftover = _sleeper(processes)
    (directory / "dead.json").write_text(RunRecord(_here(), _gone_owner(processes), (leftover,)).encode())
    clear_dead_runs(settings)
    assert leftover_proc.wait(timeout=PROCESS_WAIT_S) == -signal.SIGKILL
    assert list(directory.iterdir()) == []


def test_a_deployment_without_local_data_keeps_no_run_file() -> None:
    """Postgres ledger, OpenSearch and a Milvus server: nothing on this machine for a leftover to hold."""
    settings = Settings.model_validate({
        "ledger": {"kind": "postgres", "dsn": "postgresql://lockstep@db/lockstep"},
        "keyword": {"kind": "opensearch", "url": "http://search:9200", "index": "kb"},
        "vector": {"uri": "http://milvus:19530"},
    })
    assert runs_dir(settings) is None


def test_descendants_include_grandchildren_and_a_zombie_counts_as_gone(
    processes: list[subprocess.Popen[bytes]],
) -> None:
    """Processes started by children are found; an ended, unreaped child has no start time."""
    script = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); time.sleep(600)"
    parent = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.DEVNULL)
    processes.append(parent)
    _wait_until(lambda: len(descendants(parent.pid)) == 1, "the grandchild started")
    [grandchild] = descendants(parent.pid)
    mine = descendants(os.getpid())
    assert grandchild in mine and ProcessId(parent.pid, start_of(parent.pid) or -1) in mine
    os.kill(grandchild.pid, signal.SIGKILL)  # its parent never reaps it: a zombie
    _wait_until(lambda: start_of(grandchild.pid) is None, "the zombie counted as gone")


def test_an_actor_ends_itself_once_its_driver_is_gone(processes: list[subprocess.Popen[bytes]]) -> None:
    """The driver watch an actor starts (here in a plain process) SIGKILLs it once its driver is
    gone, within the named bound."""
    driver_proc, driver = _sleeper(processes)
    script = textwrap.dedent(f"""
        import time
        from coordinator.leftovers import ProcessId
        from lockstep.ray_runtime import Driver, _end_with
        _end_with(Driver({_here()!r}, ProcessId({driver.pid}, {driver.start_ticks})))
        print("watching", flush=True)
        time.sleep(600)
    """)
    actor = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    processes.append(actor)
    assert actor.stdout is not None and actor.stdout.readline() == b"watching\n"
    time.sleep(0.5)
    assert actor.poll() is None, "the actor ended while its driver ran"
    driver_proc.kill()
    driver_proc.wait()
    assert actor.wait(timeout=ACTOR_END_BOUND_S) == -signal.SIGKILL


# A milvus-lite file held by another process until it is killed after this long.
HOLD_S = 3.0


def test_a_milvus_lite_file_is_opened_once_the_process_holding_it_ends(tmp_path: Path) -> None:
    """A second process opening a milvus-lite file another one holds waits for it to let go
    (within LITE_LOCK_WAIT_S), then opens and uses it."""
    uri = str(tmp_path / "milvus.db")
    script = f"from pymilvus import MilvusClient; import time; MilvusClient({uri!r}); print('held', flush=True); time.sleep(600)"
    holder = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        threading.Timer(HOLD_S, holder.kill).start()
        index = build_vector(VectorSettings(uri=uri, collection="held"), dim=4)
        index.ensure()
        assert holder.poll() is not None, "opened while the other process held the file"
        assert index.count() == 0
        index.close()
    finally:
        holder.kill()
        holder.wait()
        server_manager_instance.release_server(uri)
