"""The read path's fence and metadata filter, on committed states built by the planner."""

from __future__ import annotations

from dataclasses import replace

from coordinator.chunking import ChunkingSettings
from coordinator.events import ChangeEvent, Op
from coordinator.fence import FenceReason, fence, matches
from coordinator.model import DocState, SearchHit
from coordinator.planner import plan

SMALL = ChunkingSettings(max_chars=12)
TEXT = "alpha one\n\nbeta two\n\ngamma three"  # three chunks at max_chars=12


def committed(version: int, text: str = TEXT, prior: DocState | None = None, **metadata: object) -> DocState:
    after = plan(ChangeEvent(Op.UPSERT, "doc", version, text, metadata), prior, SMALL).after
    assert after is not None
    return after


def hit(index: int, version: int, text: str, **metadata: object) -> SearchHit:
    return SearchHit(f"doc:chunk-{index}", "doc", 1.0, text, version, index, metadata)


def test_a_hit_exactly_as_committed_is_served() -> None:
    """Every chunk of the committed version, with its text and metadata, passes."""
    state = committed(3, lang="en")
    hits = [hit(0, 3, "alpha one\n\n", lang="en"), hit(2, 3, "gamma three", lang="en")]
    result = fence(hits, {"doc": state})
    assert result.served == tuple(hits) and not result.fenced


def test_each_kind_of_uncommitted_or_untrue_hit_is_fenced_with_its_reason() -> None:
    """Prepared versions, stale ones, shrinks, tombstones, unknown documents and wrong texts are dropped."""
    state = committed(3)
    shrunk = committed(4, "alpha one", prior=state)
    cases = {
        FenceReason.UNCOMMITTED: (hit(0, 4, "alpha one\n\n"), state),
        FenceReason.STALE: (hit(0, 2, "alpha one\n\n"), state),
        FenceReason.PAST_END: (hit(1, 3, "beta two\n\n"), shrunk),
        FenceReason.DELETED: (hit(0, 3, "alpha one\n\n"), DocState("doc", 5, deleted=True)),
        FenceReason.HASH: (hit(0, 3, "alpha ONE\n\n"), state),
    }
    for reason, (candidate, doc_state) in cases.items():
        result = fence([candidate], {"doc": doc_state})
        assert result.served == () and result.fenced == {reason: 1}, reason
    assert fence([hit(0, 3, "alpha one\n\n")], {}).fenced == {FenceReason.UNKNOWN: 1}


def test_skipped_chunks_keep_their_older_version_and_stay_servable() -> None:
    """After an edit of one chunk, the untouched chunks are committed at their earlier version."""
    first = committed(3)
    second = committed(5, TEXT.replace("beta", "BETA"), prior=first)
    result = fence([hit(0, 3, "alpha one\n\n"), hit(1, 5, "BETA two\n\n"), hit(1, 3, "beta two\n\n")], {"doc": second})
    assert [(h.chunk_index, h.version) for h in result.served] == [(0, 3), (1, 5)]
    assert result.fenced == {FenceReason.STALE: 1}


def test_metadata_served_must_be_the_committed_metadata() -> None:
    """A hit whose metadata differs from the committed document's is fenced as an untrue hash."""
    state = committed(3, lang="en")
    assert fence([hit(0, 3, "alpha one\n\n", lang="de")], {"doc": state}).fenced == {FenceReason.HASH: 1}


def test_a_chunk_id_that_does_not_match_its_index_is_fenced() -> None:
    """A hit claiming index 0 under another chunk's ID is not the chunk committed at index 0."""
    state = committed(3)
    lying = replace(hit(0, 3, "alpha one\n\n"), chunk_id="doc:chunk-1")
    assert fence([lying], {"doc": state}).fenced == {FenceReason.PAST_END: 1}


def test_metadata_filters_compare_json_values_by_type() -> None:
    """Equality on every key; true is not 1, 1 equals 1.0, a missing key never matches."""
    metadata = {"lang": "en", "n": 1, "flag": True, "none": None}
    assert matches(metadata, {"lang": "en", "n": 1.0})
    assert matches(metadata, {"flag": True, "none": None})
    assert not matches(metadata, {"flag": 1})
    assert not matches(metadata, {"n": True})
    assert not matches(metadata, {"lang": "de"})
    assert not matches(metadata, {"missing": None})
    assert matches(metadata, {})


def test_metadata_equal_to_python_but_not_to_json_is_fenced() -> None:
    """Hits of one document are not waved through on the first hit's metadata digest when their
    metadata only compare equal in Python (1, 1.0 and true are three JSON values)."""
    state = committed(3, n=1)
    good = hit(0, 3, "alpha one\n\n", n=1)
    result = fence([good, hit(1, 3, "beta two\n\n", n=True), hit(2, 3, "gamma three", n=1.0)], {"doc": state})
    assert result.served == (good,)
    assert result.fenced == {FenceReason.HASH: 2}
