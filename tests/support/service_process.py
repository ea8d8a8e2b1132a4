"""``lockstep run`` as a real process for the tests: start, wait, stop, kill -9 (the whole tree,
or only the process group, as a supervisor does), and its log lines as they come."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil

LOCKSTEP = [sys.executable, "-m", "lockstep"]
# How long a test waits for the service to reach a state before failing.
WAIT_S = 120.0
# A graceful stop (SIGTERM: drain, checkpoint, exit) or a restarted run must end within this.
STOP_TIMEOUT_S = 300.0
PROBE_TIMEOUT_S = 5.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_service(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*LOCKSTEP, "--log-level", "info", "run", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop_service(proc: subprocess.Popen[str]) -> str:
    """SIGTERM and wait; returns stderr (the JSON log lines)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=STOP_TIMEOUT_S)
    return err


def kill_process_group(proc: subprocess.Popen[str]) -> list[psutil.Process]:
    """SIGKILL the service's process group only, as systemd or a container runtime may: Ray's
    actors, in groups of their own, are not sent anything. Returns every process the service had
    started, as they were just before the kill."""
    started: list[psutil.Process] = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=STOP_TIMEOUT_S)
    return started


def still_running(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those of ``processes`` that still run (a zombie holds nothing and counts as gone)."""
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            continue
    return alive


def kill_all(processes: list[psutil.Process]) -> None:
    """SIGKILL whatever of ``processes`` still runs (a test's own cleanup)."""
    for process in still_running(processes):
        try:
            process.kill()
        except psutil.NoSuchProcess:
            continue


class LogTail:
    """A started service whose stderr (the JSON log lines) is read as it comes, so that a test can
    act at a given moment of the service's life."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None, "the service's stderr must be a pipe"
        self.proc = proc
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="log-tail", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()

    def wait_exit(self) -> int:
        """The exit status, once the process ended and its last log line was read."""
        code = self.proc.wait(timeout=STOP_TIMEOUT_S)
        self._reader.join(STOP_TIMEOUT_S)
        return code

    def text(self) -> str:
        with self._changed:
            return "".join(self.lines)


def kill_service(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the service and every process it started (Ray's raylet and workers leave its group)."""
    root = psutil.Process(proc.pid)
    for child in [*root.children(recursive=True), root]:
        try:
            child.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            continue
    proc.communicate(timeout=STOP_TIMEOUT_S)


def wait_for(predicate: Callable[[], bool], what: str, proc: subprocess.Popen[str] | None = None) -> None:
    """Poll ``predicate`` until true; fail with the service's log tail if it exits or time runs out."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"the service exited ({proc.returncode}) waiting for {what}: {err[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/readyz", timeout=PROBE_TIMEOUT_S).status_code == 200
    except httpx.TransportError:
        return False
