"""A shard writing two generations at once: whatever one generation prepares, it commits there.

Real stores on both sides (a SQLite home ledger and a generation ledger beside it, Tantivy,
milvus-lite files), each generation with its own chunking and vector dimension, as after a
rebuild that changed the model. The generation being built lags the active one (its backfill
has not reached every document yet), so a duplicate or a late event can be old news to one
generation and new to the other.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from adapters.embedders.cached import CachedEmbedder
from adapters.embedders.hashing import HashingEmbedder
from adapters.keyword.tantivy_index import TantivyKeywordIndex
from adapters.ledger.sqlite import SqliteEmbeddingCache, SqliteLedger
from adapters.vector.settings import VectorSettings
from chaos.faults import FaultyIndex
from coordinator.apply import ApplyEngine
from coordinator.chunking import ChunkingSettings, chunk_id, chunk_text, content_hash
from coordinator.events import ChangeEvent, Op
from coordinator.invariants import ExpectedChunk, check_index
from coordinator.multi_apply import MultiEngine
from coordinator.shard import Backoff, Envelope, ShardWorker
from lockstep.bootstrap import build_vector

# Generation 1 cuts small chunks with 32-d vectors; generation 2 whole documents with 48-d ones.
CHUNKING = {1: ChunkingSettings(40), 2: ChunkingSettings(1000)}
DIM = {1: 32, 2: 48}
# Steps a rig may take to become idle; each one is past any backoff.
STEPS_MAX = 200
STEP_S = 60.0


class Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


@dataclass
class Generation:
    ledger: SqliteLedger
    keyword: TantivyKeywordIndex
    vector: FaultyIndex
    engine: ApplyEngine


@dataclass
class TwoGenerations:
    gens: dict[int, Generation]
    worker: ShardWorker
    clock: Clock

    def run_until_idle(self) -> list[int]:
        finished: list[int] = []
        for _ in range(STEPS_MAX):
            finished += self.worker.step()
            self.clock.now_s += STEP_S
            if self.worker.idle:
                return finished
        pending = {n: [(i.doc_id, i.version) for i in g.ledger.pending()] for n, g in self.gens.items()}
        raise AssertionError(f"the shard did not become idle: {self.worker.status()}, pending {pending}")

    def versions(self, number: int, doc_ids: str) -> dict[str, int]:
        return {d: s.version for d, s in self.gens[number].ledger.get_docs(doc_ids).items()}

    def violations(self, number: int, texts: dict[str, str]) -> list[str]:
        """Both indexes of generation ``number`` hold exactly ``texts``, cut its own way."""
        expected = {
            chunk_id(d, i): ExpectedChunk(chunk_id(d, i), content_hash(t))
            for d, text in texts.items()
            for i, t in enumerate(chunk_text(text, CHUNKING[number]))
        }
        gen = self.gens[number]
        return [str(v) for side, index in (("keyword", gen.keyword), ("vector", gen.vector.inner))
                for v in check_index(side, expected, set(), list(index.scan()))]


@pytest.fixture
def two(tmp_path: Path) -> Iterator[TwoGenerations]:
    home = tmp_path / "ledger.db"
    gens: dict[int, Generation] = {}
    for number in (1, 2):
        ledger = SqliteLedger(home) if number == 1 else SqliteLedger(tmp_path / "ledger.g2.db", home=home)
        keyword = TantivyKeywordIndex(str(tmp_path / f"tantivy{number}"), "kw")
        vector = FaultyIndex(build_vector(VectorSettings(uri=str(tmp_path / f"m{number}.db")), dim=DIM[number]),
                             label="vector")
        keyword.ensure()
        vector.inner.ensure()
        cache = SqliteEmbeddingCache(gens[1].ledger if number == 2 else ledger)
        engine = ApplyEngine(ledger=ledger, keyword=keyword, vector=vector,
                             embedder=CachedEmbedder(HashingEmbedder(dim=DIM[number]), cache),
                             chunking=CHUNKING[number], source_name="test")
        gens[number] = Generation(ledger, keyword, vector, engine)
    clock = Clock()
    worker = ShardWorker(0, MultiEngine([gens[1].engine, gens[2].engine]), fence=None,  # type: ignore[arg-type]
                         mailbox_docs_max=10, batch_docs_max=10, backoff=Backoff(), clock=clock)
    yield TwoGenerations(gens, worker, clock)
    worker.close()
    for gen in reversed(gens.values()):
        gen.engine.close()
        gen.keyword.close()
        gen.vector.inner.close()
        gen.ledger.close()


def _up(doc_id: str, version: int) -> ChangeEvent:
    return ChangeEvent(Op.UPSERT, doc_id, version, _text(doc_id, version), {})


def _text(doc_id: str, version: int) -> str:
    return "\n\n".join(f"{doc_id} version {version} paragraph {p} says something." for p in range(3))


def test_a_duplicate_old_to_the_active_generation_but_new_to_the_one_being_built_commits_there(
    two: TwoGenerations,
) -> None:
    """"a" v1 is committed in generation 1 only (the backfill has not reached it); its duplicate
    is stale there but new in generation 2: it commits in generation 2, leaves no intent behind,
    and "a" v2 then commits in both instead of waiting forever for generation 2's intent."""
    two.gens[1].engine.apply([_up("a", 1)])
    two.worker.offer([Envelope(0, _up("a", 1)), Envelope(1, _up("b", 1))])
    assert sorted(two.run_until_idle()) == [0, 1]
    assert two.versions(2, "ab") == {"a": 1, "b": 1}
    assert [g.ledger.pending() for g in two.gens.values()] == [[], []]
    two.worker.offer([Envelope(2, _up("a", 2))])
    assert two.run_until_idle() == [2]
    assert two.versions(1, "a") == two.versions(2, "a") == {"a": 2}
    for number in (1, 2):
        assert two.violations(number, {"a": _text("a", 2), "b": _text("b", 1)}) == []


