"""When a rebuild's validation keeps repairing and when it gives up (pure logic)."""

from __future__ import annotations

from coordinator.rebuild.validate import VALIDATE_ROUNDS_MAX, VALIDATE_STALLED_ROUNDS_MAX, keep_validating


def test_rounds_go_on_while_each_finds_fewer_documents() -> None:
    # The 10,000-document benchmark under 79 live edits/s: five rounds were not enough.
    assert keep_validating([])
    assert keep_validating([2422, 725, 257, 72, 20])
    assert keep_validating([2422, 725, 257, 72, 20, 7, 3, 1])


def test_rounds_stop_when_the_last_ones_make_no_progress() -> None:
    stalled = [40, *[40 + i for i in range(VALIDATE_STALLED_ROUNDS_MAX)]]
    assert not keep_validating(stalled)
    # One round below the best before it is progress, even between worse ones.
    assert keep_validating([40, 45, 39, 41])
    # Fewer rounds than the stall window never count as stalled.
    assert keep_validating([5] * VALIDATE_STALLED_ROUNDS_MAX)


def test_rounds_stop_at_the_cap_even_with_progress() -> None:
    shrinking = list(range(10 * VALIDATE_ROUNDS_MAX, 0, -10))
    assert len(shrinking) == VALIDATE_ROUNDS_MAX
    assert keep_validating(shrinking[:-1])
    assert not keep_validating(shrinking)
