"""A SQL table as a change source, read incrementally by an ``(updated_at, id)`` watermark.

Each row is a document: ``id_column`` is its ID (as a string), ``text_column`` its text, and its
metadata the JSON object in ``metadata_json_column`` (if given) overlaid with the values of
``metadata_columns``. Rows are read in ``(updated_at, id)`` order, in pages of ``batch_rows``.

Positions and checkpoints: a position is the composite watermark ``[updated_at, id]`` of a row,
as canonical JSON. ``commit(position)`` records "the position after the last applied event";
``read()`` resumes with the rows strictly after it, i.e. ``updated_at > ts`` or ``updated_at = ts
and id > id``, so rows sharing a timestamp are neither skipped nor read again forever. Both parts
are kept exactly as the database driver returns them (no type conversion on the way out or back
in), so the comparison the database makes is the one its ``ORDER BY`` made.

Versions: ``version_column`` if given, else ``updated_at`` as integer microseconds since the Unix
epoch (a naive timestamp is read as UTC). Either way it must grow with every change of a row,
including a soft delete and a re-insert after a hard delete; a change that does not raise it is
ignored by the ledger's version gate.

What the watermark cannot see, by design of ``updated_at`` watermarks: a change that does not
bump ``updated_at`` (set ``deleted_at`` *and* ``updated_at`` together), rows whose ``updated_at``
is NULL, and rows committed late with a timestamp below an already committed watermark. Hard
deletes are found by ``reconcile_ids()``; the rest by the auditor through ``iter_current()``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, NamedTuple

import structlog
from sqlalchemy import (
    Column,
    ColumnElement,
    MetaData,
    Row,
    Select,
    Table,
    and_,
    create_engine,
    make_url,
    or_,
    select,
    type_coerce,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import NoSuchTableError, SQLAlchemyError
from sqlalchemy.types import NullType

from adapters.sources.base import bad_record
from adapters.sources.settings import SqlSourceSettings
from coordinator.batching import batched
from coordinator.errors import ConfigError, InvalidEvent, SourceError
from coordinator.events import ChangeEvent, Op, canonical_json
from coordinator.ports import BadRecord, CheckpointStore, KnownDocs, SourceRecord

# Rows per query: one short transaction per page keeps locks and snapshots brief, and a page
# (texts included) is all that is held in memory.
BATCH_ROWS_DEFAULT = 500
# Ledger documents checked per ``id IN (...)`` query in reconcile_ids; well under SQLite's
# oldest limit of 999 bound parameters.
LOOKUP_BATCH_MAX = 500
# Never inherit a driver's default: psycopg waits forever for a connection, sqlite3 5 s for a lock.
CONNECT_TIMEOUT_S = 10
STATEMENT_TIMEOUT_S = 120
SQLITE_BUSY_TIMEOUT_S = 30

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MICROSECOND = timedelta(microseconds=1)
# Labels of the raw (unconverted) columns every query selects.
_ID, _MARK, _TEXT, _DELETED, _VERSION, _JSON = "_id", "_mark", "_text", "_deleted", "_version", "_json"

log = structlog.get_logger(__name__)


class CurrentDoc(NamedTuple):
    """One live row as the source holds it now (what the auditor compares the indexes with)."""

    doc_id: str
    version: int
    text: str
    metadata: Mapping[str, Any]


class SqlTableSource:
    """Change events from one SQL table (SQLAlchemy 2 Core, table reflected on construction)."""

    def __init__(
        self,
        url: str,
        table: str,
        checkpoints: CheckpointStore,
        known: KnownDocs,
        *,
        id_column: str = "id",
        text_column: str = "text",
        metadata_columns: Sequence[str] = (),
        metadata_json_column: str | None = None,
        updated_at_column: str = "updated_at",
        deleted_at_column: str | None = None,
        version_column: str | None = None,
        schema: str | None = None,
        name: str | None = None,
        batch_rows: int = BATCH_ROWS_DEFAULT,
        lookup_batch_max: int = LOOKUP_BATCH_MAX,
    ) -> None:
        if batch_rows < 1 or lookup_batch_max < 1:
            raise ConfigError("batch_rows and lookup_batch_max must be at least 1")
        self.name = name or f"sql:{table}"
        self._checkpoints = checkpoints
        self._known = known
        self._batch_rows = batch_rows
        self._lookup_batch_max = lookup_batch_max
        self._engine = _engine(url)
        try:
            self._table = self._reflect(table, schema)
            self._check_columns([id_column, text_column, updated_at_column, *metadata_columns])
            self._check_columns([c for c in (deleted_at_column, version_column, metadata_json_column) if c])
        except (ConfigError, SourceError):
            self._engine.dispose()  # close the reflection's pooled connection before failing
            raise
        self._id = self._column(id_column)
        self._mark = _raw(self._column(updated_at_column))
        self._deleted = None if deleted_at_column is None else _raw(self._column(deleted_at_column))
        self._metadata_columns = tuple(metadata_columns)
        labels = {_ID: id_column, _TEXT: text_column, _MARK: updated_at_column, _DELETED: deleted_at_column}
        labels |= {_VERSION: version_column, _JSON: metadata_json_column}
        self._columns = self._labelled(labels | {f"m_{c}": c for c in self._metadata_columns})

    @classmethod
    def from_settings(cls, settings: SqlSourceSettings, checkpoints: CheckpointStore, known: KnownDocs) -> SqlTableSource:
        """The table ``settings.table`` at ``settings.url``, its columns as ``settings`` name them."""
        return cls(
            settings.url.get_secret_value(),
            settings.table,
            checkpoints,
            known,
            id_column=settings.id_column,
            text_column=settings.text_column,
            metadata_json_column=settings.metadata_column,
            metadata_columns=settings.metadata_columns,
            updated_at_column=settings.updated_at_column,
            deleted_at_column=settings.deleted_at_column,
            version_column=settings.version_column,
            name=settings.name,
        )

    # --- the ChangeSource port ---------------------------------------------------------------

    def read(self) -> Iterator[SourceRecord]:
        """Every row changed after the last committed watermark, in (updated_at, id) order."""
        mark = self._committed_mark()
        while True:
            rows = self._fetch(self._changed_after(mark))
            yield from (self._record(row) for row in rows)
            if len(rows) < self._batch_rows:
                return
            mark = (rows[-1]._mapping[_MARK], rows[-1]._mapping[_ID])

    def commit(self, position: str) -> None:
        """Persist ``position`` (the watermark of the last applied row) as the place to resume from."""
        _decode_position(position)
        self._checkpoints.set_checkpoint(self.name, position)

    def close(self) -> None:
        self._engine.dispose()

    # --- hard deletes and the auditor's view ---------------------------------------------------

    def reconcile_ids(self) -> Iterator[ChangeEvent]:
        """Deletes (at ledger version + 1) for live ledger documents whose row no longer exists.

        Ledger documents are taken in batches of ``lookup_batch_max`` and looked up by ID; a batch
        is read from the ledger *before* its lookup, so a document applied from a row is only
        deleted if that row is gone when looked for.
        """
        for batch in batched(self._known.iter_docs(include_deleted=False), self._lookup_batch_max):
            present = self._existing([state.doc_id for state in batch])
            for state in batch:
                if state.doc_id not in present:
                    log.info("row_gone", source=self.name, doc_id=state.doc_id, version=state.version + 1)
                    yield ChangeEvent(Op.DELETE, state.doc_id, state.version + 1)

    def iter_current(self) -> Iterator[CurrentDoc | BadRecord]:
        """Every live (not soft-deleted) row, in id order; rows ``read()`` would reject come as BadRecords."""
        after: object = None
        while True:
            rows = self._fetch(self._live_after(after))
            yield from (self._current(row) for row in rows)
            if len(rows) < self._batch_rows:
                return
            after = rows[-1]._mapping[_ID]

    # --- queries -------------------------------------------------------------------------------

    def _changed_after(self, mark: tuple[object, object] | None) -> Select[Any]:
        query = select(*self._columns).where(self._mark.is_not(None))
        if mark is not None:
            ts, last_id = (_bind(value) for value in mark)
            query = query.where(or_(self._mark > ts, and_(self._mark == ts, _raw(self._id) > last_id)))
        return query.order_by(self._mark, self._id).limit(self._batch_rows)

    def _live_after(self, after: object) -> Select[Any]:
        query = select(*self._columns)
        if self._deleted is not None:
            query = query.where(self._deleted.is_(None))
        if after is not None:
            query = query.where(_raw(self._id) > _bind(after))
        return query.order_by(self._id).limit(self._batch_rows)

    def _existing(self, doc_ids: Sequence[str]) -> set[str]:
        natives = [n for n in (_native_id(self._id, d) for d in doc_ids) if n is not None]
        if not natives:
            return set()
        rows = self._fetch(select(self._id).where(self._id.in_(natives)))
        return {str(row[0]) for row in rows}

    def _fetch(self, query: Select[Any]) -> list[Row[Any]]:
        with self._errors(), self._engine.connect() as connection:
            return list(connection.execute(query).all())

    # --- rows to records -----------------------------------------------------------------------

    def _record(self, row: Row[Any]) -> SourceRecord:
        values: dict[str, Any] = dict(row._mapping)
        position = _encode_position(values[_MARK], values[_ID])
        try:
            return self._event(values, position)
        except InvalidEvent as exc:
            return self._bad(exc.reason, values, position, exc.doc_id)

    def _current(self, row: Row[Any]) -> CurrentDoc | BadRecord:
        values: dict[str, Any] = dict(row._mapping)
        try:
            event = self._upsert(values, None)
        except InvalidEvent as exc:
            return self._bad(exc.reason, values, None, exc.doc_id)
        assert event.text is not None, "upserts carry text"
        return CurrentDoc(event.doc_id, event.version, event.text, event.metadata)

    def _event(self, values: Mapping[str, Any], position: str) -> ChangeEvent:
        if values.get(_DELETED) is not None:
            return ChangeEvent(Op.DELETE, _doc_id(values[_ID]), self._version(values), position=position)
        return self._upsert(values, position)

    def _upsert(self, values: Mapping[str, Any], position: str | None) -> ChangeEvent:
        doc_id = _doc_id(values[_ID])
        text = values[_TEXT]
        if text is None:
            raise InvalidEvent("text is NULL", doc_id=doc_id)
        if not isinstance(text, str):
            raise InvalidEvent(f"text is a {type(text).__name__}, not a string", doc_id=doc_id)
        metadata = self._metadata(values, doc_id)
        return ChangeEvent(Op.UPSERT, doc_id, self._version(values), text, metadata, position=position)

    def _version(self, values: Mapping[str, Any]) -> int:
        doc_id = str(values[_ID])
        if _VERSION not in values:
            return _microseconds(values[_MARK], doc_id)
        version = values[_VERSION]
        if isinstance(version, bool) or not isinstance(version, int):
            raise InvalidEvent(f"version column holds a {type(version).__name__}", doc_id=doc_id)
        return version

    def _metadata(self, values: Mapping[str, Any], doc_id: str) -> dict[str, Any]:
        metadata = _json_object(values[_JSON], doc_id) if _JSON in values else {}
        for column in self._metadata_columns:
            metadata[column] = _json_value(values[f"m_{column}"], column, doc_id)
        return metadata

    def _bad(
        self, reason: str, values: Mapping[str, Any], position: str | None, doc_id: str | None
    ) -> BadRecord:
        log.warning("bad_record", source=self.name, position=position, doc_id=doc_id, reason=reason)
        payload = json.dumps(dict(values), default=repr, sort_keys=True, ensure_ascii=False)
        return bad_record(reason, payload, position, doc_id)

    # --- set-up helpers ------------------------------------------------------------------------

    def _committed_mark(self) -> tuple[object, object] | None:
        stored = self._checkpoints.get_checkpoint(self.name)
        return None if stored is None else _decode_position(stored)

    def _reflect(self, table: str, schema: str | None) -> Table:
        try:
            with self._errors():
                return Table(table, MetaData(), schema=schema, autoload_with=self._engine)
        except SourceError as exc:
            if isinstance(exc.__cause__, NoSuchTableError):
                raise ConfigError(f"table {table!r} does not exist") from exc.__cause__
            raise

    def _check_columns(self, names: Sequence[str]) -> None:
        for name in names:
            if name not in self._table.c:
                raise ConfigError(f"table {self._table.name!r} has no column {name!r}")

    def _column(self, name: str) -> Column[Any]:
        return self._table.c[name]

    def _labelled(self, labels: Mapping[str, str | None]) -> list[ColumnElement[Any]]:
        """The raw columns every query selects, under fixed labels (unset optional columns left out)."""
        return [
            _raw(self._column(column)).label(label) for label, column in labels.items() if column is not None
        ]

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except SQLAlchemyError as exc:
            raise SourceError(f"{self.name}: {type(exc).__name__}: {exc}") from exc


# --- module helpers ----------------------------------------------------------------------------


def _engine(url: str) -> Engine:
    backend = make_url(url).get_backend_name()
    connect_args: dict[str, Any] = {}
    if backend == "sqlite":
        connect_args = {"timeout": SQLITE_BUSY_TIMEOUT_S}
    elif backend == "postgresql":
        statement_timeout_ms = STATEMENT_TIMEOUT_S * 1000
        connect_args = {
            "connect_timeout": CONNECT_TIMEOUT_S,
            "options": f"-c statement_timeout={statement_timeout_ms}",
        }
    return create_engine(url, connect_args=connect_args, pool_pre_ping=True)


def _raw(column: ColumnElement[Any]) -> ColumnElement[Any]:
    """The column with no SQLAlchemy type conversion: values exactly as the driver has them."""
    return type_coerce(column, NullType())


def _bind(value: object) -> ColumnElement[Any]:
    return type_coerce(value, NullType())


def _doc_id(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int | str | uuid.UUID):
        raise InvalidEvent(f"id is a {type(value).__name__}; expected an integer, string or UUID")
    return str(value)


def _native_id(column: Column[Any], doc_id: str) -> object | None:
    """``doc_id`` as a value of the id column's type, or None if no row could have this ID."""
    try:
        kind = column.type.python_type
    except NotImplementedError:
        return doc_id
    try:
        value: object = kind(doc_id) if kind in (int, uuid.UUID) else doc_id
    except ValueError:
        return None
    return value if str(value) == doc_id else None


