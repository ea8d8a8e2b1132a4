"""What the batch source adapters share: the checkpoint store they need and bad-record helpers."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Protocol, TypeVar

from coordinator.ports import BadRecord

# A bad record's payload is kept in the dead-letter queue for a human to look at; the first
# few KiB are enough to recognise it, and an 8 MiB blob per bad line would bloat the ledger.
PAYLOAD_CHARS_MAX = 4096

T = TypeVar("T")


class CheckpointStore(Protocol):
    """Where a source keeps "the position after the last applied event" (the ledger does this)."""

    def get_checkpoint(self, source: str) -> str | None: ...

    def set_checkpoint(self, source: str, position: str) -> None: ...


def printable(value: str) -> str:
    """``value`` with lone surrogates (undecodable file names, broken input) spelled as escapes.

    Bad records are stored as UTF-8 text; a lone surrogate would make that write fail.
    """
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def bad_record(reason: str, payload: str, position: str | None, doc_id: str | None = None) -> BadRecord:
    """A BadRecord whose texts are valid UTF-8 and whose payload is at most PAYLOAD_CHARS_MAX."""
    return BadRecord(
        reason=printable(reason),
        payload=printable(payload[:PAYLOAD_CHARS_MAX]),
        position=position,
        doc_id=None if doc_id is None else printable(doc_id),
    )


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of at most ``size`` items (itertools.batched arrives in Python 3.12)."""
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch
