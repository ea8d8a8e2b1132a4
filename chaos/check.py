"""Invariant checks at quiescence, built on ``coordinator.invariants`` and the auditor.

Checked once a schedule is quiet (all faults healed, nothing waiting, nothing prepared):

- I1-I4 per index against the source model (``invariants.check_index``), for every document
  whose newest source version was committed: each stored text is compared with the model's own
  text of that chunk, its hash with a SHA-256 the model computed itself, its metadata with the
  model's by a digest the check computes (``invariants.metadata_digest``), so no check takes a
  hash lockstep computed on trust; documents whose newest version went to the DLQ are compared
  with the ledger instead, by the auditor (``Auditor.full``), which checks I1-I4 of every
  document against the ledger (metadata included);
- I5 over the versions observed along the run (``invariants.versions_never_go_back``);
- I6: the simulated time from the last heal to quiescence stays under its bound;
- every source change is applied (the ledger's committed version reached it) or in the DLQ
  with a reason, no committed version is above the source's newest, and nothing is left
  prepared;
- the source's committed checkpoint reached the end of the deliveries;
- no ledger write of an owner that another one took over from was accepted (fencing);
- embed calls never exceed the distinct chunk texts of the source (all new to the schedule).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from chaos.workload import SourceModel
from coordinator import invariants
from coordinator.audit import Auditor
from coordinator.chunking import parse_chunk_id
from coordinator.invariants import Violation
from coordinator.model import DeadLetter, DocState, StoredChunk
from coordinator.ports import ChunkIndex, Ledger

# DLQ rows read back per check: a schedule dead-letters a handful at most.
DEAD_LETTERS_READ_MAX = 10_000


def accounted(
    model: SourceModel, docs: dict[str, DocState], letters: Sequence[DeadLetter]
) -> list[Violation]:
    """Every source change is committed (or superseded by a committed one) or dead-lettered with a reason."""
    dead: dict[str, int] = {}
    for letter in letters:
        if letter.doc_id and letter.reason and letter.version is not None:
            dead[letter.doc_id] = max(dead.get(letter.doc_id, -1), letter.version)
    out = []
    for event in model.history:
        committed = docs[event.doc_id].version if event.doc_id in docs else -1
        if committed < event.version and dead.get(event.doc_id, -1) < event.version:
            out.append(
                Violation(
                    "applied_or_dlq",
                    "ledger",
                    event.doc_id,
                    f"v{event.version} neither applied nor dead-lettered",
                )
            )
    return out


def dead_lettered_newest(model: SourceModel, letters: Sequence[DeadLetter]) -> set[str]:
    """Documents whose newest source version is in the DLQ: what the indexes hold of them is the
    ledger's to say (a version a store refused is consumed, with the earlier content)."""
    dead = {(letter.doc_id, letter.version) for letter in letters}
    return {d for d, e in model.latest.items() if (d, e.version) in dead}


def ledger_not_ahead(model: SourceModel, docs: dict[str, DocState]) -> list[Violation]:
    """The ledger never commits a version of a document that the source never had: an event
    applied past the version gate, or a version made up, shows here even when both indexes
    agree with the ledger."""
    return [
        Violation("ledger_ahead", "ledger", d, f"v{docs[d].version} committed, the source's newest is v{e.version}")
        for d, e in sorted(model.latest.items())
        if d in docs and docs[d].version > e.version
    ]


def index_against_source(
    side: str, model: SourceModel, skip: set[str], observed: Iterable[StoredChunk]
) -> list[Violation]:
    """I1-I4 of one index against the model, leaving out documents in ``skip``."""
    checked = set(model.latest) - skip
    ours = [c for c in observed if c.doc_id.startswith(model.namespace) and c.doc_id not in skip]
    deleted = model.deleted_ids() & checked
    return invariants.check_index(side, model.expected_chunks(checked), deleted, ours)


def audit_violations(auditor: Auditor) -> list[Violation]:
    """The auditor's findings (indexes against the ledger), as violations."""
    return [
        Violation(f"audit:{f.category}", f.side, f.chunk_id or f.doc_id, f.detail)
        for f in auditor.full().findings
    ]


def embed_bound(model: SourceModel, texts_embedded: int) -> list[Violation]:
    """Embed calls never exceed the distinct new-or-changed chunk texts (all new to this schedule)."""
    bound = len(model.distinct_chunk_texts())
    if texts_embedded <= bound:
        return []
    return [
        Violation(
            "embed_bound", "embedder", model.namespace, f"{texts_embedded} texts embedded > {bound} distinct"
        )
    ]


def lag_bound(lag_s: float, bound_s: float) -> list[Violation]:
    """I6: after the last fault healed, the system was quiet again within ``bound_s``."""
    if lag_s <= bound_s:
        return []
    return [Violation("I6", "lag", "-", f"{lag_s:.1f} s from heal to quiescence > {bound_s:.1f} s")]


class Witness(Protocol):
    """What saw every owner's ledger writes (``chaos.rig.FenceWitness``)."""

    @property
    def accepted_stale(self) -> list[str]: ...


def fenced(witness: Witness) -> list[Violation]:
    """Ownership: once a new owner took the shard over, the ledger refused every write of the old."""
    return [Violation("fenced", "ledger", "-", what) for what in witness.accepted_stale]


def checkpoint_at_end(committed: int, end: int) -> list[Violation]:
    """At quiescence the source's committed checkpoint is after the last delivery: everything
    read was finished, and the checkpoint advanced to it."""
    if committed == end:
        return []
    return [Violation("checkpoint", "source", "-", f"committed position {committed} != end {end}")]


def nothing_pending(ledger: Ledger) -> list[Violation]:
    return [
        Violation("pending", "ledger", i.doc_id, f"v{i.version} still prepared") for i in ledger.pending()
    ]


def versions(history: Iterable[tuple[str, int]], side: str) -> list[Violation]:
    """I5 over (key, observed version) pairs in observation order."""
    return invariants.versions_never_go_back(side, history)


def doc_of(chunk_id: str) -> str:
    return parse_chunk_id(chunk_id)[0]


def scan_all(index: ChunkIndex) -> list[StoredChunk]:
    return list(index.scan())
