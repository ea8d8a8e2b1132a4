"""What a position of this source names: the end LSN of a transaction, a snapshot's progress, or
the marker of a snapshot that must be (re)done.

Snapshot records carry ``snapshot:<cp>:<n>`` positions, which only tell the source which
documents are no longer in flight: the snapshot counts as done once a position of its end (the
consistent point ``cp`` as pg_lsn text) or later is committed.
"""

from __future__ import annotations

from adapters.sources.pgoutput import lsn_to_int
from coordinator.errors import SourceError

# The checkpoint of a source whose snapshot must be (re)done before it streams again.
SNAPSHOT_REQUIRED = "snapshot-required"
SNAPSHOT_POSITION_PREFIX = "snapshot:"


def position_lsn(position: str) -> int | None:
    """The LSN a stream position names; None for snapshot progress and the snapshot marker."""
    if position.startswith(SNAPSHOT_POSITION_PREFIX) or position == SNAPSHOT_REQUIRED:
        return None
    try:
        return lsn_to_int(position)
    except ValueError as exc:
        raise SourceError(f"not a Postgres logical replication position: {position!r}") from exc


def snapshot_progress(cp_text: str, count: int) -> str:
    """The position of the ``count``-th record of the snapshot taken at ``cp_text``."""
    return f"{SNAPSHOT_POSITION_PREFIX}{cp_text}:{count}"
