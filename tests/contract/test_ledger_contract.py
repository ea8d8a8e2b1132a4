"""Ledger contract: the same suite for every ledger adapter (SQLite and Postgres).

The Postgres-only tests at the end run several ledgers ("replicas") on one schema and prove the
races the SQLite file lock rules out by construction: the prepare gate, shard claims, fencing of
in-flight writes, timeouts and a server restart.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import structlog
from pydantic import SecretStr

from adapters.ledger.postgres import PostgresEmbeddingCache, PostgresLedger
from adapters.ledger.settings import PostgresLedgerSettings
from adapters.ledger.sqlite import SqliteEmbeddingCache, SqliteLedger
from chaos.servers import EmbeddedPostgres
from coordinator.chunking import ChunkingSettings
from coordinator.crashpoints import CrashHook, no_crash
from coordinator.errors import ConfigError, FencedError, IntentConflict, TransientStoreError
from coordinator.events import ChangeEvent, Op
from coordinator.limits import RECORD_BYTES_MAX
from coordinator.model import DeadLetter, DocState, PayloadEncoding, spell_record
from coordinator.planner import plan
from coordinator.ports import EmbeddingCache, Fence, Intent, Ledger
from tests.support.postgres_servers import PgSchema
from tests.support.threads import BackgroundCall

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


AnyLedger = SqliteLedger | PostgresLedger


@dataclass(frozen=True)
class Store:
    """Where one test's ledger lives: a SQLite file, or a fresh schema on the session's Postgres."""

    kind: str
    location: str  # the SQLite path, or the Postgres DSN
    schema: str = ""

    def open(self, clock: Callable[[], float] = time.time, crash_hook: CrashHook = no_crash) -> AnyLedger:
        if self.kind == "sqlite":
            return SqliteLedger(self.location, clock=clock, crash_hook=crash_hook)
        return PostgresLedger(self.location, clock=clock, crash_hook=crash_hook, schema=self.schema)

    def open_generation(self, number: int) -> AnyLedger:
        """A later generation's ledger beside this home ledger, laid out as lockstep.bootstrap does."""
        if self.kind == "sqlite":
            home = Path(self.location)
            return SqliteLedger(home.with_name(f"{home.stem}.g{number}{home.suffix}"), home=home)
        return PostgresLedger(self.location, schema=f"{self.schema}_g{number}", home_schema=self.schema)


def _cache(ledger: AnyLedger) -> EmbeddingCache:
    if isinstance(ledger, SqliteLedger):
        return SqliteEmbeddingCache(ledger)
    return PostgresEmbeddingCache(ledger)


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "sqlite":
        return Store("sqlite", str(tmp_path / "ledger.db"))
    # Requested lazily, so a run of the SQLite tests alone never starts Postgres.
    schema: PgSchema = request.getfixturevalue("pg_schema")
    return Store("postgres", schema.dsn, schema.name)


@pytest.fixture
def ledger(store: Store, clock: Clock) -> Iterator[AnyLedger]:
    led = store.open(clock)
    yield led
    led.close()


def _intent(doc_id: str, version: int, text: str = "hello\n\nworld", state: DocState | None = None) -> Intent:
    return plan(
        ChangeEvent(Op.UPSERT, doc_id, version, text, {"k": 1}), state, ChunkingSettings(8)
    ).to_intent()


def _commit_all(ledger: Ledger, keys: list[tuple[str, int]]) -> None:
    ledger.mark_done("keyword", keys)
    ledger.mark_done("vector", keys)
    assert ledger.commit(keys, SIDES) == len(keys)


def test_commit_needs_both_sides(ledger: AnyLedger) -> None:
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


def test_pending_intents_survive_reopen(ledger: AnyLedger, store: Store) -> None:
    """Prepared intents and the sides that hold them are durable across a reopen."""
    intent = _intent("a", 1)
    ledger.prepare([intent])
    ledger.mark_done("vector", [("a", 1)])
    reopened = store.open()
    [again] = reopened.pending()
    reopened.close()
    assert again.upserts == intent.upserts and again.after == intent.after and again.done == {"vector"}


