"""Stable chunk IDs, content hashes and the deterministic chunker.

A chunk ID is ``{doc_id}:chunk-{n}`` with n counted from 0, so it can be rebuilt from the source
alone. A content hash is the sha256 hex digest of the chunk's UTF-8 text.

With ``overlap_chars == 0`` the chunker is lossless: joining a document's chunks in order gives
back its text exactly, separators included.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass

from coordinator.limits import CHUNK_CHARS_MAX

CHUNK_SEPARATOR = ":chunk-"
# Blank lines (possibly holding spaces) end a paragraph; the separator stays with the paragraph
# before it so that nothing is lost.
_PARAGRAPH_END = re.compile(r"\n[ \t]*\n\s*")
# A sentence ends at ., ! or ? followed by whitespace; the whitespace stays with the sentence.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class ChunkingSettings:
    """How documents are cut. Part of a generation's identity: changing it re-cuts everything."""

    max_chars: int = 1000
    overlap_chars: int = 0

    def __post_init__(self) -> None:
        if self.max_chars < 1:
            raise ValueError("max_chars must be at least 1")
        if not 0 <= self.overlap_chars < self.max_chars:
            raise ValueError("overlap_chars must be in 0..max_chars-1")
        if self.max_chars + self.overlap_chars > CHUNK_CHARS_MAX:
            raise ValueError(
                f"max_chars + overlap_chars must be at most {CHUNK_CHARS_MAX}: a chunk must fit the "
                "vector index's 65,535-byte text field at 4 bytes per character"
            )

    @property
    def fingerprint(self) -> str:
        """A short stable name for these settings, recorded with every generation."""
        return f"paragraph:max{self.max_chars}:overlap{self.overlap_chars}"


def chunk_id(doc_id: str, index: int) -> str:
    """The stable ID of chunk ``index`` of ``doc_id``."""
    return f"{doc_id}{CHUNK_SEPARATOR}{index}"


def parse_chunk_id(cid: str) -> tuple[str, int]:
    """Split a chunk ID back into (doc_id, index); ValueError if it is not one."""
    doc_id, sep, index = cid.rpartition(CHUNK_SEPARATOR)
    if not sep or not doc_id or not index.isdigit():
        raise ValueError(f"not a chunk id: {cid!r}")
    return doc_id, int(index)


def content_hash(text: str) -> str:
    """sha256 hex digest of the UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def chunk_text(text: str, settings: ChunkingSettings = ChunkingSettings()) -> list[str]:
    """Cut ``text`` into chunks of at most ``max_chars`` (plus overlap) characters."""
    pieces = [p for para in _split_keep(text, _PARAGRAPH_END) for p in _fit(para, settings.max_chars)]
    chunks = _pack(pieces, settings.max_chars)
    return _with_overlap(chunks, settings.overlap_chars)


def _split_keep(text: str, boundary: re.Pattern[str]) -> list[str]:
    """Split after each boundary match, keeping the matched separator on the left piece."""
    parts: list[str] = []
    start = 0
    for match in boundary.finditer(text):
        parts.append(text[start : match.end()])
        start = match.end()
    if start < len(text):
        parts.append(text[start:])
    return parts


def _fit(paragraph: str, max_chars: int) -> list[str]:
    """Split a paragraph that is too long, on sentences first and then on characters."""
    if len(paragraph) <= max_chars:
        return [paragraph]
    sentences = _split_keep(paragraph, _SENTENCE_END)
    return [piece for s in sentences for piece in _hard_split(s, max_chars)]


def _hard_split(text: str, max_chars: int) -> list[str]:
    return [text[i : i + max_chars] for i in range(0, len(text), max_chars)]


def _pack(pieces: list[str], max_chars: int) -> list[str]:
    """Greedily join consecutive pieces while the result stays within ``max_chars``."""
    chunks: list[str] = []
    current = ""
    for piece in pieces:
        if current and len(current) + len(piece) > max_chars:
            chunks.append(current)
            current = ""
        current += piece
    if current:
        chunks.append(current)
    return chunks


def _with_overlap(chunks: list[str], overlap_chars: int) -> list[str]:
    if overlap_chars == 0 or not chunks:
        return chunks
    return [chunks[0], *(prev[-overlap_chars:] + cur for prev, cur in itertools.pairwise(chunks))]
