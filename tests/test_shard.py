"""The shard worker without Ray: coalescing, bounded mailboxes, in-flight retries, poison documents.

Real embedded stores (Tantivy, a milvus-lite file, the SQLite ledger); faults come from the
chaos injectors wrapping them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from adapters.embedders.cached import CachedEmbedder
from adapters.embedders.hashing import HashingEmbedder
from adapters.keyword.tantivy_index import TantivyKeywordIndex
from adapters.ledger.sqlite import SqliteEmbeddingCache, SqliteLedger
from adapters.vector.milvus import MilvusVectorIndex
from adapters.vector.settings import VectorSettings
from chaos.faults import FaultyEmbedder, FaultyIndex
from coordinator.apply import ApplyEngine
from coordinator.chunking import ChunkingSettings
from coordinator.events import ChangeEvent, Op
from coordinator.shard import Backoff, Envelope, ShardWorker


class Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


@dataclass
class Rig:
    worker: ShardWorker
    ledger: SqliteLedger
    embedder: FaultyEmbedder
    vector: FaultyIndex
    clock: Clock

    def run_until_idle(self, steps_max: int = 200) -> list[int]:
        finished: list[int] = []
        for _ in range(steps_max):
            finished += self.worker.step()
            self.clock.now_s += 60.0  # past any backoff
            if self.worker.idle:
                return finished
        raise AssertionError("the shard did not become idle")


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    ledger = SqliteLedger(tmp_path / "ledger.db")
    embedder = FaultyEmbedder(HashingEmbedder(dim=32))
    vector = FaultyIndex(MilvusVectorIndex(VectorSettings(uri=str(tmp_path / "m.db")), dim=32))
    keyword = TantivyKeywordIndex(str(tmp_path / "tantivy"), "kw")
    keyword.ensure()
    vector.inner.ensure()
    engine = ApplyEngine(
        ledger=ledger,
        keyword=keyword,
        vector=vector,
        embedder=CachedEmbedder(embedder, SqliteEmbeddingCache(ledger)),
        chunking=ChunkingSettings(100),
        source_name="test",
    )
    clock = Clock()
    worker = ShardWorker(
        0, engine, fence=None, mailbox_docs_max=4, batch_docs_max=10, backoff=Backoff(), clock=clock
    )
    yield Rig(worker, ledger, embedder, vector, clock)
    engine.close()
    keyword.close()
    vector.inner.close()
    ledger.close()


def _up(doc_id: str, version: int, text: str = "") -> ChangeEvent:
    return ChangeEvent(Op.UPSERT, doc_id, version, text or f"{doc_id} at version {version}", {})


def test_newer_events_coalesce_and_every_seq_is_finished(rig: Rig) -> None:
    """Three versions of one document waiting together apply once, at the newest; all seqs finish."""
    assert (
        rig.worker.offer([Envelope(0, _up("a", 1)), Envelope(1, _up("a", 3)), Envelope(2, _up("a", 2))]) == 3
    )
    assert sorted(rig.run_until_idle()) == [0, 1, 2]
    assert rig.ledger.get_docs(["a"])["a"].version == 3


def test_a_full_mailbox_pushes_back_but_still_takes_documents_it_holds(rig: Rig) -> None:
    """With four distinct documents waiting, a fifth is refused; a newer event of a held one is not."""
    envelopes = [Envelope(i, _up(f"d{i}", 1)) for i in range(5)]
    assert rig.worker.offer(envelopes) == 4
    assert rig.worker.offer([Envelope(9, _up("d0", 2))]) == 1
    assert rig.worker.offer([envelopes[4]]) == 0
    rig.run_until_idle()
    assert rig.worker.offer([envelopes[4]]) == 1


def test_in_flight_documents_wait_for_the_failing_side_and_coalesce(rig: Rig) -> None:
    """While the vector index is down, documents stay prepared; newer events wait and land after."""
    rig.vector.down = True
    rig.worker.offer([Envelope(0, _up("a", 1)), Envelope(1, _up("b", 1))])
    assert rig.worker.step() == []
    assert rig.worker.status().in_flight_docs == 2 and rig.worker.status().last_error
    rig.worker.offer([Envelope(2, _up("a", 2))])
    rig.clock.now_s += 60.0
    assert rig.worker.step() == [], "nothing may commit while a side is down"
    assert rig.vector.injected["upsert_while_down"] >= 2
    rig.vector.down = False
    assert sorted(rig.run_until_idle()) == [0, 1, 2]
    assert {d: s.version for d, s in rig.ledger.get_docs(["a", "b"]).items()} == {"a": 2, "b": 1}
    assert rig.ledger.pending() == []


def test_a_poison_document_is_dead_lettered_and_the_rest_flows_on(rig: Rig) -> None:
    """A document the embedder always fails on goes to the DLQ with its attempts; others apply."""
    poison = _up("bad", 1, "text with \x00POISON\x00 inside")
    rig.worker.offer([Envelope(0, _up("a", 1)), Envelope(1, poison), Envelope(2, _up("b", 1))])
    with capture_logs() as logs:
        assert sorted(rig.run_until_idle()) == [0, 1, 2]
    assert any(e["event"] == "shard backing off" and e["shard"] == 0 and e["phase"] == "retry" for e in logs)
    [dead] = [e for e in logs if e["event"] == "dead-lettered"]
    assert dead["doc_id"] == "bad" and dead["version"] == 1 and dead["phase"] == "dead_letter"
    assert rig.embedder.injected["poison_document"] >= 3
    [(_, letter)] = rig.ledger.dead_letters(limit=10)
    assert letter.doc_id == "bad" and letter.attempts >= 3 and "embedding failed" in letter.reason
    assert set(rig.ledger.get_docs(["a", "b", "bad"])) == {"a", "b"}


def test_an_embedder_outage_dead_letters_nothing(rig: Rig) -> None:
    """When the embedder fails for everyone, documents wait instead of filling the DLQ."""
    rig.embedder.down = True
    rig.worker.offer([Envelope(i, _up(f"d{i}", 1)) for i in range(3)])
    for _ in range(20):
        rig.worker.step()
        rig.clock.now_s += 60.0
    assert rig.embedder.injected["embedder_down"] >= 20
    assert rig.ledger.dead_letters(limit=10) == []
    rig.embedder.down = False
    assert sorted(rig.run_until_idle()) == [0, 1, 2]
    assert len(rig.ledger.get_docs(["d0", "d1", "d2"])) == 3
