"""The shard worker without Ray: coalescing, bounded mailboxes, in-flight retries, poison documents.

Real embedded stores (Tantivy, a milvus-lite file, the SQLite ledger); faults come from the
chaos injectors wrapping them.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from adapters.embedders.cached import CachedEmbedder
from adapters.embedders.hashing import HashingEmbedder
from adapters.keyword.tantivy_index import TantivyKeywordIndex
from adapters.ledger.sqlite import SqliteEmbeddingCache, SqliteLedger
from adapters.vector.settings import VectorSettings
from chaos.faults import FaultyEmbedder, FaultyIndex
from coordinator.apply import ApplyEngine
from coordinator.chunking import ChunkingSettings
from coordinator.crashpoints import no_crash
from coordinator.errors import EmbedServiceError, FencedError, TransientEmbedError, TransientStoreError
from coordinator.events import ChangeEvent, Op
from coordinator.shard import INTENT_ADOPT_AFTER_S, INTENT_CONFLICT_RETRY_S, Backoff, Envelope, ShardWorker
from lockstep.bootstrap import build_vector


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


@pytest.fixture(params=[0, 2], ids=["one-batch-at-a-time", "prepare-ahead"])
def rig(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Rig]:
    yield from _rig(tmp_path, batch_docs_max=10, prepare_ahead=request.param)


def _rig(
    tmp_path: Path, *, batch_docs_max: int, prepare_ahead: int, mailbox_docs_max: int = 4,
    crash_hook: Callable[[str], None] = no_crash,
) -> Iterator[Rig]:
    ledger = SqliteLedger(tmp_path / "ledger.db", crash_hook=crash_hook)
    embedder = FaultyEmbedder(HashingEmbedder(dim=32))
    vector = FaultyIndex(build_vector(VectorSettings(uri=str(tmp_path / "m.db")), dim=32))
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
        0, engine, fence=None, mailbox_docs_max=mailbox_docs_max, batch_docs_max=batch_docs_max, backoff=Backoff(),
        clock=clock,
        prepare_ahead=prepare_ahead,
    )  # fmt: skip
    try:
        yield Rig(worker, ledger, embedder, vector, clock)
    finally:
        worker.close()
        engine.close()
        keyword.close()
        vector.inner.close()
        ledger.close()


# A rig with other arguments than the fixture's, for a ``with`` block.
_rig_for = contextmanager(_rig)


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


def test_a_document_another_writer_holds_waits_while_the_rest_of_its_batch_commits(rig: Rig) -> None:
    """A rebuild's backfill has an intent for "b": "a" and "c" of the same batch commit at once,
    "b" waits in the mailbox (not an outage: no backoff, not degraded) and commits after."""
    from coordinator.planner import plan

    foreign = plan(_up("b", 1), None, ChunkingSettings(100)).to_intent()
    rig.ledger.prepare([foreign])
    assert rig.worker.offer([Envelope(0, _up("a", 1)), Envelope(1, _up("b", 2)), Envelope(2, _up("c", 1))]) == 3
    assert sorted(rig.worker.step()) == [0, 2]
    status = rig.worker.status()
    assert (status.waiting_docs, status.last_error, status.retry_attempt) == (1, "", 0)
    assert rig.worker.step() == [], "a held document is not taken again at once"
    rig.ledger.abort([("b", 1)])  # the other writer is done with it
    rig.clock.now_s += 0.1
    assert rig.worker.step() == [1]
    assert {d: s.version for d, s in rig.ledger.get_docs(["a", "b", "c"]).items()} == {"a": 1, "b": 2, "c": 1}


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


def test_a_document_held_in_the_generation_being_built_is_withdrawn_from_the_active_one(tmp_path: Path) -> None:
    """Writing two generations: a document the rebuild holds in generation 2 is prepared in
    neither (its generation-1 intent is withdrawn), the rest of the batch commits in both."""
    from coordinator.multi_apply import MultiEngine
    from coordinator.planner import plan

    home = SqliteLedger(tmp_path / "ledger.db")
    gen2 = SqliteLedger(tmp_path / "ledger.g2.db", home=tmp_path / "ledger.db")
    engines, closers = [], []
    for n, ledger in ((1, home), (2, gen2)):
        keyword = TantivyKeywordIndex(str(tmp_path / f"tantivy{n}"), "kw")
        vector = build_vector(VectorSettings(uri=str(tmp_path / f"m{n}.db")), dim=32)
        keyword.ensure()
        vector.ensure()
        engine = ApplyEngine(ledger=ledger, keyword=keyword, vector=vector,
                             embedder=CachedEmbedder(HashingEmbedder(dim=32), SqliteEmbeddingCache(home)),
                             chunking=ChunkingSettings(100), source_name="test")
        engines.append(engine)
        closers += [engine.close, keyword.close, vector.close]
    try:
        gen2.prepare([plan(_up("b", 1), None, ChunkingSettings(100)).to_intent()])  # the rebuild's
        multi = MultiEngine(engines)
        intents, held = multi.prepare_some([_up("a", 1), _up("b", 2)])
        assert held == ["b"] and [i.doc_id for i in intents] == ["a"]
        assert [i.doc_id for i in home.pending()] == ["a"], "b's generation-1 intent is withdrawn"
        multi.drive(intents)
        assert sorted(home.get_docs(["a", "b"])) == ["a"] and sorted(gen2.get_docs(["a", "b"])) == ["a"]
        assert [(i.doc_id, i.version) for i in gen2.pending()] == [("b", 1)]
    finally:
        for close in closers:
            close()
        gen2.close()
        home.close()


@pytest.fixture
def ahead(tmp_path: Path) -> Iterator[Rig]:
    """One document per batch, preparing the next batch while the current one is driven."""
    yield from _rig(tmp_path, batch_docs_max=1, prepare_ahead=1)


def _pending_soon(rig: Rig, doc_ids: list[str], timeout_s: float = 10.0) -> None:
    """Wait until exactly these documents have prepared intents (the helper thread's work)."""
    deadline = time.monotonic() + timeout_s
    while sorted(i.doc_id for i in rig.ledger.pending()) != doc_ids:
        assert time.monotonic() < deadline, f"pending {[i.doc_id for i in rig.ledger.pending()]}, not {doc_ids}"
        time.sleep(0.01)


def test_the_next_batch_is_prepared_while_the_current_one_is_driven(ahead: Rig) -> None:
    """After one step, "a" is committed and "b" (the next batch) is already prepared; "b" is
    driven by the next step, which prepares "c" meanwhile; the shard is busy until all commit."""
    ahead.worker.offer([Envelope(i, _up(d, 1)) for i, d in enumerate("abc")])
    assert ahead.worker.step() == [0]
    assert sorted(ahead.ledger.get_docs("abc")) == ["a"]
    _pending_soon(ahead, ["b"])
    assert not ahead.worker.idle, "a batch prepared ahead is work still to do"
    assert ahead.worker.status().ahead_docs == 1
    assert ahead.worker.step() == [1]
    _pending_soon(ahead, ["c"])
    assert ahead.worker.step() == [2]
    assert ahead.worker.idle and ahead.ledger.pending() == []
    assert {d: s.version for d, s in ahead.ledger.get_docs("abc").items()} == {"a": 1, "b": 1, "c": 1}


def test_a_newer_event_of_a_document_being_driven_waits_for_that_drive(ahead: Rig) -> None:
    """"b" v1 is prepared ahead; "b" v2 arrives meanwhile. The step driving v1 must not prepare
    v2 ahead beside it: v2 is taken only once v1 committed, and the ledger never goes back."""
    ahead.worker.offer([Envelope(0, _up("a", 1)), Envelope(1, _up("b", 1))])
    assert ahead.worker.step() == [0]
    _pending_soon(ahead, ["b"])
    ahead.worker.offer([Envelope(2, _up("b", 2))])
    assert ahead.worker.step() == [1], "drives b v1, prepared ahead"
    assert ahead.ledger.get_docs(["b"])["b"].version == 1
    assert ahead.ledger.pending() == [], "b v2 was not prepared beside the drive of b v1"
    assert ahead.worker.step() == [2]
    assert ahead.ledger.get_docs(["b"])["b"].version == 2 and ahead.worker.idle


def test_a_failing_drive_keeps_the_batch_prepared_ahead_and_both_land_after(ahead: Rig) -> None:
    """The vector index is down while "a" is driven and "b" prepared ahead: "a" stays in flight,
    "b" stays prepared, nothing commits; once the index is back both commit, every seq finishes."""
    ahead.vector.down = True
    ahead.worker.offer([Envelope(0, _up("a", 1)), Envelope(1, _up("b", 1)), Envelope(2, _up("a", 2))])
    assert ahead.worker.step() == []
    _pending_soon(ahead, ["a", "b"])
    status = ahead.worker.status()
    assert status.in_flight_docs == 1 and status.last_error and not ahead.worker.idle
    ahead.clock.now_s += 60.0
    assert ahead.worker.step() == [], "nothing may commit while a side is down"
    assert ahead.ledger.get_docs("ab") == {}
    ahead.vector.down = False
    assert sorted(ahead.run_until_idle()) == [0, 1, 2]
    assert {d: s.version for d, s in ahead.ledger.get_docs("ab").items()} == {"a": 2, "b": 1}
    assert ahead.ledger.pending() == []


def test_reordered_and_repeated_histories_end_at_the_newest_versions_and_never_go_back(ahead: Rig) -> None:
    """Versions of six documents shuffled within a window and repeated, offered a few at a time
    between steps: each document ends at its newest version and its committed version only grows."""
    rng = random.Random(11)
    history = [(f"d{n}", v) for v in range(1, 6) for n in range(6)]
    history = [e for i in range(0, len(history), 8) for e in rng.sample(history[i : i + 8], len(history[i : i + 8]))]
    history = [e for e in history for _ in range(rng.randint(1, 3))]
    seen: dict[str, int] = {}
    finished: list[int] = []
    queue = [Envelope(seq, _up(d, v)) for seq, (d, v) in enumerate(history)]
    while queue or not ahead.worker.idle:
        taken = ahead.worker.offer(queue[: rng.randint(1, 4)])
        queue = queue[taken:]
        finished += ahead.worker.step()
        ahead.clock.now_s += 1.0
        for doc_id, state in ahead.ledger.get_docs(f"d{n}" for n in range(6)).items():
            assert state.version >= seen.get(doc_id, 0), f"{doc_id} went back to v{state.version}"
            seen[doc_id] = state.version
    assert sorted(finished) == list(range(len(history)))
    assert {d: s.version for d, s in ahead.ledger.get_docs(f"d{n}" for n in range(6)).items()} == {
        f"d{n}": 5 for n in range(6)
    }
    assert ahead.ledger.pending() == []


def test_only_full_batches_go_ahead_and_they_are_driven_in_order(tmp_path: Path) -> None:
    """Batches of two, two ahead: while a,b is driven, c,d and e,f are prepared; g alone is not
    a full batch, so it keeps waiting (gathering newer events) until the shard gets to it."""
    with _rig_for(tmp_path, batch_docs_max=2, prepare_ahead=2, mailbox_docs_max=10) as rig:
        rig.worker.offer([Envelope(i, _up(d, 1)) for i, d in enumerate("abcdefg")])
        assert sorted(rig.worker.step()) == [0, 1]
        _pending_soon(rig, list("cdef"))
        rig.worker.offer([Envelope(7, _up("g", 2))])
        assert sorted(rig.worker.step()) == [2, 3]
        assert sorted(i.doc_id for i in rig.ledger.pending()) == list("ef"), "g is not prepared ahead alone"
        assert sorted(rig.worker.step()) == [4, 5]
        assert sorted(rig.worker.step()) == [6, 7]
        assert rig.worker.idle and rig.ledger.pending() == []
        assert {d: s.version for d, s in rig.ledger.get_docs("abcdefg").items()} == dict.fromkeys("abcdef", 1) | {"g": 2}


class _OffersWhileEmbedding:
    """The reader's thread offers a newer version of a document while that document's batch is
    being embedded, and then the embedder fails (once)."""

    def __init__(self, inner: HashingEmbedder, worker: ShardWorker, racing: Envelope) -> None:
        self.inner = inner
        self.worker = worker
        self.racing: Envelope | None = racing

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    @property
    def dim(self) -> int:
        return self.inner.dim

    def embed(self, texts: list[str]) -> list[list[float]]:
        if self.racing is not None:
            racing, self.racing = self.racing, None
            assert self.worker.offer([racing]) == 1
            raise TransientEmbedError("embedder unavailable (the test's)")
        return self.inner.embed(texts)


def test_a_newer_version_offered_while_its_batch_fails_is_merged_into_the_retry(rig: Rig) -> None:
    """"a" v2 arrives while "a" v1's batch is out and failing: the batch goes back to the mailbox
    merged with v2, so the retry applies v2 and finishes both seqs (neither the newer event nor
    its seq may be lost, or the watermark would stall and the index keep v1)."""
    rig.embedder.inner = _OffersWhileEmbedding(HashingEmbedder(dim=32), rig.worker, Envelope(1, _up("a", 2)))
    assert rig.worker.offer([Envelope(0, _up("a", 1))]) == 1
    assert rig.worker.step() == [], "the embedder failed: nothing finished"
    assert sorted(rig.run_until_idle()) == [0, 1]
    assert rig.ledger.get_docs(["a"])["a"].version == 2
    stored = rig.vector.inner.get(["a:chunk-0"])
    assert [(c.version, c.text) for c in stored.values()] == [(2, "a at version 2")]


# --- edges the mutation run found untested ---------------------------------------------------


def test_backoff_doubles_from_its_base_and_stops_at_its_cap() -> None:
    """delay = base * 2**attempt, at most max_s; the exponent itself stops at 30, so a shard that
    has failed for days neither overflows nor waits past the cap."""
    backoff = Backoff(base_s=0.2, max_s=10.0)
    assert [backoff.delay_s(a) for a in range(7)] == [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0]
    assert backoff.delay_s(10_000) == 10.0
    tiny = Backoff(base_s=1e-12, max_s=1e12)
    assert tiny.delay_s(30) == tiny.delay_s(31) == tiny.delay_s(500) == 1e-12 * 2**30


class _FenceSpy:
    """The shard's engine, recording the fence every prepare and drive is given."""

    def __init__(self, engine: ApplyEngine) -> None:
        self.engine = engine
        self.calls: list[tuple[str, object]] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.engine, name)

    def prepare_some(self, records: list[object], fence: object = None) -> object:
        self.calls.append(("prepare", fence))
        return self.engine.prepare_some(records, fence)  # type: ignore[arg-type]

    def drive(self, intents: list[object], fence: object = None) -> None:
        self.calls.append(("drive", fence))
        self.engine.drive(intents, fence)  # type: ignore[arg-type]


