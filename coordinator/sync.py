"""Batch sync: read a source to its end, apply it in bounded batches, checkpoint after each.

Snapshot sources that can detect hard deletes (``ReconcilableSource``) get an ID
reconciliation pass at the end of every run.

The checkpoint written after a batch is the position after its last record, and it is written
only once every event of the batch is committed in both indexes, dead-lettered, or stale.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from itertools import islice

from coordinator import crashpoints
from coordinator.apply import ApplyStats
from coordinator.events import ChangeEvent
from coordinator.ports import ChangeSource, Engine, ReconcilableSource, SourceRecord

ProgressFn = Callable[[int], None]
AppliedFn = Callable[[Sequence[SourceRecord]], None]


def _no_progress(_records: int) -> None:
    return None


def _nothing_applied(_records: Sequence[SourceRecord]) -> None:
    return None


def run_sync(
    source: ChangeSource,
    engine: Engine,
    *,
    batch_events: int,
    progress: ProgressFn = _no_progress,
    applied: AppliedFn = _nothing_applied,
) -> ApplyStats:
    """Recover pending intents, then apply the whole source; returns the run's counters.
    ``applied`` sees every batch once it is applied (the caller's consistency token)."""
    engine.recover()
    for batch in _batches(source.read(), batch_events):
        engine.apply(batch)
        applied(batch)
        position = _last_position(batch)
        if position is not None:
            source.commit(position)
            engine.crash(crashpoints.AFTER_CHECKPOINT)
        progress(len(batch))
    if isinstance(source, ReconcilableSource):
        for deletes in _batches(source.reconcile_ids(), batch_events):
            engine.apply(deletes)
            applied(deletes)
            progress(len(deletes))
    return engine.stats


def _batches(
    records: Iterator[SourceRecord] | Iterator[ChangeEvent], size: int
) -> Iterator[list[SourceRecord]]:
    while batch := list(islice(records, size)):
        yield batch


def _last_position(batch: list[SourceRecord]) -> str | None:
    for record in reversed(batch):
        if record.position is not None:
            return record.position
    return None