def test_gate_refuses_a_second_intent_and_old_versions(ledger: AnyLedger) -> None:
    """prepare refuses a document that already has an intent, and versions not above committed."""
    ledger.prepare([_intent("a", 2)])
    with pytest.raises(IntentConflict, match="pending"):
        ledger.prepare([_intent("a", 3)])
    ledger.mark_done("keyword", [("a", 2)])
    ledger.mark_done("vector", [("a", 2)])
    ledger.commit([("a", 2)], SIDES)
    with pytest.raises(IntentConflict, match="not above"):
        ledger.prepare([_intent("a", 2)])


def test_skip_conflicts_prepares_the_rest_and_names_what_met_the_gate(ledger: AnyLedger) -> None:
    """A rebuild's batch: documents with an intent pending or a newer committed version are left
    out and named; the rest are prepared. Without the flag a batch stays all or none."""
    ledger.prepare([_intent("b", 3)])
    _commit_all(ledger, [("b", 3)])
    ledger.prepare([_intent("a", 1)])
    skipped = ledger.prepare([_intent("a", 2), _intent("b", 2), _intent("c", 1)], skip_conflicts=True)
    assert sorted(skipped) == ["a", "b"]
    assert sorted((i.doc_id, i.version) for i in ledger.pending()) == [("a", 1), ("c", 1)]
    assert ledger.get_docs(["b"])["b"].version == 3
    with pytest.raises(IntentConflict):
        ledger.prepare([_intent("d", 1), _intent("a", 3)])
    assert sorted(i.doc_id for i in ledger.pending()) == ["a", "c"]


def test_abort_leaves_committed_state_unchanged(ledger: AnyLedger) -> None:
    """An aborted intent disappears and the committed state stays as it was."""
    ledger.prepare([_intent("a", 1)])
    ledger.abort([("a", 1)])
    assert ledger.pending() == [] and ledger.get_docs(["a"]) == {}


def test_replaced_intents_start_over_and_commit_their_own_state(ledger: AnyLedger) -> None:
    """A replaced intent keeps its key, forgets the sides it had reached, survives as pending
    (restores flag included), and commits the state it now carries."""
    ledger.prepare([_intent("a", 2), _intent("b", 1)])
    ledger.mark_done("keyword", [("a", 2)])
    restore = Intent("a", 2, (), (), DocState("a", 2, deleted=True, source_hash="h"), restores=True)
    ledger.replace_intents([restore])
    pending = {i.doc_id: i for i in ledger.pending()}
    assert pending["a"] == restore and pending["b"].upserts
    _commit_all(ledger, [("a", 2)])
    assert ledger.get_docs(["a"])["a"] == DocState("a", 2, deleted=True, source_hash="h")
    assert [i.doc_id for i in ledger.pending()] == ["b"]


def test_iter_docs_streams_in_order_with_tombstones_on_request(ledger: AnyLedger) -> None:
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


def test_iter_docs_orders_by_code_point(ledger: AnyLedger) -> None:
    """iter_docs orders doc_ids by Unicode code point (as Python sorts str), never by a locale."""
    ids = ["b", "B", "a", "Z", "é", "e", "ä", "a b", "a-b", "_x", "ab", "\U0001f600", "\u00e9a"]
    ledger.prepare([_intent(d, 1) for d in ids])
    _commit_all(ledger, [(d, 1) for d in ids])
    assert [d.doc_id for d in ledger.iter_docs()] == sorted(ids)


def test_iter_docs_changed_since_reads_only_later_commits(ledger: AnyLedger, clock: Clock) -> None:
    """iter_docs_changed_since yields documents committed at or after ``since``, tombstones included."""
    ledger.prepare([_intent("old", 1), _intent("gone", 1)])
    _commit_all(ledger, [("old", 1), ("gone", 1)])
    clock.now_s += 60
    since = clock.now_s
    tomb = plan(ChangeEvent(Op.DELETE, "gone", 2), ledger.get_docs(["gone"])["gone"], ChunkingSettings(8))
    ledger.prepare([_intent("new", 1), tomb.to_intent()])
    _commit_all(ledger, [("new", 1), ("gone", 2)])
    changed = list(ledger.iter_docs_changed_since(since))
    assert [(d.doc_id, d.deleted) for d in changed] == [("gone", True), ("new", False)]


