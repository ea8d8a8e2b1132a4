"""lockstep's container image, built and run without a Docker engine, for tests/test_image.py.

The repository's Dockerfile is built with buildah from a Debian bookworm rootfs made by
mmdebstrap (python3 + python3-venv, as the Dockerfile's ``BASE`` allows) and run with podman on
runc, all installed from Debian's packages when missing (see docs/image.md). Every step has a
named timeout, and a missing tool fails the test: nothing here skips.

The base tarball is cached between sessions (``base_tarball``): it depends only on the
mmdebstrap arguments and on Debian's archive, so a copy younger than ``BASE_CACHE_MAX_AGE_S``
stands in for a fresh one. Images are tagged per session and removed afterwards.

The build's steps are timed as buildah prints them, and the figures (step times, image size)
land in a "container image" section of pytest's terminal summary (``record_figure``), because
CI shows no output of a passing test.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

DEBIAN_TOOLS = ("buildah", "podman", "runc", "mmdebstrap")
# Installing the four packages took ~40 s here; an `apt-get update` first may add a minute.
APT_TIMEOUT_S = 600
# The base rootfs: what the Dockerfile needs of a base (python3 with venv as `python3`) plus the CA
# certificates python:*-slim ships, without documentation, as debian:bookworm-slim leaves it out.
BASE_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
BASE_DPKG_OPTS = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
)
# mmdebstrap took 25 s on an idle machine and 135 s on a busy one.
MMDEBSTRAP_TIMEOUT_S = 900
# A cached base is reused for a week: it saves CI the mmdebstrap run, yet Debian's security
# updates reach the test image within days.
BASE_CACHE_MAX_AGE_S = 7 * 24 * 3600
# Importing the ~175 MB tarball into podman's store takes ~10 s.
IMPORT_TIMEOUT_S = 300
# The build downloads and installs the wheel's dependencies from PyPI: ~5 min seen on a busy machine.
BUILD_TIMEOUT_S = 1800
# Short podman calls (inspect, rm, rmi, logs).
PODMAN_CALL_TIMEOUT_S = 120
# runc, not crun, and explicit ulimits: these machines refuse crun and podman's default ulimits.
PODMAN = ("podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs")
ULIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")
# The CA bundle the host trusts. The build's pip gets it as a secret, so that it trusts whatever
# this machine trusts (here a TLS-inspecting proxy in front of PyPI).
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# pip's lines that end a phase of the install step, and the phase each one starts: they split
# the step's time into the download (resolving and fetching every wheel) and the install.
PIP_PHASES = (
    ("Successfully built lockstep", "  pip: resolve and download the dependencies"),
    ("Installing collected packages", "  pip: install (unpack, compile .pyc)"),
    ("Successfully installed", "  pip: uninstall pip and setuptools"),
)
# Lines of a failed command's output quoted in the failure.
OUTPUT_TAIL_LINES = 60

FIGURES = pytest.StashKey[list[str]]()


class ImageToolError(RuntimeError):
    """A tool this module drives is missing or failed; the message carries its output's tail."""


@dataclass
class BuildReport:
    """One build: seconds per Dockerfile step as buildah printed them, and the whole wall time."""

    steps: list[tuple[str, float]] = field(default_factory=list)
    wall_s: float = 0.0


def record_figure(config: pytest.Config, line: str) -> None:
    """Keep one line for the session's "container image" summary."""
    config.stash.setdefault(FIGURES, []).append(line)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    lines = config.stash.get(FIGURES, [])
    if lines:
        terminalreporter.section("container image")
        for line in lines:
            terminalreporter.write_line(line)


def _tail(text: str) -> str:
    return "\n".join(text.splitlines()[-OUTPUT_TAIL_LINES:])


def check(argv: Sequence[str], timeout_s: float, what: str) -> str:
    """Run a command to its end with no stdin; its stdout, or ImageToolError with its output."""
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise ImageToolError(f"{what}: no result within {timeout_s:.0f} s ({' '.join(argv)})") from exc
    if done.returncode != 0:
        raise ImageToolError(f"{what} failed with exit code {done.returncode}:\n{_tail(done.stdout + done.stderr)}")
    return done.stdout


def _missing_tools() -> list[str]:
    return [tool for tool in DEBIAN_TOOLS if shutil.which(tool) is None]


def _apt_get(*args: str) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    argv = ["apt-get", *args]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=APT_TIMEOUT_S, stdin=subprocess.DEVNULL, env=env, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise ImageToolError(f"apt-get {args[0]}: no result within {APT_TIMEOUT_S} s") from exc
    if done.returncode != 0:
        raise ImageToolError(f"apt-get {' '.join(args)} failed:\n{_tail(done.stdout + done.stderr)}")


def ensure_tools() -> None:
    """Install buildah, podman, runc and mmdebstrap from Debian's packages when any is missing."""
    if not _missing_tools():
        return
    if os.geteuid() != 0:
        raise ImageToolError(f"{', '.join(_missing_tools())} missing, and installing them needs root")
    try:
        _apt_get("install", "-y", "--no-install-recommends", *DEBIAN_TOOLS)
    except ImageToolError:
        # A stale package index is the usual reason; a second failure is final.
        _apt_get("update")
        _apt_get("install", "-y", "--no-install-recommends", *DEBIAN_TOOLS)
    if _missing_tools():
        raise ImageToolError(f"still missing after apt-get install: {', '.join(_missing_tools())}")


