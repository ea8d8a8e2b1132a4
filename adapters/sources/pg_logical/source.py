"""Postgres logical replication as a change source: pgoutput, read through the SQL interface.

psycopg 3 does not speak the streaming replication protocol, so changes are read with
``pg_logical_slot_peek_binary_changes`` on an ordinary connection and decoded by
``adapters/sources/pgoutput.py``; the slot is moved with ``pg_replication_slot_advance``.

Set-up (on construction): ``wal_level`` must be ``logical``, the database UTF-8, and every table
``REPLICA IDENTITY FULL`` (an UPDATE that leaves a large, TOASTed text unchanged sends no value
for it; the full old row is where it is found). The publication is created (or completed with
missing tables) before the slot, because pgoutput resolves it as of each change's LSN.

Snapshot, then stream, with no gap: on the first start (no checkpoint) the slot is created with
an exported snapshot, and every table is read inside that snapshot. Snapshot rows get version =
the slot's consistent point ``cp``; the slot then yields exactly the transactions committed after
the snapshot, each with a larger version. The snapshot also reconciles: a live ledger document
the tables do not hold at ``cp`` gets a delete at version ``cp`` (the recovery path relies on it).

Versions and positions: every change of a transaction gets version = the transaction's end LSN
(``Commit.end_lsn``, the LSN after its commit record). The commit record's own LSN would not do:
a transaction whose commit record starts exactly at ``cp`` is streamed, not in the snapshot, and
would tie with the snapshot's version. A version must name one state, so only the last change of
each document in a transaction is emitted (an UPDATE of the key is a delete of the old id plus an
upsert of the new one; a TRUNCATE deletes every known document of the table at that point).
Only the last record of a transaction carries a position: the end LSN as pg_lsn text.

Checkpoints: ``commit(position)`` writes the position to the ledger's checkpoint table, then
advances the slot's ``confirmed_flush_lsn`` to it, so the slot never passes the low watermark.
(When every record yielded is committed and a peek up to the flushed WAL found nothing new, the
slot moves to that LSN: nothing of ours lies before it, and other tables' WAL is not held back.)
After a crash (of lockstep or of Postgres, whose slots persist at checkpoints) the slot may
resend transactions; the ledger's version gate makes them no-ops. Within one process, a
transaction already yielded is never yielded again, even though each peek starts over at the
slot's position. Snapshot records carry ``snapshot:<cp>:<n>`` positions, which only tell the
source which documents are no longer in flight: the snapshot counts as done once a position of
its end or later is committed, and an unfinished one is started over with a new slot.

A lost slot (missing, or ``wal_status = 'lost'``) while a checkpoint exists raises SourceError
naming the recovery command, ``lockstep source resnapshot``, which builds this source with
``resnapshot=True``: it re-creates the slot and re-reads the tables.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import psycopg
import structlog
from psycopg import sql
from psycopg.rows import TupleRow
from psycopg.types.string import TextLoader

from adapters.sources.base import CheckpointStore, bad_record
from adapters.sources.pgoutput import (
    UNCHANGED,
    Begin,
    Commit,
    Datum,
    Delete,
    Insert,
    PgOutputError,
    Relation,
    Truncate,
    Update,
    decode,
    lsn_to_int,
    lsn_to_text,
)
from coordinator.errors import ConfigError, InvalidEvent, SourceError
from coordinator.events import ChangeEvent, Op
from coordinator.ports import KnownDocs, SourceRecord

# Never inherit libpq's defaults (no connect timeout, no statement timeout).
CONNECT_TIMEOUT_S = 10.0
# A peek decodes from the slot's restart point and a snapshot sorts a whole table: generous.
STATEMENT_TIMEOUT_S = 300.0
# The snapshot transaction sits idle while the indexes push back; past this the server ends it
# and the snapshot starts over with a new slot (nothing was checkpointed, nothing is lost).
SNAPSHOT_IDLE_TIMEOUT_S = 3600.0
# Rows asked of one peek (``upto_nchanges``). Decoding stops at a transaction boundary, so a
# bigger transaction still comes whole; rows already delivered are asked for on top.
PEEK_CHANGES_MAX = 5000
# Rows fetched per round trip from the peek's and the snapshot's server-side cursors.
FETCH_ROWS = 500
# Row changes of one transaction held in memory until its commit; a bigger transaction is read
# twice: once to learn each document's last change, once more to emit only those.
TXN_BUFFER_CHANGES_MAX = 10_000
# Snapshot records carry a progress position this often, so documents leave the in-flight set.
SNAPSHOT_POSITION_ROWS = 500
# How often a follower looks for new transactions when it has caught up.
POLL_INTERVAL_S = 0.5
# commit() advances the slot at most this often from the caller's thread; the reader moves it
# after every peek anyway. Advancing decodes WAL, so doing it on every checkpoint would be waste.
ADVANCE_INTERVAL_S = 1.0
# Reconnect backoff while Postgres is unreachable, and how long an outage may last before the
# source gives up with a SourceError.
RECONNECT_BACKOFF_MIN_S = 0.2
RECONNECT_BACKOFF_MAX_S = 5.0
OUTAGE_MAX_S = 600.0
# How long close() waits for a running peek before advancing the slot one last time.
CLOSE_WAIT_S = 10.0
# Sleeps are cut in slices this long so that stop() is noticed promptly.
SLEEP_SLICE_S = 0.1

# Slot and publication names go into the publication_names option, which Postgres splits as an
# identifier list: plain lower-case identifiers only, so none needs quoting.
NAME_PATTERN = re.compile(r"[a-z_][a-z0-9_]{0,62}")
# The checkpoint of a source whose snapshot must be (re)done before it streams again.
SNAPSHOT_REQUIRED = "snapshot-required"
SNAPSHOT_POSITION_PREFIX = "snapshot:"
RECOVERY_COMMAND = "lockstep source resnapshot -c CONFIG"

_BOOL_OID = 16
_INT_OIDS = frozenset({20, 21, 23, 26})
_FLOAT_OIDS = frozenset({700, 701})
_JSON_OIDS = frozenset({114, 3802})
# Values become text the same way on both paths: the snapshot reads every column as the text of
# its output function in a session with these settings, and pgoutput (SQL interface) formats
# values with the same functions in that same kind of session.
_SESSION_OPTIONS = "-c TimeZone=UTC -c DateStyle=ISO,YMD -c IntervalStyle=iso_8601"
_PEEK_SQL = (
    "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes("
    "%s::name, %s::pg_lsn, %s::int4, 'proto_version', '1', 'publication_names', %s::text)"
)
_ADVANCE_SQL = (
    "SELECT pg_replication_slot_advance(slot_name, %s::pg_lsn)::text FROM pg_replication_slots "
    "WHERE slot_name = %s AND confirmed_flush_lsn < %s::pg_lsn"
)

log = structlog.get_logger(__name__)


# --- what the source works with ------------------------------------------------------------------


@dataclass(frozen=True)
class TableRef:
    """A configured table: its spelling in the settings (``label``) and where it lives."""

    label: str
    schema: str
    name: str
    prefix: str

    def doc_id(self, row_id: str) -> str:
        return self.prefix + row_id


@dataclass(frozen=True)
class Columns:
    """Which columns make a document: its ID, its text and its metadata."""

    id: str
    text: str
    metadata_json: str | None
    metadata: tuple[str, ...]

    @property
    def names(self) -> tuple[str, ...]:
        optional = (self.metadata_json,) if self.metadata_json else ()
        return (self.id, self.text, *optional, *self.metadata)


@dataclass(frozen=True)
class _Row:
    """One row change as a document change; ``reason`` set means it cannot be one."""

    op: Op
    doc_id: str | None
    table: TableRef | None
    text: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    reason: str | None = None
    payload: str = ""

    def record(self, version: int, position: str | None) -> SourceRecord:
        if self.reason is None:
            try:
                return ChangeEvent(self.op, self.doc_id or "", version, self.text, self.metadata, position)
            except InvalidEvent as exc:
                return _bad_row(exc.reason, self.payload, position, self.doc_id)
        return _bad_row(self.reason, self.payload, position, self.doc_id)


@dataclass(frozen=True)
class _Layout:
    """Where the configured columns sit in a relation's rows: name -> (index, type oid)."""

    table: TableRef
    columns: Mapping[str, tuple[int, int]]


