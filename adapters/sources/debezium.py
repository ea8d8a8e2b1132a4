"""Debezium change-event envelopes turned into ChangeEvents by a per-table mapping.

Pure: no Kafka client here (``adapters/sources/kafka.py`` reads the topics). A record is a key
and a value, each JSON with or without the converter's ``{"schema": …, "payload": …}`` wrapper.

- ``op`` ``c``/``u``/``r`` → upsert of ``after``; ``d`` → delete of ``before`` (or the key);
  ``t`` → a ``Truncate`` of the table; ``m`` (a logical-decoding message) and tombstones (a null
  value after a delete, for log compaction) are ``Skipped``: they carry no row change.
- The version is the source's commit order, never ``ts_ms`` nor the Kafka offset:
  ``source.lsn`` for Postgres, the binlog coordinates (file number, position, row) for MySQL and
  MariaDB, or a configured ``version_field`` (a dotted path into the payload, e.g.
  ``source.commit_seq``). The base is doubled and an upsert adds one, so a primary-key change
  that keeps the document ID (delete + create at the same LSN) ends with the create.
- Anything that cannot become an event is a ``BadRecord`` with its reason (dead-lettered).

``TruncateTracker`` turns a ``Truncate`` into deletes of the table's documents, including those
read but not yet committed, and persists a per-table floor so that older rows of the table that
arrive later (other partitions, redeliveries after a restart) become deletes too.
"""

from __future__ import annotations

import json
import re
import string
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from adapters.sources.base import bad_record
from coordinator.errors import InvalidEvent
from coordinator.events import METADATA_BYTES_MAX, TEXT_BYTES_MAX, ChangeEvent, Op, canonical_json
from coordinator.model import DocState
from coordinator.ports import BadRecord, CheckpointStore, KnownDocs

# The largest value worth parsing: an update of REPLICA IDENTITY FULL carries the text twice
# (before and after), escaped up to 3x, plus metadata and the schema wrapper. Bigger values
# become BadRecords without being parsed.
ENVELOPE_BYTES_MAX = 2 * 3 * TEXT_BYTES_MAX + 2 * METADATA_BYTES_MAX + 1024 * 1024
# What Debezium writes for an unchanged TOASTed column it could not read (Postgres with
# REPLICA IDENTITY DEFAULT); indexing it would replace a document's text with this marker.
UNAVAILABLE_PLACEHOLDER = "__debezium_unavailable_value"
# Texts of a row joined by text_columns: one paragraph per column.
COLUMN_SEPARATOR = "\n\n"
# Versions are 2·base + (1 for an upsert), and must stay below 2^63 (ES external versions).
VERSION_BASE_MAX = 2**62 - 1
# MySQL binlog coordinates packed into one base: file number | position | row in the event.
BINLOG_FILE_BITS = 16
BINLOG_POS_BITS = 32
BINLOG_ROW_BITS = 14

UPSERT_OPS = frozenset({"c", "u", "r"})
DELETE_OP = "d"
TRUNCATE_OP = "t"
MESSAGE_OP = "m"
_BINLOG_CONNECTORS = frozenset({"mysql", "mariadb"})
_IDENTIFIER = re.compile(r"[^.\[\]{}:!]+")


