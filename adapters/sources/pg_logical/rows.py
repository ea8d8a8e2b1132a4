"""Row changes as document changes: which columns make a document, and how a row's values (as
pgoutput or the snapshot sends them, the text of each type's output function) become a
ChangeEvent or, when they cannot, a BadRecord with the reason. Pure: no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from adapters.sources.base import bad_record
from adapters.sources.pgoutput import UNCHANGED, Datum, Delete, Insert, Update
from coordinator.errors import InvalidEvent
from coordinator.events import ChangeEvent, Op
from coordinator.ports import SourceRecord

# Type oids whose text becomes a JSON number, boolean or value in a document's metadata.
_BOOL_OID = 16
_INT_OIDS = frozenset({20, 21, 23, 26})
_FLOAT_OIDS = frozenset({700, 701})
_JSON_OIDS = frozenset({114, 3802})
# A bad row keeps at most this much of its values' repr as its dead letter's payload.
_PAYLOAD_CHARS_MAX = 4096

log = structlog.get_logger(__name__)


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
class Row:
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
class Layout:
    """Where the configured columns sit in a relation's rows: name -> (index, type oid)."""

    table: TableRef
    columns: Mapping[str, tuple[int, int]]


def rows_of(change: Insert | Update | Delete, layout: Layout, columns: Columns) -> Iterator[Row]:
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


def _deleted(layout: Layout, old: Sequence[Datum], columns: Columns) -> Row:
    values = _texts(layout, old, None, (columns.id,))
    if isinstance(values, str) or values[columns.id] is None:
        return Row(Op.DELETE, None, layout.table, reason="a deleted row's id is not in the old row", payload=repr(old)[:_PAYLOAD_CHARS_MAX])
    return Row(Op.DELETE, layout.table.doc_id(str(values[columns.id])), layout.table)


def _upserted(layout: Layout, new: Sequence[Datum], old: Sequence[Datum] | None, columns: Columns) -> Row:
    values = _texts(layout, new, old, columns.names)
    if isinstance(values, str):
        return Row(Op.UPSERT, None, layout.table, reason=values, payload=repr(new)[:_PAYLOAD_CHARS_MAX])
    types = {name: layout.columns[name][1] for name in columns.names}
    return document(layout.table, values, types, columns)


def _texts(
    layout: Layout, new: Sequence[Datum], old: Sequence[Datum] | None, names: Sequence[str]
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


def document(table: TableRef, values: Mapping[str, str | None], types: Mapping[str, int], columns: Columns) -> Row:
    """An upsert of the row's document, or a row with the reason it cannot be one."""
    payload = json.dumps(dict(values), ensure_ascii=False, sort_keys=True)
    row_id = values[columns.id]
    if row_id is None:
        return Row(Op.UPSERT, None, table, reason="id is NULL", payload=payload)
    doc_id = table.doc_id(row_id)
    text = values[columns.text]
    if text is None:
        return Row(Op.UPSERT, doc_id, table, reason="text is NULL", payload=payload)
    try:
        metadata = _metadata(values, types, columns)
    except InvalidEvent as exc:
        return Row(Op.UPSERT, doc_id, table, reason=exc.reason, payload=payload)
    return Row(Op.UPSERT, doc_id, table, text, metadata, payload=payload)


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


def positioned(
    rows: Iterable[Row],
    version: int,
    final: str | None,
    progress: Callable[[int], str] | None = None,
    every: int = 0,
) -> Iterator[SourceRecord]:
    """Records at ``version``; the last one carries ``final``, and with ``progress`` every
    ``every``-th one carries ``progress(n)`` (one row of look-ahead finds the last)."""
    held: Row | None = None
    count = 0
    for row in rows:
        if held is not None:
            count += 1
            middle = progress(count) if progress is not None and count % every == 0 else None
            yield held.record(version, middle)
        held = row
    if held is not None:
        yield held.record(version, final)