def _microseconds(value: object, doc_id: str) -> int:
    """``updated_at`` as integer microseconds since the Unix epoch (naive timestamps are UTC)."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError as exc:
            raise InvalidEvent(f"updated_at {value!r} is not an ISO-8601 timestamp", doc_id=doc_id) from exc
    if not isinstance(value, datetime):
        raise InvalidEvent(f"updated_at is a {type(value).__name__}, not a timestamp", doc_id=doc_id)
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return (aware - _EPOCH) // _ONE_MICROSECOND


def _json_object(value: object, doc_id: str) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, str | bytes):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise InvalidEvent(f"metadata column is not valid JSON: {exc}", doc_id=doc_id) from exc
    if value is None:
        # SQLAlchemy's JSON type stores Python None as the JSON text 'null': no metadata.
        return {}
    if not isinstance(value, dict):
        raise InvalidEvent("metadata column does not hold a JSON object", doc_id=doc_id)
    return dict(value)


def _json_value(value: object, column: str, doc_id: str) -> object:
    """A metadata column's value in JSON terms; decimals become strings so none lose digits."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, Decimal | uuid.UUID):
        return str(value)
    raise InvalidEvent(f"metadata column {column!r} holds a {type(value).__name__}", doc_id=doc_id)


def _encode_position(mark: object, row_id: object) -> str:
    return canonical_json([_encode_value(mark), _encode_value(row_id)])


