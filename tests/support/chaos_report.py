"""The chaos runs' figures in pytest's terminal summary, so that CI's log shows them.

CI runs plain ``pytest`` (``-ra``), which shows no output of a passing test. A chaos smoke
records its run here (``record_run``: schedules, faults injected per kind, violations, wall time)
before it asserts anything, and ``pytest_terminal_summary`` prints every recorded run in a
"chaos runs" section at the end of the session, pass or fail. The wall time is reported, never
asserted: speed is measured by benchmarks, not by tests.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from chaos.runner import headline

RUNS = pytest.StashKey[list[str]]()


def record_run(
    config: pytest.Config, name: str, schedules: int, injected: Mapping[str, int], violations: int, wall_s: float
) -> None:
    """Keep one run's figures for the session's terminal summary."""
    lines = config.stash.setdefault(RUNS, [])
    lines.append(f"{name}: {headline(schedules, injected, violations, wall_s)}")
    lines.extend(f"  {kind:<36} {count:>7}" for kind, count in sorted(injected.items()))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    lines = config.stash.get(RUNS, [])
    if lines:
        terminalreporter.section("chaos runs")
        for line in lines:
            terminalreporter.write_line(line)
