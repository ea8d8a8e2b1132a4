"""Dual apply: every batch goes through the two-phase path of each live generation.

The first engine is the active generation's. Bad records are dead-lettered once, by it (the
dead-letter queue is shared); the other generations receive the valid events. A batch counts as
applied only when every generation committed it, so the source checkpoint never passes an event
that a generation being built has not seen.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from coordinator.apply import ApplyEngine, ApplyStats
from coordinator.errors import IntentConflict
from coordinator.events import ChangeEvent
from coordinator.ports import Fence, Intent, SourceRecord

# A generation being rebuilt is also written by the rebuild's backfill: a batch that meets one of
# its intents is tried again after a pause, this many times at most.
CONFLICT_RETRIES_MAX = 100
CONFLICT_PAUSE_S = 0.2


def _no_sleep(_seconds: float) -> None:
    return None


class MultiEngine:
    """The ``Engine`` port over several generations, the active one first."""

    def __init__(self, engines: Sequence[ApplyEngine], *, sleep: Callable[[float], None] = _no_sleep) -> None:
        """``sleep`` waits out another writer's intent (the domain reads no clock itself)."""
        if not engines:
            raise ValueError("MultiEngine needs at least one engine")
        self._sleep = sleep
        self.engines = list(engines)
        self.primary = self.engines[0]

    @property
    def stats(self) -> ApplyStats:
        return self.primary.stats

    def crash(self, point: str) -> None:
        self.primary.crash(point)

    def recover(self, fence: Fence | None = None, owns: Callable[[str], bool] | None = None) -> int:
        return sum(engine.recover(fence, owns) for engine in self.engines)

    def apply(self, records: Sequence[SourceRecord], fence: Fence | None = None) -> list[str]:
        """Apply the batch in every generation. Leaves no document out: a batch that meets a
        rebuild's intent in another generation is tried again there until it passes, so the
        doc_ids returned are the active generation's, which leaves none out either."""
        skipped = self.primary.apply(records, fence)
        events = [r for r in records if isinstance(r, ChangeEvent)]
        for engine in self.engines[1:]:
            for attempt in range(CONFLICT_RETRIES_MAX):
                try:
                    engine.apply(events, fence)
                    break
                except IntentConflict:
                    # A rebuild's backfill holds an intent for one of these documents.
                    if attempt == CONFLICT_RETRIES_MAX - 1:
                        raise
                    self._sleep(CONFLICT_PAUSE_S)
        return skipped

    # --- the split interface the shard worker uses ------------------------------------------

    def pending(self) -> list[Intent]:
        """Intents still prepared in any generation, one per document (the first generation's
        that holds one): ``drive`` reads back each generation's own from the doc_ids."""
        seen: dict[str, Intent] = {}
        for engine in self.engines:
            for intent in engine.pending():
                seen.setdefault(intent.doc_id, intent)
        return list(seen.values())

    def prepare_some(
        self, records: Sequence[SourceRecord], fence: Fence | None = None
    ) -> tuple[list[Intent], list[str]]:
        """``prepare`` in every generation, leaving out the documents another writer (a
        rebuild's backfill) holds in any of them: what one generation left out is withdrawn from
        the others, so a document is prepared everywhere or nowhere. Returns one intent for each
        document prepared in *some* generation, and the doc_ids left out, for the caller to keep
        waiting.

        Each generation plans against its own ledger, so an event can be old news to one and
        new to another: a duplicate the active generation already committed is news to the
        generation being built while its backfill has not reached the document. Such a document
        is prepared in that generation only, and ``drive`` commits it there."""
        held: set[str] = set()
        done: list[tuple[ApplyEngine, list[Intent]]] = []
        offered: Sequence[SourceRecord] = records
        try:
            for engine in self.engines:
                prepared, later = engine.prepare_some(offered, fence)
                done.append((engine, prepared))
                held.update(later)
                # Bad records are dead-lettered once, by the active generation.
                offered = [r for r in records if isinstance(r, ChangeEvent) and r.doc_id not in held]
        except Exception:
            for prepared_in, prepared in done:
                prepared_in.ledger.abort([(i.doc_id, i.version) for i in prepared])
            raise
        self._withdraw(done, held)
        first: dict[str, Intent] = {}
        for _, prepared in done:
            for intent in prepared:
                if intent.doc_id not in held:
                    first.setdefault(intent.doc_id, intent)
        return list(first.values()), sorted(held)

    @staticmethod
    def _withdraw(done: Sequence[tuple[ApplyEngine, list[Intent]]], held: set[str]) -> None:
        """Abort what was prepared for the documents some generation left out."""
        for prepared_in, prepared in done:
            withdrawn = [(i.doc_id, i.version) for i in prepared if i.doc_id in held]
            if withdrawn:
                prepared_in.ledger.abort(withdrawn)

    def drive(self, intents: Sequence[Intent], fence: Fence | None = None) -> None:
        """Drive, in every generation, whatever is prepared there for these documents.

        Each generation's intents are read back from its own ledger: a document may be prepared
        in some generations only, and a retry after a failure in one generation re-drives
        exactly what is still missing there, never another generation's intents (whose chunks,
        vectors and model are that generation's, not this one's)."""
        docs = {i.doc_id for i in intents}
        for engine in self.engines:
            engine.drive([i for i in engine.pending() if i.doc_id in docs], fence)

    def dead_letter_event(self, event: ChangeEvent, reason: str, attempts: int) -> None:
        self.primary.dead_letter_event(event, reason, attempts)
        for engine in self.engines[1:]:
            # The queue is shared; the other generations only drop what they prepared for it.
            engine.ledger.abort([(event.doc_id, event.version)])

    def close(self) -> None:
        for engine in self.engines:
            engine.close()

