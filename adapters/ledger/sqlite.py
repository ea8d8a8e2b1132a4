"""The SQLite ledger (WAL): the embedded default's durable memory, and its embedding cache.

Every public method runs in one ``BEGIN IMMEDIATE`` transaction, with ``synchronous=FULL`` so a
committed transaction survives a process kill and a power cut. A crash between two statements
of one method leaves the ledger as it was before the method (proved in tests/test_ledger.py by
killing a process at named points between statements).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

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
from coordinator.errors import ConfigError, FencedError, IntentConflict, TransientStoreError
from coordinator.leases import claimed_epoch
from coordinator.model import DeadLetter, DocState, Vector
from coordinator.ports import Fence, Intent

# How long a writer waits for another process's write lock before giving up.
BUSY_TIMEOUT_S = 30.0
# SQLite limits bound parameters per statement (32766 in current builds); stay well below it.
PARAMS_PER_QUERY_MAX = 900
# Rows fetched per round trip when streaming documents, so iteration never loads the whole table.
ITER_PAGE_ROWS = 1000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    doc_id        TEXT PRIMARY KEY,
    version       INTEGER NOT NULL,
    deleted       INTEGER NOT NULL,
    chunks        TEXT NOT NULL,
    metadata_hash TEXT NOT NULL,
    source_hash   TEXT NOT NULL,
    updated_at    REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS applied (
    side    TEXT NOT NULL,
    doc_id  TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (side, doc_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS intents (
    doc_id     TEXT PRIMARY KEY,
    version    INTEGER NOT NULL,
    payload    TEXT NOT NULL,
    done       TEXT NOT NULL,
    created_at REAL NOT NULL
) WITHOUT ROWID;
"""

# Tables a generation ledger shares with its home ledger (see ``home`` below): one checkpoint
# per source, one dead-letter queue, one set of shard leases and one embedding cache.
_SHARED_SCHEMA = """
CREATE TABLE IF NOT EXISTS checkpoints (
    source   TEXT PRIMARY KEY,
    position TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_letters (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    source     TEXT NOT NULL,
    doc_id     TEXT,
    version    INTEGER,
    reason     TEXT NOT NULL,
    payload    TEXT NOT NULL,
    attempts   INTEGER NOT NULL,
    created_at REAL NOT NULL,
    position   TEXT,
    encoding   TEXT NOT NULL DEFAULT 'text',
    truncated  INTEGER NOT NULL DEFAULT 0,
    history    TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS shard_leases (
    shard      INTEGER PRIMARY KEY,
    owner      TEXT NOT NULL,
    epoch      INTEGER NOT NULL,
    expires_at REAL NOT NULL
);
-- A rowid table (unlike the others): its rows hold 1.5 KB vectors, and keyed by a random
-- hash in a WITHOUT ROWID B-tree every insert splits and rewrites full pages. Appended by
-- rowid, with the key in the small automatic index, storing a batch takes about a quarter
-- of the CPU (measured: 27 ms vs 7 ms per 400 vectors of 384 dims). Files made before keep
-- their WITHOUT ROWID table, which answers the same.
CREATE TABLE IF NOT EXISTS embeddings (
    model        TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    vector       BLOB NOT NULL,
    PRIMARY KEY (model, content_hash)
);
"""


