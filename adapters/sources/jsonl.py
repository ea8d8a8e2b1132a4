"""A JSON Lines file of change events, read from the last committed byte offset.

Each line is one event in the schema ``{"op": "upsert"|"delete", "doc_id": str, "version": int,
"text": str, "metadata": object}``. A line that cannot become an event is reported as a
BadRecord with its reason, and reading goes on with the next line.

Positions are byte offsets *after* a line, as decimal strings. ``commit(position)`` stores
"the position after the last applied event"; ``read()`` starts there, so a line is delivered
again only if it was read but not committed (at-least-once). The file is read as bytes and each
line decoded on its own, so one line of bad bytes spoils only itself. A last line without a
newline is read as a complete line: writers that append to a live file must write whole lines.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import structlog

from adapters.sources.base import bad_record
from adapters.sources.settings import JsonlSourceSettings
from coordinator.errors import InvalidEvent, SourceError
from coordinator.events import event_from_dict, loads_event_json
from coordinator.limits import RECORD_BYTES_MAX
from coordinator.ports import CheckpointStore, SourceRecord

# The longest line that can still be a valid event. Longer lines are dead-lettered with their
# first LINE_BYTES_MAX bytes; the rest is skipped without being held in memory.
LINE_BYTES_MAX = RECORD_BYTES_MAX
# How much of an oversize line is read at a time while skipping to its end.
SKIP_CHUNK_BYTES = 1024 * 1024
# How long `follow` waits before looking for appended lines again.
FOLLOW_POLL_S = 0.2
_BLANK = b" \t\r\n"
_UTF8_BOM = b"\xef\xbb\xbf"

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class _Line:
    """One raw line: its bytes (without the newline), where it ends, and whether it was too long."""

    data: bytes
    start: int
    end: int
    oversize: bool = False
    # False for a last line without its newline: a writer may still be appending to it.
    terminated: bool = True


class JsonlSource:
    """Change events from a JSON Lines file, resumable from a committed byte offset."""

    def __init__(
        self,
        path: str | Path,
        checkpoints: CheckpointStore,
        *,
        name: str | None = None,
        line_bytes_max: int = LINE_BYTES_MAX,
    ) -> None:
        self.path = Path(path)
        self.name = name or f"jsonl:{self.path.name}"
        self._checkpoints = checkpoints
        self._line_bytes_max = line_bytes_max

    @classmethod
    def from_settings(cls, settings: JsonlSourceSettings, checkpoints: CheckpointStore) -> JsonlSource:
        """The file ``settings.path``, named ``settings.name``."""
        return cls(settings.path, checkpoints, name=settings.name)

    def read(self) -> Iterator[SourceRecord]:
        """Records from the last committed offset to the current end of the file."""
        start = self._start_offset()
        try:
            with self.path.open("rb") as handle:
                yield from self._records(handle, start)
        except OSError as exc:
            raise SourceError(f"cannot read {self.path}: {exc}") from exc

    def follow(self, stop: Callable[[], bool], poll_s: float = FOLLOW_POLL_S) -> Iterator[SourceRecord]:
        """Like ``read()``, then wait for appended lines until ``stop()`` is true.

        Unlike ``read()``, a last line without its newline is left for a later poll, because a
        live writer may still be appending to it.
        """
        offset = self._start_offset()
        while not stop():
            before = offset
            for record, end in self._complete_records(offset):
                offset = end
                if record is not None:
                    yield record
            if offset == before:
                time.sleep(poll_s)

    def _complete_records(self, offset: int) -> Iterator[tuple[SourceRecord | None, int]]:
        try:
            with self.path.open("rb") as handle:
                handle.seek(offset)
                for line in _lines(handle, offset, self._line_bytes_max):
                    if not line.terminated:
                        return
                    keep = line.oversize or line.data.strip(_BLANK)
                    yield (self._record(line) if keep else None), line.end
        except FileNotFoundError:
            return
        except OSError as exc:
            raise SourceError(f"cannot read {self.path}: {exc}") from exc

    def commit(self, position: str) -> None:
        """Persist ``position`` (a byte offset after an applied line) as the place to resume from."""
        _parse_offset(position)
        self._checkpoints.set_checkpoint(self.name, position)

    def close(self) -> None:
        """Nothing to release: the file is opened for each ``read()``."""

    def _start_offset(self) -> int:
        stored = self._checkpoints.get_checkpoint(self.name)
        offset = 0 if stored is None else _parse_offset(stored)
        size = self.path.stat().st_size if self.path.exists() else 0
        if offset > size:
            # The file was truncated or replaced: resuming in the middle of other data would
            # silently skip or mangle events, so an operator must decide.
            raise SourceError(f"checkpoint {offset} is beyond the end of {self.path} ({size} bytes)")
        return offset

    def _records(self, handle: BinaryIO, start: int) -> Iterator[SourceRecord]:
        handle.seek(start)
        for line in _lines(handle, start, self._line_bytes_max):
            if line.oversize or line.data.strip(_BLANK):
                yield self._record(line)

    def _record(self, line: _Line) -> SourceRecord:
        position = str(line.end)
        if line.oversize:
            return self._bad(f"line longer than {self._line_bytes_max} bytes", line, position)
        # A byte order mark may open the file; it is not part of the first event.
        data = line.data.removeprefix(_UTF8_BOM) if line.start == 0 else line.data
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            return self._bad(f"invalid UTF-8 at byte {exc.start} of the line", line, position)
        return self._parse(text, line, position)

    def _parse(self, text: str, line: _Line, position: str) -> SourceRecord:
        try:
            raw = loads_event_json(text)
        except json.JSONDecodeError as exc:
            return self._bad(f"invalid JSON: {exc.msg} at column {exc.colno}", line, position)
        except RecursionError:
            return self._bad("invalid JSON: nested too deeply", line, position)
        try:
            return event_from_dict(raw, position=position)
        except InvalidEvent as exc:
            return self._bad(exc.reason, line, position, exc.doc_id)

    def _bad(self, reason: str, line: _Line, position: str, doc_id: str | None = None) -> SourceRecord:
        log.warning("bad_record", source=self.name, position=position, doc_id=doc_id, reason=reason)
        return bad_record(reason, line.data, position, doc_id, truncated=line.oversize)


def _lines(handle: BinaryIO, start: int, line_bytes_max: int) -> Iterator[_Line]:
    """Every line from the handle's position on; oversize lines are skipped, not loaded."""
    begin = start
    while chunk := handle.readline(line_bytes_max + 1):
        if len(chunk) > line_bytes_max and not chunk.endswith(b"\n"):
            end = begin + len(chunk) + _skip_rest_of_line(handle)
            yield _Line(chunk[:line_bytes_max], begin, end, oversize=True)
        else:
            end = begin + len(chunk)
            yield _Line(chunk.rstrip(b"\r\n"), begin, end, terminated=chunk.endswith(b"\n"))
        begin = end


def _skip_rest_of_line(handle: BinaryIO) -> int:
    """Read up to and including the next newline in bounded pieces; the number of bytes read."""
    skipped = 0
    while piece := handle.readline(SKIP_CHUNK_BYTES):
        skipped += len(piece)
        if piece.endswith(b"\n"):
            break
    return skipped


def _parse_offset(position: str) -> int:
    if not position.isdigit():
        raise SourceError(f"not a JSONL position (a byte offset): {position!r}")
    return int(position)
