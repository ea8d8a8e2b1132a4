"""The Postgres ledger: the durable memory of several replicas sharing one database.

Same protocol and semantics as the SQLite ledger (``adapters/ledger/sqlite.py``): every public
method is one transaction (READ COMMITTED), and a crash between two statements of a method leaves
the ledger as it was before it (the server rolls back a dead client's transaction). What changes
is that several processes write at once, so every check-then-write is made race-free by the
database itself, never by a read in one statement and a write in another:

- prepare's gate inserts the intent first (``INSERT ... ON CONFLICT DO NOTHING``): a second
  replica preparing the same document waits on the first one's uncommitted key and then finds it
  taken. Holding the only intent row of a document also means no commit of that document can be in
  flight, so the committed version read next is stable.
- a fence is checked with the shard's lease row locked ``FOR UPDATE`` inside the write's
  transaction, so a new owner's ``claim_shard`` waits until every write under the old epoch has
  committed or rolled back: no old-epoch write lands after a new epoch exists.
- ``claim_shard`` on a shard nobody has claimed inserts with ``ON CONFLICT DO NOTHING``, so of two
  replicas racing for it exactly one gets epoch 1 and the other sees its lease.

Connections and errors: one connection per ledger, guarded by a lock and reopened after it
breaks (``adapters/postgres_connection.py``, shared with the webhook's Postgres inbox). A lost
connection, a timeout, a deadlock or a serialisation failure raises TransientStoreError (retry;
the connection is reopened on the next call); constraint, data and SQL errors raise
PermanentStoreError. A failure while committing leaves the outcome unknown, as with any database:
a retried ``prepare`` may then find its own intent pending, which the re-drive of pending intents
on start resolves.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import psycopg
import structlog
from psycopg import sql
from psycopg.rows import TupleRow

from adapters.ledger.settings import (
    CONNECT_TIMEOUT_S,
    DEFAULT_SCHEMA,
    SCHEMA_PATTERN,
    STATEMENT_TIMEOUT_S,
    PostgresLedgerSettings,
)
from adapters.postgres_connection import SharedConnection, describe
from coordinator.codec import (
    LETTER_COLS,
    LETTER_INSERT_COLS,
    decode_chunks,
    decode_intent,
    encode_chunks,
    encode_intent,
    letter_of,
    letter_row,
    with_attempt,
)
from coordinator.crashpoints import CrashHook, no_crash
from coordinator.errors import (
    ConfigError,
    FencedError,
    IntentConflict,
)
from coordinator.leases import claimed_epoch
from coordinator.model import DeadLetter, DocState, Vector
from coordinator.ports import Fence, Intent

log = structlog.get_logger(__name__)

STORE = "ledger"

# Keys per ``= ANY(%s)`` array: bounds one statement's result set, not a protocol limit.
KEYS_PER_QUERY_MAX = 10_000
# Rows fetched per round trip when streaming documents, so iteration never loads the whole table.
ITER_PAGE_ROWS = 1000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    doc_id        TEXT COLLATE "C" PRIMARY KEY,
    version       BIGINT NOT NULL,
    deleted       BOOLEAN NOT NULL,
    chunks        JSONB NOT NULL,
    metadata_hash TEXT NOT NULL,
    source_hash   TEXT NOT NULL,
    updated_at    DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS applied (
    side    TEXT NOT NULL,
    doc_id  TEXT COLLATE "C" NOT NULL,
    version BIGINT NOT NULL,
    PRIMARY KEY (side, doc_id)
);
CREATE TABLE IF NOT EXISTS intents (
    doc_id     TEXT COLLATE "C" PRIMARY KEY,
    version    BIGINT NOT NULL,
    payload    TEXT NOT NULL,
    done       TEXT[] NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
"""

