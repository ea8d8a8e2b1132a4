"""Change events POSTed to ``/events``: a durable inbox, the intake that fills it, and the source
that reads it.

Request bodies use the JSONL event schema (``{"op", "doc_id", "version", "text", "metadata"}``,
parsed by ``coordinator.events.event_from_dict`` exactly as the JSONL source parses a line):

- ``application/json``: one event object, or an array of event objects;
- ``application/x-ndjson`` (also ``application/jsonl``, ``application/x-jsonlines``): one event
  per line, each line decoded and parsed on its own as a line of the JSONL source's file is
  (blank lines skipped, a leading byte order mark dropped, ``\\r\\n`` accepted).

Durability: the intake answers only after the whole request is committed to the inbox (one
transaction: SQLite in WAL mode with ``synchronous=FULL``, or Postgres). A crash after the
answer loses nothing; a crash before it leaves nothing of the request, and the client retries.

Idempotency: the inbox keeps each ``(doc_id, version)`` once. A retried request is acknowledged
again without a second row (counted as ``duplicates``). The same ``(doc_id, version)`` with a
different body is a conflict: refused, and recorded as a bad item (the first body stands).

Bad items: a request whose body can be split into items is never refused as a whole because of
some of them. Every valid item is stored; every invalid item (not JSON, not UTF-8, not a valid
event, a conflict) is stored as a *bad row* carrying its reason, which the source delivers as a
BadRecord, so it reaches the dead-letter queue through the same path as every other source's
bad records. The intake reports each bad item by index with its reason. A bad item sent again is
stored once (bad rows are unique by a digest of reason and payload).

Positions: each inbox row has a ``seq`` (a strictly increasing integer, never reused). A row's
position is its ``seq`` as a decimal string; ``commit(position)`` stores "the position after the
last applied event" in the ledger's checkpoint store, and ``read()``/``follow()`` resume with
the rows after it. Writers assign a ``seq`` and commit in one order (SQLite has one writer at a
time; on Postgres every append takes one transaction-scoped advisory lock first), so a reader
that has seen ``seq`` N has seen every row below N that will ever exist: no row is skipped when
several replicas receive POSTs into one Postgres inbox.

Retention: rows at or below the committed checkpoint and older than ``retention_s`` are pruned
(at most every ``PRUNE_INTERVAL_S``). A retry of an event arriving after its row was pruned is
stored again and is then a no-op at the ledger's version gate (stale), never a regression.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from adapters.ledger.settings import CONNECT_TIMEOUT_S, STATEMENT_TIMEOUT_S
from adapters.sources.base import CheckpointStore, bad_record
from adapters.sources.jsonl import LINE_BYTES_MAX
from coordinator.errors import (
    InvalidEvent,
    LockstepError,
    PermanentStoreError,
    SourceError,
    StoreError,
    TransientStoreError,
)
from coordinator.events import ChangeEvent, canonical_json, event_from_dict, event_to_dict, loads_event_json
from coordinator.model import PayloadEncoding
from coordinator.ports import BadRecord, SourceRecord

if TYPE_CHECKING:
    import psycopg
    from psycopg.rows import TupleRow

STORE = "webhook inbox"
INBOX_TABLE = "webhook_inbox"

# The default request body limit: one event of the largest valid size (the JSONL source's longest
# line) fits in a request of its own.
BODY_BYTES_MAX = LINE_BYTES_MAX
# A shorter bearer token could be guessed; 16 random characters are beyond reach.
TOKEN_CHARS_MIN = 16
# Items per request: one request is one inbox transaction, and its answer lists bad items.
BATCH_EVENTS_MAX = 5_000
# Stored but not yet committed events beyond which the intake refuses new requests (503): the
# inbox is a buffer for index outages, not an unbounded disk sink.
BACKLOG_EVENTS_MAX = 1_000_000
# Inbox rows read per query by the source: a page is all that is held in memory.
READ_PAGE_ROWS = 1_000
# How long ``follow`` waits for a wake-up (a POST to this process) before looking again; POSTs
# to another replica sharing a Postgres inbox are seen within this time.
FOLLOW_POLL_S = 0.2
# After a failed inbox read ``follow`` waits this long before trying again.
READ_RETRY_S = 1.0
# Rows are kept this long after arrival (and until committed): the window in which a retried
# request is recognised as a duplicate without reaching the ledger.
RETENTION_S = 7 * 24 * 3600.0
# Pruning runs at most this often, and deletes at most PRUNE_ROWS_MAX rows per run, so a commit
# never waits on a long delete.
PRUNE_INTERVAL_S = 60.0
PRUNE_ROWS_MAX = 10_000
# The committed checkpoint is read for the backlog check at most this often per intake.
BACKLOG_CHECK_INTERVAL_S = 1.0
# How long an SQLite writer waits for the inbox file's write lock.
SQLITE_BUSY_TIMEOUT_S = 30.0
# A Postgres session frozen inside a transaction holds the append lock for at most this long.
IDLE_IN_TRANSACTION_TIMEOUT_S = 60.0
# libpq rounds connect_timeout to whole seconds and treats anything below 2 as 2.
CONNECT_TIMEOUT_MIN_S = 2
# Keys per ``= ANY`` lookup: bounds one statement (a request holds at most BATCH_EVENTS_MAX).
KEYS_PER_QUERY_MAX = 5_000

# Media types (lower case, without parameters) and how their bodies are split into items.
JSON_MEDIA_TYPE = "application/json"
LINES_MEDIA_TYPES = frozenset({"application/x-ndjson", "application/jsonl", "application/x-jsonlines"})
MEDIA_TYPES = frozenset({JSON_MEDIA_TYPE, *LINES_MEDIA_TYPES})

_BLANK = b" \t\r\n"
_UTF8_BOM = b"\xef\xbb\xbf"

log = structlog.get_logger(__name__)


# --- errors --------------------------------------------------------------------------------------


class BodyError(LockstepError):
    """A request body refused as a whole; ``status`` is the HTTP status that says why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class InboxFull(LockstepError):
    """The backlog of stored, uncommitted events reached its bound; the client should retry later."""

    retriable = True


