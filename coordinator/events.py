"""The normalized change event every source produces, and its validation."""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from coordinator.chunking import CHUNK_SEPARATOR
from coordinator.errors import InvalidEvent

# The limits live in coordinator/limits.py; the ``as`` names keep older imports from here working.
from coordinator.limits import CHUNK_ID_BYTES_MAX, METADATA_DEPTH_MAX, METADATA_INT_MAX, METADATA_INT_MIN
from coordinator.limits import DOC_ID_BYTES_MAX as DOC_ID_BYTES_MAX
from coordinator.limits import METADATA_BYTES_MAX as METADATA_BYTES_MAX
from coordinator.limits import TEXT_BYTES_MAX as TEXT_BYTES_MAX
from coordinator.limits import VERSION_MAX as VERSION_MAX

# C0 and C1 control characters and DEL (Unicode category Cc): refused in document IDs.
_CONTROL_CHAR = re.compile("[\x00-\x1f\x7f-\x9f]")
# How much of a refused doc_id a dead letter repeats.
DOC_ID_SHOWN_CHARS_MAX = 64


class Op(enum.StrEnum):
    """What happened to a document at the source."""

    UPSERT = "upsert"
    DELETE = "delete"


@dataclass(frozen=True)
class ChangeEvent:
    """One change of one document at the source.

    ``version`` is a non-negative 64-bit integer that grows with every change of the document;
    ``position`` is the source's opaque offset of this event (for checkpoints), if it has one.
    """

    op: Op
    doc_id: str
    version: int
    text: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    position: str | None = None

    def __post_init__(self) -> None:
        validate_event(self)


def validate_event(event: ChangeEvent) -> None:
    """Raise InvalidEvent unless the event can be applied as given."""
    _check_doc_id(event.doc_id)
    _check_version(event.version, event.doc_id)
    if event.op not in (Op.UPSERT, Op.DELETE):
        raise InvalidEvent(f"unknown op {event.op!r}", doc_id=event.doc_id)
    if event.op is Op.UPSERT:
        _check_text(event.text, event.doc_id)
    _check_metadata(event.metadata, event.doc_id)


def _check_doc_id(doc_id: object) -> None:
    if not isinstance(doc_id, str) or not doc_id:
        raise InvalidEvent("doc_id must be a non-empty string")
    _check_utf8(doc_id, "doc_id", _shown(doc_id))
    if len(doc_id.encode("utf-8")) > DOC_ID_BYTES_MAX:
        raise InvalidEvent(
            f"doc_id longer than {DOC_ID_BYTES_MAX} bytes (its chunk IDs would exceed the keyword "
            f"index's {CHUNK_ID_BYTES_MAX}-byte _id)",
            doc_id=_shown(doc_id),
        )
    if CHUNK_SEPARATOR in doc_id:
        raise InvalidEvent(f"doc_id must not contain {CHUNK_SEPARATOR!r} (reserved for chunk IDs)", doc_id=doc_id)
    if match := _CONTROL_CHAR.search(doc_id):
        raise InvalidEvent(
            f"doc_id holds the control character U+{ord(match.group()):04X} at {match.start()}",
            doc_id=_shown(doc_id),
        )


def _shown(doc_id: str) -> str:
    """A refused doc_id as a dead letter shows it: short, valid UTF-8, control characters
    spelled as escapes (a ledger on Postgres cannot store NUL in text)."""
    cut = doc_id[:DOC_ID_SHOWN_CHARS_MAX].encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROL_CHAR.sub(lambda m: f"\\u{ord(m.group()):04x}", cut)


def _check_version(version: object, doc_id: str) -> None:
    if isinstance(version, bool) or not isinstance(version, int):
        raise InvalidEvent(f"version must be an integer, got {type(version).__name__}", doc_id=doc_id)
    if not 0 <= version <= VERSION_MAX:
        raise InvalidEvent(f"version {version} outside 0..2^63-1", doc_id=doc_id)


def _check_text(text: object, doc_id: str) -> None:
    if not isinstance(text, str):
        raise InvalidEvent(f"upsert needs a text string, got {_json_type(text)}", doc_id=doc_id)
    _check_utf8(text, "text", doc_id)
    if len(text.encode("utf-8")) > TEXT_BYTES_MAX:
        raise InvalidEvent(f"text larger than {TEXT_BYTES_MAX} bytes", doc_id=doc_id)


def _check_metadata(metadata: object, doc_id: str) -> None:
    if reason := metadata_rejection(metadata):
        raise InvalidEvent(reason, doc_id=doc_id)