# Tables a generation ledger shares with its home schema (see ``home_schema``): one checkpoint
# per source, one dead-letter queue, one set of shard leases and one embedding cache.
_SHARED_SCHEMA = """
CREATE TABLE IF NOT EXISTS checkpoints (
    source   TEXT PRIMARY KEY,
    position TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source     TEXT NOT NULL,
    doc_id     TEXT,
    version    BIGINT,
    reason     TEXT NOT NULL,
    payload    TEXT NOT NULL,
    attempts   INTEGER NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
-- Columns added after the first release (ADD COLUMN IF NOT EXISTS keeps older schemas' rows).
ALTER TABLE dead_letters ADD COLUMN IF NOT EXISTS position TEXT;
ALTER TABLE dead_letters ADD COLUMN IF NOT EXISTS encoding TEXT NOT NULL DEFAULT 'text';
ALTER TABLE dead_letters ADD COLUMN IF NOT EXISTS truncated BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE dead_letters ADD COLUMN IF NOT EXISTS history TEXT NOT NULL DEFAULT '[]';
CREATE INDEX IF NOT EXISTS dead_letters_by_position ON dead_letters (source, position);
CREATE TABLE IF NOT EXISTS shard_leases (
    shard      INTEGER PRIMARY KEY,
    owner      TEXT NOT NULL,
    epoch      BIGINT NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS embeddings (
    model        TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    vector       BYTEA NOT NULL,
    PRIMARY KEY (model, content_hash)
);
"""

Cursor = psycopg.Cursor[TupleRow]