def _decode_position(position: str) -> tuple[object, object]:
    try:
        mark, row_id = json.loads(position)
        return _decode_value(mark), _decode_value(row_id)
    except (ValueError, TypeError, KeyError) as exc:
        raise SourceError(f"not a SQL table position ([updated_at, id]): {position!r}") from exc


def _encode_value(value: object) -> object:
    """A watermark part as JSON, tagged so that it decodes to the very same Python value."""
    if isinstance(value, bool):
        raise SourceError("a boolean cannot be a watermark")
    if isinstance(value, int | str):
        return value
    if isinstance(value, datetime):
        return {"datetime": value.isoformat()}
    if isinstance(value, date):
        return {"date": value.isoformat()}
    if isinstance(value, uuid.UUID | Decimal):
        return {type(value).__name__.lower(): str(value)}
    raise SourceError(f"a {type(value).__name__} cannot be a watermark")


_DECODERS: dict[str, Any] = {
    "datetime": datetime.fromisoformat,
    "date": date.fromisoformat,
    "uuid": uuid.UUID,
    "decimal": Decimal,
}


def _decode_value(value: object) -> object:
    if isinstance(value, dict):
        ((tag, text),) = value.items()
        return _DECODERS[tag](text)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"unexpected watermark part {value!r}")
    return value