def metadata_rejection(metadata: object) -> str:
    """Why ``metadata`` cannot be stored in both indexes ("" when it can): an object of JSON
    values, integers within int64, finite numbers, at most METADATA_DEPTH_MAX levels, keys
    named once, valid UTF-8, at most METADATA_BYTES_MAX bytes as canonical JSON."""
    if not isinstance(metadata, Mapping):
        return f"metadata must be an object, got {_json_type(metadata)}"
    if reason := _json_value_rejection(metadata, "metadata", 1):
        return reason
    try:
        encoded = canonical_json(metadata).encode("utf-8")
    except UnicodeEncodeError:
        return "metadata is not valid UTF-8 (lone surrogate)"
    if len(encoded) > METADATA_BYTES_MAX:
        return f"metadata larger than {METADATA_BYTES_MAX} bytes"
    return ""


def _json_value_rejection(value: object, path: str, depth: int) -> str:
    """Why ``value`` cannot be stored as JSON metadata in both indexes ("" when it can)."""
    if isinstance(value, str) or value is None or isinstance(value, bool):
        return ""
    if isinstance(value, int):
        if METADATA_INT_MIN <= value <= METADATA_INT_MAX:
            return ""
        return f"{path} is the integer {value}, outside the 64-bit range the vector index stores"
    if isinstance(value, float):
        return "" if math.isfinite(value) else f"{path} is {value}, which JSON cannot spell"
    if isinstance(value, Mapping | list | tuple) and depth > METADATA_DEPTH_MAX:
        return f"metadata nests deeper than {METADATA_DEPTH_MAX} levels"
    if isinstance(value, Mapping):
        return _object_rejection(value, path, depth)
    if isinstance(value, list | tuple):
        return next(
            (r for i, v in enumerate(value) if (r := _json_value_rejection(v, f"{path}[{i}]", depth + 1))), ""
        )
    return f"{path} is a {type(value).__name__}, not a JSON value"


def _object_rejection(value: Mapping[Any, Any], path: str, depth: int) -> str:
    if isinstance(value, DuplicateKeys):
        return f"{path} names the key {value.duplicates[0]!r} more than once"
    for key, item in value.items():
        if not isinstance(key, str):
            return f"{path} has the non-string key {key!r}"
        if reason := _json_value_rejection(item, f"{path}.{key}", depth + 1):
            return reason
    return ""


def _json_type(value: object) -> str:
    """The JSON name of a decoded value's type, for messages."""
    names = {str: "a string", bool: "a boolean", int: "a number", float: "a number", list: "an array"}
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "an object"
    return names.get(type(value), type(value).__name__)


def _check_utf8(value: str, what: str, doc_id: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidEvent(f"{what} is not valid UTF-8 (lone surrogate)", doc_id=doc_id) from exc


class DuplicateKeys(dict[str, Any]):
    """A decoded JSON object that named some key twice. ``json.loads`` keeps the last value and
    says nothing; an event that does this is ambiguous (other parsers keep the first), so it is
    refused with the key named."""

    duplicates: tuple[str, ...] = ()


def _object_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    seen: set[str] = set()
    repeated: list[str] = []
    for key, _ in pairs:
        if key in seen:
            repeated.append(key)
        seen.add(key)
    marked = DuplicateKeys(obj)
    marked.duplicates = tuple(repeated)
    return marked


def loads_event_json(text: str | bytes) -> object:
    """``json.loads`` that remembers duplicated keys (see DuplicateKeys); raises what it raises."""
    return json.loads(text, object_pairs_hook=_object_pairs)


def canonical_json(value: object) -> str:
    """The one JSON spelling of a value: sorted keys, no spaces, no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def event_from_dict(raw: object, *, position: str | None = None) -> ChangeEvent:
    """Build an event from the JSONL event schema; raise InvalidEvent with the reason."""
    if not isinstance(raw, Mapping):
        raise InvalidEvent(f"event must be a JSON object, got {_json_type(raw)}")
    doc_id = raw.get("doc_id")
    if isinstance(raw, DuplicateKeys):
        shown = _shown(doc_id) if isinstance(doc_id, str) else None
        raise InvalidEvent(f"event names the key {raw.duplicates[0]!r} more than once", doc_id=shown)
    op = raw.get("op")
    shown = _shown(doc_id) if isinstance(doc_id, str) else None
    if op not in (Op.UPSERT.value, Op.DELETE.value):
        raise InvalidEvent(f"unknown op {_shown(repr(op))}", doc_id=shown)
    if "version" not in raw:
        raise InvalidEvent("missing version", doc_id=shown)
    metadata = raw.get("metadata")
    return ChangeEvent(
        op=Op(op),
        doc_id=doc_id,  # type: ignore[arg-type]  # validated in __post_init__
        version=raw["version"],
        text=raw.get("text"),
        metadata={} if metadata is None else metadata,
        position=position,
    )


def event_to_dict(event: ChangeEvent) -> dict[str, Any]:
    """The JSONL event schema of an event (inverse of event_from_dict)."""
    out: dict[str, Any] = {"op": event.op.value, "doc_id": event.doc_id, "version": event.version}
    if event.op is Op.UPSERT:
        out["text"] = event.text
    out["metadata"] = dict(event.metadata)
    return out