@dataclass(frozen=True)
class _Replay:
    """What the first pass over an oversized transaction learned, for the second pass."""

    commit_lsn: int
    end_lsn: int
    last: Mapping[str, int]
    truncated: Mapping[TableRef, int]
    final_index: int


@dataclass
class _Txn:
    """The row changes of one transaction, until its commit says which are final."""

    commit_lsn: int
    buffer_max: int
    replay: _Replay | None = None
    index: int = -1
    last: dict[str, int] = field(default_factory=dict)
    rows: dict[str, _Row] = field(default_factory=dict)
    bad: list[_Row] = field(default_factory=list)
    bad_last: int = -1
    truncated: dict[TableRef, int] = field(default_factory=dict)
    oversized: bool = False

    def add(self, row: _Row) -> None:
        """Record a row change of the first pass (kept in memory unless the buffer overflowed)."""
        self.index += 1
        if row.doc_id is None:
            self.bad_last = self.index
            if not self.oversized:
                self.bad.append(row)
        else:
            self.last[row.doc_id] = self.index
            if not self.oversized:
                # Re-inserted so that the dict's order stays the order of last changes.
                self.rows.pop(row.doc_id, None)
                self.rows[row.doc_id] = row
        if len(self.rows) + len(self.bad) > self.buffer_max:
            self.oversized = True
            self.rows.clear()
            self.bad.clear()

    def truncate(self, tables: Iterable[TableRef]) -> None:
        self.index += 1
        for table in tables:
            self.truncated[table] = self.index

    def replayed(self, row: _Row) -> _Row | None:
        """In the second pass: the row (or the delete replacing it) if it is final, else None."""
        self.index += 1
        assert self.replay is not None, "only a replayed transaction has a second pass"
        if row.doc_id is None:
            return row
        if self.replay.last.get(row.doc_id) != self.index:
            return None
        return _truncated_instead(row, self.replay.truncated, self.index)

    def final_rows(self) -> Iterator[_Row]:
        """The last change of every document, a TRUNCATE after it turning it into a delete."""
        for doc_id, row in self.rows.items():
            yield _truncated_instead(row, self.truncated, self.last[doc_id])
        yield from self.bad

    def to_replay(self, end_lsn: int) -> _Replay:
        final = max(max(self.last.values(), default=-1), self.bad_last)
        return _Replay(self.commit_lsn, end_lsn, dict(self.last), dict(self.truncated), final)


def _truncated_instead(row: _Row, truncated: Mapping[TableRef, int], index: int) -> _Row:
    if row.table is not None and truncated.get(row.table, -1) > index:
        return _Row(Op.DELETE, row.doc_id, row.table)
    return row