class PostgresLedger:
    """Ledger port on one Postgres schema; safe to share between threads and between replicas."""

    def __init__(
        self,
        dsn: str,
        *,
        clock: Callable[[], float] = time.time,
        crash_hook: CrashHook = no_crash,
        schema: str = DEFAULT_SCHEMA,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        statement_timeout_s: float = STATEMENT_TIMEOUT_S,
        home_schema: str | None = None,
    ) -> None:
        """``home_schema``: generation 1's schema, for a later generation's ledger, which keeps
        its own documents, intents and applied versions and finds the rest there (search_path)."""
        _check_schema_name(schema)
        if home_schema is not None:
            _check_schema_name(home_schema)
        self.schema = schema
        self.home_schema = home_schema
        self._where = describe(dsn, STORE)
        self._clock = clock
        self._crash = crash_hook
        self._log = log.bind(ledger=self._where, schema=schema)
        self._db = SharedConnection(
            dsn,
            store=STORE,
            application_name="lockstep-ledger",
            search_path=(schema, home_schema) if home_schema else (schema,),
            connect_timeout_s=connect_timeout_s,
            statement_timeout_s=statement_timeout_s,
            log=self._log,
        )
        self._create_schema()

    @classmethod
    def from_settings(
        cls,
        settings: PostgresLedgerSettings,
        *,
        clock: Callable[[], float] = time.time,
        crash_hook: CrashHook = no_crash,
        home_schema: str | None = None,
    ) -> PostgresLedger:
        """The ledger in ``settings.schema_name``; ``home_schema`` as for the constructor."""
        return cls(
            settings.dsn.get_secret_value(),
            clock=clock,
            crash_hook=crash_hook,
            schema=settings.schema_name,
            connect_timeout_s=settings.connect_timeout_s,
            statement_timeout_s=settings.statement_timeout_s,
            home_schema=home_schema,
        )

    def __repr__(self) -> str:
        # Never the DSN itself: it may carry a password.
        return f"PostgresLedger({self._where}, schema={self.schema!r})"

    # --- connection and transactions -------------------------------------------------------

    def _tx(self) -> AbstractContextManager[Cursor]:
        """One transaction on the shared connection; backend errors leave as StoreErrors."""
        return self._db.transaction()

    def _create_schema(self) -> None:
        """Create the schema and tables if missing; replicas starting together take turns."""
        with self._tx() as cur:
            # CREATE ... IF NOT EXISTS is not safe against a concurrent identical CREATE (it can
            # fail with a unique violation in the catalog), so creators serialise on a lock.
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"lockstep.schema.{self.schema}",))
            cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
            cur.execute(_SCHEMA)
            if self.home_schema is None:
                cur.execute(_SHARED_SCHEMA)

    # --- documents -------------------------------------------------------------------------

    def get_docs(self, doc_ids: Iterable[str]) -> dict[str, DocState]:
        out: dict[str, DocState] = {}
        with self._tx() as cur:
            for part in _parts(list(dict.fromkeys(doc_ids))):
                cur.execute(f"SELECT {_DOC_COLS} FROM documents WHERE doc_id = ANY(%s)", (part,))
                out.update((str(r[0]), _doc(r)) for r in cur.fetchall())
        return out

    def iter_docs(self, *, include_deleted: bool = False) -> Iterator[DocState]:
        return self._iter_docs_where("(NOT deleted OR %s)", include_deleted)

    def iter_docs_changed_since(self, since: float) -> Iterator[DocState]:
        """Every document (tombstones too) committed at or after ``since`` (Unix seconds), in
        doc_id order; the auditor's ``--since`` reads this."""
        return self._iter_docs_where("updated_at >= %s", since)

    def _iter_docs_where(self, condition: str, value: object) -> Iterator[DocState]:
        """Pages by key (one short transaction per page), so no lock is held between yields."""
        after = ""
        while True:
            with self._tx() as cur:
                cur.execute(
                    f"SELECT {_DOC_COLS} FROM documents WHERE doc_id > %s AND {condition} "
                    "ORDER BY doc_id LIMIT %s",
                    (after, value, ITER_PAGE_ROWS),
                )
                rows = cur.fetchall()
            yield from (_doc(r) for r in rows)
            if len(rows) < ITER_PAGE_ROWS:
                return
            after = str(rows[-1][0])

    # --- the two-phase protocol ------------------------------------------------------------

    def prepare(
        self, intents: Sequence[Intent], fence: Fence | None = None, *, skip_conflicts: bool = False
    ) -> list[str]:
        now = self._clock()
        skipped: list[str] = []
        with self._tx() as cur:
            _check_fence(cur, fence, now)
            # In doc_id order, so two replicas preparing overlapping batches lock keys in the same
            # order and cannot deadlock.
            for intent in sorted(intents, key=lambda i: i.doc_id):
                try:
                    _insert_intent(cur, intent, now)
                except IntentConflict:
                    if not skip_conflicts:
                        raise
                    skipped.append(intent.doc_id)
                    continue
                self._crash("ledger.prepare.between_statements")
                try:
                    _check_above_committed(cur, intent)
                except IntentConflict:
                    if not skip_conflicts:
                        raise
                    # The row is ours: this transaction inserted it (doc_id is the key).
                    cur.execute("DELETE FROM intents WHERE doc_id = %s", (intent.doc_id,))
                    skipped.append(intent.doc_id)
        return skipped

    def mark_done(
        self, side: str, doc_versions: Sequence[tuple[str, int]], fence: Fence | None = None
    ) -> None:
        with self._tx() as cur:
            _check_fence(cur, fence, self._clock())
            for doc_id, version in doc_versions:
                if not _add_done_side(cur, side, doc_id, version):
                    continue
                self._crash("ledger.mark_done.between_statements")
                _upsert_applied(cur, side, doc_id, version)

    def commit(
        self, doc_versions: Sequence[tuple[str, int]], sides: frozenset[str], fence: Fence | None = None
    ) -> int:
        committed = 0
        now = self._clock()
        with self._tx() as cur:
            _check_fence(cur, fence, now)
            for doc_id, version in doc_versions:
                after = _committable_state(cur, doc_id, version, sides)
                if after is None:
                    continue
                _write_doc(cur, after, now)
                self._crash("ledger.commit.between_statements")
                cur.execute("DELETE FROM intents WHERE doc_id = %s", (doc_id,))
                committed += 1
        return committed

    # --- shard ownership -------------------------------------------------------------------

    def claim_shard(self, shard: int, owner: str, lease_s: float) -> Fence:
        now = self._clock()
        with self._tx() as cur:
            epoch = _claim_unclaimed(cur, shard, owner, now + lease_s)
            if epoch is None:
                epoch = _claim_claimed(cur, shard, owner, now, lease_s)
        self._log.info("shard claimed", shard=shard, owner=owner, epoch=epoch)
        return Fence(shard, epoch)

    def renew_shard(self, fence: Fence, owner: str, lease_s: float) -> None:
        now = self._clock()
        with self._tx() as cur:
            _check_fence(cur, fence, now)
            cur.execute(
                "UPDATE shard_leases SET expires_at = %s WHERE shard = %s AND owner = %s",
                (now + lease_s, fence.shard, owner),
            )

    def replace_intents(self, intents: Sequence[Intent], fence: Fence | None = None) -> None:
        with self._tx() as cur:
            _check_fence(cur, fence, self._clock())
            cur.executemany(
                "UPDATE intents SET payload = %s, done = '{}' WHERE doc_id = %s AND version = %s",
                [(encode_intent(i), i.doc_id, i.version) for i in intents],
            )

    def abort(self, doc_versions: Sequence[tuple[str, int]]) -> None:
        with self._tx() as cur:
            cur.executemany("DELETE FROM intents WHERE doc_id = %s AND version = %s", doc_versions)

    def pending(self) -> list[Intent]:
        with self._tx() as cur:
            cur.execute("SELECT doc_id, version, payload, done FROM intents ORDER BY created_at, doc_id")
            rows = cur.fetchall()
        return [decode_intent(d, v, p, frozenset(n)) for d, v, p, n in rows]

    def applied_versions(self, side: str, doc_ids: Iterable[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        with self._tx() as cur:
            for part in _parts(list(dict.fromkeys(doc_ids))):
                cur.execute(
                    "SELECT doc_id, version FROM applied WHERE side = %s AND doc_id = ANY(%s)", (side, part)
                )
                out.update((str(d), int(v)) for d, v in cur.fetchall())
        return out

    # --- checkpoints and dead letters ------------------------------------------------------

    def get_checkpoint(self, source: str) -> str | None:
        with self._tx() as cur:
            row = cur.execute("SELECT position FROM checkpoints WHERE source = %s", (source,)).fetchone()
        return None if row is None else str(row[0])

    def set_checkpoint(self, source: str, position: str) -> None:
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO checkpoints (source, position) VALUES (%s, %s) "
                "ON CONFLICT (source) DO UPDATE SET position = excluded.position",
                (source, position),
            )

    def add_dead_letters(self, letters: Sequence[DeadLetter]) -> list[DeadLetter]:
        """Add letters and return those added: one that repeats a letter already kept (same
        source, position and first reason: a source delivering the same record again) is not
        added twice."""
        now = self._clock()
        marks = ", ".join(["%s"] * len(LETTER_INSERT_COLS.split(",")))
        added: list[DeadLetter] = []
        dlq_schema = self.home_schema or self.schema
        with self._tx() as cur:
            # Replicas dead-lettering the same redelivered record take turns.
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"lockstep.dlq.{dlq_schema}",))
            for letter in letters:
                if letter.position is not None and cur.execute(
                    "SELECT 1 FROM dead_letters WHERE source = %s AND position = %s AND reason = %s",
                    (letter.source, letter.position, letter.reason),
                ).fetchone():
                    continue
                cur.execute(f"INSERT INTO dead_letters ({LETTER_INSERT_COLS}) VALUES ({marks})", letter_row(letter, now))
                added.append(letter)
        return added

    def dead_letters(self, *, limit: int, after_id: int = 0) -> list[tuple[int, DeadLetter]]:
        with self._tx() as cur:
            cur.execute(
                f"SELECT id, {LETTER_COLS} FROM dead_letters WHERE id > %s ORDER BY id LIMIT %s",
                (after_id, limit),
            )
            rows = cur.fetchall()
        return [(int(r[0]), letter_of(r[1:])) for r in rows]

    def dead_letter(self, letter_id: int) -> tuple[DeadLetter, float] | None:
        """One dead letter and when it was first recorded (seconds since the epoch)."""
        with self._tx() as cur:
            row = cur.execute(
                f"SELECT {LETTER_COLS}, created_at FROM dead_letters WHERE id = %s", (letter_id,)
            ).fetchone()
        if row is None:
            return None
        return letter_of(row[:-1]), float(row[-1])

    def drop_dead_letters(self, letter_ids: Sequence[int]) -> int:
        with self._tx() as cur:
            cur.execute("DELETE FROM dead_letters WHERE id = ANY(%s)", (list(letter_ids),))
            return int(cur.rowcount)

    def record_attempt(self, letter_id: int, reason: str) -> bool:
        """Another attempt at a letter failed: count it and add its reason to the history (the
        first reason stays). False if there is no such letter."""
        with self._tx() as cur:
            row = cur.execute(
                "SELECT history FROM dead_letters WHERE id = %s FOR UPDATE", (letter_id,)
            ).fetchone()
            if row is None:
                return False
            cur.execute(
                "UPDATE dead_letters SET attempts = attempts + 1, history = %s WHERE id = %s",
                (with_attempt(str(row[0]), self._clock(), reason), letter_id),
            )
        return True

    def counts(self) -> dict[str, int]:
        with self._tx() as cur:
            row = cur.execute(
                "SELECT (SELECT COUNT(*) FROM documents WHERE NOT deleted), "
                "(SELECT COUNT(*) FROM documents WHERE deleted), "
                "(SELECT COALESCE(SUM(jsonb_array_length(chunks)), 0) FROM documents WHERE NOT deleted), "
                "(SELECT COUNT(*) FROM intents), (SELECT COUNT(*) FROM dead_letters)"
            ).fetchone()
        assert row is not None, "a SELECT without FROM returns one row"
        names = ("live_docs", "tombstones", "chunks", "pending_intents", "dead_letters")
        return {name: int(value) for name, value in zip(names, row, strict=True)}

    def drop_namespace(self) -> None:
        """Drop this generation ledger's schema, with its tables, and close the ledger."""
        if self.home_schema is None:
            raise ConfigError(
                f"schema {self.schema!r} is a home ledger: only a later generation's can be dropped"
            )
        with self._tx() as cur:
            cur.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.schema)))
        self._log.info("ledger schema dropped")
        self.close()

    def close(self) -> None:
        self._db.close()


