"""The reconciler's pure parts: the versions a repair writes at, the redrive event, the JSON a
reconcile prints, the rate limiter and the budget. Found untested by the mutation run."""

from __future__ import annotations

from dataclasses import replace

import pytest

from coordinator.audit import DocView, Observed, RefChunk
from coordinator.chunking import ChunkingSettings, content_hash
from coordinator.events import ChangeEvent, Op
from coordinator.invariants import metadata_digest
from coordinator.model import ChunkDelete, ChunkState, DocState, IndexedChunk, StoredChunk
from coordinator.ports import Intent
from coordinator.rebuild.snapshot import SnapshotDoc
from coordinator.reconcile import (
    DocRepair,
    RateLimiter,
    ReconcileSummary,
    _Budget,
    _event_ops,
    _verified,
    plan_repair,
    redrive_event,
    source_copies,
)

TEXT = "chunk zero text"
HASH = content_hash(TEXT)


def _copy(chunk_id: str, text: str = TEXT) -> StoredChunk:
    return StoredChunk(chunk_id, chunk_id.split(":")[0], 0, content_hash(text), 1, text, {"lang": "en"})


def test_an_orphan_without_a_ledger_state_is_deleted_at_version_zero_or_one_when_escalated() -> None:
    """Only the vector index holds "x:chunk-0", at v5, and the ledger never heard of "x": the
    delete goes to the vector side at the ledger's base (0), one above it when a gated index
    refused the first try, and the ledger records a tombstone no newer than that delete."""
    view = DocView("x", vector={"x:chunk-0": Observed("x:chunk-0", 5, HASH)})
    repair, missing = plan_repair(view, {})
    assert missing == [] and repair is not None
    assert repair.deletes == (ChunkDelete("x:chunk-0", 0, overwrite_equal=True),)
    assert (repair.upserts, repair.rewrites, repair.sides) == ((), (), frozenset({"vector"}))
    assert repair.after == DocState("x", 0, deleted=True)
    assert (repair.version, repair.bumped) == (1, False)
    escalated, _ = plan_repair(view, {}, escalate=True)
    assert escalated is not None
    assert escalated.deletes == (ChunkDelete("x:chunk-0", 1, overwrite_equal=True),)
    assert escalated.after == DocState("x", 1, deleted=True) and escalated.bumped


def test_a_stale_copy_above_the_ledger_is_overwritten_at_its_own_version_then_one_above() -> None:
    """The ledger has "d" at v2; the keyword index holds chunk 0 at v5 with another text, the
    vector index holds the right copy. The keyword side is rewritten at v5 (a gated index keeps
    v5 otherwise), then at 6 when escalated; the ledger is raised to match."""
    state = DocState("d", 2, deleted=False, chunks=(ChunkState("d:chunk-0", 0, HASH, 2),))
    view = DocView(
        "d",
        ledger=state,
        keyword={"d:chunk-0": Observed("d:chunk-0", 5, content_hash("another text"))},
        vector={"d:chunk-0": Observed("d:chunk-0", 2, HASH)},
    )
    texts = {"d:chunk-0": _copy("d:chunk-0")}
    repair, _ = plan_repair(view, texts)
    assert repair is not None
    assert [(c.chunk_id, c.version, c.text, dict(c.metadata)) for c in repair.upserts] == [
        ("d:chunk-0", 5, TEXT, {"lang": "en"})
    ]
    assert repair.sides == frozenset({"keyword", "vector"})  # the vector copy is at v2, not v5
    assert repair.after.chunks == (ChunkState("d:chunk-0", 0, HASH, 5),)
    assert (repair.after.version, repair.version, repair.bumped) == (5, 5, True)
    escalated, _ = plan_repair(view, texts, escalate=True)
    assert escalated is not None
    assert [c.version for c in escalated.upserts] == [6]
    assert (escalated.after.version, escalated.after.chunks[0].version) == (6, 6)


