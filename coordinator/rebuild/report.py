"""What one rebuild run reports, and how it reports its backfill's progress."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Called with (documents done, documents in all) as the backfill goes.
Progress = Callable[[int, int], None]


def no_progress(_done: int, _total: int) -> None:
    return None


@dataclass
class RebuildReport:
    generation: int
    previous: int
    backfilled_docs: int = 0
    resumed_from: str | None = None
    unreadable_docs: list[str] = field(default_factory=list)
    embed_calls: int = 0
    cache_hits: int = 0
    reference: str = ""
    audit_rounds: list[dict[str, Any]] = field(default_factory=list)
    query_overlap: dict[str, Any] = field(default_factory=dict)
    swap: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    live_writers: list[str] = field(default_factory=list)
    tombstones_caught_up: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "previous": self.previous,
            "backfilled_docs": self.backfilled_docs,
            "resumed_from": self.resumed_from,
            "unreadable_docs": self.unreadable_docs[:20],
            "unreadable_count": len(self.unreadable_docs),
            "embed_calls": self.embed_calls,
            "cache_hits": self.cache_hits,
            "reference": self.reference,
            "audit_rounds": self.audit_rounds,
            "query_overlap": self.query_overlap,
            "swap": self.swap,
            "seconds": self.seconds,
            "live_writers": self.live_writers,
            "tombstones_caught_up": self.tombstones_caught_up,
        }