class PostgresEmbeddingCache:
    """Durable vectors keyed by (model id, content hash), stored as float32 ``bytea``."""

    def __init__(self, ledger: PostgresLedger) -> None:
        self._ledger = ledger

    def get_many(self, model_id: str, hashes: Iterable[str]) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        with self._ledger._tx() as cur:
            for part in _parts(list(dict.fromkeys(hashes))):
                cur.execute(
                    "SELECT content_hash, vector FROM embeddings WHERE model = %s AND content_hash = ANY(%s)",
                    (model_id, part),
                )
                out.update((str(h), np.frombuffer(v, dtype=np.float32).tolist()) for h, v in cur.fetchall())
        return out

    def put_many(self, model_id: str, vectors: Mapping[str, Vector]) -> None:
        rows = [(model_id, h, np.asarray(v, dtype=np.float32).tobytes()) for h, v in vectors.items()]
        with self._ledger._tx() as cur:
            cur.executemany(
                "INSERT INTO embeddings (model, content_hash, vector) VALUES (%s, %s, %s) "
                "ON CONFLICT (model, content_hash) DO UPDATE SET vector = excluded.vector",
                rows,
            )


# --- statements: each runs inside the caller's transaction ------------------------------------

_DOC_COLS = "doc_id, version, deleted, chunks::text, metadata_hash, source_hash"