def test_drop_namespace_removes_a_generations_own_storage_and_keeps_home(
    ledger: AnyLedger, store: Store
) -> None:
    """drop_namespace removes a later generation's documents, intents and applied versions for
    good, leaves what it shares with home (checkpoints), and refuses the home ledger itself."""
    ledger.set_checkpoint("s", "7")
    generation = store.open_generation(2)
    generation.prepare([_intent("a", 1)])
    _commit_all(generation, [("a", 1)])
    generation.prepare([_intent("b", 1)])
    assert generation.get_checkpoint("s") == "7"
    generation.drop_namespace()
    again = store.open_generation(2)
    try:
        assert again.get_docs(["a"]) == {} and again.pending() == []
        assert again.applied_versions("keyword", ["a"]) == {}
    finally:
        again.drop_namespace()
    assert ledger.get_checkpoint("s") == "7"
    with pytest.raises(ConfigError, match="home ledger"):
        ledger.drop_namespace()
    assert ledger.get_checkpoint("s") == "7"


def test_checkpoints_and_dead_letters(ledger: AnyLedger) -> None:
    """Checkpoints overwrite per source; dead letters keep their first reason, payload, position
    and attempts, and every later attempt's reason in their history."""
    assert ledger.get_checkpoint("s") is None
    ledger.set_checkpoint("s", "10")
    ledger.set_checkpoint("s", "20")
    assert ledger.get_checkpoint("s") == "20"
    ledger.add_dead_letters([DeadLetter("s", "missing version", '{"op":"upsert"}', doc_id="x", position="7")])
    [(letter_id, letter)] = ledger.dead_letters(limit=10)
    assert letter.reason == "missing version" and letter.doc_id == "x" and letter.attempts == 1
    assert letter.position == "7" and letter.history == ()
    assert ledger.record_attempt(letter_id, "still missing version")
    found = ledger.dead_letter(letter_id)
    assert found is not None and found[0].attempts == 2 and found[0].reason == "missing version"
    assert [a.reason for a in found[0].history] == ["still missing version"] and found[0].history[0].at > 0
    assert found[1] > 0
    assert not ledger.record_attempt(letter_id + 1000, "no such letter")
    assert ledger.drop_dead_letters([letter_id, letter_id + 1000]) == 1
    assert ledger.dead_letter(letter_id) is None and ledger.dead_letters(limit=10) == []


def test_dead_letters_keep_records_exactly_and_page_by_id(ledger: AnyLedger) -> None:
    """A record of undecodable bytes comes back byte for byte, a record of 100 KB whole; pages
    follow letter IDs; the same record delivered again (same source, position and reason) is
    kept once."""
    raw = b'{"op":"upsert","doc_id":"b","text":"\xff\x00\xfe"}'
    big = "x" * 100_000
    spelled, encoding, truncated = spell_record(raw, RECORD_BYTES_MAX)
    letters = [
        DeadLetter("s", "invalid UTF-8", spelled, position="1", encoding=encoding, truncated=truncated),
        DeadLetter("s", "too big", big, position="2"),
        DeadLetter("t", "conflict", "{}", doc_id="c", version=3),
    ]
    assert ledger.add_dead_letters(letters) == letters
    assert ledger.add_dead_letters(letters[:2]) == []
    first, *rest = ledger.dead_letters(limit=10)
    assert len(rest) == 2 and first[1].record_bytes() == raw and first[1].encoding is PayloadEncoding.BASE64
    assert rest[0][1].payload == big and rest[1][1].version == 3 and rest[1][1].position is None
    assert [i for i, _ in ledger.dead_letters(limit=10, after_id=first[0])] == [i for i, _ in rest]
    assert ledger.add_dead_letters(letters[2:]) == letters[2:]
    assert len(ledger.dead_letters(limit=10)) == 4


def test_embedding_cache_round_trips_float32(ledger: AnyLedger) -> None:
    """Cached vectors come back per (model, hash) and are isolated between models."""
    cache = _cache(ledger)
    cache.put_many("m1", {"h1": [0.5, -0.25], "h2": [1.0, 0.0]})
    assert cache.get_many("m1", ["h1", "h3"]) == {"h1": [0.5, -0.25]}
    assert cache.get_many("m2", ["h1"]) == {}