def test_a_chunk_missing_from_one_index_is_written_there_only_at_the_ledgers_version() -> None:
    other = content_hash("chunk one text")
    state = DocState("d", 3, deleted=False, chunks=(ChunkState("d:chunk-0", 0, HASH, 3), ChunkState("d:chunk-1", 1, other, 2)))
    chunk_1 = {"d:chunk-1": Observed("d:chunk-1", 2, other)}
    view = DocView("d", ledger=state, keyword=dict(chunk_1), vector={"d:chunk-0": Observed("d:chunk-0", 3, HASH), **chunk_1})
    repair, missing = plan_repair(view, {"d:chunk-0": _copy("d:chunk-0")})
    assert missing == [] and repair is not None
    assert [(c.chunk_id, c.version) for c in repair.upserts] == [("d:chunk-0", 3)]
    assert repair.sides == frozenset({"keyword"}) and not repair.bumped
    assert (repair.version, repair.after) == (4, state)


def test_a_duplicated_key_is_deleted_then_rewritten_one_version_above_the_ledger() -> None:
    """Milvus holds "d:chunk-0" twice: the repair deletes the key and writes it back in a second
    intent, one version above what the first one commits."""
    state = DocState("d", 2, deleted=False, chunks=(ChunkState("d:chunk-0", 0, HASH, 2),))
    held = {"d:chunk-0": Observed("d:chunk-0", 2, HASH)}
    view = DocView("d", ledger=state, keyword=dict(held), vector=dict(held), duplicates={"d:chunk-0": 2})
    repair, _ = plan_repair(view, {"d:chunk-0": _copy("d:chunk-0")})
    assert repair is not None and repair.upserts == ()
    assert [(c.chunk_id, c.version) for c in repair.rewrites] == [("d:chunk-0", 2)]
    assert repair.deletes == (ChunkDelete("d:chunk-0", 2, overwrite_equal=True),)
    assert repair.sides == frozenset({"vector"})
    rewrite = repair.rewrite_intent()
    assert rewrite == Intent("d", repair.after.version + 1, repair.rewrites, (), repair.after)
    assert rewrite.version == 3 and rewrite.doc_id == "d"
    assert repair.intent() == Intent("d", repair.version, (), repair.deletes, repair.after)


def test_a_chunk_without_any_copy_of_its_text_is_unrepairable_and_named() -> None:
    state = DocState("d", 1, deleted=False, chunks=(ChunkState("d:chunk-0", 0, HASH, 1),))
    repair, missing = plan_repair(DocView("d", ledger=state), {})
    assert repair is not None and (repair.upserts, repair.deletes, repair.rewrites) == ((), (), ())
    assert missing == [("d:chunk-0", "no copy of its text with the document's metadata")]


def test_the_redrive_event_goes_above_the_ledger_and_deletes_what_the_source_lost() -> None:
    source = SnapshotDoc("d", 2, "the source text", {"acl": "a"})
    assert redrive_event(DocView("d", source=source)) == ChangeEvent(Op.UPSERT, "d", 2, "the source text", {"acl": "a"})
    behind = DocView("d", ledger=DocState("d", 7, deleted=False), source=source)
    assert redrive_event(behind) == ChangeEvent(Op.UPSERT, "d", 8, "the source text", {"acl": "a"})
    assert redrive_event(DocView("d")) == ChangeEvent(Op.DELETE, "d", 0)
    assert redrive_event(DocView("d", ledger=DocState("d", 4, deleted=False))) == ChangeEvent(Op.DELETE, "d", 5)


def test_source_copies_are_the_sources_chunks_with_its_metadata() -> None:
    text = "a" * 10 + "b" * 10 + "c" * 5
    source = SnapshotDoc("d", 1, text, {"lang": "fr"})
    copies = source_copies(DocView("d", source=source), ChunkingSettings(10))
    assert copies == {
        f"d:chunk-{i}": StoredChunk(f"d:chunk-{i}", "d", i, content_hash(t), 0, t, {"lang": "fr"})
        for i, t in enumerate(["a" * 10, "b" * 10, "c" * 5])
    }
    listed_gone = DocView("d", ledger=DocState("d", 1, deleted=False), source=None, source_listed=True)
    assert source_copies(listed_gone, ChunkingSettings(10)) == {}


