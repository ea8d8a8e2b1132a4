"""Reading the slot's WAL and moving the slot: pgoutput through the SQL interface.

psycopg 3 does not speak the streaming replication protocol, so changes are read with
``pg_logical_slot_peek_binary_changes`` on an ordinary connection and decoded by
``adapters/sources/pgoutput.py``; the slot is moved with ``pg_replication_slot_advance``. A peek
never consumes: every peek starts over at the slot's ``confirmed_flush_lsn``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from itertools import chain
from typing import Any

import psycopg
from psycopg.rows import TupleRow

from adapters.sources.pgoutput import PgOutputError, decode, lsn_to_int, lsn_to_text
from coordinator.errors import SourceError

# Rows fetched per round trip from the peek's server-side cursor.
FETCH_ROWS = 500

_PEEK_SQL = (
    "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes("
    "%s::name, %s::pg_lsn, %s::int4, 'proto_version', '1', 'publication_names', %s::text)"
)
_ADVANCE_SQL = (
    "SELECT pg_replication_slot_advance(slot_name, %s::pg_lsn)::text FROM pg_replication_slots "
    "WHERE slot_name = %s AND confirmed_flush_lsn < %s::pg_lsn"
)


@contextmanager
def peek(
    conn: psycopg.Connection[TupleRow],
    slot: str,
    publication: str,
    *,
    upto: int,
    limit: int,
    slot_lock: threading.Lock,
) -> Iterator[Iterator[Any]]:
    """The slot's changes up to LSN ``upto`` (at most ``limit`` rows, whole transactions), as
    ``(lsn, data)`` rows. The slot serves one backend at a time, so the peek itself runs under
    ``slot_lock``; its answer is read afterwards."""
    # WITH HOLD: the answer is materialized when DECLARE's implicit transaction commits, so
    # no transaction stays open (holding back vacuum) while records wait on backpressure.
    cursor = conn.cursor(name="lockstep_peek", withhold=True)
    try:
        with slot_lock:
            cursor.execute(_PEEK_SQL, (slot, lsn_to_text(upto), limit, publication))
            first = cursor.fetchmany(FETCH_ROWS)
        yield chain(first, _pages(cursor))
    finally:
        with suppress(psycopg.Error):  # the connection may be the reason we are leaving
            cursor.close()


def advance(conn: psycopg.Connection[TupleRow], slot: str, lsn: int) -> None:
    """Move the slot's confirmed_flush_lsn forward to ``lsn`` (never back)."""
    text = lsn_to_text(lsn)
    conn.execute(_ADVANCE_SQL, (text, slot, text))


def flushed_lsn(conn: psycopg.Connection[TupleRow]) -> int:
    """WAL flushed so far: a peek up to it has seen every transaction committed before it."""
    row = conn.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()
    assert row is not None, "the function answers one row"
    return lsn_to_int(str(row[0]))


def decoded(data: bytes) -> object:
    try:
        return decode(data)
    except PgOutputError as exc:
        raise SourceError(f"undecodable pgoutput message: {exc}") from exc


def _pages(cursor: psycopg.ServerCursor[TupleRow]) -> Iterator[Any]:
    while page := cursor.fetchmany(FETCH_ROWS):
        yield from page
