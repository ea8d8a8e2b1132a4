"""A folder of text and Markdown files, diffed as a snapshot against the ledger.

Each matching file is a document: its ID is its path relative to the root with ``/``
separators, its metadata ``{"path": <that path>, "title": <first Markdown heading, or the file
name without its suffix>}``. Metadata holds nothing that changes when a file is merely touched
(no mtime), so an untouched document never looks changed.

A file is changed when ``document_hash(text, metadata)`` differs from the ``source_hash`` the
ledger recorded for it. Versions continue the ledger's: a new document gets 1, a changed one
(or one re-created over a tombstone) gets the ledger's version + 1. A live ledger document whose
file is gone gets a delete at its version + 1.

The folder is walked in doc_id order (code-point order, which is UTF-8 byte order) and merged
with ``known.iter_docs()``, which must come in the same order; this finds deleted files without
holding the list of files or documents in memory. Names starting with ``.`` (files and
directories) are skipped, and symbolic links to directories are not followed.
"""

from __future__ import annotations

import io
import os
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import structlog

from adapters.sources.base import bad_record
from adapters.sources.settings import FolderSourceSettings
from coordinator.batching import batched
from coordinator.errors import InvalidEvent, SourceError
from coordinator.events import TEXT_BYTES_MAX, ChangeEvent, Op
from coordinator.model import DocState
from coordinator.planner import document_hash
from coordinator.ports import KnownDocs, SourceRecord

DEFAULT_PATTERNS = ("*.md", "*.txt")
MARKDOWN_SUFFIXES = frozenset({".md", ".markdown"})
# Ledger states are looked up for this many files at a time: one ledger query per batch
# instead of one per file, while only the batch's names (never its texts) are held.
LOOKUP_BATCH_MAX = 500
# A heading longer than this is a paragraph mistaken for one; cut so metadata stays small.
TITLE_CHARS_MAX = 300

_HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class CurrentFile:
    """One file as the folder holds it now; ``version`` is 0 (a folder's versions are the ledger's)."""

    doc_id: str
    version: int
    text: str
    metadata: dict[str, str]


@dataclass(frozen=True)
class _File:
    doc_id: str
    path: Path


class FolderSource:
    """Upserts and deletes that bring the ledger in line with a folder's current files."""

    def __init__(
        self,
        root: str | Path,
        known: KnownDocs,
        *,
        name: str | None = None,
        patterns: Sequence[str] = DEFAULT_PATTERNS,
        file_bytes_max: int = TEXT_BYTES_MAX,
        lookup_batch_max: int = LOOKUP_BATCH_MAX,
    ) -> None:
        self.root = Path(root)
        self.name = name or f"folder:{self.root.name}"
        self._known = known
        self._patterns = tuple(patterns)
        self._file_bytes_max = file_bytes_max
        self._lookup_batch_max = lookup_batch_max

    @classmethod
    def from_settings(cls, settings: FolderSourceSettings, known: KnownDocs) -> FolderSource:
        """The files under ``settings.path`` that match ``settings.patterns``."""
        return cls(settings.path, known, name=settings.name, patterns=settings.patterns)

    def read(self) -> Iterator[SourceRecord]:
        """One event per new, changed or deleted file; unchanged files yield nothing."""
        if not self.root.is_dir():
            # An absent root would make every document look deleted.
            raise SourceError(f"folder {self.root} does not exist or is not a directory")
        live = _LiveDocs(self._known.iter_docs(include_deleted=False))
        for batch in batched(self._walk(self.root, ""), self._lookup_batch_max):
            states = self._known.get_docs([f.doc_id for f in batch])
            for file in batch:
                yield from (self._delete(s) for s in live.until(file.doc_id))
                live.skip(file.doc_id)
                record = self._record(file, states.get(file.doc_id))
                if record is not None:
                    yield record
        yield from (self._delete(s) for s in live.rest())

    def iter_current(self) -> Iterator[CurrentFile | SourceRecord]:
        """Every matching file as it is now, in doc_id order (what the auditor compares with);
        unreadable files come as BadRecords, with the version the ledger does not know: 0."""
        for file in self._walk(self.root, ""):
            text = self._load(file)
            if isinstance(text, str):
                metadata = {"path": file.doc_id, "title": _title(file.path, text)}
                yield CurrentFile(file.doc_id, 0, text, metadata)
            elif text is not None:
                yield text

    def commit(self, position: str) -> None:
        """Nothing to store: a snapshot source's position is the ledger itself.

        Every ``read()`` diffs the whole folder against the ledger's committed state, so an
        applied event is remembered by the ledger (its source_hash and version) and an event
        that was read but not applied is produced again by the next ``read()``.
        """

    def close(self) -> None:
        """Nothing to release: files are opened and closed one at a time."""

    def _walk(self, directory: Path, prefix: str) -> Iterator[_File]:
        """Matching files under ``directory`` in doc_id order, one directory listing at a time."""
        for name, is_dir in _sorted_entries(directory):
            if is_dir:
                yield from self._walk(directory / name, f"{prefix}{name}/")
            elif any(fnmatchcase(name, pattern) for pattern in self._patterns):
                yield _File(prefix + name, directory / name)

    def _record(self, file: _File, state: DocState | None) -> SourceRecord | None:
        text = self._load(file)
        if not isinstance(text, str):
            return text
        metadata = {"path": file.doc_id, "title": _title(file.path, text)}
        if state is not None and not state.deleted and state.source_hash == document_hash(text, metadata):
            return None
        version = 1 if state is None else state.version + 1
        try:
            return ChangeEvent(Op.UPSERT, file.doc_id, version, text, metadata)
        except InvalidEvent as exc:
            return self._bad(exc.reason, file)

    def _load(self, file: _File) -> str | SourceRecord | None:
        """The file's text, a BadRecord saying why it cannot be read, or None if it vanished."""
        try:
            info = file.path.stat()
            if not stat.S_ISREG(info.st_mode):
                return self._bad("not a regular file", file)
            if info.st_size > self._file_bytes_max:
                return self._bad(f"file larger than {self._file_bytes_max} bytes", file)
            with file.path.open("rb") as handle:
                data = handle.read(self._file_bytes_max + 1)
        except FileNotFoundError:
            return self._vanished(file)
        except OSError as exc:
            return self._bad(f"unreadable: {exc.strerror or exc}", file)
        return self._decode(data, file)

    def _decode(self, data: bytes, file: _File) -> str | SourceRecord:
        if len(data) > self._file_bytes_max:
            return self._bad(f"file larger than {self._file_bytes_max} bytes", file)
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            return self._bad(f"invalid UTF-8 at byte {exc.start}", file)

    def _vanished(self, file: _File) -> SourceRecord | None:
        if file.path.is_symlink():
            return self._bad("unreadable: symbolic link to a missing file", file)
        # Deleted between listing and reading: the next read() sees it gone and deletes it.
        log.info("file_vanished", source=self.name, doc_id=file.doc_id)
        return None

    def _delete(self, state: DocState) -> ChangeEvent:
        log.info("file_deleted", source=self.name, doc_id=state.doc_id, version=state.version + 1)
        return ChangeEvent(Op.DELETE, state.doc_id, state.version + 1)

    def _bad(self, reason: str, file: _File) -> SourceRecord:
        log.warning("bad_record", source=self.name, doc_id=file.doc_id, reason=reason)
        return bad_record(reason, payload=str(file.path), position=None, doc_id=file.doc_id)


