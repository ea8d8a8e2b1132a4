"""The read path's consistency checker: did each search serve only what the ledger committed
while it ran?

The committed history comes from the ledger itself: ``install_history`` adds triggers to an
SQLite ledger's ``documents`` table that copy every committed state into ``commit_history``,
in the same transaction as the commit, numbered in commit order (``seq``). A reader notes the
highest ``seq`` just before it sends a request (``started``) and just after the answer
(``ended``): the fence's ledger read saw the history up to some ``p`` with
``started <= p <= ended``, with no timing slack at all.

For every answer the checker asserts, per document served:

- ``never_committed``: each hit (chunk index, version, text hash, metadata hash) is what some
  committed state of its document held at some ``p`` in ``[started, ended]``;
- ``deleted_before_request``: no document whose committed state was a tombstone when the request
  started, and stayed one until it ended, is served;
- ``mixed_versions``: all hits of one document match one committed state at one ``p``.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.codec import decode_chunks
from coordinator.model import DocState

HISTORY_DDL = """
CREATE TABLE IF NOT EXISTS commit_history (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    doc_id TEXT NOT NULL, version INTEGER NOT NULL, deleted INTEGER NOT NULL,
    chunks TEXT NOT NULL, metadata_hash TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS commit_history_insert AFTER INSERT ON documents BEGIN
    INSERT INTO commit_history (doc_id, version, deleted, chunks, metadata_hash)
    VALUES (NEW.doc_id, NEW.version, NEW.deleted, NEW.chunks, NEW.metadata_hash);
END;
CREATE TRIGGER IF NOT EXISTS commit_history_update AFTER UPDATE ON documents BEGIN
    INSERT INTO commit_history (doc_id, version, deleted, chunks, metadata_hash)
    VALUES (NEW.doc_id, NEW.version, NEW.deleted, NEW.chunks, NEW.metadata_hash);
END;
"""


def install_history(ledger_path: Path) -> None:
    """Record every committed document state of this (already created) SQLite ledger."""
    with sqlite3.connect(ledger_path) as db:
        db.executescript(HISTORY_DDL)


class HistoryCursor:
    """One reader's view of how far the committed history goes (its own connection)."""

    def __init__(self, ledger_path: Path) -> None:
        self._db = sqlite3.connect(ledger_path, timeout=30, check_same_thread=False)

    def position(self) -> int:
        row = self._db.execute("SELECT coalesce(max(seq), 0) FROM commit_history").fetchone()
        return int(row[0])

    def close(self) -> None:
        self._db.close()


@dataclass(frozen=True)
class Observation:
    """One answered search: the history positions around it and the hits it served."""

    started: int
    ended: int
    hits: tuple[Mapping[str, Any], ...]


@dataclass(frozen=True)
class Violation:
    kind: str
    doc_id: str
    detail: str


@dataclass
class History:
    """Every committed state of every document, in commit order."""

    seqs: dict[str, list[int]] = field(default_factory=dict)
    states: dict[str, list[DocState]] = field(default_factory=dict)

    @classmethod
    def read(cls, ledger_path: Path) -> History:
        history = cls()
        with sqlite3.connect(ledger_path) as db:
            rows = db.execute(
                "SELECT seq, doc_id, version, deleted, chunks, metadata_hash FROM commit_history ORDER BY seq"
            ).fetchall()
        for seq, doc_id, version, deleted, chunks, metadata_hash in rows:
            state = DocState(doc_id, version, bool(deleted), decode_chunks(doc_id, chunks), metadata_hash)
            history.seqs.setdefault(doc_id, []).append(int(seq))
            history.states.setdefault(doc_id, []).append(state)
        return history

    def at(self, doc_id: str, position: int) -> DocState | None:
        """The committed state of ``doc_id`` once the history up to ``position`` is committed."""
        seqs = self.seqs.get(doc_id, [])
        i = bisect.bisect_right(seqs, position)
        return self.states[doc_id][i - 1] if i else None

    def changes(self, doc_id: str, started: int, ended: int) -> list[int]:
        """``started`` and every position in ``(started, ended]`` where the document changed."""
        return [started, *(s for s in self.seqs.get(doc_id, []) if started < s <= ended)]


def check(history: History, observations: Iterable[Observation]) -> list[Violation]:
    found: list[Violation] = []
    for seen in observations:
        by_doc: dict[str, list[Mapping[str, Any]]] = {}
        for hit in seen.hits:
            by_doc.setdefault(str(hit["doc_id"]), []).append(hit)
        for doc_id, hits in by_doc.items():
            found += _check_doc(history, doc_id, hits, seen)
    return found


def _check_doc(history: History, doc_id: str, hits: Sequence[Mapping[str, Any]], seen: Observation) -> list[Violation]:
    positions = history.changes(doc_id, seen.started, seen.ended)
    states = [history.at(doc_id, p) for p in positions]
    if any(all(_holds(state, h) for h in hits) for state in states):
        return []
    where = f"hits {[(h['chunk_index'], h['version']) for h in hits]} in history [{seen.started}, {seen.ended}]"
    if all(s is not None and s.deleted for s in states):
        return [Violation("deleted_before_request", doc_id, where)]
    lone = [h for h in hits if not any(_holds(state, h) for state in states)]
    if lone:
        return [Violation("never_committed", doc_id, f"{where}: chunk {lone[0]['chunk_index']} v{lone[0]['version']}")]
    return [Violation("mixed_versions", doc_id, where)]


def _holds(state: DocState | None, hit: Mapping[str, Any]) -> bool:
    """Whether ``state`` committed exactly what ``hit`` serves."""
    if state is None or state.deleted:
        return False
    index = int(hit["chunk_index"])
    if not 0 <= index < len(state.chunks):
        return False
    chunk = state.chunks[index]
    return (
        chunk.chunk_id == hit["chunk_id"]
        and chunk.version == int(hit["version"])
        and chunk.content_hash == _sha256(str(hit["text"]))
        and state.metadata_hash == _sha256(json.dumps(hit["metadata"], sort_keys=True, separators=(",", ":"),
                                                      ensure_ascii=False))
    )


def _sha256(text: str) -> str:
    # Computed here, not with lockstep's own hash helpers: a check must not be the code it checks.
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
