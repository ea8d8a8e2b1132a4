"""Ledger contract: the same suite for every ledger adapter (SQLite now; Postgres joins it)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters.ledger.sqlite import SqliteEmbeddingCache, SqliteLedger
from coordinator.chunking import ChunkingSettings
from coordinator.errors import FencedError
from coordinator.events import ChangeEvent, Op
from coordinator.model import DeadLetter
from coordinator.planner import plan
from coordinator.ports import Fence, Intent

SIDES = frozenset({"keyword", "vector"})


class Clock:
    """A hand-wound clock, so lease expiry is tested without sleeping."""

    def __init__(self) -> None:
        self.now_s = 1_000_000.0

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["sqlite"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path, clock: Clock) -> Iterator[SqliteLedger]:
    led = SqliteLedger(tmp_path / "ledger.db", clock=clock)
    yield led
    led.close()


def _intent(doc_id: str, version: int, text: str = "hello\n\nworld", state=None) -> Intent:  # type: ignore[no-untyped-def]
    return plan(ChangeEvent(Op.UPSERT, doc_id, version, text, {"k": 1}), state, ChunkingSettings(8)).to_intent()


def test_commit_needs_both_sides(ledger: SqliteLedger) -> None:
    """An intent becomes committed state only after every side marked it done."""
    ledger.prepare([_intent("a", 1)])
    ledger.mark_done("keyword", [("a", 1)])
    assert ledger.commit([("a", 1)], SIDES) == 0
    assert ledger.get_docs(["a"]) == {}
    ledger.mark_done("vector", [("a", 1)])
    assert ledger.commit([("a", 1)], SIDES) == 1
    state = ledger.get_docs(["a"])["a"]
    assert state.version == 1 and len(state.chunks) == 2 and ledger.pending() == []
    assert ledger.applied_versions("keyword", ["a"]) == {"a": 1}


def test_pending_intents_survive_reopen(ledger: SqliteLedger) -> None:
    """Prepared intents and the sides that hold them are durable across a reopen."""
    intent = _intent("a", 1)
    ledger.prepare([intent])
    ledger.mark_done("vector", [("a", 1)])
    reopened = SqliteLedger(ledger.path)
    [again] = reopened.pending()
    assert again.upserts == intent.upserts and again.after == intent.after and again.done == {"vector"}


def test_gate_refuses_a_second_intent_and_old_versions(ledger: SqliteLedger) -> None:
    """prepare refuses a document that already has an intent, and versions not above committed."""
    ledger.prepare([_intent("a", 2)])
    with pytest.raises(ValueError, match="pending"):
        ledger.prepare([_intent("a", 3)])
    ledger.mark_done("keyword", [("a", 2)])
    ledger.mark_done("vector", [("a", 2)])
    ledger.commit([("a", 2)], SIDES)
    with pytest.raises(ValueError, match="not above"):
        ledger.prepare([_intent("a", 2)])


def test_abort_leaves_committed_state_unchanged(ledger: SqliteLedger) -> None:
    """An aborted intent disappears and the committed state stays as it was."""
    ledger.prepare([_intent("a", 1)])
    ledger.abort([("a", 1)])
    assert ledger.pending() == [] and ledger.get_docs(["a"]) == {}


def test_iter_docs_streams_in_order_with_tombstones_on_request(ledger: SqliteLedger) -> None:
    """iter_docs pages through every document in doc_id order; tombstones only when asked."""
    intents = [_intent(f"d{i:04d}", 1) for i in range(2500)]
    ledger.prepare(intents)
    keys = [(i.doc_id, 1) for i in intents]
    ledger.mark_done("keyword", keys)
    ledger.mark_done("vector", keys)
    ledger.commit(keys, SIDES)
    tomb = plan(ChangeEvent(Op.DELETE, "d0001", 2), ledger.get_docs(["d0001"])["d0001"], ChunkingSettings(8))
    ledger.prepare([tomb.to_intent()])
    ledger.mark_done("keyword", [("d0001", 2)])
    ledger.mark_done("vector", [("d0001", 2)])
    ledger.commit([("d0001", 2)], SIDES)
    live = [d.doc_id for d in ledger.iter_docs()]
    assert len(live) == 2499 and live == sorted(live) and "d0001" not in live
    assert len(list(ledger.iter_docs(include_deleted=True))) == 2500
    assert ledger.counts()["tombstones"] == 1 and ledger.counts()["chunks"] == 2499 * 2


def test_checkpoints_and_dead_letters(ledger: SqliteLedger) -> None:
    """Checkpoints overwrite per source; dead letters keep reason, payload and attempts."""
    assert ledger.get_checkpoint("s") is None
    ledger.set_checkpoint("s", "10")
    ledger.set_checkpoint("s", "20")
    assert ledger.get_checkpoint("s") == "20"
    ledger.add_dead_letters([DeadLetter("s", "missing version", '{"op":"upsert"}', doc_id="x")])
    [(_, letter)] = ledger.dead_letters(limit=10)
    assert letter.reason == "missing version" and letter.doc_id == "x" and letter.attempts == 1


def test_embedding_cache_round_trips_float32(ledger: SqliteLedger) -> None:
    """Cached vectors come back per (model, hash) and are isolated between models."""
    cache = SqliteEmbeddingCache(ledger)
    cache.put_many("m1", {"h1": [0.5, -0.25], "h2": [1.0, 0.0]})
    assert cache.get_many("m1", ["h1", "h3"]) == {"h1": [0.5, -0.25]}
    assert cache.get_many("m2", ["h1"]) == {}


_CRASHER = textwrap.dedent(
    """
    import os, signal, sys
    from adapters.ledger.sqlite import SqliteLedger
    from coordinator.chunking import ChunkingSettings
    from coordinator.events import ChangeEvent, Op
    from coordinator.planner import plan

    path, point = sys.argv[1], sys.argv[2]
    def hook(name):
        if name == point:
            os.kill(os.getpid(), signal.SIGKILL)
    led = SqliteLedger(path, crash_hook=hook)
    intents = [plan(ChangeEvent(Op.UPSERT, f"d{i}", 1, "x\\n\\ny", {}), None, ChunkingSettings(8)).to_intent()
               for i in range(3)]
    led.prepare(intents)
    keys = [(f"d{i}", 1) for i in range(3)]
    led.mark_done("keyword", keys)
    led.mark_done("vector", keys)
    led.commit(keys, frozenset({"keyword", "vector"}))
    """
)


@pytest.mark.parametrize(
    "point",
    ["ledger.prepare.between_statements", "ledger.mark_done.between_statements", "ledger.commit.between_statements"],
)
def test_kill_between_statements_leaves_no_half_state(tmp_path: Path, point: str) -> None:
    """A SIGKILL between two statements of one ledger transaction leaves the state before it."""
    path = tmp_path / "crash.db"
    proc = subprocess.run([sys.executable, "-c", _CRASHER, str(path), point], check=False, timeout=60)
    assert proc.returncode == -9, f"the process was not killed at {point}"
    led = SqliteLedger(path)
    pending, docs = led.pending(), led.get_docs(["d0", "d1", "d2"])
    if point.startswith("ledger.prepare"):
        assert pending == [] and docs == {}
    elif point.startswith("ledger.mark_done"):
        assert len(pending) == 3 and all(p.done == frozenset() for p in pending)
    else:
        assert len(pending) == 3 and docs == {} and all(p.done == SIDES for p in pending)


def test_a_new_owner_fences_the_old_one(ledger: SqliteLedger, clock: Clock) -> None:
    """After a lease expires, a new owner gets a higher epoch and the old epoch can no longer write."""
    old = ledger.claim_shard(3, "replica-a", lease_s=10)
    assert old == Fence(3, 1)
    with pytest.raises(FencedError, match="owned by replica-a"):
        ledger.claim_shard(3, "replica-b", lease_s=10)
    clock.now_s += 11
    new = ledger.claim_shard(3, "replica-b", lease_s=10)
    assert new.epoch == 2
    for write in (
        lambda: ledger.prepare([_intent("a", 1)], fence=old),
        lambda: ledger.mark_done("keyword", [("a", 1)], fence=old),
        lambda: ledger.commit([("a", 1)], SIDES, fence=old),
        lambda: ledger.renew_shard(old, "replica-a", lease_s=10),
    ):
        with pytest.raises(FencedError):
            write()
    ledger.prepare([_intent("a", 1)], fence=new)
    assert [i.doc_id for i in ledger.pending()] == ["a"]


def test_renewing_keeps_the_epoch_and_an_expired_lease_stops_writes(ledger: SqliteLedger, clock: Clock) -> None:
    """Renewal extends the lease at the same epoch; a lease left to expire fences its own owner."""
    fence = ledger.claim_shard(0, "replica-a", lease_s=10)
    clock.now_s += 8
    ledger.renew_shard(fence, "replica-a", lease_s=10)
    assert ledger.claim_shard(0, "replica-a", lease_s=10) == fence
    clock.now_s += 10.5
    with pytest.raises(FencedError):
        ledger.prepare([_intent("a", 1)], fence=fence)