def test_every_prepare_and_drive_carries_the_shards_fence(rig: Rig) -> None:
    """The fence is what keeps an owner that lost its shard from writing: the shard must hand it
    to every write it makes, the first drive, a retry of an in-flight batch, a batch prepared
    ahead and the adoption of another writer's intent alike."""
    fence = rig.ledger.claim_shard(0, "me#1", 3600.0)
    spy = _FenceSpy(rig.worker.engine)  # type: ignore[arg-type]
    worker = ShardWorker(0, spy, fence=fence, mailbox_docs_max=10, batch_docs_max=1,  # type: ignore[arg-type]
                         backoff=Backoff(), clock=rig.clock, prepare_ahead=1)
    try:
        _held_by_another_writer(rig, "held", 1)
        rig.vector.arm("down", 1)
        worker.offer([Envelope(i, _up(d, 1)) for i, d in enumerate(["a", "b", "c"])])
        worker.offer([Envelope(3, _up("held", 2))])
        finished: list[int] = []
        for _ in range(40):
            finished += worker.step()
            rig.clock.now_s += INTENT_ADOPT_AFTER_S / 4
            if worker.idle:
                break
        assert sorted(finished) == [0, 1, 2, 3]
        assert worker.adopted_intents == 1
        assert {d: s.version for d, s in rig.ledger.get_docs(["a", "b", "c", "held"]).items()} == {
            "a": 1, "b": 1, "c": 1, "held": 2
        }
        kinds = [k for k, _ in spy.calls]
        assert kinds.count("prepare") >= 4 and kinds.count("drive") >= 6, kinds
        assert {f for _, f in spy.calls} == {fence}, spy.calls
    finally:
        worker.close()


