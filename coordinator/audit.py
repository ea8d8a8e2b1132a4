"""The cross-index auditor: source, ledger, keyword index and vector index compared chunk by chunk.

Pure domain: it talks to the stores only through the ports, and never reads the clock.

What is compared. The *reference* for both indexes is the ledger, which records for every live
chunk the content hash and the version it was written with; when the source can list its
current state (``ListableSource``: SQL table, folder) the ledger is itself compared with the
source per document (presence and ``document_hash(text, metadata)``), and for a document where
they disagree (``ledger_drift``) the indexes are compared with the source's chunks instead,
by presence and hash only (the source knows no chunk versions). For pure event streams (JSONL,
Kafka) the ledger is the reference. Per index and chunk, the categories are:

- ``missing``   the reference has the chunk, the index does not;
- ``ghost``     the index has a chunk of a document that is not live (deleted, or never known);
- ``stale``     an older or newer version than the reference, another content hash, a text
                that does not hash to its own ``content_hash`` (an edit behind lockstep's back),
                or metadata other than the reference's (the ledger records a digest of each
                document's metadata; the auditor digests what each index holds itself);
- ``orphan``    a chunk of a live document at an index at or beyond its chunk count;
- ``duplicate`` more than one Milvus entity for one primary key (invariant I4);
- ``foreign``   an entry lockstep cannot have written: its ID is no chunk ID, or its body lacks a
                field, holds one of another type, or contradicts the store's own ID or version
                (``StoredChunk.foreign``, ``layout_problems``). Indexes are read by the stores'
                own IDs and versions (ES ``_id``/``_version``, the Milvus primary key), so such
                an entry is a finding, never a crash; ``reconcile`` deletes it at that version,
                or rewrites it when its ID is a reference chunk's;

and across sides: ``ledger_drift`` (ledger vs source, per document) and ``cross_index`` (the two
indexes hold different (version, hash, metadata) for one chunk, or only one holds it). The categories are
the named invariants of ``coordinator.invariants`` spelled per chunk: missing/ghost/orphan break
I1 (ghosts of deleted documents I3), stale breaks I2, duplicate I4; ``check_view_invariants``
runs those very functions over one document's view so the two definitions cannot drift apart.

How it scales (``full``). Every side is streamed once and never held in memory:

1. pass one: each record (chunk ID, version, hash and, when contents are read, the digest of
   its metadata; for the source and the ledger's document view: doc ID, document hash) goes
   to a bucket chosen by a stable hash of its *document ID*
   (so all chunks of a document share a bucket and the detail pass sees whole documents, which
   orphans and per-document repairs need), and is folded into the bucket's digest: a count and a
   sum modulo 2**128 of a 128-bit BLAKE2b of the record. A sum (unlike XOR) does not cancel two
   equal records, and it does not depend on the order in which a store streams its records;
2. buckets whose digests differ between any two sides, plus the buckets of duplicated Milvus
   keys (found by the adapter's ``duplicate_ids``, a primary-key range pass), are *divergent*;
3. pass two streams every side again and keeps only the records of divergent buckets, grouped
   into one ``DocView`` per document, which ``classify`` turns into findings.

Memory is O(buckets + records in divergent buckets); a clean system costs one pass per side.
``probe`` (``--sample``, ``--since``) checks given documents by real-time reads (``get``) of their
reference chunk IDs plus ``ORPHAN_PROBE_CHUNKS`` IDs beyond them; ``document`` (``--doc``) scans
both indexes for every chunk of one document, which is what a deletion request's evidence needs.
"""

from __future__ import annotations

import enum
import hashlib
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from coordinator import invariants
from coordinator.batching import batched
from coordinator.chunking import ChunkingSettings, chunk_id, chunk_text, content_hash, parse_chunk_id
from coordinator.invariants import metadata_digest
from coordinator.model import DocState, StoredChunk
from coordinator.planner import document_hash
from coordinator.ports import (
    BadRecord,
    ChangedDocs,
    ChunkReader,
    DuplicateFinder,
    FetchableSource,
    Ledger,
    ListableSource,
    ScannableIndex,
    SourceDoc,
)

log = structlog.get_logger(__name__)