class SqliteLedger:
    """Ledger port on one SQLite file; safe to share between threads of one process."""

    def __init__(
        self,
        path: str | Path,
        *,
        clock: Callable[[], float] = time.time,
        crash_hook: CrashHook = no_crash,
        home: str | Path | None = None,
    ) -> None:
        """``home``: the ledger file of generation 1, for a later generation's ledger, which
        keeps its own documents, intents and applied versions and shares the rest with home."""
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._crash = crash_hook
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._attached = home is not None
        if home is None:
            self._db.executescript(_SHARED_SCHEMA)
            self._add_missing_columns("dead_letters", _DEAD_LETTER_COLUMNS)
            self._db.execute(
                "CREATE INDEX IF NOT EXISTS dead_letters_by_position ON dead_letters (source, position)"
            )
        else:
            # Unqualified names resolve in ``main`` first, then here: the shared tables (which
            # ``main`` lacks) are the home ledger's, in the same transactions.
            self._db.execute("ATTACH DATABASE ? AS home", (str(home),))

    def _add_missing_columns(self, table: str, columns: Mapping[str, str]) -> None:
        """Columns added since a ledger file was made (``ALTER TABLE`` keeps its rows)."""
        have = {str(row[1]) for row in self._db.execute(f"PRAGMA table_info({table})")}
        for name, spec in columns.items():
            if name not in have:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {spec}")

    @contextmanager
    def _tx(self, *, own_tables_only: bool = False) -> Iterator[sqlite3.Cursor]:
        """A write transaction. ``BEGIN IMMEDIATE`` takes the write lock of every attached file,
        so a generation ledger's own writes (prepare, mark_done, commit, abort: the bulk of a
        rebuild's and a shard's work) lock only their own file instead: a deferred ``BEGIN``
        whose first statement writes ``main``. The shard lease they check is then read from a
        snapshot of the home file, which keeps taking lease renewals, checkpoints and
        dead letters meanwhile (a takeover committed during such a transaction is seen by the
        next one; the home ledger and Postgres check the lease under its lock)."""
        with self._lock:
            cur = self._db.cursor()
            try:
                if own_tables_only and self._attached:
                    cur.execute("BEGIN")
                    cur.execute("DELETE FROM main.intents WHERE 0")
                else:
                    cur.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if self._db.in_transaction:
                    cur.execute("ROLLBACK")
                raise TransientStoreError(f"ledger busy: {exc}", store="ledger") from exc
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    def _read(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        """Rows as sqlite3 returns them (untyped: a column holds whatever was stored in it); each
        caller converts the columns it reads."""
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    # --- documents -------------------------------------------------------------------------

    def get_docs(self, doc_ids: Iterable[str]) -> dict[str, DocState]:
        out: dict[str, DocState] = {}
        for part in _parts(list(dict.fromkeys(doc_ids))):
            marks = ",".join("?" * len(part))
            rows = self._read(f"SELECT {_DOC_COLS} FROM documents WHERE doc_id IN ({marks})", part)
            out.update((str(r[0]), _doc(r)) for r in rows)
        return out

    def iter_docs(self, *, include_deleted: bool = False) -> Iterator[DocState]:
        after = ""
        while True:
            rows = self._read(
                f"SELECT {_DOC_COLS} FROM documents WHERE doc_id > ? AND (deleted = 0 OR ?) "
                "ORDER BY doc_id LIMIT ?",
                (after, int(include_deleted), ITER_PAGE_ROWS),
            )
            yield from (_doc(r) for r in rows)
            if len(rows) < ITER_PAGE_ROWS:
                return
            after = str(rows[-1][0])

    def iter_docs_changed_since(self, since: float) -> Iterator[DocState]:
        """Every document (tombstones too) committed at or after ``since`` (Unix seconds), in
        doc_id order; the auditor's ``--since`` reads this."""
        after = ""
        while True:
            rows = self._read(
                f"SELECT {_DOC_COLS} FROM documents WHERE doc_id > ? AND updated_at >= ? "
                "ORDER BY doc_id LIMIT ?",
                (after, since, ITER_PAGE_ROWS),
            )
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
        with self._tx(own_tables_only=True) as cur:
            self._check_fence(cur, fence, now)
            for intent in intents:
                try:
                    self._check_preparable(cur, intent)
                except IntentConflict:
                    if not skip_conflicts:
                        raise
                    skipped.append(intent.doc_id)
                    continue
                cur.execute(
                    "INSERT INTO intents (doc_id, version, payload, done, created_at) VALUES (?, ?, ?, '[]', ?)",
                    (intent.doc_id, intent.version, encode_intent(intent), now),
                )
                self._crash("ledger.prepare.between_statements")
        return skipped

    def _check_preparable(self, cur: sqlite3.Cursor, intent: Intent) -> None:
        if cur.execute("SELECT 1 FROM intents WHERE doc_id = ?", (intent.doc_id,)).fetchone():
            raise IntentConflict(f"{intent.doc_id} already has a pending intent", store="sqlite")
        row = cur.execute("SELECT version FROM documents WHERE doc_id = ?", (intent.doc_id,)).fetchone()
        if row is not None and intent.version <= row[0]:
            raise IntentConflict(f"{intent.doc_id} v{intent.version} is not above committed v{row[0]}", store="sqlite")

    def mark_done(
        self, side: str, doc_versions: Sequence[tuple[str, int]], fence: Fence | None = None
    ) -> None:
        with self._tx(own_tables_only=True) as cur:
            self._check_fence(cur, fence, self._clock())
            for doc_id, version in doc_versions:
                row = cur.execute(
                    "SELECT done FROM intents WHERE doc_id = ? AND version = ?", (doc_id, version)
                )
                found = row.fetchone()
                if found is None:
                    continue
                done = sorted({*json.loads(found[0]), side})
                cur.execute("UPDATE intents SET done = ? WHERE doc_id = ?", (json.dumps(done), doc_id))
                self._crash("ledger.mark_done.between_statements")
                _upsert_applied(cur, side, doc_id, version)

    def commit(
        self, doc_versions: Sequence[tuple[str, int]], sides: frozenset[str], fence: Fence | None = None
    ) -> int:
        committed = 0
        now = self._clock()
        with self._tx(own_tables_only=True) as cur:
            self._check_fence(cur, fence, now)
            for doc_id, version in doc_versions:
                row = cur.execute(
                    "SELECT payload, done FROM intents WHERE doc_id = ? AND version = ?", (doc_id, version)
                ).fetchone()
                if row is None or not sides <= set(json.loads(row[1])):
                    continue
                after = decode_intent(doc_id, version, row[0], frozenset()).after
                _write_doc(cur, after, now)
                self._crash("ledger.commit.between_statements")
                cur.execute("DELETE FROM intents WHERE doc_id = ?", (doc_id,))
                committed += 1
        return committed

    # --- shard ownership -------------------------------------------------------------------

    def claim_shard(self, shard: int, owner: str, lease_s: float) -> Fence:
        now = self._clock()
        with self._tx() as cur:
            row = cur.execute("SELECT owner, epoch, expires_at FROM shard_leases WHERE shard = ?", (shard,)).fetchone()
            epoch = claimed_epoch(shard, owner, row, now)
            cur.execute(
                "INSERT INTO shard_leases (shard, owner, epoch, expires_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(shard) DO UPDATE SET owner = excluded.owner, epoch = excluded.epoch, "
                "expires_at = excluded.expires_at",
                (shard, owner, epoch, now + lease_s),
            )
        return Fence(shard, epoch)

    def renew_shard(self, fence: Fence, owner: str, lease_s: float) -> None:
        now = self._clock()
        with self._tx() as cur:
            self._check_fence(cur, fence, now)
            cur.execute(
                "UPDATE shard_leases SET expires_at = ? WHERE shard = ? AND owner = ?",
                (now + lease_s, fence.shard, owner),
            )

    @staticmethod
    def _check_fence(cur: sqlite3.Cursor, fence: Fence | None, now: float) -> None:
        """Inside the write transaction: the fence must be the shard's current, unexpired epoch."""
        if fence is None:
            return
        row = cur.execute(
            "SELECT epoch, expires_at FROM shard_leases WHERE shard = ?", (fence.shard,)
        ).fetchone()
        if row is None or row[0] != fence.epoch or row[1] <= now:
            current = "none" if row is None else f"epoch {row[0]}"
            raise FencedError(f"shard {fence.shard} epoch {fence.epoch} is fenced (current: {current})")

    def replace_intents(self, intents: Sequence[Intent], fence: Fence | None = None) -> None:
        with self._tx(own_tables_only=True) as cur:
            self._check_fence(cur, fence, self._clock())
            for intent in intents:
                cur.execute(
                    "UPDATE intents SET payload = ?, done = '[]' WHERE doc_id = ? AND version = ?",
                    (encode_intent(intent), intent.doc_id, intent.version),
                )

    def abort(self, doc_versions: Sequence[tuple[str, int]]) -> None:
        with self._tx(own_tables_only=True) as cur:
            cur.executemany("DELETE FROM intents WHERE doc_id = ? AND version = ?", doc_versions)

    def pending(self) -> list[Intent]:
        rows = self._read("SELECT doc_id, version, payload, done FROM intents ORDER BY created_at, doc_id")
        return [decode_intent(str(d), int(v), str(p), frozenset(json.loads(str(n)))) for d, v, p, n in rows]

    def applied_versions(self, side: str, doc_ids: Iterable[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for part in _parts(list(doc_ids)):
            marks = ",".join("?" * len(part))
            rows = self._read(
                f"SELECT doc_id, version FROM applied WHERE side = ? AND doc_id IN ({marks})", [side, *part]
            )
            out.update((str(d), int(v)) for d, v in rows)
        return out

    # --- checkpoints and dead letters ------------------------------------------------------

    def get_checkpoint(self, source: str) -> str | None:
        rows = self._read("SELECT position FROM checkpoints WHERE source = ?", (source,))
        return str(rows[0][0]) if rows else None

    def set_checkpoint(self, source: str, position: str) -> None:
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO checkpoints (source, position) VALUES (?, ?) "
                "ON CONFLICT(source) DO UPDATE SET position = excluded.position",
                (source, position),
            )

    def add_dead_letters(self, letters: Sequence[DeadLetter]) -> list[DeadLetter]:
        """Add letters and return those added: one that repeats a letter already kept (same
        source, position and first reason: a source delivering the same record again) is not
        added twice."""
        now = self._clock()
        added: list[DeadLetter] = []
        with self._tx() as cur:
            for letter in letters:
                if letter.position is not None and cur.execute(
                    "SELECT 1 FROM dead_letters WHERE source = ? AND position = ? AND reason = ?",
                    (letter.source, letter.position, letter.reason),
                ).fetchone():
                    continue
                cur.execute(
                    f"INSERT INTO dead_letters ({LETTER_INSERT_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    letter_row(letter, now),
                )
                added.append(letter)
        return added

    def dead_letters(self, *, limit: int, after_id: int = 0) -> list[tuple[int, DeadLetter]]:
        rows = self._read(
            f"SELECT id, {LETTER_COLS} FROM dead_letters WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)
        )
        return [(int(r[0]), letter_of(r[1:])) for r in rows]

    def dead_letter(self, letter_id: int) -> tuple[DeadLetter, float] | None:
        """One dead letter and when it was first recorded (seconds since the epoch)."""
        rows = self._read(f"SELECT {LETTER_COLS}, created_at FROM dead_letters WHERE id = ?", (letter_id,))
        if not rows:
            return None
        return letter_of(rows[0][:-1]), float(rows[0][-1])

    def drop_dead_letters(self, letter_ids: Sequence[int]) -> int:
        dropped = 0
        with self._tx() as cur:
            for part in _parts([str(i) for i in letter_ids]):
                cur.execute(f"DELETE FROM dead_letters WHERE id IN ({','.join('?' * len(part))})", part)
                dropped += cur.rowcount
        return dropped

    def record_attempt(self, letter_id: int, reason: str) -> bool:
        """Another attempt at a letter failed: count it and add its reason to the history (the
        first reason stays). False if there is no such letter."""
        with self._tx() as cur:
            row = cur.execute("SELECT history FROM dead_letters WHERE id = ?", (letter_id,)).fetchone()
            if row is None:
                return False
            history = with_attempt(str(row[0]), self._clock(), reason)
            cur.execute(
                "UPDATE dead_letters SET attempts = attempts + 1, history = ? WHERE id = ?", (history, letter_id)
            )
        return True

    def counts(self) -> dict[str, int]:
        queries = {
            "live_docs": "SELECT COUNT(*) FROM documents WHERE deleted = 0",
            "tombstones": "SELECT COUNT(*) FROM documents WHERE deleted = 1",
            "chunks": "SELECT COALESCE(SUM(json_array_length(chunks)), 0) FROM documents WHERE deleted = 0",
            "pending_intents": "SELECT COUNT(*) FROM intents",
            "dead_letters": "SELECT COUNT(*) FROM dead_letters",
        }
        return {name: int(self._read(sql)[0][0]) for name, sql in queries.items()}

    def drop_namespace(self) -> None:
        """Delete this generation ledger's file (and its WAL) and close the ledger."""
        if not self._attached:
            raise ConfigError(f"{self.path} is a home ledger: only a later generation's can be dropped")
        self.close()
        try:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        except OSError as exc:
            raise TransientStoreError(f"cannot delete {self.path}: {exc}", store="ledger") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()


class SqliteEmbeddingCache:
    """Durable vectors keyed by (model id, content hash), stored as float32 blobs."""

    def __init__(self, ledger: SqliteLedger) -> None:
        self._ledger = ledger

    def get_many(self, model_id: str, hashes: Iterable[str]) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for part in _parts(list(dict.fromkeys(hashes))):
            marks = ",".join("?" * len(part))
            rows = self._ledger._read(
                f"SELECT content_hash, vector FROM embeddings WHERE model = ? AND content_hash IN ({marks})",
                [model_id, *part],
            )
            out.update((str(h), np.frombuffer(bytes(v), dtype=np.float32).tolist()) for h, v in rows)
        return out

    def put_many(self, model_id: str, vectors: Mapping[str, Vector]) -> None:
        rows = [(model_id, h, np.asarray(v, dtype=np.float32).tobytes()) for h, v in vectors.items()]
        with self._ledger._tx() as cur:
            cur.executemany(
                "INSERT OR REPLACE INTO embeddings (model, content_hash, vector) VALUES (?, ?, ?)", rows
            )


_DOC_COLS = "doc_id, version, deleted, chunks, metadata_hash, source_hash"
# Dead-letter columns added after the first release, with how they are added to older files.
_DEAD_LETTER_COLUMNS = {
    "position": "TEXT",
    "encoding": "TEXT NOT NULL DEFAULT 'text'",
    "truncated": "INTEGER NOT NULL DEFAULT 0",
    "history": "TEXT NOT NULL DEFAULT '[]'",
}


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


def _write_doc(cur: sqlite3.Cursor, state: DocState, now: float) -> None:
    cur.execute(
        "INSERT INTO documents (doc_id, version, deleted, chunks, metadata_hash, source_hash, updated_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(doc_id) DO UPDATE SET version = excluded.version, "
        "deleted = excluded.deleted, chunks = excluded.chunks, metadata_hash = excluded.metadata_hash, "
        "source_hash = excluded.source_hash, updated_at = excluded.updated_at",
        (
            state.doc_id,
            state.version,
            int(state.deleted),
            encode_chunks(state.chunks),
            state.metadata_hash,
            state.source_hash,
            now,
        ),
    )


def _upsert_applied(cur: sqlite3.Cursor, side: str, doc_id: str, version: int) -> None:
    cur.execute(
        "INSERT INTO applied (side, doc_id, version) VALUES (?, ?, ?) ON CONFLICT(side, doc_id) "
        "DO UPDATE SET version = MAX(version, excluded.version)",
        (side, doc_id, version),
    )


def _parts(items: list[str]) -> Iterator[list[str]]:
    for start in range(0, len(items), PARAMS_PER_QUERY_MAX):
        yield items[start : start + PARAMS_PER_QUERY_MAX]