def test_a_shard_whose_owner_was_replaced_commits_nothing_more(rig: Rig) -> None:
    """The vector index fails, so "a" stays in flight; meanwhile a restarted process claims the
    shard (a new epoch). The old worker's retry is refused with FencedError and commits nothing."""
    fence = rig.ledger.claim_shard(0, "me#1", 3600.0)
    worker = ShardWorker(0, rig.worker.engine, fence=fence, mailbox_docs_max=10, batch_docs_max=10,
                         backoff=Backoff(), clock=rig.clock)
    rig.vector.arm("down", 1)
    worker.offer([Envelope(0, _up("a", 1))])
    assert worker.step() == [] and worker.status().in_flight_docs == 1
    newer = rig.ledger.claim_shard(0, "me#2", 3600.0)
    assert newer.epoch == fence.epoch + 1
    rig.clock.now_s += 60.0
    with pytest.raises(FencedError):
        worker.step()
    assert rig.ledger.get_docs(["a"]) == {}
    worker.close()


def test_an_older_version_offered_while_its_batch_fails_does_not_replace_the_newer(rig: Rig) -> None:
    """"a" v2 is out and failing when a late redelivery of "a" v1 arrives: the batch goes back
    holding v2 (both seqs), so the index never goes back to v1."""
    rig.embedder.inner = _OffersWhileEmbedding(HashingEmbedder(dim=32), rig.worker, Envelope(1, _up("a", 1)))
    assert rig.worker.offer([Envelope(0, _up("a", 2))]) == 1
    assert rig.worker.step() == []
    assert sorted(rig.run_until_idle()) == [0, 1]
    assert rig.ledger.get_docs(["a"])["a"].version == 2
    assert [c.text for c in rig.vector.inner.get(["a:chunk-0"]).values()] == ["a at version 2"]