# Buckets of the ID space. 4,096 keeps the digests tiny (two ints per bucket and side) while a
# 0.1 % drift of 200,000 chunks still leaves over 90 % of the buckets clean for the second pass.
BUCKETS = 4096
# Examples kept per category and index in a report: enough to start looking, bounded so a
# badly broken index does not produce a report of its own size.
EXAMPLES_PER_CATEGORY_MAX = 5
# IDs beyond a document's reference chunk count that a probe reads, to find orphans of a shrink.
ORPHAN_PROBE_CHUNKS = 16
# Chunk IDs per real-time read in a probe (the adapters split further if they need to).
PROBE_IDS_PER_READ_MAX = 1000
# Documents a probe handles at once: bounds the views held in memory.
PROBE_DOCS_PER_BATCH_MAX = 500
# Streams read at once: ledger, source, keyword index, vector index (the duplicate pass shares a
# thread with whichever finishes first). Each stream is network- or disk-bound, so threads overlap
# them and the audit takes about as long as its slowest side.
AUDIT_STREAMS = 4
DIGEST_MODULUS = 2**128
# Why an entry is foreign when one index holds several under its ID.
SHARED_ID = "several entries hold this ID"
SCHEMA_VERSION = 1

KEYWORD = "keyword"
VECTOR = "vector"
INDEXES = (KEYWORD, VECTOR)


class Category(enum.StrEnum):
    MISSING = "missing"
    GHOST = "ghost"
    STALE = "stale"
    ORPHAN = "orphan"
    DUPLICATE = "duplicate"
    FOREIGN = "foreign"
    LEDGER_DRIFT = "ledger_drift"
    CROSS_INDEX = "cross_index"


INDEX_CATEGORIES = (
    Category.MISSING,
    Category.GHOST,
    Category.STALE,
    Category.ORPHAN,
    Category.DUPLICATE,
    Category.FOREIGN,
)


# --- buckets and digests (pure) ------------------------------------------------------------------


def doc_of(cid: str) -> str:
    """The document a chunk ID belongs to; an ID that is not a chunk ID is its own document."""
    try:
        return parse_chunk_id(cid)[0]
    except ValueError:
        return cid


