"""Event-stream faults: what a real change stream does to the order and number of deliveries.

Two families, both seeded by the ``random.Random`` they are given and both reporting into
``injected`` only what they really did (a reorder that happened to keep the order counts 0):

- *source* faults change what happened at the source (``pk_change``, ``truncate``): they append
  events to the ``SourceModel``, so the model knows the new truth;
- *delivery* faults change how the source's history is delivered (reorder, duplicate, delay,
  drop-then-redeliver, replay from an older checkpoint, a delete before its create, a late older
  upsert after a delete); the truth is unchanged, only the deliveries are.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from chaos.workload import POISON_MARK, TABLES, SourceModel
from coordinator.events import ChangeEvent, Op

# Events a reorder may move across: a Kafka consumer reorders only within what it has fetched.
REORDER_WINDOW_EVENTS = 6
# How many later deliveries a delayed event may fall behind.
DELAY_EVENTS_MAX = 12
# A duplicate is delivered 1-3 extra times (at-least-once after a restart).
DUPLICATES_MAX = 3

Deliveries = list[ChangeEvent]


@dataclass
class StreamFaults:
    """Delivery and source faults over one schedule's history."""

    rng: random.Random
    injected: Counter[str] = field(default_factory=Counter)

    # --- source faults -----------------------------------------------------------------------

    def pk_change(self, model: SourceModel) -> None:
        """A primary key changes: delete(old) + create(new), as two unordered events."""
        live = _clean_live(model)
        if live:
            model.change_key(self.rng.choice(live))
            self.injected["pk_change"] += 1

    def refused_version(self, model: SourceModel) -> None:
        """A document gets a new version that one store will refuse (the store's side is set by
        the runner; the store reports the refusal when it happens)."""
        live = _clean_live(model)
        if live:
            model.refused_update(self.rng, self.rng.choice(live))

    def truncate(self, model: SourceModel) -> None:
        """A table is truncated: every live document of it is deleted."""
        deletes = model.truncate(self.rng.choice(TABLES))
        if deletes:
            self.injected["truncate"] += 1

    # --- delivery faults ---------------------------------------------------------------------

    def reorder(self, events: Deliveries) -> Deliveries:
        out: Deliveries = []
        for start in range(0, len(events), REORDER_WINDOW_EVENTS):
            window = events[start : start + REORDER_WINDOW_EVENTS]
            shuffled = self.rng.sample(window, len(window))
            self.injected["reorder"] += sum(a is not b for a, b in zip(window, shuffled, strict=True))
            out += shuffled
        return out

    def duplicate(self, events: Deliveries) -> Deliveries:
        out = list(events)
        for event in self.rng.sample(events, max(1, len(events) // 8)):
            for _ in range(self.rng.randint(1, DUPLICATES_MAX)):
                out.insert(self.rng.randint(out.index(event) + 1, len(out)), event)
                self.injected["duplicate"] += 1
        return out

    def delay(self, events: Deliveries) -> Deliveries:
        out = list(events)
        for _ in range(max(1, len(events) // 10)):
            at = self.rng.randrange(len(out))
            to = min(len(out) - 1, at + self.rng.randint(1, DELAY_EVENTS_MAX))
            if to > at:
                out.insert(to, out.pop(at))
                self.injected["delay"] += 1
        return out

    def drop_redeliver(self, events: Deliveries) -> Deliveries:
        """Some events are lost on the first pass and delivered again at the end."""
        dropped = set(self.rng.sample(range(len(events)), max(1, len(events) // 10)))
        self.injected["drop_redeliver"] += len(dropped)
        kept = [e for i, e in enumerate(events) if i not in dropped]
        return kept + [events[i] for i in sorted(dropped)]

    def replay_checkpoint(self, events: Deliveries) -> Deliveries:
        """A consumer restarts from an older checkpoint: a suffix of the stream comes again."""
        cut = self.rng.randrange(len(events))
        at = self.rng.randint(cut, len(events))
        self.injected["replay_checkpoint"] += len(events) - cut
        return events[:at] + events[cut:] + events[at:]

    def delete_before_create(self, events: Deliveries) -> Deliveries:
        """A document's delete overtakes every earlier event of it (e.g. its create)."""
        deletes = [i for i, e in enumerate(events) if e.op is Op.DELETE and _has_earlier(events, i)]
        if not deletes:
            return events
        at = self.rng.choice(deletes)
        event = events[at]
        first = next(i for i, e in enumerate(events) if e.doc_id == event.doc_id)
        out = events[:at] + events[at + 1 :]
        out.insert(first, event)
        self.injected["delete_before_create"] += 1
        return out

    def late_upsert_after_delete(
        self, events: Deliveries, kind: str = "late_upsert_after_delete"
    ) -> Deliveries:
        """An older upsert of a deleted document arrives again after the delete."""
        older = [
            e
            for e in events
            if e.op is Op.UPSERT
            and any(d.op is Op.DELETE and d.doc_id == e.doc_id and d.version > e.version for d in events)
        ]
        if not older:
            return events
        late = self.rng.sample(older, min(len(older), 3))
        self.injected[kind] += len(late)
        return events + late


def ensure_deleted_docs(model: SourceModel, rng: random.Random, count: int = 2) -> None:
    """Make sure the history holds deleted documents with an earlier upsert (for delete faults)."""
    while len([d for d in model.deleted_ids() if model.version(d) > 1]) < count:
        live = _clean_live(model) or [model.create(rng).doc_id]
        model.delete(rng.choice(live))


def _clean_live(model: SourceModel) -> list[str]:
    return [d for d in model.live_ids() if POISON_MARK not in (model.latest[d].text or "")]


def _has_earlier(events: Deliveries, at: int) -> bool:
    return any(e.doc_id == events[at].doc_id for e in events[:at])


DeliveryFault = Callable[[StreamFaults, Deliveries], Deliveries]

DELIVERY_FAULTS: dict[str, DeliveryFault] = {
    "reorder": StreamFaults.reorder,
    "duplicate": StreamFaults.duplicate,
    "delay": StreamFaults.delay,
    "drop_redeliver": StreamFaults.drop_redeliver,
    "replay_checkpoint": StreamFaults.replay_checkpoint,
    "delete_before_create": StreamFaults.delete_before_create,
    "late_upsert_after_delete": StreamFaults.late_upsert_after_delete,
}