# --- items and results ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One item of a request: a valid event (``event``) or a bad item (``reason``)."""

    index: int
    payload: str
    event: ChangeEvent | None = None
    reason: str | None = None
    doc_id: str | None = None
    # The item's bytes as sent (a line of a JSON-lines body), kept for its dead letter: ``payload``
    # holds the canonical event, or cannot hold bytes that are not UTF-8.
    raw: bytes | None = None

    @property
    def key(self) -> tuple[str, int]:
        assert self.event is not None, "only events have a key"
        return self.event.doc_id, self.event.version


@dataclass(frozen=True)
class Rejection:
    """A bad item of a request, as reported to the client (``index`` counts from 0)."""

    index: int
    reason: str
    doc_id: str | None = None


@dataclass(frozen=True)
class AppendResult:
    """What one request did: new events stored, events already stored, bad items recorded.
    ``keys``: the ``(doc_id, version)`` of every valid item, new or duplicate (what a consistency
    token of the request covers)."""

    accepted: int
    duplicates: int
    rejected: tuple[Rejection, ...] = ()
    keys: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class InboxRow:
    """One stored row: an event (``reason`` is None) or a bad item with its reason."""

    seq: int
    doc_id: str | None
    version: int | None
    payload: str
    reason: str | None


@dataclass(frozen=True)
class _NewRow:
    doc_id: str | None
    version: int | None
    payload: str
    reason: str | None
    digest: str | None


@dataclass
class _Plan:
    """How a request's items split against what the inbox already holds."""

    rows: list[_NewRow] = field(default_factory=list)
    accepted: int = 0
    duplicates: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    keys: list[tuple[str, int]] = field(default_factory=list)

    def result(self) -> AppendResult:
        return AppendResult(self.accepted, self.duplicates, tuple(self.rejected), tuple(self.keys))


def plan_append(items: Sequence[Item], stored: Mapping[tuple[str, int], str]) -> _Plan:
    """Split ``items`` into rows to insert, duplicates and rejections, given the stored payloads
    of their keys. The first body of a ``(doc_id, version)`` stands; a later different one is a
    conflict."""
    plan = _Plan()
    seen = dict(stored)
    for item in items:
        if item.event is None:
            _reject(plan, item, item.reason or "invalid event")
            continue
        known = seen.get(item.key)
        if known is None:
            seen[item.key] = item.payload
            plan.rows.append(_NewRow(item.key[0], item.key[1], item.payload, None, None))
            plan.accepted += 1
            plan.keys.append(item.key)
        elif known == item.payload:
            plan.duplicates += 1
            plan.keys.append(item.key)
        else:
            doc_id, version = item.key
            _reject(plan, item, f"conflict: {doc_id!r} version {version} was already accepted with a different body")
    return plan