def test_conflicting_copies_of_a_version_are_all_dead_lettered_even_across_a_failed_batch(rig: Rig) -> None:
    """Three events of "a" v1 with three texts: the first stands, the other two go to the DLQ as
    conflicts, also when the third arrives while the batch holding the first two is failing."""
    def at(n: int, text: str) -> ChangeEvent:  # each from its own source offset, as a source delivers them
        return replace(_up("a", 1, text), position=f"offset-{n}")

    rig.embedder.inner = _OffersWhileEmbedding(HashingEmbedder(dim=32), rig.worker, Envelope(2, at(2, "third text")))
    assert rig.worker.offer([Envelope(0, at(0, "first text")), Envelope(1, at(1, "second text"))]) == 2
    assert rig.worker.step() == []
    assert sorted(rig.run_until_idle()) == [0, 1, 2]
    assert [c.text for c in rig.vector.inner.get(["a:chunk-0"]).values()] == ["first text"]
    letters = [letter for _, letter in rig.ledger.dead_letters(limit=10)]
    assert sorted(json.loads(letter.payload)["text"] for letter in letters) == ["second text", "third text"]
    assert all(letter.reason.startswith("conflict: version 1 of 'a'") for letter in letters)


def test_a_poison_document_is_given_up_after_exactly_three_failures_of_its_own(rig: Rig) -> None:
    """By default a document is dead-lettered at its third failure alone (once another document
    proved the embedder works), with the embedder's own words in the reason."""
    rig.worker.offer([Envelope(0, _up("a", 1)), Envelope(1, _up("bad", 1, "\x00POISON\x00")), Envelope(2, _up("b", 1))])
    assert sorted(rig.run_until_idle()) == [0, 1, 2]
    [(_, letter)] = rig.ledger.dead_letters(limit=10)
    assert letter.attempts == 3
    assert letter.reason == "embedding failed 3 times: embedder timed out on this input (injected poison)"
    assert json.loads(letter.payload)["doc_id"] == "bad"


