"""The reader's flow control: what it buffers, what it offers each shard, what it checkpoints.

Plain Python, stepped by its caller, testable without Ray; ``lockstep/service.py`` does the I/O
around it (reads the source, calls the shard actors, commits the checkpoint) and the chaos suite
drives it on its simulated clock.

- ``read`` numbers a record (its ``seq``, from the low watermark), notes when it was read and
  routes it into its shard's buffer by ``shard_of(doc_id)``. The buffers hold at most a batch
  (``offer_batch_max``) for each shard in all (``buffer_room``): while they are full the caller
  reads nothing more, so backpressure reaches the source and nothing drops.
- ``batches`` says what to offer each shard now: at most ``offer_batch_max`` records, and no more
  than the mailbox room the shard last reported, less what it accepted since (a full shard is not
  sent records it would only refuse). ``offered`` removes what the shards accepted; the rest waits
  in its buffer for a later offer.
- ``drained`` takes what the shards report (finished seqs, status): the watermark advances, each
  shard's room is refreshed, and each finished record's lag (read to finished) is measured on
  the injected clock. ``drain_due`` paces these reports to one per ``drain_interval_s``.
- ``checkpoint`` is the position to commit: the position after the last event below which every
  event is finished (``coordinator/watermark.py``), and only when it moved since the last one
  committed (``committed``). Committing further would lose unfinished events in a crash.
- ``reoffer`` hands a lost shard's work to the shard that replaces it: what the lost one had
  accepted and not reported finished goes back to the front of its buffer, in seq order, and
  the new shard's mailbox counts as empty. What the lost one finished without reporting it is
  offered again too; the ledger's version gate makes that second apply a no-op.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from coordinator.events import ChangeEvent
from coordinator.ports import SourceRecord
from coordinator.routing import shard_of
from coordinator.shard import Envelope, ShardStatus
from coordinator.watermark import LowWatermark

# Shards are asked what they finished (and how full they are) at most this often: every call
# costs the driver and each shard actor a Ray round trip, and commits do not wait for it (only
# the checkpoint and the service's own lag histogram see it up to this much later).
DRAIN_INTERVAL_S = 0.1


@dataclass(frozen=True)
class Drained:
    """What one drain measured, for the service's metrics."""

    # Read to finished, in seconds, for each finished record this flow read.
    lags_s: list[float]
    # How long the oldest record read and not finished yet has waited (0 when there is none).
    oldest_s: float


class ReaderFlow:
    """The reader's buffers, the shards' mailbox room and the low watermark; not thread-safe
    (one reader loop owns it)."""

    def __init__(
        self,
        shards: int,
        *,
        offer_batch_max: int,
        mailbox_docs_max: int,
        watermark: LowWatermark | None = None,
        clock: Callable[[], float] = time.monotonic,
        drain_interval_s: float = DRAIN_INTERVAL_S,
    ) -> None:
        self.shards = shards
        self.offer_batch_max = offer_batch_max
        self.mailbox_docs_max = mailbox_docs_max
        self.watermark = watermark if watermark is not None else LowWatermark()
        self.clock = clock
        self.drain_interval_s = drain_interval_s
        self.buffers: dict[int, list[Envelope]] = {i: [] for i in range(shards)}
        # Each shard's free mailbox room as last reported (less what was offered since): a full
        # shard is not sent records it would only refuse, serialized again at every tick.
        self._room_left: dict[int, int] = {}
        # What each shard accepted and has not reported finished, by seq: bounded by its
        # mailbox, and offered again if the shard is lost (``reoffer``).
        self._taken: dict[int, dict[int, Envelope]] = {i: {} for i in range(shards)}
        # When each record not finished yet was read, on ``clock``.
        self._read_at: dict[int, float] = {}
        # Set by the caller: the source ended, and the last position it committed.
        self.reader_done = False
        self.committed: str | None = None
        self._drained_at: float | None = None

    # --- reading -----------------------------------------------------------------------------

    def buffer_room(self) -> int:
        """How many more records the buffers take (none while the shards are behind)."""
        return self.offer_batch_max * self.shards - self.buffered

    @property
    def buffered(self) -> int:
        return sum(map(len, self.buffers.values()))

    def read(self, record: SourceRecord, position: str | None) -> int:
        """Take a record just read, ``position`` being the source's position after it; returns its seq."""
        seq = self.watermark.track(position)
        self._read_at[seq] = self.clock()
        key = record.doc_id if isinstance(record, ChangeEvent) else f"bad:{seq}"
        self.buffers[shard_of(key, self.shards)].append(Envelope(seq, record))
        return seq

    # --- offering ----------------------------------------------------------------------------

    def batches(self) -> dict[int, list[Envelope]]:
        """What to offer each shard now (a record of a document that is already waiting needs no
        room, so this may hold back a few that would fit; they go at the next fresh report)."""
        return {
            i: b[: min(self.offer_batch_max, self._room(i))]
            for i, b in self.buffers.items()
            if b and self._room(i) > 0
        }

    def offered(self, accepted: Mapping[int, int]) -> None:
        """Each shard accepted this many records of its batch, from the front."""
        for shard, taken in accepted.items():
            self._taken[shard].update((env.seq, env) for env in self.buffers[shard][:taken])
            del self.buffers[shard][:taken]
            self._room_left[shard] = self._room(shard) - taken

    def new_shards(self) -> None:
        """The shards were replaced by new ones, with empty mailboxes: forget the room reported."""
        self._room_left.clear()

    def reoffer(self, shard: int) -> int:
        """The shard was lost with its mailbox: what it accepted and did not report finished goes
        back to the front of its buffer, for the shard that replaces it; returns how many."""
        taken = self._taken[shard]
        self.buffers[shard][:0] = [taken[seq] for seq in sorted(taken)]
        self._room_left.pop(shard, None)
        count = len(taken)
        taken.clear()
        return count

    def _room(self, shard: int) -> int:
        return self._room_left.get(shard, self.mailbox_docs_max)

    # --- draining ----------------------------------------------------------------------------

    def drain_due(self) -> bool:
        """Whether the reader's tick asks the shards for a report now (then not again for
        ``drain_interval_s``)."""
        now = self.clock()
        if self._drained_at is not None and now - self._drained_at < self.drain_interval_s:
            return False
        self._drained_at = now
        return True

    def drained(self, reports: Iterable[tuple[list[int], ShardStatus]]) -> Drained:
        """Take each shard's finished seqs and status."""
        now = self.clock()
        lags_s: list[float] = []
        for finished, status in reports:
            self.watermark.finish(finished)
            taken = self._taken[status.shard]
            for seq in finished:
                taken.pop(seq, None)
            lags_s += [now - self._read_at.pop(seq) for seq in finished if seq in self._read_at]
            self._room_left[status.shard] = self.mailbox_docs_max - status.waiting_docs
        return Drained(lags_s, now - min(self._read_at.values(), default=now))

    @property
    def outstanding(self) -> int:
        """Records read and not finished yet."""
        return self.watermark.outstanding

    # --- checkpointing -----------------------------------------------------------------------

    def checkpoint(self) -> str | None:
        """The position to commit now, if it moved since the last one committed."""
        position = self.watermark.checkpoint()
        return None if position == self.committed else position

    def idle(self) -> bool:
        """The source ended and every record read is finished."""
        return self.reader_done and not self.buffered and self.outstanding == 0