def _reject(plan: _Plan, item: Item, reason: str) -> None:
    doc_id = item.event.doc_id if item.event is not None else item.doc_id
    letter = bad_record(reason, item.raw if item.raw is not None else item.payload, None, doc_id)
    stored = _bad_row_payload(letter)
    digest = hashlib.sha256(f"{letter.reason}\x00{stored}".encode()).hexdigest()
    plan.rows.append(_NewRow(letter.doc_id, None, stored, letter.reason, digest))
    plan.rejected.append(Rejection(item.index, letter.reason, letter.doc_id))


def _bad_row_payload(letter: BadRecord) -> str:
    """How a bad row stores its record: the record spelled as the dead letter will keep it."""
    spelled = {"payload": letter.payload, "encoding": letter.encoding.value, "truncated": letter.truncated}
    return json.dumps(spelled, ensure_ascii=False)


def _bad_row_record(row: InboxRow, position: str) -> BadRecord:
    """The BadRecord of a stored bad row (rows stored by an older lockstep hold the bare text)."""
    assert row.reason is not None, "bad rows carry their reason"
    try:
        spelled = json.loads(row.payload)
        encoding = PayloadEncoding(spelled["encoding"])
        payload, truncated = str(spelled["payload"]), bool(spelled["truncated"])
    except (ValueError, TypeError, KeyError):
        return BadRecord(row.reason, row.payload, position, row.doc_id)
    return BadRecord(row.reason, payload, position, row.doc_id, encoding, truncated)


# --- request bodies ------------------------------------------------------------------------------


def parse_body(body: bytes, media_type: str, items_max: int) -> list[Item]:
    """The items of a request body; BodyError when the body as a whole cannot be read."""
    if not body.strip(_BLANK):
        raise BodyError(400, "empty body: send one event, an array of events or JSON lines")
    if media_type == JSON_MEDIA_TYPE:
        items = _json_items(body, items_max)
    elif media_type in LINES_MEDIA_TYPES:
        items = _line_items(body, items_max)
    else:
        raise BodyError(415, f"unsupported media type {media_type!r}; use one of {sorted(MEDIA_TYPES)}")
    return items


def _json_items(body: bytes, items_max: int) -> list[Item]:
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BodyError(400, f"body is not valid UTF-8 (byte {exc.start})") from exc
    try:
        raw = loads_event_json(text)
    except json.JSONDecodeError as exc:
        raise BodyError(400, f"body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except RecursionError as exc:
        raise BodyError(400, "body is not valid JSON: nested too deeply") from exc
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list):
        raise BodyError(422, f"body is a JSON {type(raw).__name__}; send an event object or an array of events")
    if not raw:
        raise BodyError(422, "the array holds no events")
    _check_count(len(raw), items_max)
    return [_item(i, value, _json_payload(value)) for i, value in enumerate(raw)]


def _line_items(body: bytes, items_max: int) -> list[Item]:
    lines = [
        (i, line.rstrip(b"\r"))
        for i, line in enumerate(body.removeprefix(_UTF8_BOM).split(b"\n"))
        if line.strip(_BLANK)
    ]
    _check_count(len(lines), items_max)
    return [_line_item(i, line) for i, line in lines]


def _line_item(index: int, line: bytes) -> Item:
    """One line, read as the JSONL source reads a line of its file."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        shown = line.decode("utf-8", "replace")
        return Item(index, shown, reason=f"invalid UTF-8 at byte {exc.start} of the line", raw=line)
    try:
        raw = loads_event_json(text)
    except json.JSONDecodeError as exc:
        return Item(index, text, reason=f"invalid JSON: {exc.msg} at column {exc.colno}")
    except RecursionError:
        return Item(index, text, reason="invalid JSON: nested too deeply")
    return _item(index, raw, text, line)


def _item(index: int, raw: object, payload: str, sent: bytes | None = None) -> Item:
    """``sent``: the item's bytes as the client sent them (a line), kept for its dead letter."""
    try:
        event = event_from_dict(raw)
    except InvalidEvent as exc:
        return Item(index, payload, reason=exc.reason, doc_id=exc.doc_id, raw=sent)
    return Item(index, canonical_json(event_to_dict(event)), event=event, raw=sent)


