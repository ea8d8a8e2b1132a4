"""Consistency tokens: their spelling, their limits, and what a token still waits for."""

from __future__ import annotations

import base64
import zlib
from collections.abc import Sequence

import pytest

from coordinator.consistency import (
    NOT_COMMITTED,
    NOT_VISIBLE,
    TOKEN_DOCS_MAX,
    TOKEN_JSON_BYTES_MAX,
    TOKEN_PREFIX,
    ConsistencyToken,
    Pending,
    not_committed,
    not_visible,
)
from coordinator.errors import InvalidSearch
from coordinator.model import ChunkState, DocState


def test_a_token_round_trips_and_keeps_the_highest_version_per_document() -> None:
    """Encoding then decoding gives the same changes; a document named twice keeps its newest version."""
    token = ConsistencyToken.of([("b", 3), ("a", 1), ("b", 7), ("é:x", 2)])
    assert token.docs == (("a", 1), ("b", 7), ("é:x", 2))
    spelled = token.encode()
    assert spelled.startswith(TOKEN_PREFIX) and "=" not in spelled
    assert ConsistencyToken.decode(spelled) == token
    merged = token.merge(ConsistencyToken.of([("a", 9), ("c", 1)]))
    assert merged.docs == (("a", 9), ("b", 7), ("c", 1), ("é:x", 2))


def test_damaged_or_hostile_tokens_are_refused_in_one_line() -> None:
    """A wrong prefix, bad base64, bad JSON, bad entries and a decompression bomb are InvalidSearch."""
    def spell(raw: bytes) -> str:
        return TOKEN_PREFIX + base64.urlsafe_b64encode(zlib.compress(raw)).decode()

    bad = [
        "nope",
        TOKEN_PREFIX + "!!!",
        spell(b"not json"),
        spell(b'{"a": 1}'),
        spell(b'[["a", -1]]'),
        spell(b'[["a", true]]'),
        spell(b'[["a"]]'),
        spell(b" " * (TOKEN_JSON_BYTES_MAX + 10)),
    ]
    for text in bad:
        with pytest.raises(InvalidSearch, match="token"):
            ConsistencyToken.decode(text)


def test_a_token_covers_at_most_its_limit_of_documents() -> None:
    """More documents than TOKEN_DOCS_MAX cannot make a token."""
    with pytest.raises(ValueError, match="at most"):
        ConsistencyToken.of((f"d{i}", 1) for i in range(TOKEN_DOCS_MAX + 1))


def _state(doc_id: str, version: int, chunk_versions: Sequence[int], deleted: bool = False) -> DocState:
    chunks = tuple(ChunkState(f"{doc_id}:chunk-{i}", i, f"h{i}", v) for i, v in enumerate(chunk_versions))
    return DocState(doc_id, version, deleted, chunks)


class Seen:
    """What a keyword index's searches show, per chunk ID."""

    def __init__(self, versions: dict[str, int]) -> None:
        self.versions = versions
        self.asked: list[str] = []

    def visible(self, chunk_ids: Sequence[str]) -> dict[str, int]:
        self.asked += chunk_ids
        return {c: self.versions[c] for c in chunk_ids if c in self.versions}


def test_changes_wait_until_committed_then_until_visible_to_keyword_searches() -> None:
    """Uncommitted changes are pending first; committed live ones until every chunk is visible
    at its committed version or later; a newer committed version and a tombstone need nothing."""
    token = ConsistencyToken.of([("a", 5), ("b", 2), ("gone", 4), ("new", 1)])
    committed = {
        "a": _state("a", 5, [3, 5]),
        "b": _state("b", 9, [9]),
        "gone": _state("gone", 4, [], deleted=True),
    }
    assert not_committed(token, committed) == [Pending("new", 1, NOT_COMMITTED)]
    committed["new"] = _state("new", 1, [1])
    assert not_committed(token, committed) == []
    seen = Seen({"a:chunk-0": 3, "a:chunk-1": 4, "b:chunk-0": 9, "new:chunk-0": 2})
    assert not_visible(token, committed, seen) == [Pending("a", 5, NOT_VISIBLE)]
    assert sorted(seen.asked) == ["a:chunk-0", "a:chunk-1", "b:chunk-0", "new:chunk-0"]
    seen.versions["a:chunk-1"] = 5
    assert not_visible(token, committed, seen) == []
