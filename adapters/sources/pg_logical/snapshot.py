"""The initial snapshot: every table read inside the snapshot a new slot exported, so that the
slot then yields exactly the transactions committed after it (snapshot, then stream, no gap).

Snapshot rows get version = the slot's consistent point ``cp``; streamed transactions all have
larger versions. The snapshot also reconciles: a live ledger document the tables do not hold at
``cp`` gets a delete at version ``cp`` (the recovery path relies on it).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from itertools import chain

import psycopg
import structlog
from psycopg import sql
from psycopg.rows import TupleRow
from psycopg.types.string import TextLoader

from adapters.sources.pg_logical.positions import snapshot_progress
from adapters.sources.pg_logical.rows import Columns, Row, TableRef, document, positioned
from adapters.sources.pg_logical.sessions import Connector, close
from adapters.sources.pg_logical.slot import create_slot
from adapters.sources.pgoutput import lsn_to_text
from coordinator.errors import SourceError
from coordinator.events import Op
from coordinator.ports import KnownDocs, SourceRecord

# The snapshot transaction sits idle while the indexes push back; past this the server ends it
# and the snapshot starts over with a new slot (nothing was checkpointed, nothing is lost).
SNAPSHOT_IDLE_TIMEOUT_S = 3600.0
# Snapshot records carry a progress position this often, so documents leave the in-flight set.
SNAPSHOT_POSITION_ROWS = 500
# Rows fetched per round trip from the snapshot's server-side cursor.
FETCH_ROWS = 500

log = structlog.get_logger(__name__)


@contextmanager
def snapshot_transaction(
    connect: Connector, slot: str, *, source: str
) -> Iterator[tuple[psycopg.Connection[TupleRow], int]]:
    """Create ``slot`` (which must not exist) with an exported snapshot; yield a REPEATABLE READ
    transaction in that snapshot and the slot's consistent point."""
    replication = connect(replication=True)
    try:
        cp, snapshot_name = create_slot(replication, slot)
        conn = connect(autocommit=False, idle_timeout_s=SNAPSHOT_IDLE_TIMEOUT_S)
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
    log.info("slot created", source=source, slot=slot, consistent_point=lsn_to_text(cp))
    try:
        yield conn, cp
    finally:
        close(conn)


def snapshot_records(
    conn: psycopg.Connection[TupleRow],
    cp: int,
    tables: Sequence[TableRef],
    types: Mapping[TableRef, Mapping[str, int]],
    columns: Columns,
    known: KnownDocs,
    *,
    every: int,
) -> Iterator[SourceRecord]:
    """Every table's records at version ``cp``; the last carries ``cp`` as its position, and
    every ``every``-th one a snapshot progress position."""
    position = lsn_to_text(cp)
    rows = chain.from_iterable(_table_snapshot(conn, t, cp, types[t], columns, known) for t in tables)
    yield from positioned(rows, cp, position, lambda n: snapshot_progress(position, n), every)


def _table_snapshot(
    conn: psycopg.Connection[TupleRow],
    table: TableRef,
    cp: int,
    types: Mapping[str, int],
    columns: Columns,
    known: KnownDocs,
) -> Iterator[Row]:
    """The table's rows in doc_id order, merged with the ledger's live documents of it: a
    row is an upsert, a ledger document the table lacks (at ``cp``) a delete."""
    rows = _table_rows(conn, table, types, columns)
    docs = (d for d in known.iter_docs() if d.doc_id.startswith(table.prefix) and d.version < cp)
    yield from merge(rows, ((d.doc_id, Row(Op.DELETE, d.doc_id, table)) for d in docs))


def _table_rows(
    conn: psycopg.Connection[TupleRow], table: TableRef, types: Mapping[str, int], columns: Columns
) -> Iterator[tuple[str, Row]]:
    names = columns.names
    # format('%s', x) is x's output function, as pgoutput sends it (x::text is not: a
    # boolean casts to 'true' but is output as 't'); NULL ids become '' and sort first.
    query = sql.SQL("SELECT {} FROM {} ORDER BY format('%s', {}) COLLATE \"C\"").format(
        sql.SQL(", ").join(map(sql.Identifier, names)),
        sql.Identifier(table.schema, table.name),
        sql.Identifier(columns.id),
    )
    with conn.cursor(name="lockstep_snapshot") as cursor:
        cursor.itersize = FETCH_ROWS
        cursor.execute(query)
        _load_as_text(cursor)
        for values in cursor:
            row = document(table, dict(zip(names, values, strict=True)), types, columns)
            yield (row.doc_id or ""), row


def merge(rows: Iterator[tuple[str, Row]], docs: Iterator[tuple[str, Row]]) -> Iterator[Row]:
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
