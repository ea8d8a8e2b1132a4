"""The named invariants: one definition of "consistent", used by runtime checks, tests and the auditor.

From shared/reference/semantics.md:
- I1 the source, the keyword index and the vector index hold the same set of live chunk ids;
- I2 for every chunk, both indexes hold the text, content hash and metadata of the source's
  latest version;
- I3 no chunk exists in either index whose document was deleted at the source;
- I4 the vector index holds exactly one entity per chunk id;
- I5 a version observed for a document never goes back;
- I6 after a fault heals, lag returns under its bound (checked by the chaos runner with a clock).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from coordinator.chunking import parse_chunk_id
from coordinator.model import StoredChunk


@dataclass(frozen=True)
class ExpectedChunk:
    """What the source says a live chunk must look like in every index: its content hash and,
    where the checker knows them, the source's own text of the chunk (compared as it is) and a
    ``metadata_digest`` of the document's metadata. A check that has them does not depend on
    the hash the code under test computed."""

    chunk_id: str
    content_hash: str
    text: str | None = None
    metadata_digest: str | None = None


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


def metadata_digest(metadata: Mapping[str, Any]) -> str:
    """sha256 hex digest of a metadata object's canonical JSON (sorted keys, no spaces, UTF-8).

    Computed here with hashlib, not by the planner's ``metadata_hash``, so that a check does not
    take the code it checks on trust; both spell the same canonical JSON, so this digest equals
    what the ledger records for the same metadata. A value JSON cannot spell (only another
    writer's entry can hold one) is spelled by ``repr`` instead of failing the check."""
    raw = json.dumps(metadata, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=repr)
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()


def latest_content(
    side: str, expected: Mapping[str, ExpectedChunk], observed: Iterable[StoredChunk]
) -> list[Violation]:
    """I2: every chunk the index holds carries the source's latest content hash and, where the
    check knows it, the source's very text."""
    out = []
    for chunk in observed:
        want = expected.get(chunk.chunk_id)
        problem = "" if want is None else _content_problem(want, chunk)
        if problem:
            out.append(Violation("I2", side, chunk.chunk_id, problem))
    return out


def _content_problem(want: ExpectedChunk, got: StoredChunk) -> str:
    if want.content_hash != got.content_hash:
        return f"hash {got.content_hash[:12]} != source {want.content_hash[:12]}"
    if want.text is None or got.text == want.text:
        return ""
    if got.text is None:
        return "text not read back"
    return f"text {got.text[:40]!r} != source {want.text[:40]!r}"


def latest_metadata(
    side: str, expected: Mapping[str, ExpectedChunk], observed: Iterable[tuple[str, str | None]]
) -> list[Violation]:
    """I2 (metadata): every chunk the index holds carries the source's latest metadata.

    ``observed`` pairs each chunk ID with the ``metadata_digest`` of the metadata read back from
    the index (None when none was read); chunks whose expectation names no digest are skipped."""
    out = []
    for cid, digest in observed:
        want = expected.get(cid)
        if want is None or want.metadata_digest is None or digest == want.metadata_digest:
            continue
        detail = "metadata not read back" if digest is None else "metadata differs from the source's"
        out.append(Violation("I2", side, cid, detail))
    return out


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
    """I1-I4 for one index against the source's expected chunks (texts and metadata where the
    expectation names them: read the index with its texts, ``scan(with_text=True)``)."""
    ids = [c.chunk_id for c in observed]
    digests = [(c.chunk_id, None if c.metadata is None else metadata_digest(c.metadata)) for c in observed]
    return [
        *same_live_chunks(side, expected, ids),
        *latest_content(side, expected, observed),
        *latest_metadata(side, expected, digests),
        *no_deleted_documents(side, deleted_docs, ids),
        *one_entity_per_id(side, ids),
    ]