def test_an_embedder_refusing_every_request_backs_off_at_the_cap_and_loses_nothing(rig: Rig) -> None:
    """An embedding service that refuses the credentials is no document's fault: the batch goes
    back in order, the shard waits the longest backoff and reports why, and nothing is dead-lettered."""
    class Refusing:
        model_id, dim = "refusing", 32

        def embed(self, texts: list[str]) -> list[list[float]]:
            raise EmbedServiceError("embedding service refused the API key")

    healthy = rig.embedder.inner
    rig.embedder.inner = Refusing()  # type: ignore[assignment]
    rig.worker.offer([Envelope(i, _up(d, 1)) for i, d in enumerate("abc")])
    assert rig.worker.step() == []
    status = rig.worker.status()
    assert status.waiting_docs == 3 and "refused the API key" in status.last_error
    rig.clock.now_s += Backoff().max_s - 0.01
    assert rig.worker.step() == [], "backs off for max_s"
    rig.embedder.inner = healthy
    rig.clock.now_s += 0.02
    assert sorted(rig.worker.step()) == [0, 1, 2]
    assert rig.ledger.dead_letters(limit=10) == []


def test_a_fresh_shard_reports_no_error_and_backs_off_from_the_base_delay_doubling(rig: Rig) -> None:
    """Each failure in a row waits twice as long as the one before (0.2 s, 0.4 s, 0.8 s), counts
    an attempt and reports the store's words; the step before the delay is up does not try."""
    fresh = rig.worker.status()
    assert (fresh.retry_attempt, fresh.last_error) == (0, "")
    rig.clock.now_s = 1000.0
    rig.vector.down = True
    rig.worker.offer([Envelope(0, _up("a", 1))])
    with capture_logs() as logs:
        assert rig.worker.step() == []
        for attempt, delay_s in ((1, 0.2), (2, 0.4), (3, 0.8)):
            status = rig.worker.status()
            assert status.retry_attempt == attempt
            assert status.last_error == "lockstep_chunks unavailable (injected)"
            writes = rig.vector.injected["upsert_while_down"]
            rig.clock.now_s += delay_s - 0.01
            assert rig.worker.step() == [] and rig.vector.injected["upsert_while_down"] == writes, "too early"
            rig.clock.now_s += 0.02
            assert rig.worker.step() == [] and rig.vector.injected["upsert_while_down"] == writes + 1
    backoffs = [e for e in logs if e["event"] == "shard backing off"]
    assert [(e["attempt"], e["delay_s"]) for e in backoffs] == [(1, 0.2), (2, 0.4), (3, 0.8), (4, 1.6)]
    assert all(e["error"] == "lockstep_chunks unavailable (injected)" and e["shard"] == 0 for e in backoffs)
    rig.vector.down = False
    rig.clock.now_s += 1.6
    assert rig.worker.step() == [0]
    assert (rig.worker.status().retry_attempt, rig.worker.status().last_error) == (0, "")


