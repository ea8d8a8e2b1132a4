"""The named invariants: one definition of "consistent", used by runtime checks, tests and the auditor.

From shared/reference/semantics.md:
- I1 the source, the keyword index and the vector index hold the same set of live chunk ids;
- I2 for every chunk, both indexes hold the text and content hash of the source's latest version;
- I3 no chunk exists in either index whose document was deleted at the source;
- I4 the vector index holds exactly one entity per chunk id;
- I5 a version observed for a document never goes back;
- I6 after a fault heals, lag returns under its bound (checked by the chaos runner with a clock).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from coordinator.chunking import parse_chunk_id
from coordinator.model import StoredChunk


@dataclass(frozen=True)
class ExpectedChunk:
    """What the source says a live chunk must look like in every index."""

    chunk_id: str
    content_hash: str


@dataclass(frozen=True)
class Violation:
    invariant: str
    side: str
    chunk_id: str
    detail: str

    def __str__(self) -> str:
        return f"{self.invariant} [{self.side}] {self.chunk_id}: {self.detail}"


def same_live_chunks(
    side: str, expected: Mapping[str, ExpectedChunk], observed: Iterable[str]
) -> list[Violation]:
    """I1: the index holds exactly the expected chunk IDs."""
    seen = set(observed)
    missing = [Violation("I1", side, cid, "missing from index") for cid in sorted(expected.keys() - seen)]
    extra = [
        Violation("I1", side, cid, "in index but not at the source") for cid in sorted(seen - expected.keys())
    ]
    return missing + extra


def latest_content(
    side: str, expected: Mapping[str, ExpectedChunk], observed: Iterable[StoredChunk]
) -> list[Violation]:
    """I2: every chunk the index holds carries the source's latest content hash."""
    return [
        Violation("I2", side, c.chunk_id, f"hash {c.content_hash[:12]} != source {want.content_hash[:12]}")
        for c in observed
        if (want := expected.get(c.chunk_id)) is not None and want.content_hash != c.content_hash
    ]


def no_deleted_documents(side: str, deleted_docs: set[str], observed: Iterable[str]) -> list[Violation]:
    """I3: no chunk of a document deleted at the source is in the index. An ID that is no chunk
    ID (another writer's entry) belongs to no document; I1 reports it."""
    return [
        Violation("I3", side, cid, "chunk of a deleted document")
        for cid in observed
        if _document_of(cid) in deleted_docs
    ]


def _document_of(cid: str) -> str | None:
    try:
        return parse_chunk_id(cid)[0]
    except ValueError:
        return None


def one_entity_per_id(side: str, observed_ids: Iterable[str]) -> list[Violation]:
    """I4: the vector index holds one entity per primary key."""
    counts = Counter(observed_ids)
    return [Violation("I4", side, cid, f"{n} entities") for cid, n in sorted(counts.items()) if n > 1]


def versions_never_go_back(side: str, history: Iterable[tuple[str, int]]) -> list[Violation]:
    """I5: over a sequence of (doc or chunk id, observed version), no version decreases."""
    newest: dict[str, int] = {}
    out: list[Violation] = []
    for key, version in history:
        if version < newest.get(key, -1):
            out.append(Violation("I5", side, key, f"version went back from {newest[key]} to {version}"))
        newest[key] = max(version, newest.get(key, -1))
    return out


def check_index(
    side: str,
    expected: Mapping[str, ExpectedChunk],
    deleted_docs: set[str],
    observed: list[StoredChunk],
) -> list[Violation]:
    """I1-I4 for one index against the source's expected chunks."""
    ids = [c.chunk_id for c in observed]
    return [
        *same_live_chunks(side, expected, ids),
        *latest_content(side, expected, observed),
        *no_deleted_documents(side, deleted_docs, ids),
        *one_entity_per_id(side, ids),
    ]
