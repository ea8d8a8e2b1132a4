"""The named invariants compare what an index really holds (texts, metadata) with an expectation
the check computed itself, never with a hash the code under test produced."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from coordinator import invariants
from coordinator.audit import DocView, Observed, check_view_invariants, classify
from coordinator.chunking import ChunkingSettings
from coordinator.invariants import ExpectedChunk, check_index, metadata_digest
from coordinator.model import ChunkState, DocState, StoredChunk
from coordinator.planner import metadata_hash

METADATA_SAMPLES: list[dict[str, Any]] = [
    {},
    {"tenant": "acme", "acl": ["finance", "legal"]},
    {"z": 1, "a": {"nested": [1, 2.5, None, True]}, "ü": "naïve ✓"},
    {"rev": 3, "table": "t0"},
]


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _stored(cid: str, text: str | None, metadata: dict[str, Any] | None, content: str = "") -> StoredChunk:
    doc_id = cid.split(":")[0]
    return StoredChunk(cid, doc_id, 0, _sha(content or text or ""), 1, text, metadata)


@pytest.mark.parametrize("metadata", METADATA_SAMPLES)
def test_the_checks_metadata_digest_agrees_with_what_the_ledger_records(metadata: dict[str, Any]) -> None:
    """The check's own digest (hashlib over canonical JSON) equals the planner's metadata_hash for
    the same metadata: two spellings of one definition, so the auditor can compare them."""
    assert metadata_digest(metadata) == metadata_hash(metadata)
    assert metadata_digest(metadata) != metadata_digest({**metadata, "extra": 1})


def test_a_text_that_differs_from_the_source_is_an_i2_violation_even_under_a_matching_hash() -> None:
    """A stored text other than the source's own is I2 even when the stored content_hash field
    agrees with the expectation (a hash that ignored part of the text would agree)."""
    expected = {"d:chunk-0": ExpectedChunk("d:chunk-0", _sha("the source text"), "the source text")}
    lying = _stored("d:chunk-0", "the source text, edited", {}, content="the source text")
    unread = _stored("d:chunk-0", None, {}, content="the source text")
    assert [v.detail for v in check_index("keyword", expected, set(), [lying])] == [
        "text 'the source text, edited' != source 'the source text'"
    ]
    assert [v.detail for v in check_index("keyword", expected, set(), [unread])] == ["text not read back"]
    assert check_index("keyword", expected, set(), [_stored("d:chunk-0", "the source text", {})]) == []


def test_metadata_other_than_the_sources_or_not_read_is_an_i2_violation() -> None:
    """Stored metadata is compared with the source's by digest; metadata that was not read back
    cannot pass for right."""
    want = {"tenant": "acme"}
    expected = {"d:chunk-0": ExpectedChunk("d:chunk-0", _sha("t"), "t", metadata_digest(want))}
    found = {
        name: [str(v) for v in check_index("vector", expected, set(), [_stored("d:chunk-0", "t", held)])]
        for name, held in (("same", {"tenant": "acme"}), ("other", {"tenant": "evil"}), ("unread", None))
    }
    assert found == {
        "same": [],
        "other": ["I2 [vector] d:chunk-0: metadata differs from the source's"],
        "unread": ["I2 [vector] d:chunk-0: metadata not read back"],
    }


def test_the_auditor_reports_metadata_other_than_the_ledgers_as_stale_and_as_i2() -> None:
    """A chunk whose metadata digest is not the ledger's is `stale` ("metadata differs") in its
    index and `cross_index` across indexes, and the view's invariants name it I2; metadata a scan
    did not read is not judged."""
    good = {"tenant": "acme"}
    chunks = (ChunkState("d:chunk-0", 0, _sha("t"), 2),)
    view = DocView("d", DocState("d", 2, False, chunks, metadata_hash=metadata_hash(good)))
    edited = metadata_digest({"tenant": "x"})
    view.keyword = {"d:chunk-0": Observed("d:chunk-0", 2, _sha("t"), metadata_digest=edited)}
    view.vector = {"d:chunk-0": Observed("d:chunk-0", 2, _sha("t"), metadata_digest=None)}
    findings = sorted((f.category.value, f.side) for f in classify(view, ChunkingSettings()))
    assert findings == [("cross_index", "indexes"), ("stale", "keyword")]
    [stale] = [f for f in classify(view, ChunkingSettings()) if f.category.value == "stale"]
    assert stale.detail.startswith("metadata differs"), stale
    assert [(v.invariant, v.side) for v in check_view_invariants(view, ChunkingSettings())] == [("I2", "keyword")]
    assert invariants.latest_metadata("vector", {}, [("d:chunk-0", "x")]) == [], "unknown chunks are I1's"
