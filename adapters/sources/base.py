"""What the source adapters share: bad-record helpers.

The checkpoint store they need is a port: ``coordinator.ports.CheckpointStore``.
"""

from __future__ import annotations

from coordinator.limits import RECORD_BYTES_MAX
from coordinator.model import spell_record
from coordinator.ports import BadRecord


def printable(value: str) -> str:
    """``value`` with lone surrogates (undecodable file names, broken input) spelled as escapes.

    Reasons and document IDs are stored as UTF-8 text; a lone surrogate would make that write fail.
    """
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def bad_record(
    reason: str,
    payload: str | bytes,
    position: str | None,
    doc_id: str | None = None,
    *,
    truncated: bool = False,
) -> BadRecord:
    """A BadRecord keeping ``payload`` exactly (as text, or base64 when it is not clean UTF-8;
    whole up to RECORD_BYTES_MAX), with a reason and doc_id that are valid UTF-8. ``truncated``:
    the caller already holds only the start of the record."""
    spelled, encoding, cut = spell_record(payload, RECORD_BYTES_MAX)
    return BadRecord(
        reason=printable(reason),
        payload=spelled,
        position=position,
        doc_id=None if doc_id is None else printable(doc_id),
        encoding=encoding,
        truncated=truncated or cut,
    )