def test_a_repeated_event_or_a_late_older_one_is_no_conflict(rig: Rig) -> None:
    """The same event twice, or an older version with other text arriving after a newer one, is
    a redelivery: nothing goes to the DLQ and the newest version lands."""
    rig.worker.offer([Envelope(0, _up("a", 1)), Envelope(1, _up("a", 1)), Envelope(2, _up("b", 2)),
                      Envelope(3, _up("b", 1, "an older text"))])  # fmt: skip
    assert sorted(rig.run_until_idle()) == [0, 1, 2, 3]
    assert rig.ledger.dead_letters(limit=10) == []
    assert {d: s.version for d, s in rig.ledger.get_docs(["a", "b"]).items()} == {"a": 1, "b": 2}


def _held_by_another_writer(rig: Rig, doc_id: str, version: int) -> None:
    from coordinator.planner import plan

    rig.ledger.prepare([plan(_up(doc_id, version), None, ChunkingSettings(100)).to_intent()])


def test_a_held_document_waits_its_retry_delay_and_is_adopted_after_its_own_wait(rig: Rig) -> None:
    """Another writer holds "b", then later "c". A held document is not even prepared again until
    INTENT_CONFLICT_RETRY_S passed; each is adopted INTENT_ADOPT_AFTER_S after its own first hold
    (not after the first hold the shard ever saw), with a warning naming it; adoptions add up."""
    spy = _FenceSpy(rig.worker.engine)  # type: ignore[arg-type]
    worker = ShardWorker(0, spy, fence=None, mailbox_docs_max=10, batch_docs_max=10,  # type: ignore[arg-type]
                         backoff=Backoff(), clock=rig.clock)  # fmt: skip
    rig.clock.now_s = 1000.0
    _held_by_another_writer(rig, "b", 1)
    worker.offer([Envelope(0, _up("b", 2))])
    assert worker.step() == [] and len(spy.calls) == 1
    rig.clock.now_s += INTENT_CONFLICT_RETRY_S / 2
    assert worker.step() == [] and len(spy.calls) == 1, "not prepared again before the retry delay"
    rig.clock.now_s += INTENT_CONFLICT_RETRY_S
    with capture_logs() as logs:
        while worker.adopted_intents == 0:
            assert worker.step() == []
            assert rig.clock.now_s < 1000.0 + INTENT_ADOPT_AFTER_S + 1.0, "adopted in time"
            rig.clock.now_s += 1.0
        assert rig.clock.now_s >= 1000.0 + INTENT_ADOPT_AFTER_S, "not adopted early"
        assert worker.step() == [0]
    [adopted] = [e for e in logs if e["event"] == "drove an intent another writer left prepared"]
    assert (adopted["shard"], adopted["doc_id"], adopted["version"], adopted["phase"]) == (0, "b", 1, "adopt")
    # Later, "c" is held: its wait starts now, and "b" held again starts over too.
    _held_by_another_writer(rig, "c", 1)
    _held_by_another_writer(rig, "b", 3)
    worker.offer([Envelope(1, _up("c", 2)), Envelope(2, _up("b", 4))])
    started = rig.clock.now_s
    while worker.adopted_intents == 1:
        assert worker.step() == []
        rig.clock.now_s += 1.0
    assert rig.clock.now_s - started >= INTENT_ADOPT_AFTER_S
    assert worker.adopted_intents == 3
    assert sorted(worker.step()) == [1, 2]
    assert {d: s.version for d, s in rig.ledger.get_docs(["b", "c"]).items()} == {"b": 4, "c": 2}
    assert worker._held_until == {} and worker._held_since == {}, "nothing is kept for documents gone by"


