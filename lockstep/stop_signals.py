"""Stop signals caught before the command line has imported anything (``lockstep.entry``).

A stop signal that arrives while the command line is still importing (a second or two) is
remembered instead of killing the process: ``lockstep run`` then stops cleanly at once and exits
0; every other command gets the signal's default action back, and the signal redone, as soon as
the command is known (``lockstep.cli.main``).
"""

from __future__ import annotations

import os
import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
EARLY_STOP = threading.Event()
_caught = threading.Event()


def catch_early() -> None:
    """Remember stop signals from now on (the executable calls this before its imports)."""
    for stop in STOP_SIGNALS:
        signal.signal(stop, lambda *_: EARLY_STOP.set())
    _caught.set()


def release_early() -> None:
    """Give stop signals their default action back, redoing one that came meanwhile; nothing
    when they were not caught (the CLI imported as a library, by tests)."""
    if not _caught.is_set():
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _caught.clear()
    if EARLY_STOP.is_set():
        os.kill(os.getpid(), signal.SIGTERM)
