"""The webhook inbox in its own SQLite file, next to the SQLite ledger."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from adapters.sources.webhook.body import Item
from adapters.sources.webhook.inbox import (
    INBOX_TABLE,
    INSERT_ROW_SQL,
    PRUNE_ROWS_MAX,
    STORE,
    AppendResult,
    InboxRow,
    check_backlog,
    first_int,
    plan_append,
    row_params,
)
from coordinator.errors import PermanentStoreError, TransientStoreError

# How long an SQLite writer waits for the inbox file's write lock.
SQLITE_BUSY_TIMEOUT_S = 30.0

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {INBOX_TABLE} (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    doc_id      TEXT,
    version     INTEGER,
    payload     TEXT NOT NULL,
    reason      TEXT,
    digest      TEXT UNIQUE,
    received_at REAL NOT NULL,
    UNIQUE (doc_id, version)
);
"""


class SqliteInbox:
    """The inbox in its own SQLite file (WAL, ``synchronous=FULL``), next to the SQLite ledger.

    ``AUTOINCREMENT`` keeps seqs from ever being reused after pruning. One connection for
    appends and one for reads, each behind its own lock, so reading never waits for an fsync.
    """

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        with self._errors():
            self._writer = self._connect()
            self._writer.executescript(_SCHEMA)
            self._reader = self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(
            self.path, timeout=SQLITE_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        return db

    def append(self, items: Sequence[Item], *, committed_seq: int, backlog_max: int) -> AppendResult:
        with self._write_lock, self._errors():
            cur = self._writer.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                check_backlog(_scalar(cur, f"SELECT coalesce(max(seq), 0) FROM {INBOX_TABLE}"), committed_seq, backlog_max)
                plan = plan_append(items, self._stored(cur, [i.key for i in items if i.event is not None]))
                now = self._clock()
                cur.executemany(INSERT_ROW_SQL.format(p="?"), [row_params(r, now) for r in plan.rows])
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
        return plan.result()

    @staticmethod
    def _stored(cur: sqlite3.Cursor, keys: Sequence[tuple[str, int]]) -> dict[tuple[str, int], str]:
        out: dict[tuple[str, int], str] = {}
        for doc_id, version in dict.fromkeys(keys):
            row = cur.execute(
                f"SELECT payload FROM {INBOX_TABLE} WHERE doc_id = ? AND version = ?", (doc_id, version)
            ).fetchone()
            if row is not None:
                out[(doc_id, version)] = str(row[0])
        return out

    def read_after(self, seq: int, limit: int) -> list[InboxRow]:
        with self._read_lock, self._errors():
            rows = self._reader.execute(
                f"SELECT seq, doc_id, version, payload, reason FROM {INBOX_TABLE} "
                "WHERE seq > ? ORDER BY seq LIMIT ?",
                (seq, limit),
            ).fetchall()
        return [InboxRow(*row) for row in rows]

    def prune(self, *, through_seq: int, received_before: float) -> int:
        with self._write_lock, self._errors():
            cur = self._writer.execute(
                f"DELETE FROM {INBOX_TABLE} WHERE seq IN (SELECT seq FROM {INBOX_TABLE} "
                "WHERE seq <= ? AND received_at < ? ORDER BY seq LIMIT ?)",
                (through_seq, received_before, PRUNE_ROWS_MAX),
            )
            return int(cur.rowcount)

    def close(self) -> None:
        with self._write_lock, self._read_lock:
            self._writer.close()
            self._reader.close()

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as exc:
            raise TransientStoreError(f"{STORE} {self.path}: {exc}", store=STORE) from exc
        except sqlite3.Error as exc:
            raise PermanentStoreError(f"{STORE} {self.path}: {exc}", store=STORE) from exc


def inbox_beside(ledger_path: str | Path) -> Path:
    """The default inbox file of an SQLite ledger: ``ledger.db`` -> ``ledger.webhook-inbox.db``."""
    path = Path(ledger_path)
    return path.with_name(f"{path.stem}.webhook-inbox.db")


def _scalar(cur: sqlite3.Cursor, query: str) -> int:
    return first_int(cur.execute(query).fetchone())