def test_an_adoption_that_fails_on_a_store_backs_off_and_adopts_later(rig: Rig) -> None:
    _held_by_another_writer(rig, "b", 1)
    rig.worker.offer([Envelope(0, _up("b", 2))])
    assert rig.worker.step() == []
    rig.clock.now_s += INTENT_ADOPT_AFTER_S
    rig.vector.down = True
    assert rig.worker.step() == []
    assert rig.worker.status().last_error == "lockstep_chunks unavailable (injected)" and rig.worker.adopted_intents == 0
    rig.vector.down = False
    assert rig.run_until_idle() == [0]
    assert rig.worker.adopted_intents == 1 and rig.ledger.get_docs(["b"])["b"].version == 2


def test_close_waits_for_the_batch_being_prepared_ahead(tmp_path: Path) -> None:
    """A shard closing while its helper thread prepares the next batch waits for that prepare:
    its intent is durably prepared when ``close`` returns (the next start drives it)."""
    import threading

    release = threading.Event()
    with _rig_for(tmp_path, batch_docs_max=1, prepare_ahead=1) as rig:
        try:
            rig.worker.offer([Envelope(0, _up("a", 1)), Envelope(1, _up("b", 1))])

            class Slow:
                model_id, dim = rig.embedder.inner.model_id, rig.embedder.inner.dim

                def embed(self, texts: list[str]) -> list[list[float]]:
                    if any(t.startswith("b ") for t in texts):
                        release.wait(10.0)
                    return HashingEmbedder(dim=32).embed(texts)

            rig.embedder.inner = Slow()  # type: ignore[assignment]
            assert rig.worker.step() == [0]
            threading.Timer(0.5, release.set).start()
            rig.worker.close()
            assert [i.doc_id for i in rig.ledger.pending()] == ["b"]
        finally:
            release.set()


def test_a_poison_document_first_in_the_mailbox_rotates_behind_the_others(rig: Rig) -> None:
    """When the batch fails on the embedder, its documents go to the back of the mailbox and are
    taken one at a time: the poison document first in line must not be taken again and again
    ahead of the others (nothing else would ever be prepared, and it would never be given up)."""
    rig.worker.offer([Envelope(0, _up("bad", 1, "\x00POISON\x00")), Envelope(1, _up("a", 1)), Envelope(2, _up("b", 1))])
    assert sorted(rig.run_until_idle(steps_max=30)) == [0, 1, 2]
    [(_, letter)] = rig.ledger.dead_letters(limit=10)
    assert letter.doc_id == "bad" and letter.attempts == 3
    assert sorted(rig.ledger.get_docs(["a", "b", "bad"])) == ["a", "b"]


def test_the_status_carries_the_engines_counters_and_per_index_figures(rig: Rig) -> None:
    """/readyz and the metrics read the shard's status: the engine's counters and, per index, its
    retries, apply seconds and writes."""
    rig.vector.arm("down", 1)
    rig.worker.offer([Envelope(0, _up("a", 1)), Envelope(1, _up("b", 1))])
    rig.run_until_idle()
    status = rig.worker.status()
    assert status.stats == rig.worker.engine.stats.as_dict()
    assert (status.stats["applied_events"], status.stats["upserted_chunks"]) == (2, 2)
    assert status.retries == {"vector": 1}
    assert status.apply_writes == {"keyword": 1, "vector": 1}, "a write that failed is a retry, not a write"
    assert set(status.apply_seconds) == {"keyword", "vector"}


def _ledger_fails_once_while_preparing() -> Callable[[str], None]:
    """A ledger crash hook that fails the first prepare transaction with a transient error."""
    failures = [1]

    def flaky(point: str) -> None:
        if point == "ledger.prepare.between_statements" and failures[0]:
            failures[0] -= 1
            raise TransientStoreError("ledger busy (the test's)", store="sqlite")

    return flaky