def test_a_retry_after_the_building_generation_failed_writes_each_generation_its_own_chunks(
    two: TwoGenerations,
) -> None:
    """Generation 2's vector index is down while a batch is driven: generation 1 commits, the
    batch stays in flight, and the retry drives generation 2's own intents into generation 2's
    indexes only (never generation 2's chunks, vectors and model into generation 1's)."""
    two.gens[2].vector.down = True
    two.worker.offer([Envelope(0, _up("a", 1))])
    assert two.worker.step() == []
    assert two.versions(1, "a") == {"a": 1} and two.versions(2, "a") == {}
    assert two.gens[2].vector.injected["upsert_while_down"] == 1
    two.gens[2].vector.down = False
    assert two.run_until_idle() == [0]
    assert two.versions(2, "a") == {"a": 1}
    for number in (1, 2):
        assert two.violations(number, {"a": _text("a", 1)}) == [], f"generation {number}"
        assert two.gens[number].ledger.pending() == []


def test_an_intent_a_killed_rebuild_left_prepared_is_driven_by_the_shard_that_waits_on_it(
    two: TwoGenerations,
) -> None:
    """The rebuild died with "a" v1 prepared in generation 2 (and nobody resumes it): the live
    "a" v2 waits for it only INTENT_ADOPT_AFTER_S, then the shard drives the dead writer's
    intent itself and "a" v2 commits in both generations; the rest of the batch never waited."""
    from coordinator.planner import plan
    from coordinator.shard import INTENT_ADOPT_AFTER_S

    two.gens[1].engine.apply([_up("a", 1)])
    two.gens[2].ledger.prepare([plan(_up("a", 1), None, CHUNKING[2]).to_intent()])  # the rebuild's
    two.worker.offer([Envelope(0, _up("a", 2)), Envelope(1, _up("b", 1))])
    assert two.worker.step() == [1], "b commits, a waits for the other writer"
    held_s = 0.0
    while held_s < INTENT_ADOPT_AFTER_S:
        assert two.worker.step() == [] and two.versions(2, "a") == {}, "a waits while the other writer may live"
        two.clock.now_s += INTENT_ADOPT_AFTER_S / 4
        held_s += INTENT_ADOPT_AFTER_S / 4
    assert two.worker.adopted_intents == 0
    assert two.worker.step() == [], "a goes back to the mailbox once more"
    assert two.worker.adopted_intents == 1, "adopted exactly INTENT_ADOPT_AFTER_S after its first hold"
    assert two.versions(2, "a") == {"a": 1}, "the dead writer's own intent, committed by the shard"
    assert sorted(two.run_until_idle()) == [0]
    assert two.versions(1, "ab") == two.versions(2, "ab") == {"a": 2, "b": 1}
    assert [g.ledger.pending() for g in two.gens.values()] == [[], []]
    for number in (1, 2):
        assert two.violations(number, {"a": _text("a", 2), "b": _text("b", 1)}) == []
