"""The harness's progress lines (on stderr, beside the printed report) and the pause between phases."""

from __future__ import annotations

import sys
import time

# Pause between phases so that a server's background work (Milvus flushes and index builds of a
# dropped collection) does not bleed into the next measurement.
SETTLE_S = 5.0


def say(message: str) -> None:
    print(f"-- {message}", file=sys.stderr, flush=True)


def settle() -> None:
    time.sleep(SETTLE_S)