def test_a_ledger_failing_while_a_batch_is_prepared_puts_the_batch_back_and_backs_off(tmp_path: Path) -> None:
    """The ledger fails (a transient store error) inside the transaction that records a batch's
    intents: nothing is prepared, the documents go back to the mailbox, the shard reports the
    error and backs off, and the next try prepares and commits them all."""
    with _rig_for(tmp_path, batch_docs_max=10, prepare_ahead=0, crash_hook=_ledger_fails_once_while_preparing()) as rig:
        rig.worker.offer([Envelope(0, _up("a", 1)), Envelope(1, _up("b", 1))])
        assert rig.worker.step() == []
        status = rig.worker.status()
        assert (status.waiting_docs, status.retry_attempt, status.last_error) == (2, 1, "ledger busy (the test's)")
        assert rig.ledger.pending() == [] and rig.ledger.get_docs(["a", "b"]) == {}
        assert sorted(rig.run_until_idle()) == [0, 1]
        assert {d: s.version for d, s in rig.ledger.get_docs(["a", "b"]).items()} == {"a": 1, "b": 1}


def test_after_an_embedder_hiccup_the_suspects_go_one_by_one_and_then_batches_resume(tmp_path: Path) -> None:
    """One embedder timeout fails a batch of three: the shard isolates, preparing the suspects
    one per step until each has been prepared, then takes whole batches again (a document that
    was prepared is no longer a suspect)."""
    with _rig_for(tmp_path, batch_docs_max=10, prepare_ahead=0) as rig:
        rig.embedder.arm("embed_timeout", 1)
        rig.worker.offer([Envelope(i, _up(d, 1)) for i, d in enumerate("abc")])
        steps = []
        for _ in range(4):
            steps.append(sorted(rig.worker.step()))
            rig.clock.now_s += 60.0
        assert [len(s) for s in steps] == [0, 1, 1, 1] and sorted(s for step in steps for s in step) == [0, 1, 2]
        rig.worker.offer([Envelope(3 + i, _up(d, 1)) for i, d in enumerate("def")])
        assert sorted(rig.worker.step()) == [3, 4, 5], "whole batches again"


def test_a_document_released_by_another_writer_waits_the_full_delay_when_held_again(rig: Rig) -> None:
    """"b" is held by another writer, which then finishes without the shard adopting anything;
    "b" commits. When another writer holds "b" again much later, its wait starts over: no
    adoption before INTENT_ADOPT_AFTER_S of the new hold."""
    rig.clock.now_s = 1000.0
    _held_by_another_writer(rig, "b", 1)
    rig.worker.offer([Envelope(0, _up("b", 2))])
    assert rig.worker.step() == []
    rig.ledger.abort([("b", 1)])
    rig.clock.now_s += 1.0
    assert rig.worker.step() == [0] and rig.worker.adopted_intents == 0
    rig.clock.now_s += 10 * INTENT_ADOPT_AFTER_S
    _held_by_another_writer(rig, "b", 3)
    rig.worker.offer([Envelope(1, _up("b", 4))])
    assert rig.worker.step() == []
    rig.clock.now_s += INTENT_ADOPT_AFTER_S / 2
    assert rig.worker.step() == [] and rig.worker.adopted_intents == 0, "adopted before its own wait"


def test_a_batch_that_failed_on_the_ledger_is_tried_again_first(tmp_path: Path) -> None:
    """The ledger fails while "a" (one document a batch) is prepared: "a" goes back in front of
    "b", so the retry takes "a" again before anything that came after it."""
    with _rig_for(tmp_path, batch_docs_max=1, prepare_ahead=0, crash_hook=_ledger_fails_once_while_preparing()) as rig:
        rig.worker.offer([Envelope(0, _up("a", 1)), Envelope(1, _up("b", 1))])
        assert rig.worker.step() == []
        rig.clock.now_s += 60.0
        assert rig.worker.step() == [0]
        rig.clock.now_s += 60.0
        assert rig.worker.step() == [1]


def test_nothing_is_prepared_ahead_while_a_poison_document_is_isolated(tmp_path: Path) -> None:
    """Isolating goes one document a step; preparing the next one ahead meanwhile would embed
    beside the suspects, which isolation exists to avoid."""
    with _rig_for(tmp_path, batch_docs_max=2, prepare_ahead=1, mailbox_docs_max=10) as rig:
        rig.worker.offer([Envelope(0, _up("bad", 1, "\x00POISON\x00")), Envelope(1, _up("a", 1))]
                         + [Envelope(2 + i, _up(d, 1)) for i, d in enumerate("bcd")])  # fmt: skip
        assert rig.worker.step() == [], "the first batch (bad, a) fails on the embedder"
        rig.clock.now_s += 60.0
        first = rig.worker.step()
        assert len(first) == 1, "one document a step while isolating"
        assert rig.worker.status().ahead_docs == 0 and len(rig.ledger.pending()) == 0
        assert sorted(first + rig.run_until_idle()) == [0, 1, 2, 3, 4]
