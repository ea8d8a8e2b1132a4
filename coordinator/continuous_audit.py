"""Continuous audit inside ``lockstep run``: what changed since the last round plus a random sample.

Each round probes, by real-time reads, every document the ledger committed since the previous
round and a rolling uniform sample of all documents. A probe reads texts and metadata, so a
chunk whose metadata is not the ledger's (edited in one index, or a metadata-only change that
reached one index only) is counted as ``stale`` like any other copy that is not the reference's. Documents with a prepared intent are left
out (they are legitimately half-applied), and a finding counts only if a second probe shortly
after still shows it, so a commit racing the probe is not reported as drift.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from coordinator.audit import INDEX_CATEGORIES, INDEXES, Auditor, Category, Finding, Report, classify
from coordinator.chunking import ChunkingSettings
from coordinator.ports import ChangedDocs, Ledger


@dataclass(frozen=True)
class DriftGauge:
    """One gauge value: chunks in ``category`` for ``index`` ("all" for cross-index categories)."""

    category: str
    index: str
    value: int


class ContinuousAudit:
    """One audit round at a time; the caller schedules rounds and publishes the gauges."""

    def __init__(
        self,
        auditor: Auditor,
        ledger: Ledger,
        chunking: ChunkingSettings,
        *,
        sample_docs: int,
        rng: random.Random,
        clock: Callable[[], float],
    ) -> None:
        self.auditor = auditor
        self.ledger = ledger
        self.chunking = chunking
        self.sample_docs = sample_docs
        self.rng = rng
        self.clock = clock
        self.last_round_at: float | None = None
        self.rounds = 0

    def round(self) -> Report:
        """Audit changed + sampled documents; returns the report of findings that persisted."""
        started = self.clock()
        doc_ids = self._changed(self.last_round_at) | self._sampled()
        findings = self._persistent(sorted(doc_ids))
        report = Report("continuous", self.auditor.reference_name)
        report.add(findings)
        report.documents_checked = len(doc_ids)
        self.last_round_at = started
        self.rounds += 1
        return report

    def _changed(self, since: float | None) -> set[str]:
        if since is None or not isinstance(self.ledger, ChangedDocs):
            return set()
        return {d.doc_id for d in self.ledger.iter_docs_changed_since(since)}

    def _sampled(self) -> set[str]:
        return set(self.auditor.sample_ids(self.sample_docs, self.rng))

    def _persistent(self, doc_ids: list[str]) -> list[Finding]:
        """Findings seen in two probes in a row, on documents with no prepared intent."""
        pending = {i.doc_id for i in self.ledger.pending()}
        first = self._findings([d for d in doc_ids if d not in pending])
        if not first:
            return []
        again = self._findings(sorted({f.doc_id for f in first} - {i.doc_id for i in self.ledger.pending()}))
        keys = {(f.doc_id, f.side, f.category, f.chunk_id) for f in first}
        return [f for f in again if (f.doc_id, f.side, f.category, f.chunk_id) in keys]

    def _findings(self, doc_ids: list[str]) -> list[Finding]:
        views = self.auditor.probe(doc_ids)
        return [f for v in views.values() for f in classify(v, self.chunking)]


def drift_gauges(report: Report) -> list[DriftGauge]:
    """Every category's count, zeros included, so a healed drift resets its gauge."""
    per_index = [
        DriftGauge(c.value, side, int(report.counts[side][c.value]))
        for side in INDEXES
        for c in INDEX_CATEGORIES
    ]
    across = [
        DriftGauge(c.value, "all", int(report.counts[c.value]))
        for c in (Category.LEDGER_DRIFT, Category.CROSS_INDEX)
    ]
    return per_index + across