@dataclass
class _Outage:
    """Backoff while Postgres is unreachable; gives up after ``max_s`` of continuous failure."""

    max_s: float
    since: float | None = None
    backoff_s: float = RECONNECT_BACKOFF_MIN_S

    def wait(self, exc: psycopg.Error, stop: Callable[[], bool]) -> None:
        now = time.monotonic()
        self.since = now if self.since is None else self.since
        if now - self.since > self.max_s:
            raise SourceError(f"Postgres unreachable for {self.max_s:.0f} s: {exc}") from exc
        log.warning("postgres source unavailable", error=str(exc), retry_in_s=self.backoff_s)
        _sleep(self.backoff_s, stop)
        self.backoff_s = min(2 * self.backoff_s, RECONNECT_BACKOFF_MAX_S)

    def reset(self) -> None:
        self.since, self.backoff_s = None, RECONNECT_BACKOFF_MIN_S


# --- the source ----------------------------------------------------------------------------------


class PgLogicalSource:
    """Change events from Postgres tables through a pgoutput logical replication slot."""

    def __init__(
        self,
        dsn: str,
        tables: Sequence[str],
        checkpoints: CheckpointStore,
        known: KnownDocs,
        *,
        slot: str = "lockstep",
        publication: str = "lockstep",
        id_column: str = "id",
        text_column: str = "text",
        metadata_column: str | None = None,
        metadata_columns: Sequence[str] = (),
        table_prefix_ids: bool = False,
        name: str | None = None,
        resnapshot: bool = False,
        poll_interval_s: float = POLL_INTERVAL_S,
        peek_changes_max: int = PEEK_CHANGES_MAX,
        txn_buffer_changes_max: int = TXN_BUFFER_CHANGES_MAX,
        snapshot_position_rows: int = SNAPSHOT_POSITION_ROWS,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        statement_timeout_s: float = STATEMENT_TIMEOUT_S,
        outage_max_s: float = OUTAGE_MAX_S,
    ) -> None:
        _check_arguments(tables, slot, publication, table_prefix_ids)
        if min(peek_changes_max, txn_buffer_changes_max, snapshot_position_rows) < 1:
            raise ConfigError("peek, buffer and snapshot position sizes must be at least 1")
        self.name = name or f"postgres:{slot}"
        self._dsn = dsn
        self._labels = tuple(tables)
        self._prefixed = table_prefix_ids
        self._checkpoints = checkpoints
        self._known = known
        self._slot = slot
        self._publication = publication
        self._columns = Columns(id_column, text_column, metadata_column, tuple(metadata_columns))
        self._poll_interval_s = poll_interval_s
        self._peek_changes_max = peek_changes_max
        self._txn_buffer_max = txn_buffer_changes_max
        self._snapshot_position_rows = snapshot_position_rows
        self._connect_timeout_s = connect_timeout_s
        self._statement_timeout_s = statement_timeout_s
        self._outage_max_s = outage_max_s
        # Reader-thread state.
        self._reader_conn: psycopg.Connection[TupleRow] | None = None
        self._layouts: dict[int, _Layout | None] = {}
        self._txn: _Txn | None = None
        self._replay: _Replay | None = None
        self._delivered_lsn = -1
        self._skipping = False
        self._skipped_rows = 0
        self._caught_up = False
        self._restart_peek = False
        # Shared with commit() (the caller's thread): the slot, the advance and in-flight docs.
        self._slot_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._commit_conn: psycopg.Connection[TupleRow] | None = None
        self._pending_lsn: int | None = None
        self._advanced_at = 0.0
        self._inflight: deque[tuple[str, set[str]]] = deque()
        self._open_group: set[str] = set()
        self._unpositioned = 0
        self._yielded_last: str | None = None
        self._committed_last: str | None = None
        self.tables, self._types, self._needs_snapshot = self._set_up(resnapshot)

    # --- the ChangeSource port -------------------------------------------------------------

    def read(self) -> Iterator[SourceRecord]:
        """The snapshot if one is due, then every transaction committed so far; then return."""
        yield from self._stream(_never, follow=False)

    def follow(self, stop: Callable[[], bool]) -> Iterator[SourceRecord]:
        """Like ``read()``, then keep streaming new transactions until ``stop()`` is true."""
        yield from self._stream(stop, follow=True)

    def commit(self, position: str) -> None:
        """Record ``position`` in the ledger and let the slot's confirmed_flush_lsn follow it.

        Safe to call from another thread than the reader's. The slot is advanced here when no
        peek is running and ADVANCE_INTERVAL_S has passed, otherwise by the reader right after
        its next peek (a slot serves one backend at a time).
        """
        lsn = _position_lsn(position)
        self._forget_inflight(position)
        if lsn is None:
            return
        self._checkpoints.set_checkpoint(self.name, position)
        with self._state_lock:
            self._pending_lsn = max(lsn, self._pending_lsn or 0)
            due = time.monotonic() - self._advanced_at >= ADVANCE_INTERVAL_S
        if due and self._slot_lock.acquire(blocking=False):
            try:
                self._advance_pending()
            finally:
                self._slot_lock.release()

    def close(self) -> None:
        """Advance the slot to the last committed position, then close the connections."""
        if self._slot_lock.acquire(timeout=CLOSE_WAIT_S):
            try:
                self._advance_pending()
            finally:
                self._slot_lock.release()
        _close(self._commit_conn)
        self._commit_conn = None

    # --- streaming ---------------------------------------------------------------------------

    def _stream(self, stop: Callable[[], bool], *, follow: bool) -> Iterator[SourceRecord]:
        outage = _Outage(self._outage_max_s)
        try:
            while not stop():
                try:
                    yield from self._tracked(self._step())
                except psycopg.Error as exc:
                    self._raise_if_permanent(exc)
                    self._drop_reader()
                    outage.wait(exc, stop)
                    continue
                outage.reset()
                if self._caught_up and not follow:
                    return
                if self._caught_up:
                    _sleep(self._poll_interval_s, stop)
        finally:
            self._drop_reader()

    def _step(self) -> Iterator[SourceRecord]:
        if self._needs_snapshot:
            yield from self._snapshot()
            self._caught_up = False
            return
        yield from self._peek()
        with self._slot_lock:
            self._advance_pending()

    def _peek(self) -> Iterator[SourceRecord]:
        """One peek: every transaction of its answer not delivered before, as records."""
        limit = self._peek_changes_max + self._skipped_rows
        rows = skipped = 0
        self._restart_peek = False
        conn = self._reader()
        upto = _flushed_lsn(conn)
        with self._peek_rows(conn, upto, limit) as answer:
            for _lsn, data in answer:
                rows += 1
                skipping = self._skipping
                yield from self._on_message(_decoded(data))
                skipped += skipping or self._skipping
                if self._restart_peek:
                    break
        self._skipped_rows = skipped
        self._caught_up = rows < limit and not self._restart_peek
        if self._caught_up:
            self._advance_when_idle(upto)

    def _advance_when_idle(self, upto: int) -> None:
        """Let the slot move to ``upto`` when every transaction decoded before it was delivered
        and every delivered record is committed, though no record of ours stands there: WAL of
        other tables would otherwise pile up behind a quiet table."""
        with self._state_lock:
            settled = self._unpositioned == 0 and self._yielded_last == self._committed_last
            if settled and self._replay is None:
                self._pending_lsn = max(upto, self._pending_lsn or 0)

    @contextmanager
    def _peek_rows(self, conn: psycopg.Connection[TupleRow], upto: int, limit: int) -> Iterator[Iterator[Any]]:
        # WITH HOLD: the answer is materialized when DECLARE's implicit transaction commits, so
        # no transaction stays open (holding back vacuum) while records wait on backpressure.
        cursor = conn.cursor(name="lockstep_peek", withhold=True)
        try:
            with self._slot_lock:
                cursor.execute(_PEEK_SQL, (self._slot, lsn_to_text(upto), limit, self._publication))
                first = cursor.fetchmany(FETCH_ROWS)
            yield chain(first, _pages(cursor))
        finally:
            self._txn, self._skipping = None, False
            with suppress(psycopg.Error):  # the connection may be the reason we are leaving
                cursor.close()

    def _on_message(self, data: object) -> Iterator[SourceRecord]:
        if isinstance(data, Relation):
            self._layouts[data.oid] = self._layout(data)
        elif isinstance(data, Begin):
            yield from self._begin(data)
        elif isinstance(data, Insert | Update | Delete):
            yield from self._row_change(data)
        elif isinstance(data, Truncate):
            self._truncate(data)
        elif isinstance(data, Commit):
            yield from self._commit(data)

    def _begin(self, begin: Begin) -> Iterator[SourceRecord]:
        self._skipping = begin.final_lsn <= self._delivered_lsn
        if self._skipping:
            self._txn = None
            return
        replay = self._replay if self._replay and self._replay.commit_lsn == begin.final_lsn else None
        self._txn = _Txn(begin.final_lsn, self._txn_buffer_max, replay)
        if replay is not None:
            # The second pass emits as it goes, so the truncation deletes come first; they
            # carry the position only if no row change of the transaction is emitted.
            position = lsn_to_text(replay.end_lsn) if replay.final_index < 0 else None
            deletes = self._truncation_deletes(replay.truncated, replay.last)
            yield from _positioned(deletes, replay.end_lsn, position)

    def _row_change(self, change: Insert | Update | Delete) -> Iterator[SourceRecord]:
        txn = self._txn
        layout = self._layouts.get(change.relation_oid)
        if txn is None or layout is None:
            return
        for row in _rows_of(change, layout, self._columns):
            if txn.replay is None:
                txn.add(row)
            elif (final := txn.replayed(row)) is not None:
                last = txn.index == txn.replay.final_index
                yield final.record(txn.replay.end_lsn, lsn_to_text(txn.replay.end_lsn) if last else None)

    def _truncate(self, truncate: Truncate) -> None:
        if self._txn is None:
            return
        layouts = (self._layouts.get(oid) for oid in truncate.relation_oids)
        self._txn.truncate(layout.table for layout in layouts if layout is not None)

    def _commit(self, commit: Commit) -> Iterator[SourceRecord]:
        txn, self._txn, self._skipping = self._txn, None, False
        if txn is None:
            return
        if txn.oversized and txn.replay is None:
            log.info("transaction replayed", source=self.name, changes=txn.index + 1, lsn=commit.end_lsn)
            self._replay = txn.to_replay(commit.end_lsn)
            self._restart_peek = True
            return
        if txn.replay is None:
            deletes = self._truncation_deletes(txn.truncated, txn.last)
            rows = chain(deletes, txn.final_rows())
            yield from _positioned(rows, commit.end_lsn, lsn_to_text(commit.end_lsn))
        self._replay = None
        self._delivered_lsn = commit.commit_lsn

    def _truncation_deletes(
        self, truncated: Mapping[TableRef, int], touched: Mapping[str, int]
    ) -> Iterator[_Row]:
        """Deletes of every document known to be in a truncated table and not touched again in
        the transaction: ledger documents and documents yielded but not yet committed."""
        for table in truncated:
            inflight = self._inflight_docs(table)
            ledger = (d.doc_id for d in self._known.iter_docs() if d.doc_id.startswith(table.prefix))
            for doc_id in chain(sorted(inflight), (d for d in ledger if d not in inflight)):
                if doc_id not in touched:
                    yield _Row(Op.DELETE, doc_id, table)

    # --- the snapshot --------------------------------------------------------------------------

    def _snapshot(self) -> Iterator[SourceRecord]:
        """Re-create the slot with an exported snapshot, then read every table inside it."""
        if self._checkpoints.get_checkpoint(self.name) not in (None, SNAPSHOT_REQUIRED):
            # A crash during this snapshot must not leave a checkpoint that looks complete.
            self._checkpoints.set_checkpoint(self.name, SNAPSHOT_REQUIRED)
        with self._snapshot_transaction() as (conn, cp):
            position = lsn_to_text(cp)
            rows = chain.from_iterable(self._table_snapshot(conn, table, cp) for table in self.tables)
            every = self._snapshot_position_rows
            yield from _positioned(rows, cp, position, lambda n: f"{SNAPSHOT_POSITION_PREFIX}{position}:{n}", every)
        self._needs_snapshot = False
        self._delivered_lsn = -1
        log.info("snapshot read", source=self.name, slot=self._slot, consistent_point=position)

    @contextmanager
    def _snapshot_transaction(self) -> Iterator[tuple[psycopg.Connection[TupleRow], int]]:
        """A REPEATABLE READ transaction in the snapshot a new slot exported, and its LSN."""
        self._drop_slot()
        replication = self._connect(replication=True)
        try:
            cp, snapshot_name = self._create_slot(replication)
            conn = self._connect(autocommit=False, idle_timeout_s=SNAPSHOT_IDLE_TIMEOUT_S)
            try:
                conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
                conn.read_only = True
                conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot_name)))
            except BaseException:
                conn.close()
                raise
        finally:
            # The exported snapshot lives until the replication connection's next command;
            # once imported, the transaction above keeps it.
            replication.close()
        log.info("slot created", source=self.name, slot=self._slot, consistent_point=lsn_to_text(cp))
        try:
            yield conn, cp
        finally:
            _close(conn)

    def _create_slot(self, replication: psycopg.Connection[TupleRow]) -> tuple[int, str]:
        command = sql.SQL("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT")
        row = replication.execute(command.format(sql.Identifier(self._slot))).fetchone()
        assert row is not None, "CREATE_REPLICATION_SLOT answers one row"
        return lsn_to_int(str(row[1])), str(row[2])

    def _drop_slot(self) -> None:
        with self._slot_lock, self._connect() as conn:
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
                (self._slot,),
            )

    def _table_snapshot(self, conn: psycopg.Connection[TupleRow], table: TableRef, cp: int) -> Iterator[_Row]:
        """The table's rows in doc_id order, merged with the ledger's live documents of it: a
        row is an upsert, a ledger document the table lacks (at ``cp``) a delete."""
        rows = self._table_rows(conn, table)
        docs = (d for d in self._known.iter_docs() if d.doc_id.startswith(table.prefix) and d.version < cp)
        yield from _merge(rows, ((d.doc_id, _Row(Op.DELETE, d.doc_id, table)) for d in docs))

    def _table_rows(self, conn: psycopg.Connection[TupleRow], table: TableRef) -> Iterator[tuple[str, _Row]]:
        names = self._columns.names
        # format('%s', x) is x's output function, as pgoutput sends it (x::text is not: a
        # boolean casts to 'true' but is output as 't'); NULL ids become '' and sort first.
        query = sql.SQL("SELECT {} FROM {} ORDER BY format('%s', {}) COLLATE \"C\"").format(
            sql.SQL(", ").join(map(sql.Identifier, names)),
            sql.Identifier(table.schema, table.name),
            sql.Identifier(self._columns.id),
        )
        types = self._types[table]
        with conn.cursor(name="lockstep_snapshot") as cursor:
            cursor.itersize = FETCH_ROWS
            cursor.execute(query)
            _load_as_text(cursor)
            for values in cursor:
                row = _document(table, dict(zip(names, values, strict=True)), types, self._columns)
                yield (row.doc_id or ""), row

    # --- in-flight documents -------------------------------------------------------------------

    def _tracked(self, records: Iterator[SourceRecord]) -> Iterator[SourceRecord]:
        """Yield records, remembering which upserted documents are not yet committed."""
        for record in records:
            with self._state_lock:
                if isinstance(record, ChangeEvent) and record.op is Op.UPSERT:
                    self._open_group.add(record.doc_id)
                self._unpositioned += 1
                if record.position is not None:
                    self._inflight.append((record.position, self._open_group))
                    self._open_group, self._unpositioned = set(), 0
                    self._yielded_last = record.position
            yield record

    def _forget_inflight(self, position: str) -> None:
        with self._state_lock:
            self._committed_last = position
            if all(p != position for p, _ in self._inflight):
                return
            while self._inflight and self._inflight.popleft()[0] != position:
                pass

    def _inflight_docs(self, table: TableRef) -> set[str]:
        with self._state_lock:
            groups = [*(docs for _, docs in self._inflight), self._open_group]
            return {d for docs in groups for d in docs if d.startswith(table.prefix)}

    # --- the slot ------------------------------------------------------------------------------

    def _advance_pending(self) -> None:
        """Move confirmed_flush_lsn to the newest committed position (caller holds the slot lock)."""
        with self._state_lock:
            lsn, self._advanced_at = self._pending_lsn, time.monotonic()
        if lsn is None:
            return
        try:
            conn = self._commit_conn = self._commit_conn or self._connect()
            text = lsn_to_text(lsn)
            conn.execute(_ADVANCE_SQL, (text, self._slot, text))
        except psycopg.Error as exc:
            # The checkpoint is in the ledger already; the slot catches up on a later try.
            log.warning("slot not advanced", source=self.name, slot=self._slot, error=str(exc))
            _close(self._commit_conn)
            self._commit_conn = None
            return
        with self._state_lock:
            if self._pending_lsn == lsn:
                self._pending_lsn = None

    def _raise_if_permanent(self, exc: psycopg.Error) -> None:
        """Lost slots and errors that fail the same way again become SourceError; the rest
        (lost connections, timeouts, a slot busy for a moment) are retried."""
        if _is_lost_slot(exc):
            if _position_lsn(self._checkpoints.get_checkpoint(self.name) or SNAPSHOT_REQUIRED) is None:
                self._needs_snapshot = True  # nothing was checkpointed: just start over
                return
            log.error("replication slot lost", source=self.name, slot=self._slot, error=str(exc))
            raise SourceError(self._lost_message(str(exc).splitlines()[0])) from exc
        if not isinstance(exc, psycopg.OperationalError) or isinstance(exc, psycopg.errors.ObjectNotInPrerequisiteState):
            raise SourceError(f"{self.name}: {type(exc).__name__}: {exc}") from exc

    def _lost_message(self, what: str) -> str:
        checkpoint = self._checkpoints.get_checkpoint(self.name)
        return (
            f"replication slot {self._slot!r} is lost ({what}) while {self.name!r} has a checkpoint at "
            f"{checkpoint}: the changes after it can no longer be read. Recover with "
            f"`{RECOVERY_COMMAND}`, which re-creates the slot, re-reads the tables and deletes "
            "documents they no longer hold."
        )

    # --- set-up --------------------------------------------------------------------------------

    def _set_up(self, resnapshot: bool) -> tuple[tuple[TableRef, ...], dict[TableRef, dict[str, int]], bool]:
        try:
            with self._connect() as conn:
                _check_server(conn)
                tables = tuple(self._table(conn, label) for label in self._labels)
                types = {t: self._column_types(conn, t) for t in tables}
                self._ensure_publication(conn, tables)
                needs_snapshot = resnapshot or self._snapshot_due(conn)
        except psycopg.Error as exc:
            raise SourceError(f"{self.name}: cannot set up: {type(exc).__name__}: {exc}") from exc
        return tables, types, needs_snapshot

    def _table(self, conn: psycopg.Connection[TupleRow], label: str) -> TableRef:
        row = conn.execute(
            "SELECT n.nspname, c.relname, c.relreplident FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass(%s)",
            (label,),
        ).fetchone()
        if row is None:
            raise ConfigError(f"table {label!r} does not exist")
        schema, name, identity = row
        if identity != "f":
            raise ConfigError(
                f"table {label!r} needs REPLICA IDENTITY FULL (ALTER TABLE {label} REPLICA IDENTITY FULL): "
                "an UPDATE that leaves a TOASTed text unchanged sends its value only in the full old row"
            )
        return TableRef(label, str(schema), str(name), f"{label}/" if self._prefixed else "")

    def _column_types(self, conn: psycopg.Connection[TupleRow], table: TableRef) -> dict[str, int]:
        rows = conn.execute(
            "SELECT attname, atttypid::int FROM pg_attribute WHERE attrelid = %s::regclass "
            "AND attnum > 0 AND NOT attisdropped",
            (sql.Identifier(table.schema, table.name).as_string(conn),),
        ).fetchall()
        types = {str(n): int(t) for n, t in rows}
        missing = [c for c in self._columns.names if c not in types]
        if missing:
            raise ConfigError(f"table {table.label!r} has no column {missing[0]!r}")
        return types

    def _ensure_publication(self, conn: psycopg.Connection[TupleRow], tables: Sequence[TableRef]) -> None:
        pub = sql.Identifier(self._publication)
        flags = conn.execute(
            "SELECT pubinsert AND pubupdate AND pubdelete AND pubtruncate FROM pg_publication WHERE pubname = %s",
            (self._publication,),
        ).fetchone()
        names = sql.SQL(", ").join(sql.Identifier(t.schema, t.name) for t in tables)
        if flags is None:
            conn.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(pub, names))
            log.info("publication created", source=self.name, publication=self._publication)
            return
        if not flags[0]:
            raise ConfigError(f"publication {self._publication!r} must publish insert, update, delete and truncate")
        published = set(
            conn.execute(
                "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s",
                (self._publication,),
            ).fetchall()
        )
        for table in tables:
            if (table.schema, table.name) not in published:
                conn.execute(
                    sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(pub, sql.Identifier(table.schema, table.name))
                )

    def _snapshot_due(self, conn: psycopg.Connection[TupleRow]) -> bool:
        """True when the source must start with a snapshot; SourceError when the slot is lost."""
        checkpoint = self._checkpoints.get_checkpoint(self.name)
        if checkpoint is None or _position_lsn(checkpoint) is None:
            return True
        slot = conn.execute(
            "SELECT plugin, slot_type, database = current_database(), wal_status "
            "FROM pg_replication_slots WHERE slot_name = %s",
            (self._slot,),
        ).fetchone()
        if slot is None:
            raise SourceError(self._lost_message("it does not exist"))
        plugin, kind, same_database, wal_status = slot
        if (plugin, kind, same_database) != ("pgoutput", "logical", True):
            raise ConfigError(f"slot {self._slot!r} exists but is not a pgoutput slot of this database")
        if wal_status == "lost":
            raise SourceError(self._lost_message("the WAL it needs was removed"))
        return False

    # --- connections ---------------------------------------------------------------------------

    def _connect(
        self, *, autocommit: bool = True, replication: bool = False, idle_timeout_s: float = 0.0
    ) -> psycopg.Connection[TupleRow]:
        options = f"{_SESSION_OPTIONS} -c statement_timeout={int(self._statement_timeout_s * 1000)}"
        if idle_timeout_s:
            options += f" -c idle_in_transaction_session_timeout={int(idle_timeout_s * 1000)}"
        extra: dict[str, Any] = {"replication": "database"} if replication else {}
        return psycopg.connect(
            self._dsn,
            autocommit=autocommit,
            connect_timeout=max(2, round(self._connect_timeout_s)),
            options=options,
            client_encoding="UTF8",
            **extra,
        )

    def _reader(self) -> psycopg.Connection[TupleRow]:
        if self._reader_conn is None or self._reader_conn.closed:
            self._reader_conn = self._connect()
        return self._reader_conn

    def _drop_reader(self) -> None:
        _close(self._reader_conn)
        self._reader_conn = None
        self._txn = None

    def _layout(self, relation: Relation) -> _Layout | None:
        table = next((t for t in self.tables if (t.schema, t.name) == (relation.namespace, relation.name)), None)
        if table is None:
            return None
        columns = {c.name: (i, c.type_oid) for i, c in enumerate(relation.columns)}
        return _Layout(table, columns)