def bucket_of(doc_id: str, buckets: int = BUCKETS) -> int:
    """The stable bucket of a document (the same in every process and on every machine)."""
    digest = hashlib.blake2b(doc_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % buckets


def record_digest(key: str, version: int | None, hashed: str) -> int:
    """A 128-bit digest of one (ID, version, hash) record; ``version`` None for doc records."""
    raw = f"{key}\x00{'' if version is None else version}\x00{hashed}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(raw, digest_size=16).digest(), "big")


@dataclass
class Digests:
    """Per-bucket record counts and digest sums of one side."""

    buckets: int = BUCKETS
    counts: list[int] = field(default_factory=list)
    sums: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.counts = self.counts or [0] * self.buckets
        self.sums = self.sums or [0] * self.buckets

    @property
    def records(self) -> int:
        return sum(self.counts)

    def add(self, doc_id: str, key: str, version: int | None, hashed: str) -> None:
        bucket = bucket_of(doc_id, self.buckets)
        self.counts[bucket] += 1
        self.sums[bucket] = (self.sums[bucket] + record_digest(key, version, hashed)) % DIGEST_MODULUS

    def differing(self, other: Digests) -> set[int]:
        """Buckets whose count or digest differs from ``other``'s."""
        assert self.buckets == other.buckets, "digests of different bucketings cannot be compared"
        return {
            b
            for b in range(self.buckets)
            if self.counts[b] != other.counts[b] or self.sums[b] != other.sums[b]
        }


# --- observations and views ----------------------------------------------------------------------


@dataclass(frozen=True)
class Observed:
    """One chunk as an index holds it; ``text_ok`` False when its text does not hash to its hash,
    ``foreign`` says why lockstep cannot have written it ("" when it can have), and
    ``metadata_digest`` is the digest of the metadata it holds (None when it was not read)."""

    chunk_id: str
    version: int
    content_hash: str
    text_ok: bool = True
    foreign: str = ""
    metadata_digest: str | None = None

    @classmethod
    def of(cls, chunk: StoredChunk) -> Observed:
        text_ok = chunk.text is None or content_hash(chunk.text) == chunk.content_hash
        foreign = "; ".join(p for p in (chunk.foreign, *layout_problems(chunk)) if p)
        digest = None if chunk.metadata is None else metadata_digest(chunk.metadata)
        return cls(chunk.chunk_id, chunk.version, chunk.content_hash, text_ok, foreign, digest)

    @property
    def effective_hash(self) -> str:
        """The hash that is digested: a text that lies about its hash, or an entry lockstep did
        not write, never matches the reference."""
        if self.foreign:
            return f"foreign:{self.content_hash}"
        return self.content_hash if self.text_ok else f"text-mismatch:{self.content_hash}"

    @property
    def digested(self) -> str:
        """What pass one digests: the effective hash, with the metadata digest when it was read."""
        return with_metadata(self.effective_hash, self.metadata_digest)

    def shared(self) -> Observed:
        """This entry, found to share its ID with others in one index."""
        if SHARED_ID in self.foreign:
            return self
        return replace(self, foreign=f"{self.foreign}; {SHARED_ID}" if self.foreign else SHARED_ID)


def with_metadata(hashed: str, digest: str | None) -> str:
    """A record's hash together with its metadata digest (the hash alone when there is none)."""
    return hashed if digest is None else f"{hashed}|{digest}"


def layout_problems(chunk: StoredChunk) -> list[str]:
    """Why a chunk that its store read without complaint still cannot be one lockstep wrote: the
    checks that need no store, so that the auditor does not take the adapters' word for them."""
    try:
        doc_id, index = parse_chunk_id(chunk.chunk_id)
    except ValueError:
        return [f"{chunk.chunk_id!r} is not a chunk ID"]
    if chunk_id(doc_id, index) != chunk.chunk_id:
        return [f"{chunk.chunk_id!r} is not a chunk ID as lockstep spells them"]
    problems = []
    if chunk.doc_id != doc_id:
        problems.append(f"doc_id {chunk.doc_id!r} is not its ID's")
    if chunk.chunk_index != index:
        problems.append(f"chunk_index {chunk.chunk_index} is not its ID's")
    if chunk.version < 0:
        problems.append(f"version {chunk.version} is negative")
    if chunk.text == "":
        problems.append("its text is empty (lockstep writes no empty chunk)")
    return problems


@dataclass(frozen=True)
class RefChunk:
    """What the reference says one chunk must be; ``version`` None when only the source knows it,
    ``metadata_digest`` None when the reference records no metadata for it."""

    chunk_id: str
    chunk_index: int
    content_hash: str
    version: int | None
    metadata_digest: str | None = None


@dataclass
class DocView:
    """Everything every side holds about one document (only documents of divergent buckets)."""

    doc_id: str
    ledger: DocState | None = None
    source: SourceDoc | None = None
    source_listed: bool = False
    keyword: dict[str, Observed] = field(default_factory=dict)
    vector: dict[str, Observed] = field(default_factory=dict)
    duplicates: dict[str, int] = field(default_factory=dict)

    def side(self, name: str) -> dict[str, Observed]:
        return self.keyword if name == KEYWORD else self.vector

    @property
    def ledger_live(self) -> bool:
        return self.ledger is not None and not self.ledger.deleted


@dataclass(frozen=True)
class Finding:
    """One discrepancy: ``side`` is an index name, ``ledger`` or ``indexes`` (cross-index)."""

    category: Category
    side: str
    doc_id: str
    chunk_id: str
    detail: str

    def as_json(self) -> dict[str, str]:
        return {"doc_id": self.doc_id, "chunk_id": self.chunk_id, "detail": self.detail}


# --- classification (pure) -----------------------------------------------------------------------


def source_chunks(doc: SourceDoc, chunking: ChunkingSettings) -> dict[str, RefChunk]:
    """The chunks the source's current text cuts into (no versions: the source knows none), with
    the digest of the source's metadata."""
    digest = metadata_digest(doc.metadata)
    return {
        chunk_id(doc.doc_id, i): RefChunk(chunk_id(doc.doc_id, i), i, content_hash(t), None, digest)
        for i, t in enumerate(chunk_text(doc.text, chunking))
    }


def ledger_chunks(state: DocState | None) -> dict[str, RefChunk]:
    """The live chunks the ledger recorded, with the versions they were written with and the
    document's metadata digest (every state the planner commits records one; a state without it
    compares no metadata)."""
    if state is None or state.deleted:
        return {}
    digest = state.metadata_hash or None
    return {
        c.chunk_id: RefChunk(c.chunk_id, c.chunk_index, c.content_hash, c.version, digest) for c in state.chunks
    }


def has_ledger_drift(view: DocView) -> bool:
    """Whether a listable source and the ledger disagree on this document (presence or content)."""
    if not view.source_listed:
        return False
    if view.source is None:
        return view.ledger_live
    if not view.ledger_live:
        return True
    assert view.ledger is not None, "ledger_live implies a state"
    return view.ledger.source_hash != document_hash(view.source.text, view.source.metadata)


def reference(view: DocView, chunking: ChunkingSettings) -> dict[str, RefChunk]:
    """What both indexes must hold for this document: the ledger's chunks, or the source's on drift."""
    if has_ledger_drift(view):
        return source_chunks(view.source, chunking) if view.source is not None else {}
    return ledger_chunks(view.ledger)


def classify(view: DocView, chunking: ChunkingSettings) -> list[Finding]:
    """Every finding for one document, per index and across sides."""
    ref = reference(view, chunking)
    findings = _drift_findings(view)
    for side in INDEXES:
        findings += _index_findings(view, side, ref)
    findings += [
        Finding(Category.DUPLICATE, VECTOR, view.doc_id, cid, f"{n} entities")
        for cid, n in sorted(view.duplicates.items())
    ]
    return findings + _cross_findings(view)


def _drift_findings(view: DocView) -> list[Finding]:
    if not has_ledger_drift(view):
        return []
    if view.source is None:
        detail = "deleted at the source, live in the ledger"
    elif not view.ledger_live:
        detail = "live at the source, not live in the ledger"
    else:
        detail = f"source content differs from the ledger's v{view.ledger.version if view.ledger else '?'}"
    return [Finding(Category.LEDGER_DRIFT, "ledger", view.doc_id, "", detail)]


def _index_findings(view: DocView, side: str, ref: Mapping[str, RefChunk]) -> list[Finding]:
    held = view.side(side)
    foreign = {cid for cid, o in held.items() if o.foreign}
    out = [
        Finding(Category.MISSING, side, view.doc_id, cid, "in the reference, not in the index")
        for cid in sorted(ref.keys() - held.keys())
    ]
    out += [_foreign_finding(view.doc_id, side, held[cid], cid in ref) for cid in sorted(foreign)]
    for cid in sorted((held.keys() & ref.keys()) - foreign):
        problem = stale_reason(ref[cid], held[cid])
        if problem:
            out.append(Finding(Category.STALE, side, view.doc_id, cid, problem))
    live = bool(ref)
    for cid in sorted(held.keys() - ref.keys() - foreign):
        out.append(_extra_finding(view.doc_id, side, cid, live, len(ref)))
    return out


def _foreign_finding(doc_id: str, side: str, got: Observed, in_reference: bool) -> Finding:
    fate = "a reference chunk's ID: rewritten" if in_reference else "deleted"
    detail = f"{got.foreign} (held at version {got.version}; {fate} by reconcile)"
    return Finding(Category.FOREIGN, side, doc_id, got.chunk_id, detail)


def stale_reason(want: RefChunk, got: Observed) -> str:
    """Why an index's copy of a chunk is not the reference's ("" when it is)."""
    if got.foreign:
        return f"not written by lockstep: {got.foreign}"
    if not got.text_ok:
        return f"text does not hash to its content_hash {got.content_hash[:12]}"
    if got.content_hash != want.content_hash:
        return f"hash {got.content_hash[:12]} != reference {want.content_hash[:12]}"
    if want.version is not None and got.version != want.version:
        return f"version {got.version} != reference {want.version}"
    return _metadata_reason(want.metadata_digest, got.metadata_digest)


def _metadata_reason(want: str | None, got: str | None) -> str:
    """Metadata other than the reference's: the index's copy answers filters and facets (a
    tenant, an ACL) wrongly even though its text is right. Unread metadata is not judged."""
    if want is None or got is None or got == want:
        return ""
    return f"metadata differs: digest {got[:12]} != reference {want[:12]}"


def _extra_finding(doc_id: str, side: str, cid: str, live: bool, count: int) -> Finding:
    """A chunk the reference lacks (its ID is a chunk ID: others are foreign): an orphan of a
    live document, else a ghost."""
    index = parse_chunk_id(cid)[1]
    if live and index >= count:
        return Finding(Category.ORPHAN, side, doc_id, cid, f"chunk {index} of a {count}-chunk document")
    return Finding(Category.GHOST, side, doc_id, cid, "chunk of a document that is not live")


def _cross_findings(view: DocView) -> list[Finding]:
    out: list[Finding] = []
    for cid in sorted(view.keyword.keys() | view.vector.keys()):
        k, v = view.keyword.get(cid), view.vector.get(cid)
        if _as_record(k) != _as_record(v):
            out.append(Finding(Category.CROSS_INDEX, "indexes", view.doc_id, cid, _cross_detail(k, v)))
    return out


def _as_record(o: Observed | None) -> tuple[int, str, str | None] | None:
    return None if o is None else (o.version, o.effective_hash, o.metadata_digest)


def _cross_detail(k: Observed | None, v: Observed | None) -> str:
    def show(o: Observed | None) -> str:
        if o is None:
            return "absent"
        metadata = "" if o.metadata_digest is None else f" metadata {o.metadata_digest[:12]}"
        return f"v{o.version} {o.effective_hash[:12]}{metadata}"

    return f"keyword {show(k)}, vector {show(v)}"


def check_view_invariants(view: DocView, chunking: ChunkingSettings) -> list[invariants.Violation]:
    """I1-I4 of ``coordinator.invariants`` over one document's view (the same definitions)."""
    ref = reference(view, chunking)
    expected = {cid: invariants.ExpectedChunk(cid, r.content_hash) for cid, r in ref.items()}
    metadata = {cid: replace(e, metadata_digest=ref[cid].metadata_digest) for cid, e in expected.items()}
    deleted = set() if ref else {view.doc_id}
    out: list[invariants.Violation] = []
    for side in INDEXES:
        observed = view.side(side).values()
        held = [StoredChunk(o.chunk_id, view.doc_id, 0, o.effective_hash, o.version) for o in observed]
        out += invariants.check_index(side, expected, deleted, held)
        # A view holds metadata as digests (or none, when a scan did not read it).
        read = [(o.chunk_id, o.metadata_digest) for o in observed if o.metadata_digest is not None]
        out += invariants.latest_metadata(side, metadata, read)
    dup_ids = [cid for cid, n in view.duplicates.items() for _ in range(n)]
    return out + invariants.one_entity_per_id(VECTOR, dup_ids)


# --- the report ------------------------------------------------------------------------------


@dataclass
class Report:
    """Counts and a few examples per category and index; ``as_json`` is the documented schema."""

    mode: str
    reference: str
    counts: dict[str, Any] = field(default_factory=dict)
    examples: dict[str, Any] = field(default_factory=dict)
    scanned: dict[str, int | None] = field(default_factory=dict)
    buckets_total: int = BUCKETS
    buckets_divergent: int = 0
    documents_checked: int = 0

    def __post_init__(self) -> None:
        self.counts = {s: {c.value: 0 for c in INDEX_CATEGORIES} for s in INDEXES}
        self.counts |= {Category.LEDGER_DRIFT.value: 0, Category.CROSS_INDEX.value: 0}
        self.examples = {s: {c.value: [] for c in INDEX_CATEGORIES} for s in INDEXES}
        self.examples |= {Category.LEDGER_DRIFT.value: [], Category.CROSS_INDEX.value: []}

    def add(self, findings: Iterable[Finding]) -> None:
        for f in findings:
            counts, examples = self._slots(f)
            counts[f.category.value] = counts.get(f.category.value, 0) + 1
            bucket = examples[f.category.value]
            if len(bucket) < EXAMPLES_PER_CATEGORY_MAX:
                bucket.append(f.as_json())

    def _slots(self, f: Finding) -> tuple[dict[str, Any], dict[str, Any]]:
        if f.side in INDEXES:
            return self.counts[f.side], self.examples[f.side]
        return self.counts, self.examples

    @property
    def drift(self) -> int:
        per_index = sum(int(n) for s in INDEXES for n in self.counts[s].values())
        across = int(self.counts[Category.LEDGER_DRIFT.value]) + int(self.counts[Category.CROSS_INDEX.value])
        return per_index + across

    @property
    def clean(self) -> bool:
        return self.drift == 0

    def as_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "mode": self.mode,
            "reference": self.reference,
            "clean": self.clean,
            "counts": self.counts,
            "examples": self.examples,
            "scanned": self.scanned,
            "buckets": {"total": self.buckets_total, "divergent": self.buckets_divergent},
            "documents_checked": self.documents_checked,
        }