_CRASHER = textwrap.dedent(
    """
    import os, signal, sys
    from adapters.ledger.postgres import PostgresLedger
    from adapters.ledger.sqlite import SqliteLedger
    from coordinator.chunking import ChunkingSettings
    from coordinator.events import ChangeEvent, Op
    from coordinator.planner import plan

    kind, location, schema, point = sys.argv[1:5]
    def hook(name):
        if name == point:
            os.kill(os.getpid(), signal.SIGKILL)
    if kind == "sqlite":
        led = SqliteLedger(location, crash_hook=hook)
    else:
        led = PostgresLedger(location, schema=schema, crash_hook=hook)
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
    [
        "ledger.prepare.between_statements",
        "ledger.mark_done.between_statements",
        "ledger.commit.between_statements",
    ],
)
def test_kill_between_statements_leaves_no_half_state(store: Store, point: str) -> None:
    """A SIGKILL between two statements of one ledger transaction leaves the state before it."""
    args = [sys.executable, "-c", _CRASHER, store.kind, store.location, store.schema, point]
    proc = subprocess.run(args, check=False, timeout=60)
    assert proc.returncode == -9, f"the process was not killed at {point}"
    led = store.open()
    pending, docs = led.pending(), led.get_docs(["d0", "d1", "d2"])
    led.close()
    if point.startswith("ledger.prepare"):
        assert pending == [] and docs == {}
    elif point.startswith("ledger.mark_done"):
        assert len(pending) == 3 and all(p.done == frozenset() for p in pending)
    else:
        assert len(pending) == 3 and docs == {} and all(p.done == SIDES for p in pending)


def test_a_new_owner_fences_the_old_one(ledger: AnyLedger, clock: Clock) -> None:
    """After a lease expires, a new owner gets a higher epoch and the old epoch can no longer write."""
    old = ledger.claim_shard(3, "replica-a#1", lease_s=10)
    assert old == Fence(3, 1)
    with pytest.raises(FencedError, match="owned by replica-a"):
        ledger.claim_shard(3, "replica-b#1", lease_s=10)
    clock.now_s += 11
    new = ledger.claim_shard(3, "replica-b#1", lease_s=10)
    assert new.epoch == 2
    for write in (
        lambda: ledger.prepare([_intent("a", 1)], fence=old),
        lambda: ledger.mark_done("keyword", [("a", 1)], fence=old),
        lambda: ledger.commit([("a", 1)], SIDES, fence=old),
        lambda: ledger.renew_shard(old, "replica-a#1", lease_s=10),
    ):
        with pytest.raises(FencedError):
            write()
    ledger.prepare([_intent("a", 1)], fence=new)
    assert [i.doc_id for i in ledger.pending()] == ["a"]


def test_renewing_keeps_the_epoch_and_an_expired_lease_stops_writes(ledger: AnyLedger, clock: Clock) -> None:
    """Renewal extends the lease at the same epoch; a lease left to expire fences its own owner."""
    fence = ledger.claim_shard(0, "replica-a#1", lease_s=10)
    clock.now_s += 8
    ledger.renew_shard(fence, "replica-a#1", lease_s=10)
    assert ledger.claim_shard(0, "replica-a#1", lease_s=10) == fence
    clock.now_s += 10.5
    with pytest.raises(FencedError):
        ledger.prepare([_intent("a", 1)], fence=fence)


# --- Postgres only: several replicas on one database ------------------------------------------

# How long a call that must wait for another replica's transaction is watched to prove it waits.
WAIT_OBSERVED_S = 0.5
# How long any call here may take once nothing holds it back.
CALL_DEADLINE_S = 30.0
# Replicas racing in the free-for-all tests.
RACERS = 8


class _Held:
    """A crash hook that parks its ledger's transaction the ``nth`` time it reaches ``point``."""

    def __init__(self, point: str, nth: int = 1) -> None:
        self.point = point
        self.remaining = nth
        self.reached = threading.Event()
        self.release = threading.Event()

    def __call__(self, name: str) -> None:
        if name == self.point:
            self.remaining -= 1
        if name == self.point and self.remaining == 0:
            self.reached.set()
            assert self.release.wait(CALL_DEADLINE_S), "the held transaction was never released"


@pytest.fixture
def replicas(pg_schema: PgSchema, clock: Clock) -> Iterator[Callable[..., PostgresLedger]]:
    """Opens ledgers on one shared schema, as separate replicas would; closes them all after."""
    opened: list[PostgresLedger] = []

    def open_replica(crash_hook: CrashHook = no_crash, **options: float) -> PostgresLedger:
        led = PostgresLedger(
            pg_schema.dsn, schema=pg_schema.name, clock=clock, crash_hook=crash_hook, **options
        )
        opened.append(led)
        return led

    yield open_replica
    for led in opened:
        led.close()


def _race(attempts: list[Callable[[], object]]) -> list[BackgroundCall]:
    """Start every attempt at once (a barrier) and wait for all of them."""
    barrier = threading.Barrier(len(attempts))

    def at_once(fn: Callable[[], object]) -> Callable[[], object]:
        return lambda: (barrier.wait(CALL_DEADLINE_S), fn())[1]

    calls = [BackgroundCall(at_once(fn)) for fn in attempts]
    assert all(c.finished_within(CALL_DEADLINE_S) for c in calls), "a racer hung"
    return calls


def test_two_replicas_preparing_one_doc_exactly_one_wins(replicas: Callable[..., PostgresLedger]) -> None:
    """A second replica preparing a document waits on the first one's uncommitted intent, then is refused."""
    held = _Held("ledger.prepare.between_statements")
    first_replica, second_replica = replicas(crash_hook=held), replicas()
    first = BackgroundCall(lambda: first_replica.prepare([_intent("x", 1)]))
    assert held.reached.wait(CALL_DEADLINE_S)
    second = BackgroundCall(lambda: second_replica.prepare([_intent("x", 2)]))
    assert not second.finished_within(WAIT_OBSERVED_S), "the second prepare did not wait for the first"
    held.release.set()
    assert first.finished_within(CALL_DEADLINE_S) and first.error is None
    assert second.finished_within(CALL_DEADLINE_S)
    assert isinstance(second.error, IntentConflict) and "pending" in str(second.error)
    assert [(i.doc_id, i.version) for i in second_replica.pending()] == [("x", 1)]


def test_many_replicas_racing_to_prepare_one_doc_exactly_one_wins(
    replicas: Callable[..., PostgresLedger],
) -> None:
    """Of RACERS replicas preparing the same document at the same moment, exactly one succeeds."""
    ledgers = [replicas() for _ in range(RACERS)]
    calls = _race([partial(led.prepare, [_intent("x", 1)]) for led in ledgers])
    assert sum(c.error is None for c in calls) == 1
    assert all(isinstance(c.error, IntentConflict) for c in calls if c.error is not None)
    assert len(ledgers[0].pending()) == 1


def test_prepare_racing_a_commit_sees_the_committed_version(replicas: Callable[..., PostgresLedger]) -> None:
    """A prepare racing a commit that already deleted the intent waits for it and is refused as not above."""
    # Parked on its second document, the commit has written x and deleted x's intent, uncommitted.
    held = _Held("ledger.commit.between_statements", nth=2)
    committer, preparer = replicas(crash_hook=held), replicas()
    keys = [("x", 2), ("y", 2)]
    committer.prepare([_intent(d, v) for d, v in keys])
    committer.mark_done("keyword", keys)
    committer.mark_done("vector", keys)
    commit = BackgroundCall(lambda: committer.commit(keys, SIDES))
    assert held.reached.wait(CALL_DEADLINE_S)
    prepare = BackgroundCall(lambda: preparer.prepare([_intent("x", 2)]))
    assert not prepare.finished_within(WAIT_OBSERVED_S), "the prepare did not wait for the commit"
    held.release.set()
    assert commit.finished_within(CALL_DEADLINE_S) and commit.result == 2
    assert prepare.finished_within(CALL_DEADLINE_S)
    assert isinstance(prepare.error, IntentConflict) and "not above" in str(prepare.error)


def test_replicas_claiming_one_shard_exactly_one_wins(replicas: Callable[..., PostgresLedger]) -> None:
    """Of RACERS replicas claiming a never-claimed shard at once, one gets epoch 1 and the rest are fenced."""
    ledgers = [replicas() for _ in range(RACERS)]
    calls = _race([partial(led.claim_shard, 7, f"replica-{i}", lease_s=10) for i, led in enumerate(ledgers)])
    assert [c.result for c in calls if c.error is None] == [Fence(7, 1)]
    assert all(isinstance(c.error, FencedError) for c in calls if c.error is not None)


def test_a_takeover_waits_for_the_old_owners_write_in_flight(
    replicas: Callable[..., PostgresLedger], clock: Clock
) -> None:
    """A new owner's claim waits for a write already checked under the old epoch, then fences the old owner."""
    held = _Held("ledger.prepare.between_statements")
    old_owner, new_owner = replicas(crash_hook=held), replicas()
    old = old_owner.claim_shard(1, "replica-a", lease_s=10)
    write = BackgroundCall(lambda: old_owner.prepare([_intent("x", 1)], fence=old))
    assert held.reached.wait(CALL_DEADLINE_S)
    clock.now_s += 11
    claim = BackgroundCall(lambda: new_owner.claim_shard(1, "replica-b", lease_s=10))
    assert not claim.finished_within(WAIT_OBSERVED_S), "the claim did not wait for the write in flight"
    held.release.set()
    assert write.finished_within(CALL_DEADLINE_S) and write.error is None
    assert claim.finished_within(CALL_DEADLINE_S) and claim.result == Fence(1, 2)
    with pytest.raises(FencedError):
        old_owner.mark_done("keyword", [("x", 1)], fence=old)


def test_a_statement_timeout_is_a_transient_error(replicas: Callable[..., PostgresLedger]) -> None:
    """A replica blocked behind another's row lock past its statement timeout gets TransientStoreError and stays usable."""
    held = _Held("ledger.prepare.between_statements")
    holder, impatient = replicas(crash_hook=held), replicas(statement_timeout_s=0.3)
    first = BackgroundCall(lambda: holder.prepare([_intent("x", 1)]))
    assert held.reached.wait(CALL_DEADLINE_S)
    with pytest.raises(TransientStoreError, match="QueryCanceled"):
        impatient.prepare([_intent("x", 1)])
    held.release.set()
    assert first.finished_within(CALL_DEADLINE_S) and first.error is None
    with pytest.raises(IntentConflict, match="pending"):
        impatient.prepare([_intent("x", 1)])


def test_a_server_restart_is_transient_and_the_ledger_reconnects(
    restartable_postgres: EmbeddedPostgres, clock: Clock
) -> None:
    """While the server is down every call raises TransientStoreError; once it is back the same ledger works."""
    led = PostgresLedger(restartable_postgres.uri, clock=clock, schema="lockstep")
    led.prepare([_intent("x", 1)])
    restartable_postgres.stop()
    with pytest.raises(TransientStoreError):
        led.pending()  # the connection it had is gone
    with pytest.raises(TransientStoreError):
        led.pending()  # and there is no server to reconnect to
    restartable_postgres.start()
    assert [i.doc_id for i in led.pending()] == ["x"]
    led.close()


def test_the_dsn_password_never_shows(pg_schema: PgSchema) -> None:
    """A password in the DSN shows in no repr, str, log line or parse error of the ledger or its settings."""
    dsn = pg_schema.dsn.replace("postgres:@", "postgres:hunter2@")
    assert "hunter2" in dsn
    settings = PostgresLedgerSettings(dsn=SecretStr(dsn), schema=pg_schema.name)
    with structlog.testing.capture_logs() as logs:
        led = PostgresLedger.from_settings(settings)
        led.close()
        led.pending()  # reconnects, and logs it
    led.close()
    with pytest.raises(ConfigError) as bad:
        PostgresLedger("host=/tmp password=hunter2 dbname")
    shown = (repr(led), str(led), repr(logs), repr(settings), str(settings), str(bad.value))
    assert logs and all("hunter2" not in text for text in shown)
    assert bad.value.__suppress_context__ and bad.value.__cause__ is None


def test_a_restarted_incarnation_takes_over_at_once_and_fences_its_predecessor(ledger: SqliteLedger) -> None:
    """The same replica restarting need not wait for its dead lease, and gets a new epoch."""
    first = ledger.claim_shard(1, "pod-0#aaa", lease_s=30)
    second = ledger.claim_shard(1, "pod-0#bbb", lease_s=30)
    assert second.epoch == first.epoch + 1
    with pytest.raises(FencedError):
        ledger.prepare([_intent("a", 1)], fence=first)


# --- SQLite only: a later generation's ledger beside its home file -----------------------------


def test_a_generation_ledgers_own_transaction_leaves_the_home_file_writable(tmp_path: Path, clock: Clock) -> None:
    """While a generation ledger's prepare is in flight (a rebuild's batch), the home ledger still
    renews leases and writes checkpoints at once, and the generation's writes still see the fence."""
    home = SqliteLedger(tmp_path / "ledger.db", clock=clock)
    held = _Held("ledger.prepare.between_statements")
    gen = SqliteLedger(tmp_path / "ledger.g2.db", clock=clock, crash_hook=held, home=tmp_path / "ledger.db")
    try:
        fence = home.claim_shard(0, "pod-0#a", lease_s=30)
        prepare = BackgroundCall(lambda: gen.prepare([_intent("a", 1), _intent("b", 1)], fence=fence))
        assert held.reached.wait(CALL_DEADLINE_S)
        renew = BackgroundCall(lambda: home.renew_shard(fence, "pod-0#a", lease_s=30))
        checkpoint = BackgroundCall(lambda: home.set_checkpoint("src", "42"))
        assert renew.finished_within(CALL_DEADLINE_S / 3) and renew.error is None
        assert checkpoint.finished_within(CALL_DEADLINE_S / 3) and checkpoint.error is None
        held.release.set()
        assert prepare.finished_within(CALL_DEADLINE_S) and prepare.error is None
        assert sorted(i.doc_id for i in gen.pending()) == ["a", "b"] and home.pending() == []
        # The shared tables are the home file's, whichever ledger writes them.
        assert gen.get_checkpoint("src") == "42"
        # A takeover fences the generation's writes too.
        home.claim_shard(0, "pod-0#b", lease_s=30)
        with pytest.raises(FencedError):
            gen.mark_done("keyword", [("a", 1)], fence=fence)
        with pytest.raises(FencedError):
            gen.prepare([_intent("c", 1)], fence=fence)
    finally:
        held.release.set()
        gen.close()
        home.close()


def test_generation_ledgers_serialize_their_own_writes(tmp_path: Path, clock: Clock) -> None:
    """Two connections to one generation file (a shard and the rebuild) still take turns: the
    second prepare of the same document waits for the first and then meets its intent."""
    home = SqliteLedger(tmp_path / "ledger.db", clock=clock)
    held = _Held("ledger.prepare.between_statements")
    first = SqliteLedger(tmp_path / "ledger.g2.db", clock=clock, crash_hook=held, home=tmp_path / "ledger.db")
    second = SqliteLedger(tmp_path / "ledger.g2.db", clock=clock, home=tmp_path / "ledger.db")
    try:
        racing = BackgroundCall(lambda: first.prepare([_intent("a", 1)]))
        assert held.reached.wait(CALL_DEADLINE_S)
        waiting = BackgroundCall(lambda: second.prepare([_intent("a", 2)]))
        assert not waiting.finished_within(WAIT_OBSERVED_S)
        held.release.set()
        assert racing.finished_within(CALL_DEADLINE_S) and racing.error is None
        assert waiting.finished_within(CALL_DEADLINE_S)
        assert isinstance(waiting.error, IntentConflict)
        assert [(i.doc_id, i.version) for i in second.pending()] == [("a", 1)]
    finally:
        held.release.set()
        for led in (first, second, home):
            led.close()


def test_writers_announce_renew_expire_and_withdraw(ledger: AnyLedger, clock: Clock) -> None:
    """The generations' writers: a starting writer (set unknown), one writing a set, renewal,
    expiry after its TTL without renewal, and withdrawal."""
    from adapters.ledger.registry import registry_for
    from coordinator.generations import lagging_writers

    registry = registry_for(ledger)
    registry.announce("svc-a", None, 30.0)
    registry.announce("svc-b", [2, 1], 30.0)
    assert registry.writers() == {"svc-a": None, "svc-b": (1, 2)}
    assert lagging_writers(registry.writers(), 2) == ["svc-a"]
    registry.announce("svc-a", [1], 30.0)  # it read the registry before generation 2 existed
    assert lagging_writers(registry.writers(), 2) == ["svc-a"]

    clock.now_s += 20
    registry.announce("svc-b", [1, 2], 30.0)  # renewed; svc-a is not
    clock.now_s += 15
    assert registry.writers() == {"svc-b": (1, 2)}, "svc-a's announcement expired 30 s after it was made"
    assert lagging_writers(registry.writers(), 2) == []
    registry.withdraw("svc-b")
    assert registry.writers() == {}
    # The table lives in the home ledger: a reopened ledger sees the same rows.
    registry.announce("svc-c", [3], 30.0)
    assert registry_for(ledger).writers() == {"svc-c": (3,)}