# --- rows to documents ---------------------------------------------------------------------------


def _rows_of(change: Insert | Update | Delete, layout: _Layout, columns: Columns) -> Iterator[_Row]:
    """The document changes of one row change: an UPDATE of the id is a delete plus an upsert."""
    old = change.old if isinstance(change, Update | Delete) else None
    full_old = old if isinstance(change, Update | Delete) and change.old_kind == "O" else None
    if isinstance(change, Delete):
        yield _deleted(layout, change.old, columns)
        return
    row = _upserted(layout, change.new, full_old, columns)
    if old is not None and row.doc_id is not None:
        gone = _deleted(layout, old, columns)
        if gone.doc_id is not None and gone.doc_id != row.doc_id:
            yield gone
    yield row


def _deleted(layout: _Layout, old: Sequence[Datum], columns: Columns) -> _Row:
    values = _texts(layout, old, None, (columns.id,))
    if isinstance(values, str) or values[columns.id] is None:
        return _Row(Op.DELETE, None, layout.table, reason="a deleted row's id is not in the old row", payload=repr(old)[:4096])
    return _Row(Op.DELETE, layout.table.doc_id(str(values[columns.id])), layout.table)


def _upserted(layout: _Layout, new: Sequence[Datum], old: Sequence[Datum] | None, columns: Columns) -> _Row:
    values = _texts(layout, new, old, columns.names)
    if isinstance(values, str):
        return _Row(Op.UPSERT, None, layout.table, reason=values, payload=repr(new)[:4096])
    types = {name: layout.columns[name][1] for name in columns.names}
    return _document(layout.table, values, types, columns)