class TableMappingSettings(BaseModel):
    """How the rows of one table become documents.

    ``doc_id`` is a template of row columns (``"orders:{id}"``); a delete is mapped from the
    row's old values (``before``) or, without them, from the record key, so the template should
    use key columns. The text is ``text_columns`` joined by blank lines, or ``text_template``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    doc_id: str
    text_columns: tuple[str, ...] = ()
    text_template: str | None = None
    metadata_columns: tuple[str, ...] = ()
    # A dotted path into the payload holding this table's commit order (overrides the source's).
    version_field: str | None = None

    @model_validator(mode="after")
    def _one_text_source(self) -> TableMappingSettings:
        if bool(self.text_columns) == (self.text_template is not None):
            raise ValueError("give exactly one of text_columns and text_template")
        Template.parse(self.doc_id)
        if self.text_template is not None:
            Template.parse(self.text_template)
        if not Template.parse(self.doc_id).fields:
            raise ValueError(f"doc_id template {self.doc_id!r} uses no column")
        return self


@dataclass(frozen=True)
class Template:
    """A ``str.format``-style template of plain column names, and the regex of its outputs."""

    source: str
    literals: tuple[str, ...]
    fields: tuple[str, ...]

    @classmethod
    def parse(cls, source: str) -> Template:
        literals: list[str] = []
        fields: list[str] = []
        try:
            parts = list(string.Formatter().parse(source))
        except ValueError as exc:
            raise ValueError(f"template {source!r}: {exc}") from exc
        for literal, name, spec, conversion in parts:
            literals.append(literal)
            if name is None:
                continue
            if not _IDENTIFIER.fullmatch(name) or spec or conversion:
                raise ValueError(f"template {source!r}: use plain column names like {{id}}, not {{{name}}}")
            fields.append(name)
        return cls(source, tuple(literals), tuple(fields))

    @property
    def prefix(self) -> str:
        return self.literals[0] if self.literals else ""

    def render(self, values: Mapping[str, str]) -> str:
        out = []
        for i, literal in enumerate(self.literals):
            out.append(literal)
            if i < len(self.fields):
                out.append(values[self.fields[i]])
        return "".join(out)

    def pattern(self) -> re.Pattern[str]:
        """Matches exactly the strings this template can render (every field non-empty)."""
        body = "(?:.+)".join(re.escape(literal) for literal in self.literals)
        if len(self.fields) == len(self.literals):
            body += "(?:.+)"
        return re.compile(body, re.DOTALL)


def check_distinct_doc_ids(tables: Mapping[str, TableMappingSettings]) -> None:
    """With several tables, each doc_id template must start with its own literal prefix, none a
    prefix of another's: a truncate finds its table's documents by their IDs, and two tables
    must never claim the same document."""
    if len(tables) < 2:
        return
    prefixes = {name: Template.parse(t.doc_id).prefix for name, t in tables.items()}
    for name, prefix in prefixes.items():
        if not prefix:
            raise ValueError(f"table {name}: with several tables, doc_id must start with a literal prefix")
        for other, other_prefix in prefixes.items():
            if other != name and other_prefix.startswith(prefix):
                raise ValueError(f"tables {name} and {other}: doc_id prefixes {prefix!r} and {other_prefix!r} overlap")


class KafkaSourceSettings(BaseModel):
    """``source: {kind: kafka, …}``: Debezium change events from Kafka topics (a consumer group)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["kafka"] = "kafka"
    name: str = "kafka"
    bootstrap_servers: tuple[str, ...] = Field(min_length=1)
    topics: tuple[str, ...] = Field(min_length=1)
    group_id: str = "lockstep"
    client_id: str = "lockstep"
    # Keyed "schema.table" (Postgres), "database.table" (MySQL) or "table".
    tables: dict[str, TableMappingSettings] = Field(min_length=1)
    # A dotted path into the payload holding the commit order, for connectors other than
    # Postgres (source.lsn) and MySQL/MariaDB (binlog coordinates).
    version_field: str | None = None
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None
    # Where a group without committed offsets starts.
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    # read_committed skips aborted transactions (Debezium with exactly-once delivery).
    isolation_level: Literal["read_committed", "read_uncommitted"] = "read_committed"
    session_timeout_s: float = Field(default=10.0, gt=0)
    request_timeout_s: float = Field(default=30.0, gt=0)
    # How long a revoked partition's in-flight records may take to commit before hand-over.
    revoke_grace_s: float = Field(default=10.0, ge=0)
    # `lockstep sync` / `run --exit-when-idle` fail if the group assigns nothing for this long.
    assignment_wait_s: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> KafkaSourceSettings:
        check_distinct_doc_ids(self.tables)
        if any("@" in server for server in self.bootstrap_servers):
            raise ValueError("bootstrap_servers must not carry credentials; use sasl_username/sasl_password")
        if self.security_protocol.startswith("SASL") and (self.sasl_username is None or self.sasl_password is None):
            raise ValueError(f"{self.security_protocol} needs sasl_username and sasl_password")
        return self


@dataclass(frozen=True)
class TableMapping:
    """A table's compiled mapping."""

    table: str
    doc_id: Template
    text: Template | None
    text_columns: tuple[str, ...]
    metadata_columns: tuple[str, ...]
    version_field: str | None
    doc_pattern: re.Pattern[str]

    @classmethod
    def build(cls, table: str, settings: TableMappingSettings) -> TableMapping:
        doc_id = Template.parse(settings.doc_id)
        text = None if settings.text_template is None else Template.parse(settings.text_template)
        return cls(
            table,
            doc_id,
            text,
            settings.text_columns,
            settings.metadata_columns,
            settings.version_field,
            doc_id.pattern(),
        )

    def owns(self, doc_id: str) -> bool:
        return self.doc_pattern.fullmatch(doc_id) is not None


