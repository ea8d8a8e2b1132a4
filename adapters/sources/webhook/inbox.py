"""What a webhook inbox is: append-only storage of received items, read back in ``seq`` order,
and how one request's items become its rows (pure, shared by both inboxes).

Durability: ``append`` stores a whole request in one transaction (SQLite in WAL mode with
``synchronous=FULL``, or Postgres) before the intake answers. A crash after the answer loses
nothing; a crash before it leaves nothing of the request, and the client retries.

Idempotency: an inbox keeps each ``(doc_id, version)`` once. A retried request is acknowledged
again without a second row (counted as ``duplicates``). The same ``(doc_id, version)`` with a
different body is a conflict: refused, and recorded as a bad item (the first body stands).

Bad items: every invalid item (not JSON, not UTF-8, not a valid event, a conflict) is stored as a
*bad row* carrying its reason, which the source delivers as a BadRecord, so it reaches the
dead-letter queue through the same path as every other source's bad records. A bad item sent
again is stored once (bad rows are unique by a digest of reason and payload).

Positions: each row has a ``seq`` (a strictly increasing integer, never reused). Writers assign
a ``seq`` and commit in one order (SQLite has one writer at a time; on Postgres every append takes
one transaction-scoped advisory lock first), so a reader that has seen ``seq`` N has seen every
row below N that will ever exist: no row is skipped when several replicas receive POSTs into one
Postgres inbox.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from adapters.sources.base import bad_record
from adapters.sources.webhook.body import Item
from coordinator.errors import LockstepError
from coordinator.model import PayloadEncoding
from coordinator.ports import BadRecord

STORE = "webhook inbox"
INBOX_TABLE = "webhook_inbox"
# Rows one prune deletes at most, so a commit never waits on a long delete.
PRUNE_ROWS_MAX = 10_000

# The insert of one row, with ``{p}`` standing for the driver's placeholder.
INSERT_ROW_SQL = (
    f"INSERT INTO {INBOX_TABLE} (doc_id, version, payload, reason, digest, received_at) "
    "VALUES ({p}, {p}, {p}, {p}, {p}, {p}) ON CONFLICT DO NOTHING"
)


class InboxFull(LockstepError):
    """The backlog of stored, uncommitted events reached its bound; the client should retry later."""

    retriable = True


class Inbox(Protocol):
    """Append-only storage of received events, readable in ``seq`` order."""

    def append(self, items: Sequence[Item], *, committed_seq: int, backlog_max: int) -> AppendResult:
        """Store the request's items in one transaction; InboxFull if the backlog (rows above
        ``committed_seq``) already holds ``backlog_max``."""

    def read_after(self, seq: int, limit: int) -> list[InboxRow]:
        """Up to ``limit`` rows with a seq above ``seq``, in seq order."""

    def prune(self, *, through_seq: int, received_before: float) -> int:
        """Delete at most PRUNE_ROWS_MAX rows at or below ``through_seq`` received before the
        given Unix time; returns how many."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class Rejection:
    """A bad item of a request, as reported to the client (``index`` counts from 0)."""

    index: int
    reason: str
    doc_id: str | None = None


@dataclass(frozen=True)
class AppendResult:
    """What one request did: new events stored, events already stored, bad items recorded.
    ``keys``: the ``(doc_id, version)`` of every valid item, new or duplicate (what a consistency
    token of the request covers)."""

    accepted: int
    duplicates: int
    rejected: tuple[Rejection, ...] = ()
    keys: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class InboxRow:
    """One stored row: an event (``reason`` is None) or a bad item with its reason."""

    seq: int
    doc_id: str | None
    version: int | None
    payload: str
    reason: str | None


@dataclass(frozen=True)
class NewRow:
    """A row to insert: an event (no ``reason``) or a bad item (no ``version``, a ``digest``)."""

    doc_id: str | None
    version: int | None
    payload: str
    reason: str | None
    digest: str | None


@dataclass
class AppendPlan:
    """How a request's items split against what the inbox already holds."""

    rows: list[NewRow] = field(default_factory=list)
    accepted: int = 0
    duplicates: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    keys: list[tuple[str, int]] = field(default_factory=list)

    def result(self) -> AppendResult:
        return AppendResult(self.accepted, self.duplicates, tuple(self.rejected), tuple(self.keys))


def plan_append(items: Sequence[Item], stored: Mapping[tuple[str, int], str]) -> AppendPlan:
    """Split ``items`` into rows to insert, duplicates and rejections, given the stored payloads
    of their keys. The first body of a ``(doc_id, version)`` stands; a later different one is a
    conflict."""
    plan = AppendPlan()
    seen = dict(stored)
    for item in items:
        if item.event is None:
            _reject(plan, item, item.reason or "invalid event")
            continue
        known = seen.get(item.key)
        if known is None:
            seen[item.key] = item.payload
            plan.rows.append(NewRow(item.key[0], item.key[1], item.payload, None, None))
            plan.accepted += 1
            plan.keys.append(item.key)
        elif known == item.payload:
            plan.duplicates += 1
            plan.keys.append(item.key)
        else:
            doc_id, version = item.key
            _reject(plan, item, f"conflict: {doc_id!r} version {version} was already accepted with a different body")
    return plan


def _reject(plan: AppendPlan, item: Item, reason: str) -> None:
    doc_id = item.event.doc_id if item.event is not None else item.doc_id
    letter = bad_record(reason, item.raw if item.raw is not None else item.payload, None, doc_id)
    stored = bad_row_payload(letter)
    digest = hashlib.sha256(f"{letter.reason}\x00{stored}".encode()).hexdigest()
    plan.rows.append(NewRow(letter.doc_id, None, stored, letter.reason, digest))
    plan.rejected.append(Rejection(item.index, letter.reason, letter.doc_id))


def bad_row_payload(letter: BadRecord) -> str:
    """How a bad row stores its record: the record spelled as the dead letter will keep it."""
    spelled = {"payload": letter.payload, "encoding": letter.encoding.value, "truncated": letter.truncated}
    return json.dumps(spelled, ensure_ascii=False)


def bad_row_record(row: InboxRow, position: str) -> BadRecord:
    """The BadRecord of a stored bad row (rows stored by an older lockstep hold the bare text)."""
    assert row.reason is not None, "bad rows carry their reason"
    try:
        spelled = json.loads(row.payload)
        encoding = PayloadEncoding(spelled["encoding"])
        payload, truncated = str(spelled["payload"]), bool(spelled["truncated"])
    except (ValueError, TypeError, KeyError):
        return BadRecord(row.reason, row.payload, position, row.doc_id)
    return BadRecord(row.reason, payload, position, row.doc_id, encoding, truncated)


def row_params(row: NewRow, now: float) -> tuple[object, ...]:
    return (row.doc_id, row.version, row.payload, row.reason, row.digest, now)


def first_int(row: Sequence[Any] | None) -> int:
    assert row is not None, "an aggregate always returns a row"
    return int(row[0])


def check_backlog(last_seq: int, committed_seq: int, backlog_max: int) -> None:
    if last_seq - committed_seq >= backlog_max:
        raise InboxFull(f"{last_seq - committed_seq} events wait in the inbox (at most {backlog_max})")