def _texts(
    layout: _Layout, new: Sequence[Datum], old: Sequence[Datum] | None, names: Sequence[str]
) -> dict[str, str | None] | str:
    """The named columns' values as text; a reason string if one cannot be had."""
    out: dict[str, str | None] = {}
    for name in names:
        if name not in layout.columns:
            return f"table {layout.table.label!r} has no column {name!r} any more"
        index = layout.columns[name][0]
        datum = new[index] if index < len(new) else None
        if datum is UNCHANGED and old is not None and index < len(old):
            datum = old[index]
        if datum is UNCHANGED:
            return f"column {name!r} is an unchanged TOASTed value and the old row was not sent (REPLICA IDENTITY FULL?)"
        try:
            out[name] = None if datum is None else bytes(datum).decode("utf-8")
        except UnicodeDecodeError:
            return f"column {name!r} is not valid UTF-8"
    return out


def _document(table: TableRef, values: Mapping[str, str | None], types: Mapping[str, int], columns: Columns) -> _Row:
    """An upsert of the row's document, or a row with the reason it cannot be one."""
    payload = json.dumps(dict(values), ensure_ascii=False, sort_keys=True)
    row_id = values[columns.id]
    if row_id is None:
        return _Row(Op.UPSERT, None, table, reason="id is NULL", payload=payload)
    doc_id = table.doc_id(row_id)
    text = values[columns.text]
    if text is None:
        return _Row(Op.UPSERT, doc_id, table, reason="text is NULL", payload=payload)
    try:
        metadata = _metadata(values, types, columns)
    except InvalidEvent as exc:
        return _Row(Op.UPSERT, doc_id, table, reason=exc.reason, payload=payload)
    return _Row(Op.UPSERT, doc_id, table, text, metadata, payload=payload)