def _json_payload(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _check_count(count: int, items_max: int) -> None:
    if count > items_max:
        raise BodyError(413, f"{count} events in one request; at most {items_max}")


# --- the inbox -----------------------------------------------------------------------------------


class Inbox(Protocol):
    """Append-only storage of received events, readable in ``seq`` order."""

    def append(self, items: Sequence[Item], *, committed_seq: int, backlog_max: int) -> AppendResult:
        """Store the request's items in one transaction; InboxFull if the backlog (rows above
        ``committed_seq``) already holds ``backlog_max``."""

    def read_after(self, seq: int, limit: int) -> list[InboxRow]:
        """Up to ``limit`` rows with a seq above ``seq``, in seq order."""

    def prune(self, *, through_seq: int, received_before: float) -> int:
        """Delete at most PRUNE_ROWS_MAX rows at or below ``through_seq`` received before the
        given Unix time; returns how many."""

    def close(self) -> None: ...


_SQLITE_SCHEMA = f"""
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
_INSERT = (
    f"INSERT INTO {INBOX_TABLE} (doc_id, version, payload, reason, digest, received_at) "
    "VALUES ({p}, {p}, {p}, {p}, {p}, {p}) ON CONFLICT DO NOTHING"
)


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
            self._writer.executescript(_SQLITE_SCHEMA)
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
                _check_backlog(_scalar(cur, f"SELECT coalesce(max(seq), 0) FROM {INBOX_TABLE}"), committed_seq, backlog_max)
                plan = plan_append(items, self._stored(cur, [i.key for i in items if i.event is not None]))
                now = self._clock()
                cur.executemany(_INSERT.format(p="?"), [_params(r, now) for r in plan.rows])
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


_PG_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {INBOX_TABLE} (
    seq         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    doc_id      TEXT COLLATE "C",
    version     BIGINT,
    payload     TEXT NOT NULL,
    reason      TEXT,
    digest      TEXT UNIQUE,
    received_at DOUBLE PRECISION NOT NULL,
    UNIQUE (doc_id, version)
);
"""


class PostgresInbox:
    """The inbox as a table in the Postgres ledger's schema, shared by every replica.

    Every append first takes one transaction-scoped advisory lock, so seqs are assigned in
    commit order across replicas (see the module docstring). One connection behind a lock,
    reopened after it breaks, as the Postgres ledger does.
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        statement_timeout_s: float = STATEMENT_TIMEOUT_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.schema = schema
        self._dsn = dsn
        self._connect_timeout_s = connect_timeout_s
        self._statement_timeout_s = statement_timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[TupleRow] | None = None
        self._append_lock_key = f"lockstep.{INBOX_TABLE}.{schema}"
        self._create()

    def __repr__(self) -> str:
        # Never the DSN itself: it may carry a password.
        return f"PostgresInbox(schema={self.schema!r})"

    def append(self, items: Sequence[Item], *, committed_seq: int, backlog_max: int) -> AppendResult:
        with self._tx() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self._append_lock_key,))
            cur.execute(f"SELECT coalesce(max(seq), 0) FROM {INBOX_TABLE}")
            _check_backlog(_first(cur.fetchone()), committed_seq, backlog_max)
            plan = plan_append(items, self._stored(cur, [i.key for i in items if i.event is not None]))
            now = self._clock()
            if plan.rows:
                cur.executemany(_INSERT.format(p="%s"), [_params(r, now) for r in plan.rows])
        return plan.result()

    @staticmethod
    def _stored(cur: Any, keys: Sequence[tuple[str, int]]) -> dict[tuple[str, int], str]:
        out: dict[tuple[str, int], str] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), KEYS_PER_QUERY_MAX):
            part = unique[start : start + KEYS_PER_QUERY_MAX]
            cur.execute(
                f"SELECT i.doc_id, i.version, i.payload FROM {INBOX_TABLE} i "
                "JOIN unnest(%s::text[], %s::bigint[]) AS k(doc_id, version) "
                "ON i.doc_id = k.doc_id AND i.version = k.version",
                ([d for d, _ in part], [v for _, v in part]),
            )
            out.update(((str(d), int(v)), str(p)) for d, v, p in cur.fetchall())
        return out

    def read_after(self, seq: int, limit: int) -> list[InboxRow]:
        with self._tx() as cur:
            cur.execute(
                f"SELECT seq, doc_id, version, payload, reason FROM {INBOX_TABLE} "
                "WHERE seq > %s ORDER BY seq LIMIT %s",
                (seq, limit),
            )
            return [InboxRow(*row) for row in cur.fetchall()]

    def prune(self, *, through_seq: int, received_before: float) -> int:
        with self._tx() as cur:
            cur.execute(
                f"DELETE FROM {INBOX_TABLE} WHERE seq IN (SELECT seq FROM {INBOX_TABLE} "
                "WHERE seq <= %s AND received_at < %s ORDER BY seq LIMIT %s)",
                (through_seq, received_before, PRUNE_ROWS_MAX),
            )
            return int(cur.rowcount)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
            self._conn = None

    def _create(self) -> None:
        from psycopg import sql

        with self._tx() as cur:
            # Replicas starting together would race on CREATE ... IF NOT EXISTS; they take turns.
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"lockstep.schema.{self.schema}",))
            cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
            cur.execute(_PG_SCHEMA)

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        import psycopg

        with self._lock:
            try:
                conn = self._connection()
                with conn.transaction(), conn.cursor() as cur:
                    yield cur
            except psycopg.DatabaseError as exc:
                raise self._store_error(exc) from exc

    def _connection(self) -> psycopg.Connection[TupleRow]:
        import psycopg

        if self._conn is not None and not self._conn.closed:
            return self._conn
        timeout_ms = int(self._statement_timeout_s * 1000)
        idle_ms = int(IDLE_IN_TRANSACTION_TIMEOUT_S * 1000)
        self._conn = psycopg.connect(
            self._dsn,
            autocommit=True,  # transactions are explicit: conn.transaction() in _tx
            connect_timeout=max(CONNECT_TIMEOUT_MIN_S, math.ceil(self._connect_timeout_s)),
            options=(
                f"-c statement_timeout={timeout_ms} -c idle_in_transaction_session_timeout={idle_ms} "
                f"-c search_path={self.schema}"
            ),
            application_name="lockstep-webhook-inbox",
        )
        return self._conn

    def _store_error(self, exc: Exception) -> StoreError:
        import psycopg

        lost = self._conn is None or self._conn.broken or self._conn.closed
        if lost and self._conn is not None:
            self._conn.close()
            self._conn = None
        message = f"{STORE} (postgres, schema {self.schema}): {type(exc).__name__}: {exc}"
        if lost or isinstance(exc, psycopg.OperationalError):
            return TransientStoreError(message, store=STORE)
        return PermanentStoreError(message, store=STORE)


def inbox_beside(ledger_path: str | Path) -> Path:
    """The default inbox file of an SQLite ledger: ``ledger.db`` -> ``ledger.webhook-inbox.db``."""
    path = Path(ledger_path)
    return path.with_name(f"{path.stem}.webhook-inbox.db")


def _params(row: _NewRow, now: float) -> tuple[object, ...]:
    return (row.doc_id, row.version, row.payload, row.reason, row.digest, now)


def _scalar(cur: sqlite3.Cursor, query: str) -> int:
    return _first(cur.execute(query).fetchone())


def _first(row: Sequence[Any] | None) -> int:
    assert row is not None, "an aggregate always returns a row"
    return int(row[0])


def _check_backlog(last_seq: int, committed_seq: int, backlog_max: int) -> None:
    if last_seq - committed_seq >= backlog_max:
        raise InboxFull(f"{last_seq - committed_seq} events wait in the inbox (at most {backlog_max})")


# --- the intake and the source -------------------------------------------------------------------


class WebhookSource:
    """The inbox as a ChangeSource: rows in seq order from the last committed seq.

    ``follow`` is what ``lockstep run`` uses: it reads what is there, then waits for a wake-up
    from this process's intake (or ``FOLLOW_POLL_S``) and reads again.
    """

    def __init__(
        self,
        inbox: Inbox,
        checkpoints: CheckpointStore,
        *,
        name: str = "webhook",
        retention_s: float = RETENTION_S,
        clock: Callable[[], float] = time.time,
        page_rows: int = READ_PAGE_ROWS,
    ) -> None:
        self.name = name
        self.inbox = inbox
        self._checkpoints = checkpoints
        self._retention_s = retention_s
        self._clock = clock
        self._page_rows = page_rows
        self._wake = threading.Event()
        self._pruned_at = float("-inf")

    def intake(self, *, batch_events_max: int = BATCH_EVENTS_MAX, backlog_events_max: int = BACKLOG_EVENTS_MAX) -> WebhookIntake:
        """The intake that stores requests in this source's inbox and wakes it up."""
        return WebhookIntake(
            self.inbox,
            self.committed_seq,
            wake=self._wake.set,
            batch_events_max=batch_events_max,
            backlog_events_max=backlog_events_max,
        )

    def read(self) -> Iterator[SourceRecord]:
        """Every row after the committed seq, up to the current end of the inbox."""
        after = self.committed_seq()
        while True:
            rows = self.inbox.read_after(after, self._page_rows)
            yield from map(self._record, rows)
            if len(rows) < self._page_rows:
                return
            after = rows[-1].seq

    def follow(self, stop: Callable[[], bool], poll_s: float = FOLLOW_POLL_S) -> Iterator[SourceRecord]:
        """Like ``read()``, then keep reading new rows until ``stop()`` is true."""
        after = self.committed_seq()
        while not stop():
            try:
                rows = self.inbox.read_after(after, self._page_rows)
            except StoreError as exc:
                if not exc.retriable:
                    raise
                log.warning("inbox read failed; retrying", source=self.name, error=str(exc), phase="read")
                time.sleep(READ_RETRY_S)
                continue
            for row in rows:
                after = row.seq
                yield self._record(row)
            if len(rows) < self._page_rows:
                # Cleared before the next read: a wake-up set after this point is never lost.
                self._wake.wait(poll_s)
                self._wake.clear()

    def commit(self, position: str) -> None:
        """Persist ``position`` (the seq of the last applied row) as the place to resume from."""
        seq = _parse_seq(position)
        self._checkpoints.set_checkpoint(self.name, position)
        self._prune(seq)

    def committed_seq(self) -> int:
        stored = self._checkpoints.get_checkpoint(self.name)
        return 0 if stored is None else _parse_seq(stored)

    def close(self) -> None:
        self.inbox.close()

    def _prune(self, committed: int) -> None:
        now = self._clock()
        if now - self._pruned_at < PRUNE_INTERVAL_S:
            return
        self._pruned_at = now
        try:
            pruned = self.inbox.prune(through_seq=committed, received_before=now - self._retention_s)
        except StoreError as exc:
            log.warning("inbox prune failed", source=self.name, error=str(exc))
            return
        if pruned:
            log.info("inbox pruned", source=self.name, rows=pruned, through_seq=committed)

    def _record(self, row: InboxRow) -> SourceRecord:
        position = str(row.seq)
        if row.reason is not None:
            return _bad_row_record(row, position)
        try:
            return event_from_dict(json.loads(row.payload), position=position)
        except (InvalidEvent, json.JSONDecodeError) as exc:
            # Only a stored row altered behind lockstep's back can get here.
            reason = exc.reason if isinstance(exc, InvalidEvent) else f"stored row is not JSON: {exc.msg}"
            return bad_record(f"inbox row {row.seq}: {reason}", row.payload, position, row.doc_id)


class WebhookIntake:
    """Turns one request body into inbox rows; knows nothing of HTTP beyond the media type."""

    def __init__(
        self,
        inbox: Inbox,
        committed_seq: Callable[[], int],
        *,
        wake: Callable[[], None],
        batch_events_max: int = BATCH_EVENTS_MAX,
        backlog_events_max: int = BACKLOG_EVENTS_MAX,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._inbox = inbox
        self._committed_seq = committed_seq
        self._wake = wake
        self.batch_events_max = batch_events_max
        self.backlog_events_max = backlog_events_max
        self._clock = clock
        self._committed = (float("-inf"), 0)
        self._lock = threading.Lock()

    def accept(self, body: bytes, media_type: str) -> AppendResult:
        """Store the body's items durably; BodyError, InboxFull or StoreError when it cannot."""
        items = parse_body(body, media_type, self.batch_events_max)
        result = self._inbox.append(items, committed_seq=self._committed_now(), backlog_max=self.backlog_events_max)
        if result.accepted or result.rejected:
            self._wake()
        return result

    def _committed_now(self) -> int:
        """The committed checkpoint, read from the ledger at most every BACKLOG_CHECK_INTERVAL_S."""
        with self._lock:
            read_at, seq = self._committed
            now = self._clock()
            if now - read_at >= BACKLOG_CHECK_INTERVAL_S:
                seq = self._committed_seq()
                self._committed = (now, seq)
            return seq


def _parse_seq(position: str) -> int:
    if not position.isdigit():
        raise SourceError(f"not a webhook inbox position (a seq): {position!r}")
    return int(position)
