"""Small edges of the core the mutation run found untested: the I5 check's own arithmetic and
words, the watermark forgetting what it finished, and how a delete's duplicate is recognised."""

from __future__ import annotations

from coordinator.events import ChangeEvent, Op
from coordinator.invariants import ExpectedChunk, Violation, check_index, versions_never_go_back
from coordinator.model import DocState, StoredChunk
from coordinator.planner import event_hash, same_content
from coordinator.watermark import LowWatermark


def test_versions_never_go_back_names_each_step_back_and_accepts_version_zero() -> None:
    history = [("b", 0), ("b", 0), ("a", 1), ("a", 3), ("a", 2), ("b", 1), ("a", 3), ("a", 1)]
    assert versions_never_go_back("keyword", history) == [
        Violation("I5", "keyword", "a", "version went back from 3 to 2"),
        Violation("I5", "keyword", "a", "version went back from 3 to 1"),
    ]
    assert versions_never_go_back("vector", [("c", 0), ("c", 0), ("d", 5)]) == []
    # The newest version seen stays the reference after a step back.
    assert [v.detail for v in versions_never_go_back("vector", [("e", 3), ("e", 1), ("e", 2)])] == [
        "version went back from 3 to 1", "version went back from 3 to 2"
    ]


def test_a_wrong_hash_is_reported_with_both_hashes_cut_to_twelve_characters() -> None:
    want = ExpectedChunk("d:chunk-0", "a" * 64)
    got = StoredChunk("d:chunk-0", "d", 0, "b" * 64, 1, "text")
    [violation] = check_index("vector", {"d:chunk-0": want}, set(), [got])
    assert violation.detail.endswith(f"hash {'b' * 12} != source {'a' * 12}")


def test_the_watermark_forgets_what_it_finished_and_takes_events_without_a_position() -> None:
    """A reader runs for months: finished seqs and their positions must not pile up. An event
    without a source position (a webhook's) finishes like any other and moves nothing."""
    watermark = LowWatermark()
    seqs = [watermark.track(f"p{n}") for n in range(3)] + [watermark.track(None)]
    watermark.finish([seqs[1], seqs[3]])
    assert watermark.checkpoint() is None and watermark.outstanding == 4
    watermark.finish([seqs[0]])
    assert watermark.checkpoint() == "p1" and watermark.outstanding == 2
    watermark.finish([seqs[2]])
    assert watermark.checkpoint() == "p2" and watermark.outstanding == 0
    assert (watermark._finished, watermark._positions) == (set(), {})


def test_a_delete_repeats_only_a_delete_and_records_no_content_hash() -> None:
    delete = ChangeEvent(Op.DELETE, "d", 4)
    assert event_hash(delete) == ""
    assert same_content(delete, DocState("d", 4, deleted=True))
    assert not same_content(delete, DocState("d", 4, deleted=False))
    assert not same_content(delete, DocState("d", 4, deleted=True, source_hash="refused upsert's hash"))