def _metadata(values: Mapping[str, str | None], types: Mapping[str, int], columns: Columns) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    if columns.metadata_json is not None:
        raw = values[columns.metadata_json]
        parsed = None if raw is None else _json(raw, columns.metadata_json)
        if parsed is not None and not isinstance(parsed, dict):
            raise InvalidEvent(f"metadata column {columns.metadata_json!r} does not hold a JSON object")
        metadata.update(parsed or {})
    for name in columns.metadata:
        metadata[name] = _value(types[name], values[name], name)
    return metadata


def _value(type_oid: int, text: str | None, name: str) -> object:
    """A column's pg text as a JSON value: numbers, booleans and JSON stay what they are;
    everything else (numeric, timestamps, uuid, ...) keeps its text, so no digits are lost."""
    if text is None:
        return None
    if type_oid in _INT_OIDS:
        return int(text)
    if type_oid in _FLOAT_OIDS:
        number = float(text)
        return number if number == number and abs(number) != float("inf") else text
    if type_oid == _BOOL_OID:
        return text == "t"
    if type_oid in _JSON_OIDS:
        return _json(text, name)
    return text


def _json(text: str, name: str) -> object:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InvalidEvent(f"column {name!r} is not valid JSON: {exc}") from exc


def _bad_row(reason: str, payload: str, position: str | None, doc_id: str | None) -> SourceRecord:
    log.warning("bad_record", position=position, doc_id=doc_id, reason=reason)
    return bad_record(reason, payload, position, doc_id)