def _check_fence(cur: Cursor, fence: Fence | None, now: float) -> None:
    """The fence must be the shard's current, unexpired epoch; the lease row stays locked until
    the caller's transaction ends, so no new epoch can be issued while this write is in flight."""
    if fence is None:
        return
    row = cur.execute(
        "SELECT epoch, expires_at FROM shard_leases WHERE shard = %s FOR UPDATE", (fence.shard,)
    ).fetchone()
    if row is None or row[0] != fence.epoch or row[1] <= now:
        current = "none" if row is None else f"epoch {row[0]}"
        log.warning("write fenced", shard=fence.shard, epoch=fence.epoch, current=current)
        raise FencedError(f"shard {fence.shard} epoch {fence.epoch} is fenced (current: {current})")


def _insert_intent(cur: Cursor, intent: Intent, now: float) -> None:
    """The first half of the gate: insert, or find the document's intent already there (a
    concurrent uncommitted insert of the same doc_id is waited for, then counts as there)."""
    inserted = cur.execute(
        "INSERT INTO intents (doc_id, version, payload, done, created_at) VALUES (%s, %s, %s, '{}', %s) "
        "ON CONFLICT (doc_id) DO NOTHING RETURNING doc_id",
        (intent.doc_id, intent.version, encode_intent(intent), now),
    ).fetchone()
    if inserted is None:
        raise IntentConflict(f"{intent.doc_id} already has a pending intent", store=STORE)


def _check_above_committed(cur: Cursor, intent: Intent) -> None:
    """The second half of the gate. Our uncommitted intent row excludes every commit of this
    document, so the committed version cannot change before our transaction ends."""
    row = cur.execute("SELECT version FROM documents WHERE doc_id = %s", (intent.doc_id,)).fetchone()
    if row is not None and intent.version <= row[0]:
        raise IntentConflict(f"{intent.doc_id} v{intent.version} is not above committed v{row[0]}", store=STORE)


