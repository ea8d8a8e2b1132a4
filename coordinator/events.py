"""The normalized change event every source produces, and its validation."""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from coordinator.errors import InvalidEvent

# Versions travel as ES external versions, which are signed 64-bit integers.
VERSION_MAX = 2**63 - 1
# Longer IDs would make chunk IDs exceed the vector index's VARCHAR primary key budget.
DOC_ID_BYTES_MAX = 512
# A bigger document is almost certainly a mistake (a binary blob, a dump) and would produce
# thousands of chunks in one transaction; it goes to the dead-letter queue instead.
TEXT_BYTES_MAX = 8 * 1024 * 1024
# Metadata is copied onto every chunk in both indexes; keep it small.
METADATA_BYTES_MAX = 64 * 1024


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
    if len(doc_id.encode("utf-8", "surrogatepass")) > DOC_ID_BYTES_MAX:
        raise InvalidEvent(f"doc_id longer than {DOC_ID_BYTES_MAX} bytes", doc_id=doc_id[:64])
    if ":chunk-" in doc_id:
        raise InvalidEvent("doc_id must not contain ':chunk-' (reserved for chunk IDs)", doc_id=doc_id)
    _check_utf8(doc_id, "doc_id", doc_id)


def _check_version(version: object, doc_id: str) -> None:
    if isinstance(version, bool) or not isinstance(version, int):
        raise InvalidEvent(f"version must be an integer, got {type(version).__name__}", doc_id=doc_id)
    if not 0 <= version <= VERSION_MAX:
        raise InvalidEvent(f"version {version} outside 0..2^63-1", doc_id=doc_id)


def _check_text(text: object, doc_id: str) -> None:
    if not isinstance(text, str):
        raise InvalidEvent("upsert needs a text string", doc_id=doc_id)
    _check_utf8(text, "text", doc_id)
    if len(text.encode("utf-8")) > TEXT_BYTES_MAX:
        raise InvalidEvent(f"text larger than {TEXT_BYTES_MAX} bytes", doc_id=doc_id)


def _check_metadata(metadata: object, doc_id: str) -> None:
    if not isinstance(metadata, Mapping):
        raise InvalidEvent("metadata must be an object", doc_id=doc_id)
    try:
        encoded = canonical_json(metadata)
    except (TypeError, ValueError) as exc:
        raise InvalidEvent(f"metadata is not JSON-serializable: {exc}", doc_id=doc_id) from exc
    _check_utf8(encoded, "metadata", doc_id)
    if len(encoded.encode("utf-8")) > METADATA_BYTES_MAX:
        raise InvalidEvent(f"metadata larger than {METADATA_BYTES_MAX} bytes", doc_id=doc_id)


def _check_utf8(value: str, what: str, doc_id: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidEvent(f"{what} is not valid UTF-8 (lone surrogate)", doc_id=doc_id) from exc


def canonical_json(value: object) -> str:
    """The one JSON spelling of a value: sorted keys, no spaces, no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def event_from_dict(raw: object, *, position: str | None = None) -> ChangeEvent:
    """Build an event from the JSONL event schema; raise InvalidEvent with the reason."""
    if not isinstance(raw, Mapping):
        raise InvalidEvent("event must be a JSON object")
    doc_id = raw.get("doc_id")
    op = raw.get("op")
    if op not in (Op.UPSERT.value, Op.DELETE.value):
        raise InvalidEvent(f"unknown op {op!r}", doc_id=doc_id if isinstance(doc_id, str) else None)
    if "version" not in raw:
        raise InvalidEvent("missing version", doc_id=doc_id if isinstance(doc_id, str) else None)
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
