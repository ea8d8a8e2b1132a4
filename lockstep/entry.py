"""The ``lockstep`` executable: stop signals are caught before the command line is imported
(see ``lockstep.stop_signals``), then the command line runs."""

from __future__ import annotations

from lockstep.stop_signals import catch_early

catch_early()

from lockstep.cli import app  # noqa: E402 (after catching stop signals: one arriving meanwhile is remembered)


def main() -> None:
    app(prog_name="lockstep")
