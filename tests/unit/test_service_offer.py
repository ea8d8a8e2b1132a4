"""The service's flow control toward shard mailboxes (pure logic: a real ShardWorker stands in
for its Ray actor; no store is involved because the shard never steps)."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from coordinator.apply import ApplyStats
from coordinator.events import ChangeEvent, Op
from coordinator.shard import Backoff, Envelope, ShardStatus, ShardWorker
from lockstep.service import Service
from lockstep.settings import Settings


class _OneShard:
    """The two calls the service makes of its ShardCluster, onto one in-process ShardWorker;
    counts every envelope sent, as each would be serialized to the actor."""

    def __init__(self, worker: ShardWorker) -> None:
        self.worker = worker
        self.sent = 0

    def offer(self, batches: dict[int, list[Envelope]]) -> dict[int, int]:
        self.sent += sum(map(len, batches.values()))
        return {i: self.worker.offer(b) for i, b in batches.items()}

    def drain(self) -> list[tuple[list[int], ShardStatus, str]]:
        return [([], self.worker.status(), "")]


def _service(tmp_path: Path) -> Service:
    settings = Settings.model_validate({
        "source": {"kind": "jsonl", "path": str(tmp_path / "events.jsonl")},
        "keyword": {"kind": "tantivy", "path": str(tmp_path / "tantivy")},
        "vector": {"uri": str(tmp_path / "milvus.db")},
        "ledger": {"path": str(tmp_path / "ledger.db")},
        "run": {"shards": 1, "mailbox_docs_max": 10, "offer_batch_max": 5, "http_port": 0},
    })
    return Service(settings, log_level="warning")


def test_a_full_mailbox_is_not_sent_records_it_would_refuse(tmp_path: Path) -> None:
    service = _service(tmp_path)
    engine: Any = SimpleNamespace(stats=ApplyStats())
    worker = ShardWorker(0, engine, fence=None, mailbox_docs_max=10, batch_docs_max=4, backoff=Backoff(),
                         clock=time.monotonic)
    cluster: Any = _OneShard(worker)
    for n in range(40):
        seq = service.watermark.track(str(n))
        service.state.buffers[0].append(Envelope(seq, ChangeEvent(Op.UPSERT, f"d{n}", 1, "text", {})))

    for _ in range(20):  # the shard never steps: its mailbox fills and stays full
        service._offer(cluster)
        service._drain(cluster)
    assert worker.status().waiting_docs == 10
    assert len(service.state.buffers[0]) == 30, "nothing is dropped: the rest waits in the driver"
    assert cluster.sent == 10, "records a full mailbox would refuse are not sent again and again"

    worker._take()  # the shard takes a batch of 4 into work: room for 4 more
    service._drain(cluster)
    service._offer(cluster)
    assert cluster.sent == 14 and worker.status().waiting_docs == 10 and len(service.state.buffers[0]) == 26