@dataclass
class AuditResult:
    """A report and the views behind its findings (the reconciler's input)."""

    report: Report
    views: dict[str, DocView]
    findings: list[Finding]


# --- the auditor -------------------------------------------------------------------------------


@dataclass
class _SideDigests:
    buckets: int
    source: Digests = field(init=False)
    ledger_docs: Digests = field(init=False)
    ledger: Digests = field(init=False)
    keyword: Digests = field(init=False)
    vector: Digests = field(init=False)

    def __post_init__(self) -> None:
        for name in ("source", "ledger_docs", "ledger", "keyword", "vector"):
            setattr(self, name, Digests(self.buckets))

    def divergent(self, source_listed: bool) -> set[int]:
        out = self.ledger.differing(self.keyword) | self.ledger.differing(self.vector)
        return out | (self.source.differing(self.ledger_docs) if source_listed else set())


class Auditor:
    """Compares the four sides through the ports; one instance per audit run."""

    def __init__(
        self,
        *,
        ledger: Ledger,
        keyword: ChunkReader,
        vector: ChunkReader,
        source: ListableSource | None,
        chunking: ChunkingSettings,
        reference_name: str,
        buckets: int = BUCKETS,
        hash_text: bool = True,
    ) -> None:
        self.ledger = ledger
        # Probes read by chunk ID; the modes that stream a whole index (``full``, ``document``)
        # need it scannable (``_scan``): the service's proxies to its writer actors only probe.
        self.indexes: dict[str, ChunkReader] = {KEYWORD: keyword, VECTOR: vector}
        self.source = source
        self.chunking = chunking
        self.reference_name = reference_name
        self.buckets = buckets
        self.hash_text = hash_text
        self.bad_source_rows = 0

    # --- modes -------------------------------------------------------------------------------

    def full(self) -> AuditResult:
        """Digest pass over every side, then a detail pass over the divergent buckets only."""
        with ThreadPoolExecutor(max_workers=AUDIT_STREAMS, thread_name_prefix="lockstep-audit") as pool:
            pending_duplicates = pool.submit(self._duplicates)
            digests = self._pass_one(pool)
            duplicates = pending_duplicates.result()
        scanned = self._scanned(digests)
        divergent = digests.divergent(self.source is not None)
        divergent |= {bucket_of(doc_of(cid), self.buckets) for cid in duplicates}
        log.info("audit digest pass done", divergent_buckets=len(divergent), buckets=self.buckets)
        views = (
            self._collect(lambda doc_id: bucket_of(doc_id, self.buckets) in divergent) if divergent else {}
        )
        for cid, n in duplicates.items():
            views.setdefault(doc_of(cid), DocView(doc_of(cid), source_listed=self.source is not None))
            views[doc_of(cid)].duplicates[cid] = n
        report = Report("full", self.reference_name, buckets_total=self.buckets)
        report.buckets_divergent = len(divergent)
        report.scanned = scanned
        return self._finish(report, views)

    def sample(self, documents: int, rng: random.Random) -> AuditResult:
        """Probe a uniform random sample of the ledger's documents (tombstones included)."""
        return self._finish(Report("sample", self.reference_name), self.probe(self.sample_ids(documents, rng)))

    def sample_ids(self, documents: int, rng: random.Random) -> list[str]:
        """A uniform random sample of the ledger's document IDs, tombstones included."""
        return reservoir(self._ledger_doc_ids(), documents, rng)

    def since(self, since: float) -> AuditResult:
        """Probe every document the ledger committed at or after ``since`` (Unix seconds)."""
        if not isinstance(self.ledger, ChangedDocs):
            raise TypeError("this ledger cannot list documents by commit time")
        doc_ids = [d.doc_id for d in self.ledger.iter_docs_changed_since(since)]
        return self._finish(Report("since", self.reference_name), self.probe(doc_ids))

    def recheck(self, doc_ids: Sequence[str]) -> AuditResult:
        """Probe these documents again (after repairs, or after live writes in flight settled)."""
        return self._finish(Report("recheck", self.reference_name), self.probe(doc_ids))

    def document(self, doc_id: str) -> AuditResult:
        """Every side's full holdings of one document: both indexes are scanned for its chunks."""
        views = self._collect(lambda d: d == doc_id)
        views.setdefault(doc_id, DocView(doc_id, source_listed=self.source is not None))
        if views[doc_id].ledger is None:
            views[doc_id].ledger = self.ledger.get_docs([doc_id]).get(doc_id)
        return self._finish(Report("doc", self.reference_name), views, keep_clean=True)

    def probe(self, doc_ids: Sequence[str], known_ids: Iterable[str] = ()) -> dict[str, DocView]:
        """Views of these documents by real-time reads of their likely chunk IDs (plus ``known_ids``)."""
        wanted = set(doc_ids)
        sources = self._source_docs(wanted)
        extra: dict[str, set[str]] = {}
        for cid in known_ids:
            extra.setdefault(doc_of(cid), set()).add(cid)
        views: dict[str, DocView] = {}
        for batch in batched(sorted(wanted), PROBE_DOCS_PER_BATCH_MAX):
            views |= self._probe_batch(batch, sources, extra)
        return views

    # --- pass one ----------------------------------------------------------------------------

    def _pass_one(self, pool: ThreadPoolExecutor) -> _SideDigests:
        """Every side streamed once, concurrently (each stream has its own thread and client)."""
        digests = _SideDigests(self.buckets)
        self.bad_source_rows = 0
        streams = [
            pool.submit(self._digest_ledger, digests),
            pool.submit(self._digest_source, digests.source),
            pool.submit(self._digest_index, KEYWORD, digests.keyword),
            pool.submit(self._digest_index, VECTOR, digests.vector),
        ]
        for stream in streams:
            stream.result()
        return digests

    def _digest_ledger(self, digests: _SideDigests) -> None:
        for state in self.ledger.iter_docs(include_deleted=False):
            digests.ledger_docs.add(state.doc_id, state.doc_id, None, state.source_hash)
            # Index scans read metadata exactly when they read texts (``_observe``).
            digest = (state.metadata_hash or None) if self.hash_text else None
            for c in state.chunks:
                digests.ledger.add(state.doc_id, c.chunk_id, c.version, with_metadata(c.content_hash, digest))

    def _digest_source(self, target: Digests) -> None:
        for doc in self._listed():
            target.add(doc.doc_id, doc.doc_id, None, document_hash(doc.text, doc.metadata))

    def _digest_index(self, side: str, target: Digests) -> None:
        for chunk in self._scan(side):
            o = self._observe(chunk)
            target.add(doc_of(o.chunk_id), o.chunk_id, o.version, o.digested)

    def _scan(self, side: str) -> Iterator[StoredChunk]:
        index = self.indexes[side]
        if not isinstance(index, ScannableIndex):
            raise TypeError(f"the {side} index is read by chunk ID only: a mode that streams it needs its scan()")
        return index.scan(with_text=self.hash_text)

    def _observe(self, chunk: StoredChunk) -> Observed:
        """A scanned chunk; without ``hash_text`` its metadata is left out too, so that every
        index is compared alike (a Milvus scan without texts reads no metadata)."""
        return Observed.of(chunk if self.hash_text else replace(chunk, metadata=None))

    def _listed(self) -> Iterator[SourceDoc]:
        """The source's live documents; rows it cannot turn into documents are counted, not compared."""
        if self.source is None:
            return
        for item in self.source.iter_current():
            if isinstance(item, BadRecord):
                self.bad_source_rows += 1
            else:
                yield item

    def _duplicates(self) -> dict[str, int]:
        vector = self.indexes[VECTOR]
        return vector.duplicate_ids() if isinstance(vector, DuplicateFinder) else {}

    def _scanned(self, digests: _SideDigests) -> dict[str, int | None]:
        listed = self.source is not None
        return {
            "source_docs": digests.source.records if listed else None,
            "source_bad_rows": self.bad_source_rows if listed else None,
            "ledger_docs": digests.ledger_docs.records,
            "ledger_chunks": digests.ledger.records,
            "keyword_chunks": digests.keyword.records,
            "vector_chunks": digests.vector.records,
        }

    # --- pass two and probes -----------------------------------------------------------------

    def _collect(self, wanted: Callable[[str], bool]) -> dict[str, DocView]:
        """Stream every side again (concurrently), keeping only documents ``wanted`` accepts."""
        with ThreadPoolExecutor(max_workers=AUDIT_STREAMS, thread_name_prefix="lockstep-audit") as pool:
            ledger = pool.submit(
                lambda: [d for d in self.ledger.iter_docs(include_deleted=True) if wanted(d.doc_id)]
            )
            source = pool.submit(lambda: [d for d in self._listed() if wanted(d.doc_id)])
            held = {side: pool.submit(self._held, side, wanted) for side in INDEXES}
            views: dict[str, DocView] = {}

            def view(doc_id: str) -> DocView:
                return views.setdefault(doc_id, DocView(doc_id, source_listed=self.source is not None))

            for state in ledger.result():
                view(state.doc_id).ledger = state
            for doc in source.result():
                view(doc.doc_id).source = doc
            for side, observed in held.items():
                for o in observed.result():
                    _hold(view(doc_of(o.chunk_id)).side(side), o)
        return views

    def _held(self, side: str, wanted: Callable[[str], bool]) -> list[Observed]:
        chunks = self._scan(side)
        return [self._observe(c) for c in chunks if wanted(doc_of(c.chunk_id))]

    def _source_docs(self, wanted: set[str]) -> dict[str, SourceDoc]:
        if isinstance(self.source, FetchableSource):
            fetched = self.source.get_current(sorted(wanted))
            return {d.doc_id: d for d in fetched if not isinstance(d, BadRecord) and d.doc_id in wanted}
        return {d.doc_id: d for d in self._listed() if d.doc_id in wanted}

    def _probe_batch(
        self, doc_ids: Sequence[str], sources: Mapping[str, SourceDoc], extra: Mapping[str, set[str]]
    ) -> dict[str, DocView]:
        states = self.ledger.get_docs(doc_ids)
        views = {
            d: DocView(d, states.get(d), sources.get(d), source_listed=self.source is not None)
            for d in doc_ids
        }
        ids = sorted({cid for v in views.values() for cid in self._probe_ids(v, extra.get(v.doc_id, set()))})
        for side in INDEXES:
            for part in batched(ids, PROBE_IDS_PER_READ_MAX):
                for cid, chunk in self.indexes[side].get(part).items():
                    views[doc_of(cid)].side(side)[cid] = Observed.of(chunk)
        return views

    def _probe_ids(self, view: DocView, extra: set[str]) -> set[str]:
        counts = [len(ledger_chunks(view.ledger))]
        if view.source is not None:
            counts.append(len(source_chunks(view.source, self.chunking)))
        return {chunk_id(view.doc_id, i) for i in range(max(counts) + ORPHAN_PROBE_CHUNKS)} | extra

    def _ledger_doc_ids(self) -> Iterator[str]:
        return (d.doc_id for d in self.ledger.iter_docs(include_deleted=True))

    def _finish(self, report: Report, views: dict[str, DocView], *, keep_clean: bool = False) -> AuditResult:
        """Classify, count and keep the views with findings (all of them if ``keep_clean``)."""
        findings = [f for v in views.values() for f in classify(v, self.chunking)]
        report.add(findings)
        report.documents_checked = len(views)
        log.info("audit done", mode=report.mode, drift=report.drift, documents=len(views))
        with_findings = {f.doc_id for f in findings}
        kept = views if keep_clean else {d: v for d, v in views.items() if d in with_findings}
        return AuditResult(report, kept, findings)


