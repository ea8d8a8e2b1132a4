"""Seeded source histories and the plain-dict model of what the source holds.

A schedule's source is a list of ChangeEvents in *source order* (each document's versions
increase along it). The model is a plain dict: doc_id -> the newest event of that document.
Every document ID carries the schedule's namespace, so schedules sharing a store never touch
each other's documents, and every chunk text carries it too, so the embedding cache of one
schedule never serves another (the embed-call bound stays exact).

Source mutations offered here: create, update (some paragraphs change, documents grow and
shrink), metadata-only change, delete, re-create after a delete, a primary-key change (delete of
the old ID + create of a new one with the same text, as Debezium emits it), a truncate (a delete
of every live document of one "table") and a version a store will refuse (``REFUSAL_KEY``).

What the indexes must hold is the model's own: each chunk's text as the model cut it, its
SHA-256 computed here with hashlib and the digest of the document's metadata computed by the
check (``invariants.metadata_digest``), never a hash lockstep computed.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from coordinator.chunking import ChunkingSettings, chunk_id, chunk_text
from coordinator.events import ChangeEvent, Op
from coordinator.invariants import ExpectedChunk, metadata_digest

# Paragraphs per document: enough to grow and shrink, few enough that a schedule stays fast.
PARAGRAPHS_MAX = 5
# Chunks of at most this many characters: one paragraph per chunk (paragraphs are shorter).
CHUNK_CHARS_MAX = 80
CHUNKING = ChunkingSettings(max_chars=CHUNK_CHARS_MAX)
TABLES = ("t0", "t1")
# Marks a text the FaultyEmbedder always fails on (a poison document).
POISON_MARK = "\x00POISON\x00"
# A metadata key one store refuses for good (``FaultyIndex.refuse``), as a strict mapping would.
REFUSAL_KEY = "refused_by_store"


@dataclass
class SourceModel:
    """The source as a plain dict (doc_id -> newest event) plus the history that built it."""

    namespace: str
    chunking: ChunkingSettings = CHUNKING
    latest: dict[str, ChangeEvent] = field(default_factory=dict)
    history: list[ChangeEvent] = field(default_factory=list)
    _paragraphs: dict[str, list[int]] = field(default_factory=dict)
    _next_doc: int = 0

    # --- mutations ---------------------------------------------------------------------------

    def create(self, rng: random.Random, *, poison: bool = False) -> ChangeEvent:
        doc_id = self._new_id()
        self._paragraphs[doc_id] = [0] * rng.randint(1, PARAGRAPHS_MAX)
        return self._upsert(doc_id, 1, rng.choice(TABLES), poison=poison)

    def update(self, rng: random.Random, doc_id: str) -> ChangeEvent:
        """Some paragraphs change, some stay (their chunks must not be embedded again)."""
        revs = self._paragraphs.setdefault(doc_id, [0])
        revs = [r + 1 if rng.random() < 0.4 else r for r in revs]
        revs = revs[: rng.randint(1, PARAGRAPHS_MAX)] + [0] * max(0, rng.randint(0, 2) - 1)
        self._paragraphs[doc_id] = revs or [0]
        return self._upsert(doc_id, self.version(doc_id) + 1, self._table(doc_id))

    def touch_metadata(self, doc_id: str) -> ChangeEvent:
        """Same text, new metadata: a rewrite with zero embed calls."""
        return self._upsert(doc_id, self.version(doc_id) + 1, self._table(doc_id))

    def delete(self, doc_id: str) -> ChangeEvent:
        return self._record(ChangeEvent(Op.DELETE, doc_id, self.version(doc_id) + 1))

    def refused_update(self, rng: random.Random, doc_id: str) -> ChangeEvent:
        """An update whose metadata a store will refuse (it holds REFUSAL_KEY)."""
        event = self.update(rng, doc_id)
        self.history.pop()
        metadata = {**event.metadata, REFUSAL_KEY: True}
        return self._record(ChangeEvent(Op.UPSERT, doc_id, event.version, event.text, metadata))

    def recreate(self, rng: random.Random, doc_id: str) -> ChangeEvent:
        self._paragraphs[doc_id] = [rng.randint(5, 9)] * rng.randint(1, PARAGRAPHS_MAX)
        return self._upsert(doc_id, self.version(doc_id) + 1, rng.choice(TABLES))

    def change_key(self, doc_id: str) -> tuple[ChangeEvent, ChangeEvent]:
        """A primary-key change: delete(old) + create(new) carrying the same text and metadata."""
        old = self.latest[doc_id]
        new_id = self._new_id()
        self._paragraphs[new_id] = list(self._paragraphs.get(doc_id, [0]))
        gone = self.delete(doc_id)
        born = self._record(ChangeEvent(Op.UPSERT, new_id, 1, self._text(new_id), dict(old.metadata)))
        return gone, born

    def truncate(self, table: str) -> list[ChangeEvent]:
        """Delete every live document of ``table``."""
        return [self.delete(d) for d in self.live_ids() if self._table(d) == table]

    # --- reading -----------------------------------------------------------------------------

    def version(self, doc_id: str) -> int:
        event = self.latest.get(doc_id)
        return 0 if event is None else event.version

    def live_ids(self) -> list[str]:
        return sorted(d for d, e in self.latest.items() if e.op is Op.UPSERT)

    def deleted_ids(self) -> set[str]:
        return {d for d, e in self.latest.items() if e.op is Op.DELETE}

    def expected_chunks(self, doc_ids: set[str] | None = None) -> dict[str, ExpectedChunk]:
        """What both indexes must hold for these live documents (all of them by default): each
        chunk's own text, its SHA-256 and the digest of the document's metadata."""
        out: dict[str, ExpectedChunk] = {}
        for doc_id in self.live_ids():
            if doc_ids is not None and doc_id not in doc_ids:
                continue
            event = self.latest[doc_id]
            digest = metadata_digest(event.metadata)
            for i, piece in enumerate(chunk_text(event.text or "", self.chunking)):
                cid = chunk_id(doc_id, i)
                out[cid] = ExpectedChunk(cid, hashlib.sha256(piece.encode("utf-8")).hexdigest(), piece, digest)
        return out

    def distinct_chunk_texts(self) -> set[str]:
        """Every distinct chunk text of every upsert in the history: the embed-call bound."""
        return {
            piece
            for e in self.history
            if e.op is Op.UPSERT and POISON_MARK not in (e.text or "")
            for piece in chunk_text(e.text or "", self.chunking)
        }

    # --- helpers -----------------------------------------------------------------------------

    def _new_id(self) -> str:
        self._next_doc += 1
        return f"{self.namespace}-d{self._next_doc:03d}"

    def _table(self, doc_id: str) -> str:
        event = self.latest.get(doc_id)
        table = None if event is None else event.metadata.get("table")
        return str(table) if table else TABLES[0]

    def _text(self, doc_id: str, *, poison: bool = False) -> str:
        paragraphs = [
            f"{doc_id} paragraph {i} revision {rev} about refunds and invoices"
            for i, rev in enumerate(self._paragraphs[doc_id])
        ]
        if poison:
            paragraphs[0] += POISON_MARK
        return "\n\n".join(paragraphs)

    def _upsert(self, doc_id: str, version: int, table: str, *, poison: bool = False) -> ChangeEvent:
        metadata = {"table": table, "rev": version}
        return self._record(
            ChangeEvent(Op.UPSERT, doc_id, version, self._text(doc_id, poison=poison), metadata)
        )

    def _record(self, event: ChangeEvent) -> ChangeEvent:
        self.latest[event.doc_id] = event
        self.history.append(event)
        return event


def random_history(model: SourceModel, rng: random.Random, changes: int, *, poison_docs: int = 0) -> None:
    """Append ``changes`` random source mutations (and ``poison_docs`` poison creations) to ``model``."""
    for _ in range(max(3, changes // 4)):
        model.create(rng)
    for _ in range(poison_docs):
        model.create(rng, poison=True)
    while len(model.history) < changes:
        _one_mutation(model, rng)


def _one_mutation(model: SourceModel, rng: random.Random) -> None:
    live = [d for d in model.live_ids() if POISON_MARK not in (model.latest[d].text or "")]
    roll = rng.random()
    if not live or roll < 0.15:
        model.create(rng)
    elif roll < 0.55:
        model.update(rng, rng.choice(live))
    elif roll < 0.68:
        model.touch_metadata(rng.choice(live))
    elif roll < 0.85:
        model.delete(rng.choice(live))
    elif roll < 0.93 and model.deleted_ids():
        model.recreate(rng, rng.choice(sorted(model.deleted_ids())))
    else:
        model.update(rng, rng.choice(live))