class _LiveDocs:
    """The ledger's live documents as a cursor, checked to come in strictly ascending doc_id order."""

    def __init__(self, docs: Iterator[DocState]) -> None:
        self._docs = docs
        self._head = next(docs, None)

    def until(self, doc_id: str) -> Iterator[DocState]:
        """Consume and yield every document ordered before ``doc_id``."""
        while self._head is not None and self._head.doc_id < doc_id:
            yield self._advance()

    def skip(self, doc_id: str) -> None:
        """Consume the head if it is ``doc_id`` (its file exists)."""
        if self._head is not None and self._head.doc_id == doc_id:
            self._advance()

    def rest(self) -> Iterator[DocState]:
        while self._head is not None:
            yield self._advance()

    def _advance(self) -> DocState:
        current = self._head
        assert current is not None, "callers check the head first"
        self._head = next(self._docs, None)
        if self._head is not None and self._head.doc_id <= current.doc_id:
            # Merging against a differently ordered stream would delete documents that exist.
            raise SourceError(
                f"ledger documents are not in code-point order ({current.doc_id!r} before "
                f"{self._head.doc_id!r}); refusing to diff the folder against them"
            )
        return current


def _sorted_entries(directory: Path) -> list[tuple[str, bool]]:
    """(name, is_dir) of the visible entries of one directory, in doc_id order.

    A directory sorts as its name plus ``/``, so that ``a-b.md`` < ``a/x.md`` as in the ledger.
    An unreadable directory aborts the read: skipping it would make its documents look deleted.
    """
    try:
        with os.scandir(directory) as entries:
            found = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries if not e.name.startswith(".")]
    except OSError as exc:
        raise SourceError(f"cannot list {directory}: {exc}") from exc
    return sorted(found, key=lambda entry: entry[0] + "/" if entry[1] else entry[0])


def _title(path: Path, text: str) -> str:
    """The first ATX heading of a Markdown file (outside code fences), else the file's stem."""
    if path.suffix.lower() in MARKDOWN_SUFFIXES:
        heading = _first_heading(text)
        if heading:
            return heading[:TITLE_CHARS_MAX]
    return path.stem


def _first_heading(text: str) -> str | None:
    in_fence = False
    for line in io.StringIO(text):
        if _FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and (match := _HEADING.match(line.rstrip("\r\n"))):
            return match.group(1).strip()
    return None
