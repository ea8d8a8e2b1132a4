"""Reciprocal rank fusion against rankings computed by hand."""

from __future__ import annotations

import pytest

from coordinator.fusion import rrf


def test_two_legs_sum_their_reciprocal_ranks() -> None:
    """A chunk found by both legs scores 1/(k+r1) + 1/(k+r2) and outranks one found by one leg."""
    fused = rrf({"keyword": ["a", "b", "c"], "vector": ["b", "d"]}, k=60)
    assert [f.chunk_id for f in fused] == ["b", "a", "d", "c"]
    scores = {f.chunk_id: f.score for f in fused}
    assert scores["b"] == pytest.approx(1 / 62 + 1 / 61)
    assert scores["a"] == pytest.approx(1 / 61)
    assert scores["d"] == pytest.approx(1 / 62)
    assert scores["c"] == pytest.approx(1 / 63)
    assert dict(fused[0].ranks) == {"keyword": 2, "vector": 1}


def test_a_hit_missing_from_one_leg_gets_nothing_from_it() -> None:
    """A chunk only the vector leg found has a rank in that leg alone."""
    fused = {f.chunk_id: f for f in rrf({"keyword": ["a"], "vector": ["x", "a"]}, k=1)}
    assert dict(fused["x"].ranks) == {"vector": 1}
    assert fused["x"].score == pytest.approx(1 / 2)
    assert fused["a"].score == pytest.approx(1 / 2 + 1 / 3)


def test_ties_are_broken_by_chunk_id() -> None:
    """Equal scores (the same ranks in mirrored legs) come out in chunk ID order."""
    fused = rrf({"keyword": ["m", "z"], "vector": ["z", "m"], "extra": []}, k=60)
    assert [f.chunk_id for f in fused] == ["m", "z"]
    assert fused[0].score == fused[1].score
    single = rrf({"keyword": ["b"], "vector": ["a"]}, k=60)
    assert [f.chunk_id for f in single] == ["a", "b"]


def test_weights_scale_each_leg() -> None:
    """A leg of weight 2 counts double, one of weight 0 reports ranks but adds nothing."""
    fused = rrf({"keyword": ["a", "b"], "vector": ["b", "a"]}, k=10, weights={"keyword": 2.0, "vector": 1.0})
    scores = {f.chunk_id: f.score for f in fused}
    assert scores["a"] == pytest.approx(2 / 11 + 1 / 12)
    assert scores["b"] == pytest.approx(2 / 12 + 1 / 11)
    assert [f.chunk_id for f in fused] == ["a", "b"]
    muted = {f.chunk_id: f for f in rrf({"keyword": ["a"], "vector": ["b"]}, k=10, weights={"keyword": 0.0})}
    assert muted["a"].score == 0.0 and dict(muted["a"].ranks) == {"keyword": 1}
    assert muted["b"].score == pytest.approx(1 / 11)


def test_windows_of_different_lengths_and_repeats_keep_first_ranks() -> None:
    """Ranks count from 1 within each window, whatever its length; a repeated ID keeps its best rank."""
    keyword = [f"k{i}" for i in range(5)]
    vector = ["k4", "v1", "k4"]
    fused = {f.chunk_id: f for f in rrf({"keyword": keyword, "vector": vector}, k=60)}
    assert dict(fused["k4"].ranks) == {"keyword": 5, "vector": 1}
    assert fused["k4"].score == pytest.approx(1 / 65 + 1 / 61)
    assert len(fused) == 6


def test_a_single_leg_keeps_its_order_and_k_must_be_positive() -> None:
    """One leg alone comes out in its own order (the agreement with a raw engine query); k < 1 is refused."""
    assert [f.chunk_id for f in rrf({"keyword": ["z", "a", "m"]})] == ["z", "a", "m"]
    assert rrf({}) == []
    with pytest.raises(ValueError, match="at least 1"):
        rrf({"keyword": ["a"]}, k=0)
