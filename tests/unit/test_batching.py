"""coordinator.batching: the one way lockstep cuts items into bounded batches."""

from __future__ import annotations

from collections.abc import Iterator

from coordinator.batching import batched


def test_batches_keep_order_and_the_last_one_is_short() -> None:
    """Items come out in order, ``size`` at a time, the remainder in a last, shorter batch."""
    assert list(batched(range(5), 2)) == [[0, 1], [2, 3], [4]]
    assert list(batched([], 3)) == []
    assert list(batched("abc", 3)) == [["a", "b", "c"]]


def test_a_stream_is_read_one_batch_ahead_at_most() -> None:
    """An iterator is consumed only as far as the batch being handed out (snapshots stream)."""
    pulled: list[int] = []

    def stream() -> Iterator[int]:
        for i in range(10):
            pulled.append(i)
            yield i

    batches = batched(stream(), 4)
    assert next(batches) == [0, 1, 2, 3]
    assert pulled == [0, 1, 2, 3]