def _hold(held: dict[str, Observed], o: Observed) -> None:
    """Record ``o``; an ID seen twice in one index's scan (possible only in a store that does not
    key by ID, for entries another writer added) is foreign, at the higher of the versions."""
    kept = held.get(o.chunk_id)
    held[o.chunk_id] = o if kept is None else max(kept, o, key=lambda x: x.version).shared()


def reservoir(items: Iterable[str], k: int, rng: random.Random) -> list[str]:
    """A uniform random sample of ``k`` items from a stream of unknown length (Algorithm R)."""
    chosen: list[str] = []
    for seen, item in enumerate(items):
        if seen < k:
            chosen.append(item)
        elif (j := rng.randrange(seen + 1)) < k:
            chosen[j] = item
    return chosen




def evidence(view: DocView, findings: Sequence[Finding]) -> dict[str, Any]:
    """The right-to-be-forgotten evidence for one document: where it is, on every side."""
    state = view.ledger
    ledger_state = "absent" if state is None else ("tombstone" if state.deleted else "live")
    source = {
        "listable": view.source_listed,
        "present": (view.source is not None) if view.source_listed else None,
        "version": view.source.version if view.source is not None else None,
    }
    return {
        "schema_version": SCHEMA_VERSION,
        "mode": "doc",
        "doc_id": view.doc_id,
        "source": source,
        "ledger": {
            "state": ledger_state,
            "version": None if state is None else state.version,
            "chunks": 0 if state is None else len(state.chunks),
        },
        KEYWORD: _holdings(view.keyword),
        VECTOR: _holdings(view.vector) | {"duplicates": dict(view.duplicates)},
        "forgotten": _forgotten(view, ledger_state),
        "clean": not findings,
        "findings": [{"category": f.category.value, "side": f.side} | f.as_json() for f in findings],
    }


def _holdings(held: Mapping[str, Observed]) -> dict[str, Any]:
    return {
        "count": len(held),
        "chunks": [
            {"chunk_id": o.chunk_id, "version": o.version, "content_hash": o.content_hash}
            for o in sorted(held.values(), key=lambda o: o.chunk_id)
        ],
    }


def _forgotten(view: DocView, ledger_state: str) -> bool:
    """Gone everywhere: not at a listable source, not live in the ledger, in neither index."""
    at_source = view.source_listed and view.source is not None
    return not at_source and ledger_state != "live" and not view.keyword and not view.vector
