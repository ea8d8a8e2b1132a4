"""The reader's flow control toward shard mailboxes (``coordinator.reader.ReaderFlow``): a real
ShardWorker stands in for its Ray actor (no store is involved because the shard never steps),
and a fake clock for the wall."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from coordinator.apply import ApplyStats
from coordinator.events import ChangeEvent, Op
from coordinator.ports import BadRecord
from coordinator.reader import DRAIN_INTERVAL_S, ReaderFlow
from coordinator.routing import shard_of
from coordinator.shard import Backoff, Envelope, ShardStatus, ShardWorker


@dataclass
class _Clock:
    """A clock the test advances by hand."""

    now_s: float = 100.0

    def __call__(self) -> float:
        return self.now_s


class _OneShard:
    """The offer the service makes of its ShardCluster, onto one in-process ShardWorker; counts
    every envelope sent, as each would be serialized to the actor."""

    def __init__(self, worker: ShardWorker) -> None:
        self.worker = worker
        self.sent = 0

    def offer(self, batches: dict[int, list[Envelope]]) -> dict[int, int]:
        self.sent += sum(map(len, batches.values()))
        return {i: self.worker.offer(b) for i, b in batches.items()}


def _offer(flow: ReaderFlow, cluster: _OneShard) -> None:
    """What the service's tick does to offer: the flow's batches, if any, then what was accepted."""
    batches = flow.batches()
    if batches:
        flow.offered(cluster.offer(batches))


def _event(n: int) -> ChangeEvent:
    return ChangeEvent(Op.UPSERT, f"d{n}", 1, "text", {})


def _status(shard: int, waiting_docs: int = 0) -> ShardStatus:
    return ShardStatus(shard, waiting_docs, 0, 0, "", {}, {}, {}, {})


def _flow(clock: _Clock | None = None, *, shards: int = 1) -> ReaderFlow:
    return ReaderFlow(shards, offer_batch_max=5, mailbox_docs_max=10, clock=clock or _Clock())


def test_a_full_mailbox_is_not_sent_records_it_would_refuse() -> None:
    """A shard whose mailbox is full is offered nothing until it reports room again, and nothing drops."""
    flow = _flow()
    engine: Any = SimpleNamespace(stats=ApplyStats())
    worker = ShardWorker(0, engine, fence=None, mailbox_docs_max=10, batch_docs_max=4, backoff=Backoff(),
                         clock=_Clock())
    cluster = _OneShard(worker)
    for n in range(40):
        seq = flow.watermark.track(str(n))
        flow.buffers[0].append(Envelope(seq, _event(n)))

    for _ in range(20):  # the shard never steps: its mailbox fills and stays full
        _offer(flow, cluster)
        flow.drained([([], worker.status())])
    assert worker.status().waiting_docs == 10
    assert len(flow.buffers[0]) == 30, "nothing is dropped: the rest waits in the driver"
    assert cluster.sent == 10, "records a full mailbox would refuse are not sent again and again"

    worker._take()  # the shard takes a batch of 4 into work: room for 4 more
    flow.drained([([], worker.status())])
    _offer(flow, cluster)
    assert cluster.sent == 14 and worker.status().waiting_docs == 10 and len(flow.buffers[0]) == 26


def test_the_buffers_hold_at_most_a_batch_for_each_shard() -> None:
    """Reading stops once the buffers hold a batch for each shard in all (the reader's
    backpressure) and resumes by as many records as the shards accepted."""
    flow = _flow(shards=2)
    assert flow.buffer_room() == 10
    for n in range(10):
        flow.read(_event(n), str(n + 1))
    assert flow.buffer_room() == 0 and flow.buffered == 10
    accepted = len(flow.buffers[0])
    flow.offered({0: accepted})
    assert accepted > 0 and flow.buffer_room() == accepted


def test_records_are_numbered_in_order_and_routed_by_document() -> None:
    """Each record gets the next seq and lands in the buffer of the shard that owns its document;
    a bad record, which has no document, is routed by its seq."""
    flow = _flow(shards=3)
    seqs = [flow.read(_event(n), str(n + 1)) for n in range(4)]
    bad = flow.read(BadRecord("not json", "{"), "5")
    assert seqs == [0, 1, 2, 3] and bad == 4
    for n in range(4):
        assert Envelope(n, _event(n)) in flow.buffers[shard_of(f"d{n}", 3)]
    assert flow.buffers[shard_of("bad:4", 3)][-1].seq == 4


def test_a_batch_is_at_most_the_batch_size_and_the_room_reported() -> None:
    """A shard is offered at most ``offer_batch_max`` records, and fewer when its mailbox reported less room."""
    flow = _flow()
    for n in range(5):
        flow.read(_event(n), str(n + 1))
    assert [e.seq for e in flow.batches()[0]] == [0, 1, 2, 3, 4]
    flow.drained([([], _status(0, waiting_docs=8))])
    assert [e.seq for e in flow.batches()[0]] == [0, 1]
    flow.offered({0: 1})
    assert [e.seq for e in flow.batches()[0]] == [1], "room left after what was accepted since the report"
    flow.offered({0: 1})
    assert flow.batches() == {}, "no room: nothing is offered"


def test_new_shards_are_offered_as_if_their_mailboxes_were_empty() -> None:
    """Once the shard actors are replaced, the room the old ones reported is forgotten."""
    flow = _flow()
    for n in range(5):
        flow.read(_event(n), str(n + 1))
    flow.drained([([], _status(0, waiting_docs=10))])
    assert flow.batches() == {}
    flow.new_shards()
    assert len(flow.batches()[0]) == 5


def test_a_lost_shards_unfinished_work_goes_back_to_the_front_of_its_buffer() -> None:
    """When a shard is lost, what it accepted and did not report finished is offered again, in seq
    order and ahead of what it was never sent, to a mailbox counted as empty; what it reported
    finished is not, and the checkpoint waits for the rest."""
    flow = _flow()
    for n in range(8):
        flow.read(_event(n), str(n + 1))
    flow.offered({0: 5})
    flow.drained([([1, 3], _status(0, waiting_docs=10))])
    assert flow.batches() == {}, "the lost shard had reported a full mailbox"

    assert flow.reoffer(0) == 3
    assert [e.seq for e in flow.buffers[0]] == [0, 2, 4, 5, 6, 7]
    assert [e.seq for e in flow.batches()[0]] == [0, 2, 4, 5, 6]
    assert flow.reoffer(0) == 0, "nothing was accepted since"
    flow.offered({0: 6})
    flow.drained([([0, 2, 4, 5, 6, 7], _status(0))])
    assert flow.outstanding == 0 and flow.checkpoint() == "8"


def test_the_checkpoint_passes_only_finished_events_and_is_committed_once() -> None:
    """The position to commit is the one after the last event below which every event is
    finished, and it is not asked for again once committed."""
    flow = _flow()
    for n in range(3):
        flow.read(_event(n), str(n + 1))
    assert flow.checkpoint() is None
    flow.drained([([1, 2], _status(0))])
    assert flow.checkpoint() is None, "event 0 is not finished: committing past it could lose it"
    flow.drained([([0], _status(0))])
    assert flow.checkpoint() == "3"
    flow.committed = "3"
    assert flow.checkpoint() is None, "the same position is not committed twice"


def test_the_flow_is_idle_once_the_source_ended_and_everything_finished() -> None:
    """Idle needs all three: the reader done, the buffers empty and no event outstanding."""
    flow = _flow()
    flow.read(_event(0), "1")
    flow.reader_done = True
    assert not flow.idle()
    flow.offered({0: 1})
    assert not flow.idle() and flow.outstanding == 1
    flow.drained([([0], _status(0))])
    assert flow.idle()


def test_drains_are_paced_by_the_clock() -> None:
    """The shards are asked for a report at the first tick, then not again until the interval passed."""
    clock = _Clock(now_s=100.0)
    flow = ReaderFlow(1, offer_batch_max=5, mailbox_docs_max=10, clock=clock, drain_interval_s=1.0)
    assert flow.drain_due()
    assert not flow.drain_due()
    clock.now_s = 100.75
    assert not flow.drain_due()
    clock.now_s = 101.0
    assert flow.drain_due()
    assert not flow.drain_due()


def test_drains_are_paced_by_default_at_the_drain_interval() -> None:
    """Without an interval given, reports are asked for every ``DRAIN_INTERVAL_S``."""
    clock = _Clock(now_s=0.0)
    flow = _flow(clock)
    assert flow.drain_due()
    clock.now_s = DRAIN_INTERVAL_S * 0.9
    assert not flow.drain_due()
    clock.now_s = DRAIN_INTERVAL_S
    assert flow.drain_due()


def test_a_drain_measures_each_finished_records_lag_and_the_oldest_unfinished() -> None:
    """Lag runs from a record's read to the drain that reports it finished; the oldest age is
    that of the oldest record still unfinished, on the injected clock."""
    clock = _Clock(now_s=10.0)
    flow = _flow(clock)
    flow.read(_event(0), "1")
    clock.now_s = 11.0
    flow.read(_event(1), "2")
    clock.now_s = 12.5
    drained = flow.drained([([0], _status(0))])
    assert drained.lags_s == [2.5]
    assert drained.oldest_s == 1.5
    clock.now_s = 14.0
    drained = flow.drained([([1], _status(0))])
    assert drained.lags_s == [3.0]
    assert drained.oldest_s == 0.0, "nothing unfinished: no age"