# --- module helpers ------------------------------------------------------------------------------


def _positioned(
    rows: Iterable[_Row],
    version: int,
    final: str | None,
    progress: Callable[[int], str] | None = None,
    every: int = 0,
) -> Iterator[SourceRecord]:
    """Records at ``version``; the last one carries ``final``, and with ``progress`` every
    ``every``-th one carries ``progress(n)`` (one row of look-ahead finds the last)."""
    held: _Row | None = None
    count = 0
    for row in rows:
        if held is not None:
            count += 1
            middle = progress(count) if progress is not None and count % every == 0 else None
            yield held.record(version, middle)
        held = row
    if held is not None:
        yield held.record(version, final)


def _merge(rows: Iterator[tuple[str, _Row]], docs: Iterator[tuple[str, _Row]]) -> Iterator[_Row]:
    """Both inputs in ascending key order: every row, plus every doc whose key no row has.

    Keys are checked to ascend: a ledger in another collation than the table's sort would
    otherwise turn into wrong deletes.
    """
    row, doc = next(rows, None), next(docs, None)
    last_row = last_doc = ""
    while row is not None or doc is not None:
        if doc is not None and (row is None or doc[0] < row[0]):
            last_doc = _ascending(last_doc, doc[0], "ledger")
            yield doc[1]
            doc = next(docs, None)
            continue
        assert row is not None, "the loop runs while one input is left"
        last_row = _ascending(last_row, row[0], "table")
        if doc is not None and doc[0] == row[0]:
            doc = next(docs, None)
        yield row[1]
        row = next(rows, None)