def test_a_redrive_costs_a_write_per_chunk_per_index_and_a_delete_at_least_one() -> None:
    chunking = ChunkingSettings(10)
    upsert = ChangeEvent(Op.UPSERT, "d", 1, "x" * 25, {})
    assert _event_ops(upsert, DocView("d"), chunking) == 2 * 3
    assert _event_ops(ChangeEvent(Op.DELETE, "d", 2), DocView("d"), chunking) == 2
    state = DocState("d", 1, deleted=False, chunks=tuple(ChunkState(f"d:chunk-{i}", i, HASH, 1) for i in range(4)))
    assert _event_ops(ChangeEvent(Op.DELETE, "d", 2), DocView("d", ledger=state), chunking) == 8


def test_the_printed_summary_and_repairs_keep_their_documented_keys() -> None:
    summary = ReconcileSummary(True, {"clean": False}, ops=7, skipped_for_budget=2, escalations=1, remaining=3,
                               embed_calls=4)  # fmt: skip
    assert summary.as_json() == {
        "schema_version": 1, "dry_run": True, "audit": {"clean": False}, "redrives": [], "repairs": [],
        "unrepairable": [], "ops": 7, "skipped_for_budget": 2, "escalations": 1, "remaining_findings": 3,
        "embed_calls": 4,
    }  # fmt: skip
    chunk = IndexedChunk("d:chunk-0", "d", 0, TEXT, HASH, 4, {})
    repair = DocRepair("d", 4, (chunk,), (ChunkDelete("d:chunk-1", 3),), (chunk,), DocState("d", 4, deleted=False),
                       frozenset({"vector", "keyword"}), bumped=True)  # fmt: skip
    assert repair.as_json() == {
        "doc_id": "d", "sides": ["keyword", "vector"],
        "upserts": [{"chunk_id": "d:chunk-0", "version": 4}],
        "deletes": [{"chunk_id": "d:chunk-1", "version": 3}],
        "rewrites": [{"chunk_id": "d:chunk-0", "version": 4}],
        "ledger_version": 4, "raises_ledger_version": True,
    }  # fmt: skip
    assert repair.ops == 2 * 3


def test_the_rate_limiter_spaces_work_and_refuses_a_rate_that_is_not_positive() -> None:
    now = [100.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    limiter = RateLimiter(0.5, clock=lambda: now[0], sleep=sleep)  # one op every 2 s
    limiter.acquire(3)
    assert slept == [], "the first work starts at once"
    now[0] += 6.0  # exactly when the first three ops' time is used up
    limiter.acquire(1)
    assert slept == [], "no wait (not even of 0 s) when the time is exactly used up"
    limiter.acquire(2)
    assert slept == [pytest.approx(2.0)]
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match=r"^ops_per_s must be positive$"):
            RateLimiter(bad)


def test_the_budget_takes_whole_batches_while_they_fit() -> None:
    budget = _Budget(10)
    assert budget.take(6) and not budget.take(5) and budget.take(4) and not budget.take(1)
    assert budget.used == 10
    unlimited = _Budget(None)
    assert unlimited.take(10**9) and unlimited.used == 10**9


def test_a_copy_is_fit_to_repair_from_only_if_lockstep_wrote_it_with_the_references_text_and_metadata() -> None:
    ref = RefChunk("d:chunk-0", 0, HASH, 1, metadata_digest({"lang": "en"}))
    good = _copy("d:chunk-0")
    assert _verified(good, ref)
    assert not _verified(replace(good, foreign="no version field"), ref), "another writer's copy"
    assert not _verified(replace(good, text=None), ref)
    assert not _verified(replace(good, text="another text"), ref)
    assert not _verified(replace(good, metadata={"lang": "de"}), ref), "the index whose metadata was edited"
    unrecorded = RefChunk("d:chunk-0", 0, HASH, 1, None)
    assert _verified(replace(good, metadata={"lang": "de"}), unrecorded), "no metadata to compare"
