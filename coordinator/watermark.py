"""The low watermark: the source position before which every event is finished.

An event is *finished* once it is committed in both indexes, found stale, superseded by a
committed newer event of the same document (coalescing), or dead-lettered. Events are numbered
in source order by the reader (``seq``); the checkpoint may advance to the position of the
highest seq such that it and every seq before it are finished. Committing a source offset any
further would lose the unfinished events on a crash; committing less only causes redelivery,
which the ledger's version gate makes harmless.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field


@dataclass
class LowWatermark:
    """Tracks outstanding seqs and the position to checkpoint; not thread-safe (one reader owns it)."""

    _outstanding: list[int] = field(default_factory=list)
    _finished: set[int] = field(default_factory=set)
    _positions: dict[int, str] = field(default_factory=dict)
    _next_seq: int = 0
    _low_position: str | None = None

    def track(self, position: str | None) -> int:
        """Number the next event read; returns its seq."""
        seq = self._next_seq
        self._next_seq += 1
        heapq.heappush(self._outstanding, seq)
        if position is not None:
            self._positions[seq] = position
        return seq

    def finish(self, seqs: list[int]) -> None:
        """Mark events finished (in any order)."""
        self._finished.update(seqs)
        while self._outstanding and self._outstanding[0] in self._finished:
            seq = heapq.heappop(self._outstanding)
            self._finished.discard(seq)
            position = self._positions.pop(seq, None)
            if position is not None:
                self._low_position = position

    @property
    def outstanding(self) -> int:
        return len(self._outstanding)

    def checkpoint(self) -> str | None:
        """The position after the last event below which everything is finished, if any."""
        return self._low_position