def _add_done_side(cur: Cursor, side: str, doc_id: str, version: int) -> bool:
    """Add ``side`` to the intent's done set in one statement; False if there is no such intent."""
    updated = cur.execute(
        "UPDATE intents SET done = ARRAY(SELECT DISTINCT s FROM unnest(array_append(done, %s)) AS s ORDER BY s) "
        "WHERE doc_id = %s AND version = %s RETURNING doc_id",
        (side, doc_id, version),
    ).fetchone()
    return updated is not None


def _committable_state(cur: Cursor, doc_id: str, version: int, sides: frozenset[str]) -> DocState | None:
    """The intent's ``after`` state if every side holds it (its row locked), else None."""
    row = cur.execute(
        "SELECT payload, done FROM intents WHERE doc_id = %s AND version = %s FOR UPDATE", (doc_id, version)
    ).fetchone()
    if row is None or not sides <= set(row[1]):
        return None
    return decode_intent(doc_id, version, row[0], frozenset()).after


def _claim_unclaimed(cur: Cursor, shard: int, owner: str, expires_at: float) -> int | None:
    """Epoch 1 if nobody ever claimed ``shard``; of racing claimants exactly one inserts."""
    row = cur.execute(
        "INSERT INTO shard_leases (shard, owner, epoch, expires_at) VALUES (%s, %s, 1, %s) "
        "ON CONFLICT (shard) DO NOTHING RETURNING epoch",
        (shard, owner, expires_at),
    ).fetchone()
    return None if row is None else int(row[0])


def _claim_claimed(cur: Cursor, shard: int, owner: str, now: float, lease_s: float) -> int:
    """Renew, take over or refuse (``claimed_epoch``'s rules) an existing lease, its row locked."""
    row = cur.execute(
        "SELECT owner, epoch, expires_at FROM shard_leases WHERE shard = %s FOR UPDATE", (shard,)
    ).fetchone()
    assert row is not None, "the lease row exists: the insert conflicted and rows are never deleted"
    epoch = claimed_epoch(shard, owner, (str(row[0]), int(row[1]), float(row[2])), now)
    cur.execute(
        "UPDATE shard_leases SET owner = %s, epoch = %s, expires_at = %s WHERE shard = %s",
        (owner, epoch, now + lease_s, shard),
    )
    return epoch


def _write_doc(cur: Cursor, state: DocState, now: float) -> None:
    cur.execute(
        "INSERT INTO documents (doc_id, version, deleted, chunks, metadata_hash, source_hash, updated_at) "
        "VALUES (%s, %s, %s, %s::jsonb, %s, %s, %s) ON CONFLICT (doc_id) DO UPDATE SET version = excluded.version, "
        "deleted = excluded.deleted, chunks = excluded.chunks, metadata_hash = excluded.metadata_hash, "
        "source_hash = excluded.source_hash, updated_at = excluded.updated_at",
        (
            state.doc_id,
            state.version,
            state.deleted,
            encode_chunks(state.chunks),
            state.metadata_hash,
            state.source_hash,
            now,
        ),
    )


def _upsert_applied(cur: Cursor, side: str, doc_id: str, version: int) -> None:
    cur.execute(
        "INSERT INTO applied (side, doc_id, version) VALUES (%s, %s, %s) ON CONFLICT (side, doc_id) "
        "DO UPDATE SET version = GREATEST(applied.version, excluded.version)",
        (side, doc_id, version),
    )


# --- pure helpers ------------------------------------------------------------------------------


def _doc(row: tuple[Any, ...]) -> DocState:
    doc_id = str(row[0])
    return DocState(
        doc_id=doc_id,
        version=int(row[1]),
        deleted=bool(row[2]),
        chunks=decode_chunks(doc_id, str(row[3])),
        metadata_hash=str(row[4]),
        source_hash=str(row[5]),
    )


def _check_schema_name(schema: str) -> None:
    if not re.fullmatch(SCHEMA_PATTERN, schema):
        raise ConfigError(f"schema {schema!r} must match {SCHEMA_PATTERN}")


def _parts(items: list[str]) -> Iterator[list[str]]:
    for start in range(0, len(items), KEYS_PER_QUERY_MAX):
        yield items[start : start + KEYS_PER_QUERY_MAX]
