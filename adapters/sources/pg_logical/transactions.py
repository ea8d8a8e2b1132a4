"""pgoutput messages assembled into transactions, and transactions into records. Pure: no I/O.

Versions and positions: every change of a transaction gets version = the transaction's end LSN
(``Commit.end_lsn``, the LSN after its commit record). The commit record's own LSN would not do:
a transaction whose commit record starts exactly at the snapshot's consistent point is streamed,
not in the snapshot, and would tie with the snapshot's version. A version must name one state, so
only the last change of each document in a transaction is emitted (an UPDATE of the key is a
delete of the old id plus an upsert of the new one; a TRUNCATE deletes every known document of
the table at that point). Only the last record of a transaction carries a position: the end LSN
as pg_lsn text.

A transaction of more than ``buffer_max`` row changes is not held in memory: its first pass
learns each document's last change, then the assembler asks for the peek to be started over
(``restart_peek``) and emits the final changes on the second pass, as it goes.

Within one process a transaction already delivered is never delivered again, though each peek
starts over at the slot's position: its Begin is recognised by its LSN and it is skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain

import structlog

from adapters.sources.pg_logical.rows import Columns, Layout, Row, TableRef, positioned, rows_of
from adapters.sources.pgoutput import Begin, Commit, Delete, Insert, Relation, Truncate, Update, lsn_to_text
from coordinator.events import Op
from coordinator.ports import SourceRecord

log = structlog.get_logger(__name__)


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
    rows: dict[str, Row] = field(default_factory=dict)
    bad: list[Row] = field(default_factory=list)
    bad_last: int = -1
    truncated: dict[TableRef, int] = field(default_factory=dict)
    oversized: bool = False

    def add(self, row: Row) -> None:
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

    def replayed(self, row: Row) -> Row | None:
        """In the second pass: the row (or the delete replacing it) if it is final, else None."""
        self.index += 1
        assert self.replay is not None, "only a replayed transaction has a second pass"
        if row.doc_id is None:
            return row
        if self.replay.last.get(row.doc_id) != self.index:
            return None
        return _truncated_instead(row, self.replay.truncated, self.index)

    def final_rows(self) -> Iterator[Row]:
        """The last change of every document, a TRUNCATE after it turning it into a delete."""
        for doc_id, row in self.rows.items():
            yield _truncated_instead(row, self.truncated, self.last[doc_id])
        yield from self.bad

    def to_replay(self, end_lsn: int) -> _Replay:
        final = max(max(self.last.values(), default=-1), self.bad_last)
        return _Replay(self.commit_lsn, end_lsn, dict(self.last), dict(self.truncated), final)


def _truncated_instead(row: Row, truncated: Mapping[TableRef, int], index: int) -> Row:
    if row.table is not None and truncated.get(row.table, -1) > index:
        return Row(Op.DELETE, row.doc_id, row.table)
    return row


class TransactionAssembler:
    """Turns the messages of successive peeks into records: one state per document per
    transaction, transactions delivered once, oversized ones in two passes.

    ``docs_of(table)``: the documents known to be in ``table`` (those a TRUNCATE deletes), in
    the order their deletes are emitted.
    """

    def __init__(
        self,
        tables: Sequence[TableRef],
        columns: Columns,
        buffer_max: int,
        docs_of: Callable[[TableRef], Iterable[str]],
        *,
        name: str,
    ) -> None:
        self.name = name
        self._tables = tuple(tables)
        self._columns = columns
        self._buffer_max = buffer_max
        self._docs_of = docs_of
        self._layouts: dict[int, Layout | None] = {}
        self._txn: _Txn | None = None
        self._replay: _Replay | None = None
        self._delivered_lsn = -1
        # Inside a transaction delivered before: its messages are passed over.
        self.skipping = False
        # An oversized transaction was counted: the peek must start over for its second pass.
        self.restart_peek = False

    @property
    def replaying(self) -> bool:
        """True between an oversized transaction's two passes."""
        return self._replay is not None

    def on_message(self, message: object) -> Iterator[SourceRecord]:
        if isinstance(message, Relation):
            self._layouts[message.oid] = self._layout(message)
        elif isinstance(message, Begin):
            yield from self._begin(message)
        elif isinstance(message, Insert | Update | Delete):
            yield from self._row_change(message)
        elif isinstance(message, Truncate):
            self._truncate(message)
        elif isinstance(message, Commit):
            yield from self._commit(message)

    def start_peek(self) -> None:
        self.restart_peek = False

    def end_peek(self) -> None:
        """A peek's answer ended (or failed): a transaction left open there comes again whole."""
        self._txn, self.skipping = None, False

    def forget_delivered(self) -> None:
        """After a snapshot: the new slot's transactions all come after it, none was delivered."""
        self._delivered_lsn = -1

    def _begin(self, begin: Begin) -> Iterator[SourceRecord]:
        self.skipping = begin.final_lsn <= self._delivered_lsn
        if self.skipping:
            self._txn = None
            return
        replay = self._replay if self._replay and self._replay.commit_lsn == begin.final_lsn else None
        self._txn = _Txn(begin.final_lsn, self._buffer_max, replay)
        if replay is not None:
            # The second pass emits as it goes, so the truncation deletes come first; they
            # carry the position only if no row change of the transaction is emitted.
            position = lsn_to_text(replay.end_lsn) if replay.final_index < 0 else None
            deletes = self._truncation_deletes(replay.truncated, replay.last)
            yield from positioned(deletes, replay.end_lsn, position)

    def _row_change(self, change: Insert | Update | Delete) -> Iterator[SourceRecord]:
        txn = self._txn
        layout = self._layouts.get(change.relation_oid)
        if txn is None or layout is None:
            return
        for row in rows_of(change, layout, self._columns):
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
        txn, self._txn, self.skipping = self._txn, None, False
        if txn is None:
            return
        if txn.oversized and txn.replay is None:
            log.info("transaction replayed", source=self.name, changes=txn.index + 1, lsn=commit.end_lsn)
            self._replay = txn.to_replay(commit.end_lsn)
            self.restart_peek = True
            return
        if txn.replay is None:
            deletes = self._truncation_deletes(txn.truncated, txn.last)
            rows = chain(deletes, txn.final_rows())
            yield from positioned(rows, commit.end_lsn, lsn_to_text(commit.end_lsn))
        self._replay = None
        self._delivered_lsn = commit.commit_lsn

    def _truncation_deletes(self, truncated: Mapping[TableRef, int], touched: Mapping[str, int]) -> Iterator[Row]:
        """Deletes of every document known to be in a truncated table and not touched again in
        the transaction (``docs_of`` is asked when its table's turn comes)."""
        for table in truncated:
            for doc_id in self._docs_of(table):
                if doc_id not in touched:
                    yield Row(Op.DELETE, doc_id, table)

    def _layout(self, relation: Relation) -> Layout | None:
        table = next((t for t in self._tables if (t.schema, t.name) == (relation.namespace, relation.name)), None)
        if table is None:
            return None
        columns = {c.name: (i, c.type_oid) for i, c in enumerate(relation.columns)}
        return Layout(table, columns)
