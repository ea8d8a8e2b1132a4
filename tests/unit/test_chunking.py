"""The chunker, chunk IDs and content hashes."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.chunking import ChunkingSettings, chunk_id, chunk_text, content_hash, parse_chunk_id

_paragraphs = st.lists(
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=400), max_size=12
)


@settings(max_examples=300, deadline=None)
@given(parts=_paragraphs, max_chars=st.integers(min_value=1, max_value=500))
def test_joining_chunks_reproduces_the_text(parts: list[str], max_chars: int) -> None:
    """With overlap 0, the chunks of any text joined in order are exactly that text."""
    text = "\n\n".join(parts)
    chunks = chunk_text(text, ChunkingSettings(max_chars=max_chars))
    assert "".join(chunks) == text
    assert all(0 < len(c) <= max_chars for c in chunks)


@settings(max_examples=100, deadline=None)
@given(parts=_paragraphs)
def test_chunking_is_deterministic(parts: list[str]) -> None:
    """The same text always yields the same chunks."""
    text = "\n\n".join(parts)
    assert chunk_text(text) == chunk_text(text)


def test_paragraphs_are_packed_up_to_max_chars() -> None:
    """Short paragraphs share a chunk until the next one would overflow it."""
    text = "a" * 40 + "\n\n" + "b" * 40 + "\n\n" + "c" * 40
    chunks = chunk_text(text, ChunkingSettings(max_chars=90))
    assert chunks == ["a" * 40 + "\n\n" + "b" * 40 + "\n\n", "c" * 40]


def test_oversized_paragraph_splits_on_sentences_first() -> None:
    """A paragraph longer than max_chars is cut at sentence ends before falling back to characters."""
    text = "One two three. Four five six! Seven eight nine?"
    chunks = chunk_text(text, ChunkingSettings(max_chars=20))
    assert chunks == ["One two three. ", "Four five six! ", "Seven eight nine?"]


def test_sentence_longer_than_max_chars_splits_on_characters() -> None:
    """A single sentence longer than max_chars is cut into max_chars pieces."""
    assert chunk_text("x" * 25, ChunkingSettings(max_chars=10)) == ["x" * 10, "x" * 10, "x" * 5]


def test_overlap_prefixes_the_tail_of_the_previous_chunk() -> None:
    """With overlap, each chunk after the first starts with the previous chunk's last characters."""
    chunks = chunk_text("x" * 10 + "y" * 10, ChunkingSettings(max_chars=10, overlap_chars=3))
    assert chunks == ["x" * 10, "xxx" + "y" * 10]


def test_empty_text_has_no_chunks() -> None:
    """An empty document produces no chunks at all."""
    assert chunk_text("") == []


def test_chunk_ids_round_trip() -> None:
    """Chunk IDs are {doc_id}:chunk-{n} and parse back, even when doc_id contains colons."""
    assert chunk_id("kb/a:b", 3) == "kb/a:b:chunk-3"
    assert parse_chunk_id("kb/a:b:chunk-3") == ("kb/a:b", 3)
    with pytest.raises(ValueError):
        parse_chunk_id("kb/a:b")


def test_content_hash_is_sha256_of_utf8() -> None:
    """The content hash is the sha256 hex digest of the UTF-8 bytes."""
    assert content_hash("héllo") == hashlib.sha256("héllo".encode()).hexdigest()


def test_invalid_settings_are_refused() -> None:
    """max_chars below 1 or an overlap not below max_chars is a configuration error."""
    with pytest.raises(ValueError):
        ChunkingSettings(max_chars=0)
    with pytest.raises(ValueError):
        ChunkingSettings(max_chars=10, overlap_chars=10)
