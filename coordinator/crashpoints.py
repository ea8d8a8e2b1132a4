"""Named crash points at every boundary of the apply protocol.

Production passes ``no_crash``. Crash tests pass a hook that kills the process (SIGKILL, not an
exception) when a chosen point is reached, then restart and check that everything converges.
"""

from __future__ import annotations

from collections.abc import Callable

AFTER_EMBED = "after_embed"
AFTER_PREPARE = "after_prepare"
AFTER_KEYWORD_APPLY = "after_keyword_apply"
AFTER_VECTOR_APPLY = "after_vector_apply"
AFTER_COMMIT = "after_commit"
AFTER_CHECKPOINT = "after_checkpoint"

PROTOCOL_POINTS = (
    AFTER_EMBED,
    AFTER_PREPARE,
    AFTER_KEYWORD_APPLY,
    AFTER_VECTOR_APPLY,
    AFTER_COMMIT,
    AFTER_CHECKPOINT,
)

CrashHook = Callable[[str], None]


def no_crash(_point: str) -> None:
    """The production hook: crash points cost one function call."""
    return None