def _mmdebstrap_argv(out: Path) -> list[str]:
    opts = [f"--dpkgopt={opt}" for opt in BASE_DPKG_OPTS]
    return [
        "mmdebstrap", "--variant=apt", "--format=tar", f"--include={','.join(BASE_PACKAGES)}", *opts,
        BASE_SUITE, str(out),
    ]


def _base_cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "lockstep" / "image-base"


def _fresh(path: Path) -> bool:
    return path.is_file() and time.time() - path.stat().st_mtime < BASE_CACHE_MAX_AGE_S


def base_tarball() -> tuple[Path, bool]:
    """The base rootfs tarball and whether it came from the cache.

    The cache key is the mmdebstrap command line, so a change to the packages or options builds
    a new tarball. mmdebstrap writes beside it and the file is renamed only once complete, so an
    interrupted run never leaves a truncated tarball to be reused.
    """
    key = hashlib.sha256(" ".join(_mmdebstrap_argv(Path("-"))).encode()).hexdigest()[:16]
    cache = _base_cache_dir()
    tarball = cache / f"{BASE_SUITE}-{key}.tar"
    if _fresh(tarball):
        return tarball, True
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / f"{tarball.stem}.{os.getpid()}.partial.tar"
    try:
        check(_mmdebstrap_argv(partial), MMDEBSTRAP_TIMEOUT_S, "mmdebstrap")
        os.replace(partial, tarball)
    finally:
        partial.unlink(missing_ok=True)
    return tarball, False


def import_base(tarball: Path, tag: str) -> None:
    check([*PODMAN, "import", str(tarball), tag], IMPORT_TIMEOUT_S, "podman import")


def _step_label(line: str) -> str | None:
    """``[1/2] STEP 11/11: RUN …`` → ``[1/2] RUN …`` (cut short); None for any other line."""
    stage, sep, rest = line.partition("STEP ")
    if not sep or (stage and not stage.startswith("[")):
        return None
    _, _, instruction = rest.partition(": ")
    return f"{stage}{' '.join(instruction.split())[:72]}"


def build_image(context: Path, tag: str, build_args: dict[str, str]) -> BuildReport:
    """``buildah bud`` the Dockerfile in ``context``; times each step as its line appears."""
    argv = [
        "buildah", "bud", "--isolation", "chroot", "--layers=false", "--force-rm", "--tag", tag,
        "--secret", f"id=pip-ca,src={HOST_CA_BUNDLE}",
        *(f"--build-arg={name}={value}" for name, value in build_args.items()),
        str(context),
    ]
    if not HOST_CA_BUNDLE.is_file():
        raise ImageToolError(f"no CA bundle at {HOST_CA_BUNDLE} for the build's pip")
    return _timed_build(argv)


def _timed_build(argv: list[str]) -> BuildReport:
    report = BuildReport()
    output: list[str] = []
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True
    )
    killer = threading.Timer(BUILD_TIMEOUT_S, proc.kill)
    killer.start()
    try:
        _read_steps(proc, report, output)
        code = proc.wait()
    finally:
        killer.cancel()
    report.wall_s = time.monotonic() - started
    if code != 0:
        reason = f"killed after {BUILD_TIMEOUT_S} s" if code < 0 else f"exit code {code}"
        raise ImageToolError(f"buildah bud failed ({reason}):\n{_tail(''.join(output))}")
    return report


def _phase_label(line: str) -> str | None:
    """A Dockerfile step, the commit, or a phase of pip inside the install step; else None."""
    if line.lstrip("[/0123456789] ").startswith("COMMIT"):
        return "commit: " + line[:60]
    for marker, label in PIP_PHASES:
        if line.startswith(marker):
            return label
    return _step_label(line)


def _read_steps(proc: subprocess.Popen[str], report: BuildReport, output: list[str]) -> None:
    """Each phase lasts from its line to the next phase's line (or to the end of the build)."""
    assert proc.stdout is not None
    label, since = "start", time.monotonic()
    for line in proc.stdout:
        output.append(line)
        phase = _phase_label(line.strip())
        if phase is None:
            continue
        now = time.monotonic()
        report.steps.append((label, now - since))
        label, since = phase, now
    report.steps.append((label, time.monotonic() - since))


def image_size_bytes(tag: str) -> int:
    return int(check([*PODMAN, "image", "inspect", "--format", "{{.Size}}", tag], PODMAN_CALL_TIMEOUT_S, "inspect"))


def image_user(tag: str) -> str:
    return check(
        [*PODMAN, "image", "inspect", "--format", "{{.Config.User}}", tag], PODMAN_CALL_TIMEOUT_S, "inspect"
    ).strip()


def remove_image(tag: str) -> None:
    """Remove a tag this session made; a failure here only leaves disk used, so it is not raised."""
    subprocess.run(
        [*PODMAN, "rmi", "--force", tag], capture_output=True, timeout=PODMAN_CALL_TIMEOUT_S,
        stdin=subprocess.DEVNULL, check=False,
    )
