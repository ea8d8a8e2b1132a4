"""JSON encodings of ledger records, shared by every ledger adapter (SQLite, Postgres)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from coordinator.chunking import chunk_id
from coordinator.model import (
    Attempt,
    ChunkDelete,
    ChunkState,
    DeadLetter,
    DocState,
    IndexedChunk,
    PayloadEncoding,
)
from coordinator.ports import Intent


def encode_chunks(chunks: tuple[ChunkState, ...]) -> str:
    """Chunks of a document as ``[[hash, version], ...]`` by position (IDs are derivable)."""
    assert all(c.chunk_index == i for i, c in enumerate(chunks)), "chunks are stored densely by position"
    return json.dumps([[c.content_hash, c.version] for c in chunks], separators=(",", ":"))


def decode_chunks(doc_id: str, raw: str) -> tuple[ChunkState, ...]:
    return tuple(ChunkState(chunk_id(doc_id, i), i, h, v) for i, (h, v) in enumerate(json.loads(raw)))


def doc_to_json(state: DocState) -> dict[str, Any]:
    return {
        "doc_id": state.doc_id,
        "version": state.version,
        "deleted": state.deleted,
        "chunks": json.loads(encode_chunks(state.chunks)),
        "metadata_hash": state.metadata_hash,
        "source_hash": state.source_hash,
    }


def doc_from_json(raw: dict[str, Any]) -> DocState:
    return DocState(
        doc_id=raw["doc_id"],
        version=raw["version"],
        deleted=raw["deleted"],
        chunks=decode_chunks(raw["doc_id"], json.dumps(raw["chunks"])),
        metadata_hash=raw["metadata_hash"],
        source_hash=raw["source_hash"],
    )


def encode_intent(intent: Intent) -> str:
    body: dict[str, Any] = {
        "upserts": [_chunk_to_json(c) for c in intent.upserts],
        "deletes": [_delete_to_json(d) for d in intent.deletes],
        "after": doc_to_json(intent.after),
    }
    # Written only when set, so intents of live events keep their earlier encoding.
    if intent.restores:
        body["restores"] = True
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def decode_intent(doc_id: str, version: int, raw: str, done: frozenset[str]) -> Intent:
    body = json.loads(raw)
    return Intent(
        doc_id=doc_id,
        version=version,
        upserts=tuple(_chunk_from_json(c) for c in body["upserts"]),
        deletes=tuple(_delete_from_json(d) for d in body["deletes"]),
        after=doc_from_json(body["after"]),
        done=done,
        restores=bool(body.get("restores", False)),
    )


def _chunk_to_json(c: IndexedChunk) -> dict[str, Any]:
    encoded = {
        "id": c.chunk_id,
        "doc": c.doc_id,
        "i": c.chunk_index,
        "text": c.text,
        "hash": c.content_hash,
        "v": c.version,
        "meta": dict(c.metadata),
    }
    # Written only when set, so intents of live events keep their earlier encoding.
    return encoded | {"eq": True} if c.overwrite_equal else encoded


def _chunk_from_json(raw: dict[str, Any]) -> IndexedChunk:
    return IndexedChunk(
        raw["id"],
        raw["doc"],
        raw["i"],
        raw["text"],
        raw["hash"],
        raw["v"],
        raw["meta"],
        overwrite_equal=bool(raw.get("eq", False)),
    )


def _delete_to_json(d: ChunkDelete) -> list[Any]:
    return [d.chunk_id, d.version, 1] if d.overwrite_equal else [d.chunk_id, d.version]


def _delete_from_json(raw: list[Any]) -> ChunkDelete:
    return ChunkDelete(raw[0], raw[1], overwrite_equal=len(raw) > 2 and bool(raw[2]))


# --- dead letters ----------------------------------------------------------------------------

# The dead-letter columns every ledger reads, in the order ``letter_of`` takes them.
LETTER_COLS = "source, reason, payload, doc_id, version, attempts, position, encoding, truncated, history"
# The columns ``letter_row`` fills, in its order.
LETTER_INSERT_COLS = f"{LETTER_COLS}, created_at"


def letter_row(letter: DeadLetter, now: float) -> tuple[object, ...]:
    """A dead letter as the row values of LETTER_INSERT_COLS."""
    return (
        letter.source,
        letter.reason,
        letter.payload,
        letter.doc_id,
        letter.version,
        letter.attempts,
        letter.position,
        letter.encoding.value,
        bool(letter.truncated),
        encode_history(letter.history),
        now,
    )


def letter_of(row: Sequence[Any]) -> DeadLetter:
    """A dead letter from the values of LETTER_COLS."""
    source, reason, payload, doc_id, version, attempts, position, encoding, truncated, history = row
    return DeadLetter(
        source=str(source),
        reason=str(reason),
        payload=str(payload),
        doc_id=None if doc_id is None else str(doc_id),
        version=None if version is None else int(version),
        attempts=int(attempts),
        position=None if position is None else str(position),
        encoding=PayloadEncoding(encoding),
        truncated=bool(truncated),
        history=decode_history(str(history)),
    )


def encode_history(history: Sequence[Attempt]) -> str:
    return json.dumps([[a.at, a.reason] for a in history], ensure_ascii=False)


def decode_history(raw: str) -> tuple[Attempt, ...]:
    return tuple(Attempt(float(at), str(reason)) for at, reason in json.loads(raw))


def with_attempt(history: str, at: float, reason: str) -> str:
    """A stored history with one more failed attempt appended."""
    return encode_history([*decode_history(history), Attempt(at, reason)])