def _ascending(previous: str, key: str, what: str) -> str:
    if key < previous:
        raise SourceError(f"the {what} is not in code point order ({key!r} after {previous!r})")
    return key


def _load_as_text(cursor: psycopg.ServerCursor[TupleRow]) -> None:
    """Every column as the text of its type's output function, exactly what pgoutput sends."""
    for column in cursor.description or ():
        cursor.adapters.register_loader(column.type_code, TextLoader)


def _pages(cursor: psycopg.ServerCursor[TupleRow]) -> Iterator[Any]:
    while page := cursor.fetchmany(FETCH_ROWS):
        yield from page


def _flushed_lsn(conn: psycopg.Connection[TupleRow]) -> int:
    """WAL flushed so far: a peek up to it has seen every transaction committed before it."""
    row = conn.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()
    assert row is not None, "the function answers one row"
    return lsn_to_int(str(row[0]))


def _decoded(data: bytes) -> object:
    try:
        return decode(data)
    except PgOutputError as exc:
        raise SourceError(f"undecodable pgoutput message: {exc}") from exc


def _position_lsn(position: str) -> int | None:
    """The LSN a stream position names; None for snapshot progress and the snapshot marker."""
    if position.startswith(SNAPSHOT_POSITION_PREFIX) or position == SNAPSHOT_REQUIRED:
        return None
    try:
        return lsn_to_int(position)
    except ValueError as exc:
        raise SourceError(f"not a Postgres logical replication position: {position!r}") from exc


def _is_lost_slot(exc: psycopg.Error) -> bool:
    """The slot was invalidated (55000 "can no longer access") or dropped (42704)."""
    message = str(exc)
    lost = isinstance(exc, psycopg.errors.ObjectNotInPrerequisiteState) and "replication slot" in message
    missing = isinstance(exc, psycopg.errors.UndefinedObject) and "replication slot" in message
    return lost or missing


def _check_server(conn: psycopg.Connection[TupleRow]) -> None:
    settings: dict[str, str] = dict(
        conn.execute(
            "SELECT name, setting FROM pg_settings WHERE name IN ('wal_level', 'server_encoding')"
        ).fetchall()
    )
    if settings.get("wal_level") != "logical":
        raise ConfigError(f"wal_level is {settings.get('wal_level')!r}; logical replication needs 'logical'")
    if settings.get("server_encoding") != "UTF8":
        raise ConfigError(f"the database encoding is {settings.get('server_encoding')!r}; UTF8 is required")


def _check_arguments(tables: Sequence[str], slot: str, publication: str, prefixed: bool) -> None:
    if not tables:
        raise ConfigError("a Postgres logical replication source needs at least one table")
    if len(tables) > 1 and not prefixed:
        raise ConfigError("several tables need table_prefix_ids, or their ids would collide")
    if any("/" in table for table in tables):
        raise ConfigError("table names must not contain '/', which separates them from ids in doc_ids")
    for what, value in (("slot", slot), ("publication", publication)):
        if not NAME_PATTERN.fullmatch(value):
            raise ConfigError(f"{what} name {value!r} must be a lower-case identifier")


def _sleep(seconds: float, stop: Callable[[], bool]) -> None:
    deadline = time.monotonic() + seconds
    while not stop() and (left := deadline - time.monotonic()) > 0:
        time.sleep(min(SLEEP_SLICE_S, left))


def _never() -> bool:
    return False


def _close(conn: psycopg.Connection[TupleRow] | None) -> None:
    if conn is not None:
        with suppress(psycopg.Error):
            conn.close()
