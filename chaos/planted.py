"""Planted bugs: deliberately broken collaborators that prove the chaos suite has teeth.

Switched on only by the runner's ``planted_bug`` parameter (``lockstep chaos run --plant-bug``),
never by lockstep itself: nothing in ``coordinator/`` or ``lockstep/`` knows about them.

- ``keyword-drops-deletes``: the keyword index reports every delete as applied and deletes
  nothing ("deletes sent to one index only"); ghosts of deleted documents stay searchable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from coordinator.model import ChunkDelete, ItemResult, ItemStatus, WriteResult

KEYWORD_DROPS_DELETES = "keyword-drops-deletes"
PLANTED_BUGS = (KEYWORD_DROPS_DELETES,)


@dataclass
class DropsDeletes:
    """A keyword index that acknowledges deletes without sending them."""

    inner: Any

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def delete(self, deletes: Sequence[ChunkDelete]) -> WriteResult:
        return WriteResult(tuple(ItemResult(d.chunk_id, ItemStatus.APPLIED) for d in deletes))


def _same(index: Any) -> Any:
    return index


def keyword_wrapper(bug: str | None) -> Callable[[Any], Any]:
    """How the runner wraps the keyword index for ``bug`` (unchanged when None)."""
    if bug is None:
        return _same
    if bug == KEYWORD_DROPS_DELETES:
        return DropsDeletes
    raise ValueError(f"unknown planted bug {bug!r}; one of {', '.join(PLANTED_BUGS)}")