# --- what a record decodes to ----------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """An upsert or delete of one document of ``table``."""

    table: str
    event: ChangeEvent


@dataclass(frozen=True)
class Truncate:
    """Every document of ``table`` committed below ``version`` is gone."""

    table: str
    version: int


@dataclass(frozen=True)
class Skipped:
    """A record that carries no row change (a tombstone, a logical-decoding message)."""

    reason: str


Decoded = Change | Truncate | Skipped | BadRecord


class _Bad(Exception):
    """A reason why a record cannot become an event (internal control flow of ``decode``)."""

    def __init__(self, reason: str, doc_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.doc_id = doc_id


class DebeziumDecoder:
    """Decodes Kafka records holding Debezium envelopes with one mapping per table.

    Tables are named ``schema.table`` (Postgres), ``database.table`` (MySQL) or just ``table``.
    """

    def __init__(self, tables: Mapping[str, TableMappingSettings], *, version_field: str | None = None) -> None:
        self.tables = {name: TableMapping.build(name, t) for name, t in tables.items()}
        self.version_field = version_field

    def decode(self, key: bytes | None, value: bytes | None, position: str | None = None) -> Decoded:
        """One record's meaning; never raises for bad input (that is a BadRecord)."""
        if value is None:
            return Skipped("tombstone")
        try:
            return self._decode(key, value, position)
        except _Bad as bad:
            return bad_record(bad.reason, value, position, bad.doc_id)

    def _decode(self, key: bytes | None, value: bytes, position: str | None) -> Decoded:
        payload = _envelope(value)
        op = payload.get("op")
        if op == MESSAGE_OP:
            return Skipped("logical decoding message")
        source = payload.get("source")
        if not isinstance(source, dict):
            raise _Bad("not a Debezium change event: no source block" if op is None else "source block missing")
        if op not in UPSERT_OPS | {DELETE_OP, TRUNCATE_OP}:
            raise _Bad(f"unknown op {op!r}")
        mapping = self._mapping(source)
        base = self._version_base(payload, source, mapping)
        if op == TRUNCATE_OP:
            return Truncate(mapping.table, 2 * base)
        row = _row(op, payload, _key_fields(key))
        doc_id = _render_doc_id(mapping, row)
        if op == DELETE_OP:
            return Change(mapping.table, _event(Op.DELETE, doc_id, 2 * base, None, {}, position))
        text = _render_text(mapping, row, doc_id)
        metadata = _metadata(mapping, row, doc_id)
        return Change(mapping.table, _event(Op.UPSERT, doc_id, 2 * base + 1, text, metadata, position))

    def _mapping(self, source: Mapping[str, Any]) -> TableMapping:
        table = source.get("table")
        if not isinstance(table, str) or not table:
            raise _Bad("source block has no table")
        for container in (source.get("schema"), source.get("db")):
            if isinstance(container, str) and container and f"{container}.{table}" in self.tables:
                return self.tables[f"{container}.{table}"]
        if table in self.tables:
            return self.tables[table]
        raise _Bad(f"no mapping for table {_qualified(source, table)}")

    def _version_base(self, payload: Mapping[str, Any], source: Mapping[str, Any], mapping: TableMapping) -> int:
        path = mapping.version_field or self.version_field
        if path is not None:
            return _checked_base(_integer(_lookup(payload, path), path), path)
        connector = source.get("connector")
        if connector == "postgresql":
            return _checked_base(_integer(source.get("lsn"), "source.lsn"), "source.lsn")
        if connector in _BINLOG_CONNECTORS:
            return binlog_base(source)
        raise _Bad(f"no commit order known for connector {connector!r}: set version_field")


def binlog_base(source: Mapping[str, Any]) -> int:
    """MySQL/MariaDB binlog coordinates (``mysql-bin.000003``, pos, row) as one increasing integer."""
    name = source.get("file")
    if not isinstance(name, str) or not name.rpartition(".")[2].isdigit():
        raise _Bad(f"binlog file name {name!r} has no numeric suffix")
    number = int(name.rpartition(".")[2])
    pos = _integer(source.get("pos"), "source.pos")
    row = _integer(source.get("row", 0), "source.row")
    if number >= 2**BINLOG_FILE_BITS or pos >= 2**BINLOG_POS_BITS or row >= 2**BINLOG_ROW_BITS:
        raise _Bad(f"binlog coordinates {name}:{pos}:{row} exceed the version encoding: set version_field")
    return (number << (BINLOG_POS_BITS + BINLOG_ROW_BITS)) | (pos << BINLOG_ROW_BITS) | row


# --- helpers (pure) ----------------------------------------------------------------------------


def _envelope(value: bytes) -> dict[str, Any]:
    if len(value) > ENVELOPE_BYTES_MAX:
        raise _Bad(f"value larger than {ENVELOPE_BYTES_MAX} bytes")
    decoded = _json(value, "value")
    if not isinstance(decoded, dict):
        raise _Bad("value is not a JSON object")
    return _unwrap(decoded, "value")


def _key_fields(key: bytes | None) -> dict[str, Any]:
    """The record key's columns, if the key is a JSON object (a Debezium key struct)."""
    if not key:
        return {}
    decoded = _json(key, "key")
    if not isinstance(decoded, dict):
        return {}
    return _unwrap(decoded, "key")


def _json(data: bytes, what: str) -> Any:
    # Decoded explicitly: json.loads(bytes) would guess UTF-16/32 from the first bytes.
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Bad(f"{what} is not valid UTF-8 at byte {exc.start}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _Bad(f"{what} is not valid JSON: {exc.msg} at column {exc.colno}") from exc
    except RecursionError as exc:
        raise _Bad(f"{what} is not valid JSON: nested too deeply") from exc


def _unwrap(decoded: dict[str, Any], what: str) -> dict[str, Any]:
    """The payload of a ``{"schema": …, "payload": …}`` converter wrapper, or the object itself."""
    if set(decoded) != {"schema", "payload"}:
        return decoded
    payload = decoded["payload"]
    if not isinstance(payload, dict):
        raise _Bad(f"{what} payload is not a JSON object")
    return payload


def _row(op: str, payload: Mapping[str, Any], key: Mapping[str, Any]) -> dict[str, Any]:
    """The row the mapping reads: ``after`` for upserts, ``before`` for deletes, over the key."""
    image = payload.get("before" if op == DELETE_OP else "after")
    if op in UPSERT_OPS and not isinstance(image, dict):
        raise _Bad(f"op {op!r} without an after image")
    if image is not None and not isinstance(image, dict):
        raise _Bad("row image is not a JSON object")
    return {**key, **(image or {})}


def _render_doc_id(mapping: TableMapping, row: Mapping[str, Any]) -> str:
    values = {}
    for name in mapping.doc_id.fields:
        if row.get(name) is None:
            raise _Bad(f"doc_id column {name!r} is {'null' if name in row else 'missing'} in {mapping.table}")
        values[name] = _cell(row[name])
    return mapping.doc_id.render(values)


def _render_text(mapping: TableMapping, row: Mapping[str, Any], doc_id: str) -> str:
    names = mapping.text.fields if mapping.text is not None else mapping.text_columns
    values = {name: _column(row, name, mapping.table, doc_id) for name in names}
    if mapping.text is not None:
        return mapping.text.render({n: _cell(v) for n, v in values.items()})
    return COLUMN_SEPARATOR.join(_cell(values[name]) for name in mapping.text_columns)


def _metadata(mapping: TableMapping, row: Mapping[str, Any], doc_id: str) -> dict[str, Any]:
    return {name: _column(row, name, mapping.table, doc_id) for name in mapping.metadata_columns}


def _column(row: Mapping[str, Any], name: str, table: str, doc_id: str) -> Any:
    if name not in row:
        raise _Bad(f"column {name!r} missing from the row of {table}", doc_id)
    value = row[name]
    if value == UNAVAILABLE_PLACEHOLDER:
        raise _Bad(f"column {name!r} is unavailable (unchanged TOAST value): set REPLICA IDENTITY FULL", doc_id)
    return value


def _cell(value: Any) -> str:
    """A column value as text: strings as they are, null as empty, everything else as JSON."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return canonical_json(value)


def _event(
    op: Op, doc_id: str, version: int, text: str | None, metadata: Mapping[str, Any], position: str | None
) -> ChangeEvent:
    try:
        return ChangeEvent(op, doc_id, version, text, metadata, position)
    except InvalidEvent as exc:
        raise _Bad(exc.reason, exc.doc_id or doc_id[:64]) from exc


def _lookup(payload: Mapping[str, Any], path: str) -> Any:
    value: Any = payload
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise _Bad(f"version field {path!r} missing")
        value = value[part]
    return value


def _integer(value: Any, what: str) -> int:
    """A non-negative integer, given as a JSON number or a string of digits."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad(f"{what} is not an integer: {value!r}")
    if value < 0:
        raise _Bad(f"{what} is negative: {value}")
    return value


def _checked_base(value: int, what: str) -> int:
    if value > VERSION_BASE_MAX:
        raise _Bad(f"{what} {value} exceeds {VERSION_BASE_MAX}")
    return value


def _qualified(source: Mapping[str, Any], table: str) -> str:
    container = source.get("schema") or source.get("db")
    return f"{container}.{table}" if isinstance(container, str) and container else table


# --- truncates ----------------------------------------------------------------------------------


@dataclass
class TruncateTracker:
    """Turns truncates into deletes and keeps later, older rows of a truncated table deleted.

    A truncate is unordered against row events (it has no key, so it lands in any partition),
    so three sets of documents must go: those committed in the ledger below the truncate's
    version; those read but not yet committed (``observe`` records them until ``settle`` says
    their sequence number is committed); and rows read after it with a lower version
    (``gate`` turns them into deletes). The floor of each table is persisted in the checkpoint
    store before the truncate's deletes are handed out, so it survives a restart.
    """

    source_name: str
    tables: Mapping[str, TableMapping]
    docs: KnownDocs
    checkpoints: CheckpointStore
    floors: dict[str, int] = field(default_factory=dict)
    _inflight: dict[str, tuple[str, int]] = field(default_factory=dict)
    _order: deque[tuple[int, str]] = field(default_factory=deque)

    def __post_init__(self) -> None:
        for table in self.tables:
            stored = self.checkpoints.get_checkpoint(self._floor_key(table))
            if stored is not None and stored.isdigit():
                self.floors[table] = int(stored)

    def gate(self, change: Change) -> ChangeEvent:
        """The change, or a delete at its version if its table was truncated after it."""
        event = change.event
        if event.op is Op.UPSERT and event.version < self.floors.get(change.table, -1):
            return ChangeEvent(Op.DELETE, event.doc_id, event.version, position=event.position)
        return event

    def observe(self, change: Change, seq: int) -> None:
        """Remember that ``change`` was handed out as record ``seq`` (not yet committed)."""
        self._inflight[change.event.doc_id] = (change.table, seq)
        self._order.append((seq, change.event.doc_id))

    def settle(self, committed_seq: int) -> None:
        """Forget documents whose records up to ``committed_seq`` are committed (the ledger has them)."""
        while self._order and self._order[0][0] <= committed_seq:
            seq, doc_id = self._order.popleft()
            if self._inflight.get(doc_id, (None, -1))[1] == seq:
                del self._inflight[doc_id]

    def truncate(self, truncate: Truncate, position: str | None) -> list[ChangeEvent]:
        """Deletes, at the truncate's version, of every document the table may hold."""
        if truncate.version > self.floors.get(truncate.table, -1):
            self.checkpoints.set_checkpoint(self._floor_key(truncate.table), str(truncate.version))
            self.floors[truncate.table] = truncate.version
        mapping = self.tables[truncate.table]
        doomed = {d for d, (table, _seq) in self._inflight.items() if table == truncate.table}
        doomed |= set(_committed_below(self.docs.iter_docs(), mapping, truncate.version))
        return [ChangeEvent(Op.DELETE, d, truncate.version, position=position) for d in sorted(doomed)]

    @property
    def inflight_docs(self) -> int:
        return len(self._inflight)

    def _floor_key(self, table: str) -> str:
        return f"{self.source_name}#truncated:{table}"


def _committed_below(states: Iterable[DocState], mapping: TableMapping, version: int) -> Iterable[str]:
    for state in states:
        if not state.deleted and state.version < version and mapping.owns(state.doc_id):
            yield state.doc_id
