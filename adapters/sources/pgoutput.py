"""A decoder of pgoutput, PostgreSQL's built-in logical replication output plugin (protocol 1).

One function, ``decode(data)``, turns one message (a row of
``pg_logical_slot_peek_binary_changes``) into one of the dataclasses below; it does no I/O and
knows nothing about lockstep's events. The layouts follow the PostgreSQL documentation,
"Logical Replication Message Formats": integers are big-endian, strings are NUL-terminated, and
a row is a TupleData::

    Begin     'B' final_lsn:i64 commit_ts:i64 xid:i32
    Commit    'C' flags:i8 commit_lsn:i64 end_lsn:i64 commit_ts:i64
    Origin    'O' commit_lsn:i64 name:str
    Relation  'R' oid:i32 namespace:str name:str replica_identity:i8 ncols:i16
                  (flags:i8 name:str type_oid:i32 type_modifier:i32) * ncols
    Type      'Y' oid:i32 namespace:str name:str
    Insert    'I' oid:i32 'N' TupleData
    Update    'U' oid:i32 ['K' TupleData | 'O' TupleData] 'N' TupleData
    Delete    'D' oid:i32 ('K' | 'O') TupleData
    Truncate  'T' nrels:i32 options:i8 oid:i32 * nrels
    Message   'M' flags:i8 lsn:i64 prefix:str length:i32 content
    TupleData ncols:i16 (('n' | 'u') | ('t' | 'b') length:i32 bytes) * ncols

Values stay bytes in the server's encoding: the caller decides how to read them. A column that
is TOASTed and unchanged by an UPDATE arrives as ``UNCHANGED``: its value is only in the old row
(which pgoutput sends when the table has ``REPLICA IDENTITY FULL``). A message that does not
parse raises ``PgOutputError`` with the offset where it broke.
"""

from __future__ import annotations

import enum
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass

# The Truncate message's option bits.
TRUNCATE_CASCADE = 1
TRUNCATE_RESTART_IDENTITY = 2
# A Relation column flag: the column is part of the replica identity key.
COLUMN_IS_KEY = 1

_I8 = struct.Struct(">b")
_U8 = struct.Struct(">B")
_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")
_LSN = re.compile(r"[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}")


class PgOutputError(ValueError):
    """A pgoutput message that does not follow the protocol."""


class Unchanged(enum.Enum):
    """The marker of a TOASTed value an UPDATE left unchanged (sent as 'u', value not included)."""

    TOAST = "u"


UNCHANGED = Unchanged.TOAST

# One column of a row: its bytes (text or binary format), None for SQL NULL, or UNCHANGED.
Datum = bytes | None | Unchanged


@dataclass(frozen=True)
class Begin:
    final_lsn: int
    commit_ts_us: int
    xid: int


@dataclass(frozen=True)
class Commit:
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_ts_us: int


@dataclass(frozen=True)
class Origin:
    commit_lsn: int
    name: str


@dataclass(frozen=True)
class Column:
    is_key: bool
    name: str
    type_oid: int
    type_modifier: int


@dataclass(frozen=True)
class Relation:
    oid: int
    namespace: str
    name: str
    replica_identity: str
    columns: tuple[Column, ...]


@dataclass(frozen=True)
class TypeInfo:
    oid: int
    namespace: str
    name: str


@dataclass(frozen=True)
class Insert:
    relation_oid: int
    new: tuple[Datum, ...]


@dataclass(frozen=True)
class Update:
    """``old_kind`` is 'K' (old key columns only), 'O' (the whole old row) or None (not sent)."""

    relation_oid: int
    old_kind: str | None
    old: tuple[Datum, ...] | None
    new: tuple[Datum, ...]


@dataclass(frozen=True)
class Delete:
    relation_oid: int
    old_kind: str
    old: tuple[Datum, ...]


@dataclass(frozen=True)
class Truncate:
    relation_oids: tuple[int, ...]
    cascade: bool
    restart_identity: bool


@dataclass(frozen=True)
class LogicalMessage:
    transactional: bool
    lsn: int
    prefix: str
    content: bytes


Message = (
    Begin | Commit | Origin | Relation | TypeInfo | Insert | Update | Delete | Truncate | LogicalMessage
)


