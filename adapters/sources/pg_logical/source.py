"""Postgres logical replication as a ChangeSource: the slot's transactions, after an initial
snapshot, through ``wal.py`` (peeks), ``transactions.py`` (records), ``snapshot.py`` and
``slot.py`` (set-up).

Snapshot, then stream, with no gap: on the first start (no checkpoint) the slot is created with
an exported snapshot and every table is read inside it (``snapshot.py``); the slot then yields
exactly the transactions committed after the snapshot, each with a larger version.

Checkpoints: ``commit(position)`` writes the position to the ledger's checkpoint table, then
advances the slot's ``confirmed_flush_lsn`` to it, so the slot never passes the low watermark.
(When every record yielded is committed and a peek up to the flushed WAL found nothing new, the
slot moves to that LSN: nothing of ours lies before it, and other tables' WAL is not held back.)
After a crash (of lockstep or of Postgres, whose slots persist at checkpoints) the slot may
resend transactions; the ledger's version gate makes them no-ops. Within one process a
transaction already yielded is never yielded again (``transactions.py``). A snapshot counts as
done once a position of its end or later is committed; an unfinished one is started over with a
new slot.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from itertools import chain

import psycopg
import structlog
from psycopg.rows import TupleRow

from adapters.sources.pg_logical import slot as slots
from adapters.sources.pg_logical.inflight import InFlight
from adapters.sources.pg_logical.positions import SNAPSHOT_REQUIRED, position_lsn
from adapters.sources.pg_logical.rows import Columns, TableRef
from adapters.sources.pg_logical.sessions import Connector, Outage, close, sleep
from adapters.sources.pg_logical.settings import PgLogicalSourceSettings
from adapters.sources.pg_logical.snapshot import (
    SNAPSHOT_POSITION_ROWS,
    snapshot_records,
    snapshot_transaction,
)
from adapters.sources.pg_logical.transactions import TransactionAssembler
from adapters.sources.pg_logical.wal import advance, decoded, flushed_lsn, peek
from adapters.sources.pgoutput import lsn_to_text
from coordinator.errors import ConfigError, SourceError
from coordinator.ports import CheckpointStore, KnownDocs, SourceRecord

# commit() advances the slot at most this often from the caller's thread; the reader moves it
# after every peek anyway. Advancing decodes WAL, so doing it on every checkpoint would be waste.
ADVANCE_INTERVAL_S = 1.0
# How long close() waits for a running peek before advancing the slot one last time.
CLOSE_WAIT_S = 10.0

log = structlog.get_logger(__name__)


class PgLogicalSource:
    """Change events from Postgres tables through a pgoutput logical replication slot.

    ``resnapshot`` re-creates the slot and re-reads the tables (``lockstep source resnapshot``);
    ``snapshot_position_rows``: how often a snapshot record carries a progress position.
    """

    def __init__(
        self,
        settings: PgLogicalSourceSettings,
        checkpoints: CheckpointStore,
        known: KnownDocs,
        *,
        resnapshot: bool = False,
        snapshot_position_rows: int = SNAPSHOT_POSITION_ROWS,
    ) -> None:
        slots.check_names(settings.tables, settings.slot, settings.publication, settings.table_prefix_ids)
        if min(settings.peek_changes_max, settings.txn_buffer_changes_max, snapshot_position_rows) < 1:
            raise ConfigError("peek, buffer and snapshot position sizes must be at least 1")
        self.name = settings.name
        self._settings = settings
        self._slot = settings.slot
        self._checkpoints = checkpoints
        self._known = known
        self._columns = Columns(
            settings.id_column, settings.text_column, settings.metadata_column, settings.metadata_columns
        )
        self._snapshot_position_rows = snapshot_position_rows
        self._connect = Connector(
            settings.dsn.get_secret_value(), settings.connect_timeout_s, settings.statement_timeout_s
        )
        # Reader-thread state.
        self._reader_conn: psycopg.Connection[TupleRow] | None = None
        self._skipped_rows = 0
        self._caught_up = False
        # Shared with commit() (the caller's thread): the slot, the advance and in-flight docs.
        self._slot_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._commit_conn: psycopg.Connection[TupleRow] | None = None
        self._pending_lsn: int | None = None
        self._advanced_at = 0.0
        self._inflight = InFlight()
        self.tables, self._types, self._needs_snapshot = self._set_up(resnapshot)
        self._assembler = TransactionAssembler(
            self.tables, self._columns, settings.txn_buffer_changes_max, self._docs_of, name=self.name
        )

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
        lsn = position_lsn(position)
        self._inflight.committed(position)
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
        close(self._commit_conn)
        self._commit_conn = None

    # --- streaming ---------------------------------------------------------------------------

    def _stream(self, stop: Callable[[], bool], *, follow: bool) -> Iterator[SourceRecord]:
        outage = Outage(self._settings.outage_max_s)
        try:
            while not stop():
                try:
                    yield from self._inflight.tracked(self._step())
                except psycopg.Error as exc:
                    self._raise_if_permanent(exc)
                    self._drop_reader()
                    outage.wait(exc, stop)
                    continue
                outage.reset()
                if self._caught_up and not follow:
                    return
                if self._caught_up:
                    sleep(self._settings.poll_interval_s, stop)
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
        assembler = self._assembler
        limit = self._settings.peek_changes_max + self._skipped_rows
        rows = skipped = 0
        assembler.start_peek()
        conn = self._reader()
        upto = flushed_lsn(conn)
        try:
            publication = self._settings.publication
            with peek(conn, self._slot, publication, upto=upto, limit=limit, slot_lock=self._slot_lock) as answer:
                for _lsn, data in answer:
                    rows += 1
                    skipping = assembler.skipping
                    yield from assembler.on_message(decoded(data))
                    skipped += skipping or assembler.skipping
                    if assembler.restart_peek:
                        break
        finally:
            assembler.end_peek()
        self._skipped_rows = skipped
        self._caught_up = rows < limit and not assembler.restart_peek
        if self._caught_up:
            self._advance_when_idle(upto)

    def _advance_when_idle(self, upto: int) -> None:
        """Let the slot move to ``upto`` when every transaction decoded before it was delivered
        and every delivered record is committed, though no record of ours stands there: WAL of
        other tables would otherwise pile up behind a quiet table."""
        if self._inflight.settled() and not self._assembler.replaying:
            with self._state_lock:
                self._pending_lsn = max(upto, self._pending_lsn or 0)

    def _docs_of(self, table: TableRef) -> Iterator[str]:
        """The documents a TRUNCATE of ``table`` deletes: those yielded but not yet committed,
        then the ledger's."""
        inflight = self._inflight.docs(table.prefix)
        ledger = (d.doc_id for d in self._known.iter_docs() if d.doc_id.startswith(table.prefix))
        return chain(sorted(inflight), (d for d in ledger if d not in inflight))

    # --- the snapshot --------------------------------------------------------------------------

    def _snapshot(self) -> Iterator[SourceRecord]:
        """Re-create the slot with an exported snapshot, then read every table inside it."""
        if self._checkpoints.get_checkpoint(self.name) not in (None, SNAPSHOT_REQUIRED):
            # A crash during this snapshot must not leave a checkpoint that looks complete.
            self._checkpoints.set_checkpoint(self.name, SNAPSHOT_REQUIRED)
        with self._slot_lock, self._connect() as conn:
            slots.drop_slot(conn, self._slot)
        with snapshot_transaction(self._connect, self._slot, source=self.name) as (conn, cp):
            every = self._snapshot_position_rows
            yield from snapshot_records(conn, cp, self.tables, self._types, self._columns, self._known, every=every)
        self._needs_snapshot = False
        self._assembler.forget_delivered()
        log.info("snapshot read", source=self.name, slot=self._slot, consistent_point=lsn_to_text(cp))

    # --- the slot ------------------------------------------------------------------------------

    def _advance_pending(self) -> None:
        """Move confirmed_flush_lsn to the newest committed position (caller holds the slot lock)."""
        with self._state_lock:
            lsn, self._advanced_at = self._pending_lsn, time.monotonic()
        if lsn is None:
            return
        try:
            conn = self._commit_conn = self._commit_conn or self._connect()
            advance(conn, self._slot, lsn)
        except psycopg.Error as exc:
            # The checkpoint is in the ledger already; the slot catches up on a later try.
            log.warning("slot not advanced", source=self.name, slot=self._slot, error=str(exc))
            close(self._commit_conn)
            self._commit_conn = None
            return
        with self._state_lock:
            if self._pending_lsn == lsn:
                self._pending_lsn = None

    def _raise_if_permanent(self, exc: psycopg.Error) -> None:
        """Lost slots and errors that fail the same way again become SourceError; the rest
        (lost connections, timeouts, a slot busy for a moment) are retried."""
        if slots.is_lost_slot(exc):
            checkpoint = self._checkpoints.get_checkpoint(self.name)
            if position_lsn(checkpoint or SNAPSHOT_REQUIRED) is None:
                self._needs_snapshot = True  # nothing was checkpointed: just start over
                return
            log.error("replication slot lost", source=self.name, slot=self._slot, error=str(exc))
            what = str(exc).splitlines()[0]
            raise SourceError(slots.lost_message(self.name, self._slot, checkpoint, what)) from exc
        if not isinstance(exc, psycopg.OperationalError) or isinstance(exc, psycopg.errors.ObjectNotInPrerequisiteState):
            raise SourceError(f"{self.name}: {type(exc).__name__}: {exc}") from exc

    # --- connections and set-up ------------------------------------------------------------------

    def _reader(self) -> psycopg.Connection[TupleRow]:
        if self._reader_conn is None or self._reader_conn.closed:
            self._reader_conn = self._connect()
        return self._reader_conn

    def _drop_reader(self) -> None:
        close(self._reader_conn)
        self._reader_conn = None
        self._assembler.end_peek()

    def _set_up(self, resnapshot: bool) -> tuple[tuple[TableRef, ...], dict[TableRef, dict[str, int]], bool]:
        settings = self._settings
        try:
            with self._connect() as conn:
                slots.check_server(conn)
                tables = tuple(slots.table_ref(conn, label, settings.table_prefix_ids) for label in settings.tables)
                types = {t: slots.column_types(conn, t, self._columns) for t in tables}
                slots.ensure_publication(conn, settings.publication, tables, source=self.name)
                checkpoint = self._checkpoints.get_checkpoint(self.name)
                needs_snapshot = resnapshot or slots.snapshot_due(conn, self._slot, checkpoint, source=self.name)
        except psycopg.Error as exc:
            raise SourceError(f"{self.name}: cannot set up: {type(exc).__name__}: {exc}") from exc
        return tables, types, needs_snapshot


def _never() -> bool:
    return False
