"""What ApplyEngine writes down when it gives a document up, and the edges of its two phases.

Dead letters are the only trace of a document lockstep could not apply: an operator replays them,
so each must hold the whole event (text, metadata, where the source had it) and a reason that
names the store's own words, with no secret in it. Real embedded stores (a SQLite ledger,
Tantivy, a milvus-lite file); refusals come from the chaos suite's FaultyIndex, embedding
failures from small embedders of the test's own.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from adapters.embedders.cached import CachedEmbedder
from adapters.embedders.hashing import HashingEmbedder
from adapters.keyword.tantivy_index import TantivyKeywordIndex
from adapters.ledger.sqlite import SqliteEmbeddingCache, SqliteLedger
from adapters.vector.settings import VectorSettings
from chaos.faults import FaultyIndex
from coordinator.apply import ApplyEngine
from coordinator.chunking import ChunkingSettings
from coordinator.codec import decode_intent
from coordinator.errors import FencedError, IntentConflict, PermanentEmbedError
from coordinator.events import ChangeEvent, Op
from coordinator.model import ChunkDelete, DeadLetter
from coordinator.planner import plan
from lockstep.bootstrap import build_vector

DIM = 32
CHUNK_CHARS = 100


class RejectsMarked:
    """An embedder that refuses for good any text holding ``REJECT`` (an input the model cannot
    take), and embeds the rest."""

    def __init__(self) -> None:
        self.inner = HashingEmbedder(dim=DIM)

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    @property
    def dim(self) -> int:
        return DIM

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if any("REJECT" in t for t in texts):
            raise PermanentEmbedError("the model rejected the input (the test's)")
        return self.inner.embed(texts)


@dataclass
class Stores:
    ledger: SqliteLedger
    keyword: TantivyKeywordIndex
    vector: FaultyIndex

    def engine(self, chunking: ChunkingSettings | None = None) -> ApplyEngine:
        return ApplyEngine(
            ledger=self.ledger,
            keyword=self.keyword,
            vector=self.vector,
            embedder=CachedEmbedder(RejectsMarked(), SqliteEmbeddingCache(self.ledger)),
            chunking=chunking or ChunkingSettings(CHUNK_CHARS),
            source_name="events",
        )

    def letters(self) -> list[DeadLetter]:
        return [letter for _, letter in self.ledger.dead_letters(limit=100)]


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[Stores]:
    ledger = SqliteLedger(tmp_path / "ledger.db")
    keyword = TantivyKeywordIndex(str(tmp_path / "tantivy"), "kw")
    vector = FaultyIndex(build_vector(VectorSettings(uri=str(tmp_path / "m.db")), dim=DIM), label="vector")
    keyword.ensure()
    vector.inner.ensure()
    yield Stores(ledger, keyword, vector)
    keyword.close()
    vector.inner.close()
    ledger.close()


def _up(doc_id: str, version: int, text: str, position: str | None = None, **metadata: str) -> ChangeEvent:
    return ChangeEvent(Op.UPSERT, doc_id, version, text, metadata, position=position)


def _as_sent(event: ChangeEvent) -> dict[str, object]:
    """The event as a letter must hold it, written out by the test (not by lockstep's codec)."""
    return {"op": event.op.value, "doc_id": event.doc_id, "version": event.version, "text": event.text,
            "metadata": dict(event.metadata)}  # fmt: skip


def test_a_refused_document_is_dead_lettered_whole_with_where_the_source_had_it(stores: Stores) -> None:
    """The vector index refuses "acl" metadata for good: the letter holds the whole event, its
    source, version and position, and the store's reason; the rest of the batch commits."""
    stores.vector.refuse = "acl"
    engine = stores.engine()
    refused = _up("doc", 3, "a text the vector index will refuse", position="offset-17", acl="team-a")
    engine.apply([refused, _up("other", 1, "a text it takes", position="offset-18")])
    engine.close()
    [letter] = stores.letters()
    assert (letter.source, letter.doc_id, letter.version, letter.position) == ("events", "doc", 3, "offset-17")
    assert json.loads(letter.payload) == _as_sent(refused)
    assert letter.reason == "vector index refused 'doc:chunk-0': strict mapping (injected)"
    states = stores.ledger.get_docs(["doc", "other"])
    assert (states["doc"].deleted, states["doc"].version, states["other"].deleted) == (True, 3, False)
    assert stores.keyword.get(["doc:chunk-0"]) == {} and stores.vector.get(["doc:chunk-0"]) == {}
    assert engine.stats.dead_letters == 1


def _prepared_then_restarted(stores: Stores, chunking: ChunkingSettings, event: ChangeEvent) -> ApplyEngine:
    """Prepare ``event`` in one engine, which then stops before writing; a new engine (a
    restart: it never saw the event) recovers it against a vector index that refuses it."""
    first = stores.engine(chunking)
    [intent] = first.prepare([event])
    assert intent.doc_id == event.doc_id and stores.ledger.pending() == [intent]
    first.close()
    stores.vector.refuse = "acl"
    again = stores.engine(chunking)
    assert again.recover() == 1
    again.close()
    return again


def test_a_document_refused_after_a_restart_is_dead_lettered_as_its_event(stores: Stores) -> None:
    """Without overlap the intent holds the whole text, so the letter written after a restart is
    still the event itself (its source position is gone with the process that read it)."""
    event = _up("doc", 2, "the whole text of the document", acl="team-b")
    _prepared_then_restarted(stores, ChunkingSettings(CHUNK_CHARS), event)
    [letter] = stores.letters()
    assert json.loads(letter.payload) == _as_sent(event)
    assert (letter.doc_id, letter.version, letter.position) == ("doc", 2, None)
    assert stores.ledger.pending() == [] and stores.ledger.get_docs(["doc"])["doc"].deleted


def test_a_document_refused_after_a_restart_that_cannot_be_rebuilt_keeps_its_chunks(stores: Stores) -> None:
    """With overlapping chunks the text cannot be put back together from the intent: the letter
    holds the intent (every chunk it would have written) and says so in its reason."""
    chunking = ChunkingSettings(40, overlap_chars=10)
    text = "one sentence after another, long enough to be cut into several overlapping chunks"
    _prepared_then_restarted(stores, chunking, _up("doc", 4, text, acl="team-c"))
    [letter] = stores.letters()
    assert (letter.source, letter.doc_id, letter.version) == ("events", "doc", 4)
    assert letter.reason.startswith("vector index refused 'doc:chunk-")
    assert letter.reason.endswith(
        " (prepared before a restart: the letter holds the chunks it would have written)"
    )
    intent = decode_intent("doc", 4, letter.payload, frozenset())
    assert len(intent.upserts) > 1 and all(text.find(c.text) >= 0 for c in intent.upserts)
    assert all(c.metadata == {"acl": "team-c"} for c in intent.upserts)


def test_a_document_the_model_rejects_is_dead_lettered_and_the_batch_goes_on(stores: Stores) -> None:
    """A permanent embedding failure is the input's fault: that document's letter holds its event
    and the model's words; the others of the batch are embedded and committed."""
    engine = stores.engine()
    bad = _up("bad", 1, "REJECT this one", position="offset-3", lang="en")
    engine.apply([_up("good", 1, "fine text", position="offset-2"), bad, _up("also", 1, "more", position="offset-4")])
    engine.close()
    [letter] = stores.letters()
    assert (letter.doc_id, letter.version, letter.position) == ("bad", 1, "offset-3")
    assert letter.reason == "embedding failed: the model rejected the input (the test's)"
    assert json.loads(letter.payload) == _as_sent(bad)
    assert sorted(stores.ledger.get_docs(["good", "bad", "also"])) == ["also", "good"]
    assert stores.keyword.get(["bad:chunk-0"]) == {} and stores.vector.get(["bad:chunk-0"]) == {}


def test_a_given_up_event_is_counted_once_and_its_reason_keeps_no_secret(stores: Stores) -> None:
    """``dead_letter_event`` (a shard giving a poison document up): one event, its attempts, and
    a reason with the credential in the embedder's error message taken out, in the letter and
    in the log line alike."""
    engine = stores.engine()
    event = _up("poison", 5, "some text", position="offset-9")
    secret = "sk-0123456789abcdefABCDEF"
    with capture_logs() as logs:
        engine.dead_letter_event(event, f"embedding failed 3 times: 401 for key {secret}", 3)
    engine.close()
    [letter] = stores.letters()
    assert letter.attempts == 3 and letter.doc_id == "poison" and letter.position == "offset-9"
    assert secret not in letter.reason and letter.reason.startswith("embedding failed 3 times: 401 for key ")
    assert engine.stats.events == 1 and engine.stats.dead_letters == 1
    [logged] = [e for e in logs if e["event"] == "dead-lettered"]
    assert logged["reason"] == letter.reason and (logged["doc_id"], logged["version"]) == ("poison", 5)


def test_prepare_records_intents_and_is_refused_by_another_writers_intent_or_a_stale_fence(stores: Stores) -> None:
    """Phase 1 alone: ``prepare`` returns the intents it recorded; a document another writer
    holds fails the call (unless asked to skip it, as ``prepare_some`` does), and so does a
    fence that is no longer current."""
    engine = stores.engine()
    stores.ledger.prepare([plan(_up("held", 1, "theirs"), None, ChunkingSettings(CHUNK_CHARS)).to_intent()])
    intents = engine.prepare([_up("a", 1, "text a"), _up("b", 1, "text b")])
    assert sorted((i.doc_id, i.version) for i in intents) == [("a", 1), ("b", 1)]
    with pytest.raises(IntentConflict):
        engine.prepare([_up("held", 2, "ours")])
    assert engine.prepare_some([_up("held", 2, "ours"), _up("c", 1, "text c")])[1] == ["held"]
    fence = stores.ledger.claim_shard(0, "r#1", 3600.0)
    stores.ledger.claim_shard(0, "r#2", 3600.0)
    with pytest.raises(FencedError):
        engine.prepare([_up("d", 1, "text d")], fence)
    assert sorted(i.doc_id for i in stores.ledger.pending()) == ["a", "b", "c", "held"]
    engine.close()


def test_an_intent_driven_twice_or_superseded_is_fine_and_one_that_vanished_is_a_bug(stores: Stores) -> None:
    """A second drive of a committed intent (a recovery racing its preparer) finds it committed
    at the same version, or at a newer one: nothing to do. An intent that is neither pending
    nor committed (aborted behind the engine's back) is a bug the engine refuses to hide."""
    engine = stores.engine()
    [v1] = engine.prepare([_up("a", 1, "first")])
    engine.drive([v1])
    engine.drive([replace(v1, done=frozenset())])
    assert stores.ledger.get_docs(["a"])["a"].version == 1
    engine.apply([_up("a", 2, "second")])
    engine.drive([replace(v1, done=frozenset())])
    assert stores.ledger.get_docs(["a"])["a"].version == 2
    [lost] = engine.prepare([_up("z", 1, "never committed")])
    stores.ledger.abort([("z", 1)])
    with pytest.raises(AssertionError, match=r"neither committed nor superseded: \['z@v1'\]"):
        engine.drive([lost])
    engine.close()


def test_a_refused_edit_is_restored_from_the_committed_copy_and_a_lost_copy_is_reported(stores: Stores) -> None:
    """"a" v1 is committed; its v2 is refused: both indexes go back to v1's text (the ledger
    records the restore at v2, so v2 cannot come back). For "b" the
    committed chunk was also deleted from both indexes behind lockstep's back: there is nothing
    to restore it from, and the engine says so, naming the chunk, for ``reconcile`` to handle."""
    engine = stores.engine()
    engine.apply([_up("a", 1, "a first text"), _up("b", 1, "b first text")])
    for index in (stores.keyword, stores.vector.inner):
        index.delete([ChunkDelete("b:chunk-0", 2)])  # behind lockstep's back
    stores.vector.refuse = "acl"
    with capture_logs() as logs:
        engine.apply([_up("a", 2, "a second text", acl="x"), _up("b", 2, "b second text", acl="x")])
    engine.close()
    assert {d: s.version for d, s in stores.ledger.get_docs(["a", "b"]).items()} == {"a": 2, "b": 2}
    assert [c.text for c in stores.keyword.get(["a:chunk-0"]).values()] == ["a first text"]
    assert [c.text for c in stores.vector.get(["a:chunk-0"]).values()] == ["a first text"]
    [lost] = [e for e in logs if e["event"].startswith("no copy left of committed chunks")]
    assert lost["event"] == "no copy left of committed chunks of a refused document; run `lockstep reconcile`"
    assert (lost["doc_id"], lost["version"], lost["chunks"], lost["phase"]) == ("b", 2, ["b:chunk-0"], "restore")
    assert stores.ledger.pending() == []


def test_the_bug_report_of_vanished_intents_names_at_most_ten(stores: Stores) -> None:
    engine = stores.engine()
    intents = engine.prepare([_up(f"z{n:02d}", 1, f"text {n}") for n in range(12)])
    stores.ledger.abort([(i.doc_id, i.version) for i in intents])
    with pytest.raises(AssertionError) as raised:
        engine.drive(intents)
    named = str(raised.value).split("neither committed nor superseded: ", 1)[1]
    assert named == str([f"z{n:02d}@v1" for n in range(10)])
    engine.close()


def test_the_error_line_of_a_restore_without_copies_names_at_most_ten_chunks(stores: Stores) -> None:
    """A document of twelve chunks, all lost from both indexes, then refused: the error line
    names the first ten chunks it cannot restore (a line, not a dump)."""
    engine = stores.engine()
    text = "".join(f"{n:02d}" + "x" * (CHUNK_CHARS - 2) for n in range(12))
    engine.apply([_up("big", 1, text)])
    lost_ids = [f"big:chunk-{n}" for n in range(12)]
    assert len(stores.keyword.get(lost_ids)) == 12
    for index in (stores.keyword, stores.vector.inner):
        index.delete([ChunkDelete(cid, 2) for cid in lost_ids])  # behind lockstep's back
    stores.vector.refuse = "acl"
    with capture_logs() as logs:
        engine.apply([_up("big", 2, text, acl="x")])
    engine.close()
    [lost] = [e for e in logs if e["event"].startswith("no copy left of committed chunks")]
    assert lost["chunks"] == lost_ids[:10]