class _Reader:
    """A cursor over one message's bytes; every read checks that the bytes are there."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def take(self, size: int) -> bytes:
        if size < 0 or self.at + size > len(self.data):
            raise PgOutputError(f"message ends at byte {len(self.data)}, needed {size} more at {self.at}")
        piece = self.data[self.at : self.at + size]
        self.at += size
        return piece

    def unpack(self, fmt: struct.Struct) -> int:
        value: int = fmt.unpack(self.take(fmt.size))[0]
        return value

    def byte(self) -> str:
        return chr(self.unpack(_U8))

    def string(self) -> str:
        end = self.data.find(b"\x00", self.at)
        if end < 0:
            raise PgOutputError(f"unterminated string at byte {self.at}")
        raw = self.data[self.at : end]
        self.at = end + 1
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PgOutputError(f"string at byte {self.at} is not UTF-8") from exc

    def done(self) -> None:
        if self.at != len(self.data):
            raise PgOutputError(f"{len(self.data) - self.at} unexpected bytes after the message")


def decode(data: bytes) -> Message:
    """One pgoutput (protocol 1) message; PgOutputError if it is malformed or of an unknown kind."""
    if not data:
        raise PgOutputError("empty message")
    reader = _Reader(bytes(data))
    kind = reader.byte()
    parse = _PARSERS.get(kind)
    if parse is None:
        raise PgOutputError(f"unknown message type {kind!r}")
    message = parse(reader)
    reader.done()
    return message


def _begin(r: _Reader) -> Begin:
    return Begin(final_lsn=r.unpack(_U64), commit_ts_us=r.unpack(_I64), xid=r.unpack(_U32))


def _commit(r: _Reader) -> Commit:
    return Commit(
        flags=r.unpack(_U8), commit_lsn=r.unpack(_U64), end_lsn=r.unpack(_U64), commit_ts_us=r.unpack(_I64)
    )


def _origin(r: _Reader) -> Origin:
    return Origin(commit_lsn=r.unpack(_U64), name=r.string())


def _relation(r: _Reader) -> Relation:
    oid, namespace, name = r.unpack(_U32), r.string(), r.string()
    identity = r.byte()
    count = r.unpack(_I16)
    columns = tuple(_column(r) for _ in range(count))
    return Relation(oid, namespace, name, identity, columns)


def _column(r: _Reader) -> Column:
    flags = r.unpack(_U8)
    return Column(bool(flags & COLUMN_IS_KEY), r.string(), r.unpack(_U32), r.unpack(_I32))


def _type(r: _Reader) -> TypeInfo:
    return TypeInfo(oid=r.unpack(_U32), namespace=r.string(), name=r.string())


def _insert(r: _Reader) -> Insert:
    oid = r.unpack(_U32)
    _expect(r, "N")
    return Insert(oid, _tuple(r))


def _update(r: _Reader) -> Update:
    oid = r.unpack(_U32)
    marker = r.byte()
    old_kind: str | None = None
    old: tuple[Datum, ...] | None = None
    if marker in ("K", "O"):
        old_kind, old = marker, _tuple(r)
        marker = r.byte()
    if marker != "N":
        raise PgOutputError(f"update: expected 'N', got {marker!r}")
    return Update(oid, old_kind, old, _tuple(r))


def _delete(r: _Reader) -> Delete:
    oid = r.unpack(_U32)
    kind = r.byte()
    if kind not in ("K", "O"):
        raise PgOutputError(f"delete: expected 'K' or 'O', got {kind!r}")
    return Delete(oid, kind, _tuple(r))


def _truncate(r: _Reader) -> Truncate:
    count = r.unpack(_I32)
    options = r.unpack(_I8)
    oids = tuple(r.unpack(_U32) for _ in range(count))
    return Truncate(oids, bool(options & TRUNCATE_CASCADE), bool(options & TRUNCATE_RESTART_IDENTITY))


def _message(r: _Reader) -> LogicalMessage:
    flags = r.unpack(_U8)
    lsn, prefix = r.unpack(_U64), r.string()
    content = r.take(r.unpack(_I32))
    return LogicalMessage(bool(flags & 1), lsn, prefix, content)


def _tuple(r: _Reader) -> tuple[Datum, ...]:
    return tuple(_datum(r) for _ in range(r.unpack(_I16)))


def _datum(r: _Reader) -> Datum:
    kind = r.byte()
    if kind == "n":
        return None
    if kind == "u":
        return UNCHANGED
    if kind in ("t", "b"):
        return r.take(r.unpack(_I32))
    raise PgOutputError(f"unknown column kind {kind!r} at byte {r.at - 1}")


def _expect(r: _Reader, marker: str) -> None:
    got = r.byte()
    if got != marker:
        raise PgOutputError(f"expected {marker!r}, got {got!r}")


_PARSERS: dict[str, Callable[[_Reader], Message]] = {
    "B": _begin,
    "C": _commit,
    "O": _origin,
    "R": _relation,
    "Y": _type,
    "I": _insert,
    "U": _update,
    "D": _delete,
    "T": _truncate,
    "M": _message,
}


def lsn_to_int(text: str) -> int:
    """``'16/B374D848'`` (pg_lsn's text form) as a 64-bit integer; ValueError if malformed."""
    if not _LSN.fullmatch(text):
        raise ValueError(f"not an LSN: {text!r}")
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def lsn_to_text(lsn: int) -> str:
    """The pg_lsn text form of a 64-bit LSN."""
    if not 0 <= lsn < 2**64:
        raise ValueError(f"LSN out of range: {lsn}")
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"
