"""Request bodies of ``POST /events``: how a body is split into items, each a valid event or a
bad item with its reason.

Bodies use the JSONL event schema (``{"op", "doc_id", "version", "text", "metadata"}``, parsed by
``coordinator.events.event_from_dict`` exactly as the JSONL source parses a line):

- ``application/json``: one event object, or an array of event objects;
- ``application/x-ndjson`` (also ``application/jsonl``, ``application/x-jsonlines``): one event
  per line, each line decoded and parsed on its own as a line of the JSONL source's file is
  (blank lines skipped, a leading byte order mark dropped, ``\\r\\n`` accepted).

A body that can be split into items is never refused as a whole because of some of them; a body
that cannot is a BodyError carrying the HTTP status that says why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from adapters.sources.jsonl import LINE_BYTES_MAX
from coordinator.errors import InvalidEvent, LockstepError
from coordinator.events import ChangeEvent, canonical_json, event_from_dict, event_to_dict, loads_event_json

# The default request body limit: one event of the largest valid size (the JSONL source's longest
# line) fits in a request of its own.
BODY_BYTES_MAX = LINE_BYTES_MAX

# Media types (lower case, without parameters) and how their bodies are split into items.
JSON_MEDIA_TYPE = "application/json"
LINES_MEDIA_TYPES = frozenset({"application/x-ndjson", "application/jsonl", "application/x-jsonlines"})
MEDIA_TYPES = frozenset({JSON_MEDIA_TYPE, *LINES_MEDIA_TYPES})

_BLANK = b" \t\r\n"
_UTF8_BOM = b"\xef\xbb\xbf"


class BodyError(LockstepError):
    """A request body refused as a whole; ``status`` is the HTTP status that says why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Item:
    """One item of a request: a valid event (``event``) or a bad item (``reason``)."""

    index: int
    payload: str
    event: ChangeEvent | None = None
    reason: str | None = None
    doc_id: str | None = None
    # The item's bytes as sent (a line of a JSON-lines body), kept for its dead letter: ``payload``
    # holds the canonical event, or cannot hold bytes that are not UTF-8.
    raw: bytes | None = None

    @property
    def key(self) -> tuple[str, int]:
        assert self.event is not None, "only events have a key"
        return self.event.doc_id, self.event.version


def parse_body(body: bytes, media_type: str, items_max: int) -> list[Item]:
    """The items of a request body; BodyError when the body as a whole cannot be read."""
    if not body.strip(_BLANK):
        raise BodyError(400, "empty body: send one event, an array of events or JSON lines")
    if media_type == JSON_MEDIA_TYPE:
        items = _json_items(body, items_max)
    elif media_type in LINES_MEDIA_TYPES:
        items = _line_items(body, items_max)
    else:
        raise BodyError(415, f"unsupported media type {media_type!r}; use one of {sorted(MEDIA_TYPES)}")
    return items


def _json_items(body: bytes, items_max: int) -> list[Item]:
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BodyError(400, f"body is not valid UTF-8 (byte {exc.start})") from exc
    try:
        raw = loads_event_json(text)
    except json.JSONDecodeError as exc:
        raise BodyError(400, f"body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except RecursionError as exc:
        raise BodyError(400, "body is not valid JSON: nested too deeply") from exc
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list):
        raise BodyError(422, f"body is a JSON {type(raw).__name__}; send an event object or an array of events")
    if not raw:
        raise BodyError(422, "the array holds no events")
    _check_count(len(raw), items_max)
    return [_item(i, value, _json_payload(value)) for i, value in enumerate(raw)]


def _line_items(body: bytes, items_max: int) -> list[Item]:
    lines = [
        (i, line.rstrip(b"\r"))
        for i, line in enumerate(body.removeprefix(_UTF8_BOM).split(b"\n"))
        if line.strip(_BLANK)
    ]
    _check_count(len(lines), items_max)
    return [_line_item(i, line) for i, line in lines]


def _line_item(index: int, line: bytes) -> Item:
    """One line, read as the JSONL source reads a line of its file."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        shown = line.decode("utf-8", "replace")
        return Item(index, shown, reason=f"invalid UTF-8 at byte {exc.start} of the line", raw=line)
    try:
        raw = loads_event_json(text)
    except json.JSONDecodeError as exc:
        return Item(index, text, reason=f"invalid JSON: {exc.msg} at column {exc.colno}")
    except RecursionError:
        return Item(index, text, reason="invalid JSON: nested too deeply")
    return _item(index, raw, text, line)


def _item(index: int, raw: object, payload: str, sent: bytes | None = None) -> Item:
    """``sent``: the item's bytes as the client sent them (a line), kept for its dead letter."""
    try:
        event = event_from_dict(raw)
    except InvalidEvent as exc:
        return Item(index, payload, reason=exc.reason, doc_id=exc.doc_id, raw=sent)
    return Item(index, canonical_json(event_to_dict(event)), event=event, raw=sent)


def _json_payload(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _check_count(count: int, items_max: int) -> None:
    if count > items_max:
        raise BodyError(413, f"{count} events in one request; at most {items_max}")
