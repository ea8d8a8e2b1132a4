"""The cross-index auditor and reconciler, against real stores corrupted behind lockstep's back.

Stacks (the contract suites' matrix): Tantivy + a milvus-lite file; OpenSearch-API server + the
Milvus 2.3.5 server; Elasticsearch (through the header proxy) + a milvus-lite server. Every test
gets a fresh index, collection and ledger. Corruptions go through the adapters or raw clients,
never through the ledger, exactly as an operator's mistake or a store bug would.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import tantivy
import yaml
from milvus_lite.server_manager import server_manager_instance
from opensearchpy import OpenSearch
from pymilvus import MilvusClient
from structlog.testing import capture_logs

from adapters.keyword.es_compat_proxy import EsCompatProxy
from adapters.keyword.settings import KeywordSettings
from adapters.keyword.tantivy_index import TantivyKeywordIndex
from adapters.vector.settings import VectorSettings
from chaos.check import audit_violations
from coordinator import invariants
from coordinator.audit import (
    BUCKETS,
    SHARED_ID,
    Auditor,
    Digests,
    DocView,
    Observed,
    Report,
    bucket_of,
    check_view_invariants,
    classify,
    record_digest,
    reservoir,
)
from coordinator.chunking import ChunkingSettings, chunk_id, chunk_text, content_hash
from coordinator.continuous_audit import ContinuousAudit
from coordinator.model import NO_VERSION, ChunkDelete, ChunkState, DocState, IndexedChunk, StoredChunk
from coordinator.reconcile import NO_ID, REPAIR_ESCALATIONS_MAX, RateLimiter, Reconciler, plan_repair
from coordinator.sync import run_sync
from lockstep.bootstrap import build_source
from lockstep.runtime import Runtime, runtime
from lockstep.settings import Settings
from tests.support.milvus_servers import LiteServer, RealMilvus
from tests.support.raw_stores import read_keyword, read_vector

DIM = 16
CHUNKING = {"max_chars": 40}
DOCS = 20
# Repairs in tests are not throttled: the rate limiter has its own unit test.
TEST_OPS_PER_S = 1e9
CLI_TIMEOUT_S = 300
AUDIT_CLI = [sys.executable, "-m", "lockstep.audit_cli"]
# The raw clients that write foreign data: a request's timeout, and the Tantivy writer's heap
# (tantivy needs at least 15 MB per indexing thread).
RAW_TIMEOUT_S = 30
RAW_TANTIVY_HEAP_BYTES = 16 * 1024 * 1024

STACKS = ["tantivy+milvus-lite-file", "opensearch+milvus-2.3.5", "elasticsearch+milvus-lite-server"]


# --- fixtures ----------------------------------------------------------------------------------


def _text(doc_id: str, version: int, paragraphs: int = 3) -> str:
    return "\n\n".join(f"{doc_id} v{version} paragraph {p} about refunds" for p in range(paragraphs))


def _event(doc_id: str, version: int, paragraphs: int = 3) -> dict[str, Any]:
    text = _text(doc_id, version, paragraphs)
    return {"op": "upsert", "doc_id": doc_id, "version": version, "text": text, "metadata": {"d": doc_id}}


def _append(path: Path, *events: dict[str, Any]) -> None:
    with path.open("a") as out:
        out.writelines(json.dumps(e) + "\n" for e in events)


def _stores(request: pytest.FixtureRequest, stack: str, tmp_path: Path) -> tuple[dict[str, Any], str]:
    """(keyword settings, vector URI) of one stack, starting its servers through the fixtures."""
    name = f"au-{uuid.uuid4().hex[:10]}"
    if stack.startswith("tantivy"):
        return {"kind": "tantivy", "path": str(tmp_path / "tantivy"), "index": name}, str(tmp_path / "m.db")
    if stack.startswith("opensearch"):
        real: RealMilvus = request.getfixturevalue("real_milvus")
        url = request.getfixturevalue("opensearch_api_url")
        return {"kind": "opensearch", "url": url, "index": name}, real.uri
    proxy: EsCompatProxy = request.getfixturevalue("es_compat_proxy")
    lite: LiteServer = request.getfixturevalue("lite_server")
    return {"kind": "elasticsearch", "url": proxy.url, "index": name}, lite.uri


def _settings(tmp_path: Path, keyword: dict[str, Any], vector_uri: str, source: dict[str, Any]) -> Settings:
    return Settings.model_validate(
        {
            "source": source,
            "keyword": KeywordSettings(**keyword),
            "vector": VectorSettings(uri=vector_uri, collection=f"au_{uuid.uuid4().hex}"),
            "ledger": {"path": str(tmp_path / "ledger.db")},
            "embedder": {"kind": "hashing", "dim": DIM},
            "chunking": CHUNKING,
        }
    )


@pytest.fixture(params=STACKS)
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Settings]]:
    keyword, vector_uri = _stores(request, request.param, tmp_path)
    source = {"kind": "jsonl", "path": str(tmp_path / "events.jsonl"), "name": "events"}
    settings = _settings(tmp_path, keyword, vector_uri, source)
    yield request.param, settings
    with runtime(settings) as rt:
        rt.keyword.drop()
        rt.vector.drop()
    if vector_uri.endswith(".db"):
        server_manager_instance.release_server(vector_uri)


def _sync(settings: Settings) -> dict[str, int]:
    with runtime(settings) as rt:
        source = build_source(settings, rt.ledger)
        try:
            return run_sync(source, rt.engine, batch_events=50).as_dict()
        finally:
            source.close()


def _auditor(settings: Settings, rt: Runtime) -> Auditor:
    source = build_source(settings, rt.ledger)
    listable = source if hasattr(source, "iter_current") else None
    return Auditor(
        ledger=rt.ledger,
        keyword=rt.keyword,
        vector=rt.vector,
        source=listable,  # type: ignore[arg-type]  # checked structurally just above
        chunking=settings.chunking.to_domain(),
        reference_name="test",
    )


def _audit(settings: Settings) -> Report:
    with runtime(settings) as rt:
        return _auditor(settings, rt).full().report


def _reconcile(settings: Settings, **kwargs: Any) -> dict[str, Any]:
    with runtime(settings) as rt:
        reconciler = Reconciler(
            auditor=_auditor(settings, rt),
            engine=rt.engine,
            ledger=rt.ledger,
            keyword=rt.keyword,
            vector=rt.vector,
            chunking=settings.chunking.to_domain(),
            limiter=RateLimiter(TEST_OPS_PER_S),
        )
        return reconciler.run(dry_run=kwargs.get("dry_run", False), max_ops=kwargs.get("max_ops")).as_json()


def _total(report: Report) -> int:
    """How many findings the report counted (each finding counts once, in one category)."""
    return sum(sum(v.values()) if isinstance(v, dict) else v for v in report.counts.values())


def _counts(report: Report) -> dict[str, Any]:
    """Only the non-zero counts, for exact comparisons that read well in a failure."""
    out: dict[str, Any] = {}
    for key, value in report.counts.items():
        if isinstance(value, dict):
            nonzero = {k: v for k, v in value.items() if v}
            if nonzero:
                out[key] = nonzero
        elif value:
            out[key] = value
    return out


def _loaded(settings: Settings, deleted: tuple[str, ...] = ()) -> None:
    path = Path(str(settings.source.path))  # type: ignore[union-attr]  # jsonl settings have a path
    _append(path, *(_event(f"d{i}", 1) for i in range(DOCS)))
    _append(path, *({"op": "delete", "doc_id": d, "version": 2} for d in deleted))
    summary = _sync(settings)
    assert summary["dead_letters"] == 0


def _copy(rt: Runtime, cid: str, **changes: Any) -> IndexedChunk:
    """A chunk as the keyword index holds it, changed, ready to be written behind the ledger's back."""
    held = rt.keyword.get([cid])[cid]
    base = IndexedChunk(
        cid,
        held.doc_id,
        held.chunk_index,
        held.text or "",
        held.content_hash,
        held.version,
        held.metadata or {},
    )
    return replace(base, **changes)


def _with_vector(rt: Runtime, chunk: IndexedChunk) -> IndexedChunk:
    return replace(chunk, vector=[1.0] + [0.5] * (DIM - 1))


# --- the matrix: corrupt, audit exactly, reconcile, audit clean --------------------------------


def test_a_clean_system_audits_clean(stack: tuple[str, Settings]) -> None:
    """No false positives: a freshly synced system (deletes included) has no finding at all."""
    _, settings = stack
    _loaded(settings, deleted=("d18", "d19"))
    report = _audit(settings)
    assert _counts(report) == {}, report.as_json()
    assert report.clean and report.buckets_divergent == 0
    assert report.scanned["keyword_chunks"] == report.scanned["vector_chunks"] == 3 * (DOCS - 2)


def test_corruptions_are_reported_exactly_and_reconcile_repairs_them(stack: tuple[str, Settings]) -> None:
    """Each behind-the-back corruption shows up in its category and index, and nothing else;
    reconcile repairs all of it through the ledger, and the next audit is clean."""
    name, settings = stack
    _loaded(settings, deleted=("d19",))
    real_milvus = name.endswith("2.3.5")
    with runtime(settings) as rt:
        # keyword: a deleted chunk (with a tombstone above the ledger's version), a ghost of an
        # unknown document, a text edited at the same version, an orphan beyond the chunk count.
        rt.keyword.delete([ChunkDelete(chunk_id("d1", 0), 2)])
        rt.keyword.upsert([_copy(rt, chunk_id("d0", 0), chunk_id="zz:chunk-0", doc_id="zz", version=3)])
        rt.keyword.upsert([_copy(rt, chunk_id("d4", 1), text="tampered text", overwrite_equal=True)])
        rt.keyword.upsert([_copy(rt, chunk_id("d5", 0), chunk_id=chunk_id("d5", 7), chunk_index=7)])
        # vector: a deleted chunk, a ghost of a deleted document, an older version, an edited text.
        rt.vector.delete([ChunkDelete(chunk_id("d2", 1), 99)])
        rt.vector.upsert(
            [_with_vector(rt, _copy(rt, chunk_id("d0", 0), chunk_id="d19:chunk-0", doc_id="d19"))]
        )
        rt.vector.upsert([_with_vector(rt, _copy(rt, chunk_id("d3", 0), version=0))])
        rt.vector.upsert([_with_vector(rt, _copy(rt, chunk_id("d4", 2), text="also tampered"))])
        if real_milvus:
            _insert_duplicate(settings, rt, chunk_id("d6", 0))
    report = _audit(settings)
    expected: dict[str, Any] = {
        "keyword": {"missing": 1, "ghost": 1, "stale": 1, "orphan": 1},
        "vector": {"missing": 1, "ghost": 1, "stale": 2} | ({"duplicate": 1} if real_milvus else {}),
        "cross_index": 8,
    }
    assert _counts(report) == expected, json.dumps(report.as_json(), indent=1)
    examples = report.examples
    assert examples["keyword"]["missing"][0]["chunk_id"] == "d1:chunk-0"
    assert examples["keyword"]["orphan"][0]["chunk_id"] == "d5:chunk-7"
    assert examples["vector"]["ghost"][0]["chunk_id"] == "d19:chunk-0"

    summary = _reconcile(settings)
    assert summary["remaining_findings"] == 0, json.dumps(summary, indent=1)
    assert summary["embed_calls"] == 0, "every repaired text had a cached vector"
    after = _audit(settings)
    assert after.clean, json.dumps(after.as_json(), indent=1)
    _later_events_still_apply(settings)


def _later_events_still_apply(settings: Settings) -> None:
    """A same-version repair leaves the ledger's gate as it was: the next real version applies."""
    with runtime(settings) as rt:
        assert rt.ledger.get_docs(["d4"])["d4"].version == 1, "a same-version repair must not bump"
    path = Path(str(settings.source.path))  # type: ignore[union-attr]  # jsonl settings have a path
    _append(path, _event("d4", 2), _event("d1", 5))
    summary = _sync(settings)
    assert summary["applied_events"] == 2 and summary["stale_events"] == 0
    assert _audit(settings).clean
    with runtime(settings) as rt:
        assert "d4 v2" in (rt.keyword.get([chunk_id("d4", 1)])[chunk_id("d4", 1)].text or "")


def _insert_duplicate(settings: Settings, rt: Runtime, cid: str) -> None:
    """A second entity for an existing key: Milvus 2.3.5's ``insert`` does not check keys."""
    held = rt.vector.get([cid])[cid]
    vector = rt.vector.fetch_vectors([cid])[cid]
    row = {
        "chunk_id": cid,
        "vector": vector,
        "doc_id": held.doc_id,
        "chunk_index": held.chunk_index,
        "text": held.text,
        "content_hash": held.content_hash,
        "version": held.version,
        "metadata": dict(held.metadata or {}),
    }
    client = MilvusClient(uri=settings.vector.uri, timeout=30)
    try:
        client.insert(settings.vector.collection, [row], timeout=30)
    finally:
        client.close()


def test_a_dropped_index_is_rebuilt_from_the_cache_without_embedding(stack: tuple[str, Settings]) -> None:
    """Dropping the whole vector collection makes every chunk missing there; reconcile refills it
    from cached vectors (zero model calls) and the audit is clean again."""
    _, settings = stack
    _loaded(settings)
    with runtime(settings) as rt:
        rt.vector.drop()
    report = _audit(settings)
    assert _counts(report) == {"vector": {"missing": 3 * DOCS}, "cross_index": 3 * DOCS}
    summary = _reconcile(settings)
    assert summary["remaining_findings"] == 0 and summary["embed_calls"] == 0
    assert _audit(settings).clean


# --- embedded stack only: sources that list themselves, modes, budget ---------------------------


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[Settings]:
    settings = _settings(
        tmp_path,
        {"kind": "tantivy", "path": str(tmp_path / "tantivy")},
        str(tmp_path / "m.db"),
        {"kind": "jsonl", "path": str(tmp_path / "events.jsonl"), "name": "events"},
    )
    yield settings
    server_manager_instance.release_server(settings.vector.uri)


@dataclass
class SqlTable:
    """Table ``a`` of a SQLite database, the source of ``settings`` (a listable source)."""

    db: Any  # a SQLAlchemy engine
    settings: Settings

    def write(self, sql: str, *params: Any) -> None:
        with self.db.begin() as db:
            db.exec_driver_sql(sql, params)


@pytest.fixture
def sql_table(tmp_path: Path) -> Iterator[SqlTable]:
    import sqlalchemy as sa

    url = f"sqlite:///{tmp_path / 'kb.sqlite'}"
    table = SqlTable(sa.create_engine(url), _settings(
        tmp_path, {"kind": "tantivy", "path": str(tmp_path / "t")}, str(tmp_path / "m.db"),
        {"kind": "sql", "url": url, "table": "a"},
    ))  # fmt: skip
    table.write("CREATE TABLE a (id TEXT PRIMARY KEY, text TEXT, updated_at TIMESTAMP)")
    yield table
    server_manager_instance.release_server(table.settings.vector.uri)


def test_a_sql_source_is_compared_with_the_ledger_and_redriven(sql_table: SqlTable) -> None:
    """Rows changed or hard-deleted without a sync are ledger drift (and stale / ghost in both
    indexes against the source); reconcile re-drives them and deletes nothing the source has."""
    settings = sql_table.settings
    for i in range(5):
        sql_table.write("INSERT INTO a VALUES (?, ?, ?)", f"a{i}", _text(f"a{i}", 1), f"2026-01-01 00:00:0{i}")
    _sync(settings)
    assert _audit(settings).clean
    sql_table.write("UPDATE a SET text = 'rewritten at the source' WHERE id = 'a1'")
    sql_table.write("DELETE FROM a WHERE id = 'a2'")
    report = _audit(settings)
    assert _counts(report) == {
        "keyword": {"stale": 1, "orphan": 2, "ghost": 3},
        "vector": {"stale": 1, "orphan": 2, "ghost": 3},
        "ledger_drift": 2,
    }, report.as_json()
    plan = _reconcile(settings, dry_run=True)
    assert plan["dry_run"] is True and plan["ops"] == 0, "ledger drift is redriven, not repaired"
    assert sorted((r["doc_id"], r["op"]) for r in plan["redrives"]) == [("a1", "upsert"), ("a2", "delete")]
    assert plan["remaining_findings"] == _total(report) and not _audit(settings).clean
    summary = _reconcile(settings)
    assert {r["doc_id"] for r in summary["redrives"]} == {"a1", "a2"}
    assert summary["redrives"] == plan["redrives"], "the dry run lists exactly what the run redrives"
    assert _audit(settings).clean
    with runtime(settings) as rt:
        assert len(rt.keyword.get([chunk_id(f"a{i}", 0) for i in range(5)])) == 4


def test_sample_and_since_probe_documents_by_id(embedded: Settings) -> None:
    """--sample and --since read chosen documents in real time and find their drift."""
    _loaded(embedded)
    with runtime(embedded) as rt:
        rt.keyword.upsert([_copy(rt, chunk_id("d3", 0), chunk_id=chunk_id("d3", 4), chunk_index=4)])
        auditor = _auditor(embedded, rt)
        everything = auditor.sample(DOCS, random.Random(1)).report
        assert _counts(everything) == {"keyword": {"orphan": 1}, "cross_index": 1}
        assert auditor.since(0.0).report.documents_checked == DOCS
        assert auditor.since(4e9).report.documents_checked == 0


@dataclass(frozen=True)
class _SourceDoc:
    doc_id: str
    version: int
    text: str
    metadata: dict[str, Any]


class _FetchOnly:
    """A source that reads chosen documents; listing it all fails the test."""

    def __init__(self, docs: dict[str, _SourceDoc]) -> None:
        self.docs = docs
        self.fetched: list[list[str]] = []

    def iter_current(self) -> Iterator[_SourceDoc]:
        raise AssertionError("a probe listed the whole source")

    def get_current(self, doc_ids: Sequence[str]) -> Iterator[_SourceDoc]:
        self.fetched.append(list(doc_ids))
        return iter([self.docs[d] for d in doc_ids if d in self.docs])


def test_a_recheck_reads_only_its_documents_from_a_source_that_can_fetch_them(embedded: Settings) -> None:
    """A generation snapshot (the rebuild's reference) answers a recheck of a few documents
    without being listed whole, and what it answers is compared: a text changed at the source
    is stale in both indexes, a document the source lacks is a ghost."""
    _loaded(embedded)
    docs = {f"d{i}": _SourceDoc(f"d{i}", 1, _text(f"d{i}", 1), {"d": f"d{i}"}) for i in range(DOCS)}
    docs["d1"] = _SourceDoc("d1", 2, "rewritten at the source", {"d": "d1"})
    del docs["d2"]
    source = _FetchOnly(docs)
    with runtime(embedded) as rt:
        auditor = Auditor(ledger=rt.ledger, keyword=rt.keyword, vector=rt.vector, source=source,
                          chunking=embedded.chunking.to_domain(), reference_name="snapshot")
        result = auditor.recheck(["d1", "d2", "d3"])
    assert source.fetched == [["d1", "d2", "d3"]]
    assert result.report.documents_checked == 3
    assert {f.doc_id for f in result.findings} == {"d1", "d2"}, result.report.as_json()


def test_doc_evidence_shows_a_forgotten_document_everywhere(embedded: Settings) -> None:
    """--doc proves a deleted document is gone from ledger (tombstone) and both indexes."""
    _loaded(embedded, deleted=("d7",))
    with runtime(embedded) as rt:
        result = _auditor(embedded, rt).document("d7")
    from coordinator.audit import evidence

    proof = evidence(result.views["d7"], result.findings)
    assert proof["forgotten"] and proof["clean"]
    assert proof["ledger"] == {"state": "tombstone", "version": 2, "chunks": 0}
    assert proof["keyword"]["count"] == proof["vector"]["count"] == 0


def test_max_ops_caps_the_work_and_dry_run_changes_nothing(embedded: Settings) -> None:
    """A dry run prints the plan without writing; --max-ops stops before the budget is exceeded."""
    _loaded(embedded)
    with runtime(embedded) as rt:
        rt.vector.delete([ChunkDelete(chunk_id(f"d{i}", 0), 9) for i in range(6)])
    findings = _total(_audit(embedded))
    plan = _reconcile(embedded, dry_run=True)
    assert len(plan["repairs"]) == 6 and all(r["sides"] == ["vector"] for r in plan["repairs"])
    assert plan["ops"] == 6, "one chunk upsert on one side per repair"
    assert sorted(plan["repairs"], key=lambda r: r["doc_id"])[0] == {
        "doc_id": "d0",
        "sides": ["vector"],
        "upserts": [{"chunk_id": "d0:chunk-0", "version": 1}],
        "deletes": [],
        "rewrites": [],
        "ledger_version": 1,
        "raises_ledger_version": False,
    }
    assert plan["remaining_findings"] == findings > 0 and plan["redrives"] == plan["unrepairable"] == []
    assert not _audit(embedded).clean
    capped = _reconcile(embedded, max_ops=1)
    assert capped["ops"] == 0 and capped["skipped_for_budget"] == 6
    done = _reconcile(embedded)
    assert done["remaining_findings"] == 0
    assert done["ops"] == plan["ops"] and done["repairs"] == plan["repairs"], "the dry run plans what the run does"


def test_repairs_take_the_budget_batch_by_batch_and_their_counts_add_up(
    embedded: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seven documents lack chunk 0 in the vector index; repairs go in batches of two (one op
    each). With a budget of 3 the first batch fits, the next two do not, the last (one repair)
    does: every count is the sum over the batches that ran, and what did not fit is still found."""
    monkeypatch.setattr("coordinator.reconcile.REPAIR_BATCH_DOCS", 2)
    _loaded(embedded)
    with runtime(embedded) as rt:
        rt.vector.delete([ChunkDelete(chunk_id(f"d{i}", 0), 9) for i in range(7)])
    capped = _reconcile(embedded, max_ops=3)
    assert (capped["ops"], len(capped["repairs"]), capped["skipped_for_budget"]) == (3, 3, 4)
    assert capped["audit"]["clean"] is False and capped["audit"]["counts"]["vector"]["missing"] == 7
    assert _counts(_audit(embedded)) == {"vector": {"missing": 4}, "cross_index": 4}
    rest = _reconcile(embedded)
    assert (rest["ops"], len(rest["repairs"]), rest["skipped_for_budget"]) == (4, 4, 0)
    assert {r["doc_id"] for r in capped["repairs"] + rest["repairs"]} == {f"d{i}" for i in range(7)}
    assert _audit(embedded).clean


def test_redrives_take_the_budget_batch_by_batch_and_their_counts_add_up(
    sql_table: SqlTable, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seven rows added at the source without a sync are ledger drift, redriven in batches of two
    documents (three chunks each, so six ops a document). A budget of 18 takes the first batch,
    skips the next two and takes the last: three redrives, four skipped, 18 ops."""
    monkeypatch.setattr("coordinator.reconcile.REPAIR_BATCH_DOCS", 2)
    settings = sql_table.settings
    _sync(settings)
    for i in range(7):
        sql_table.write("INSERT INTO a VALUES (?, ?, ?)", f"a{i}", _text(f"a{i}", 1), f"2026-01-01 00:00:0{i}")
    capped = _reconcile(settings, max_ops=18)
    assert (capped["ops"], len(capped["redrives"]), capped["skipped_for_budget"]) == (18, 3, 4), capped
    assert _counts(_audit(settings))["ledger_drift"] == 4
    rest = _reconcile(settings)
    assert (rest["ops"], len(rest["redrives"]), rest["skipped_for_budget"]) == (24, 4, 0)
    assert _audit(settings).clean
    # Chunk 0 of two documents is lost from both indexes: the source's own text repairs both
    # (and nothing the source holds is deleted on the way).
    with runtime(settings) as rt:
        lost = [ChunkDelete(chunk_id(d, 0), 9) for d in ("a0", "a1")]
        rt.keyword.delete(lost)
        rt.vector.delete(lost)
    repaired = _reconcile(settings)
    assert sorted(r["doc_id"] for r in repaired["repairs"]) == ["a0", "a1"]
    assert repaired["unrepairable"] == [] and repaired["remaining_findings"] == 0
    assert _audit(settings).clean


def test_a_repair_the_gated_keyword_index_refuses_is_escalated_up_to_its_limit(
    embedded: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tombstones above the ledger's version (d1's chunk 0 deleted at v4, d2's at v5, behind
    lockstep's back) make the gated keyword index take the repair as superseded. Each round that
    did not stick is escalated one version above the ledger (which the repair raises, with a
    warning): the fourth write, at v4, passes d1's tombstone; d2's needs v5, past
    REPAIR_ESCALATIONS_MAX, so it is left as a finding for the next run. Repairs go one document
    a batch, so every round spans two batches."""
    assert REPAIR_ESCALATIONS_MAX == 3
    monkeypatch.setattr("coordinator.reconcile.REPAIR_BATCH_DOCS", 1)
    _loaded(embedded)
    with runtime(embedded) as rt:
        rt.keyword.delete([ChunkDelete(chunk_id("d1", 0), 4), ChunkDelete(chunk_id("d2", 0), 5)])
    with capture_logs() as logs:
        summary = _reconcile(embedded)
    assert summary["escalations"] == 4
    assert summary["remaining_findings"] == _total(_audit(embedded)) > 0
    with runtime(embedded) as rt:
        assert {d: s.version for d, s in rt.ledger.get_docs(["d1", "d2"]).items()} == {"d1": 4, "d2": 4}
        assert rt.keyword.get([chunk_id("d1", 0)]) and not rt.keyword.get([chunk_id("d2", 0)])
    escalating = [e for e in logs if e["event"] == "repairs did not stick, escalating"]
    assert [(e["documents"], e["attempt"]) for e in escalating] == [(2, 1), (2, 2), (2, 3), (1, 4)]
    raised = [e for e in logs if e["event"] == "repair raises the ledger version"]
    assert [(e["doc_id"], e["version"]) for e in raised] == [("d1", 2), ("d2", 2), ("d1", 3), ("d2", 3), ("d1", 4), ("d2", 4)]
    assert all(e["reason"] == "an index holds this document's chunks at or above the ledger's version" for e in raised)
    again = _reconcile(embedded)
    assert again["remaining_findings"] == 0 and _audit(embedded).clean


def test_an_orphan_beside_ledger_drift_is_still_seen_after_the_redrive(sql_table: SqlTable) -> None:
    """A row edited at the source without a sync (ledger drift) whose document also has a chunk
    beyond its count in the keyword index: the redrive brings the new text, and the re-read after
    it must still see the orphan (read by ID) so that the repair round removes it."""
    settings = sql_table.settings
    sql_table.write("INSERT INTO a VALUES (?, ?, ?)", "a0", _text("a0", 1), "2026-01-01 00:00:00")
    _sync(settings)
    with runtime(settings) as rt:
        orphan = _copy(rt, chunk_id("a0", 0), chunk_id=chunk_id("a0", 7), chunk_index=7)
        rt.keyword.upsert([orphan])
    sql_table.write("UPDATE a SET text = ?, updated_at = ? WHERE id = 'a0'", _text("a0", 2), "2026-01-02 00:00:00")
    summary = _reconcile(settings)
    assert [r["doc_id"] for r in summary["redrives"]] == ["a0"]
    [repair] = summary["repairs"]
    assert repair["deletes"] == [{"chunk_id": "a0:chunk-7", "version": repair["deletes"][0]["version"]}]
    assert repair["sides"] == ["keyword"]
    assert summary["remaining_findings"] == 0 and _audit(settings).clean


def test_chunks_without_any_copy_are_listed_for_every_batch_in_a_run_and_a_dry_run(
    embedded: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunk 0 of d0, d1 and d2 is gone from both indexes and the source (a JSONL stream) cannot
    list it: nothing is left to repair it from. With one document a batch, the dry run and the run
    both name all three, not only the last batch's."""
    monkeypatch.setattr("coordinator.reconcile.REPAIR_BATCH_DOCS", 1)
    _loaded(embedded)
    lost = [ChunkDelete(chunk_id(f"d{i}", 0), 9) for i in range(3)]
    with runtime(embedded) as rt:
        rt.keyword.delete(lost)
        rt.vector.delete(lost)
    want = [{"chunk_id": chunk_id(f"d{i}", 0), "reason": "no copy of its text with the document's metadata"}
            for i in range(3)]  # fmt: skip
    plan = _reconcile(embedded, dry_run=True)
    assert sorted(plan["unrepairable"], key=lambda u: u["chunk_id"]) == want
    summary = _reconcile(embedded)
    assert sorted(summary["unrepairable"], key=lambda u: u["chunk_id"]) == want


def test_a_repair_of_one_index_goes_through_while_the_other_is_down(embedded: Settings) -> None:
    """Six documents lack chunk 0 in the vector index only. The keyword index is down while
    reconcile runs: the repairs touch only the vector side, so they commit all the same (and the
    keyword index is not written to at all)."""
    from chaos.faults import FaultyIndex
    from coordinator.apply import ApplyEngine

    _loaded(embedded)
    with runtime(embedded) as rt:
        rt.vector.delete([ChunkDelete(chunk_id(f"d{i}", 0), 9) for i in range(6)])
        keyword = FaultyIndex(rt.keyword, down=True, label="keyword")
        engine = ApplyEngine(ledger=rt.ledger, keyword=keyword, vector=rt.vector, embedder=rt.embedder,
                             chunking=embedded.chunking.to_domain(), source_name="test")  # fmt: skip
        try:
            summary = Reconciler(
                auditor=_auditor(embedded, rt), engine=engine, ledger=rt.ledger, keyword=rt.keyword,
                vector=rt.vector, chunking=embedded.chunking.to_domain(), limiter=RateLimiter(TEST_OPS_PER_S),
            ).run(dry_run=False, max_ops=None).as_json()  # fmt: skip
        finally:
            engine.close()
        assert summary["remaining_findings"] == 0 and len(summary["repairs"]) == 6
        assert keyword.injected == {}, "nothing was sent to the keyword index"
    assert _audit(embedded).clean


# --- the CLI, as a real process ----------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AUDIT_CLI, *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
        env=dict(os.environ),
        stdin=subprocess.DEVNULL,
    )


def _config_file(tmp_path: Path, settings: Settings) -> Path:
    keyword = settings.keyword.model_dump(include={"kind", "index", "path", "url"}, exclude_none=True)
    config = {
        "source": {"kind": "jsonl", "path": str(tmp_path / "events.jsonl"), "name": "events"},
        "keyword": keyword,
        "vector": {"uri": settings.vector.uri, "collection": settings.vector.collection},
        "ledger": {"path": str(tmp_path / "ledger.db")},
        "embedder": {"kind": "hashing", "dim": DIM},
        "chunking": CHUNKING,
    }
    path = tmp_path / "lockstep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_cli_exit_codes_and_json_schema(embedded: Settings, tmp_path: Path) -> None:
    """audit exits 0 clean, 1 on drift, 2 on error; --json carries the documented keys."""
    _loaded(embedded)
    server_manager_instance.release_server(embedded.vector.uri)
    config = _config_file(tmp_path, embedded)
    clean = _cli("audit", "-c", str(config), "--json")
    assert clean.returncode == 0, clean.stderr[-2000:]
    report = json.loads(clean.stdout)
    assert set(report) == {
        "schema_version",
        "mode",
        "reference",
        "clean",
        "counts",
        "examples",
        "scanned",
        "buckets",
        "documents_checked",
        "elapsed_s",
    }
    assert report["counts"]["keyword"] == dict.fromkeys(
        ("missing", "ghost", "stale", "orphan", "duplicate", "foreign"), 0
    )
    with runtime(embedded) as rt:
        rt.keyword.delete([ChunkDelete(chunk_id("d0", 0), 2)])
    server_manager_instance.release_server(embedded.vector.uri)
    drift = _cli("audit", "-c", str(config), "--json")
    assert drift.returncode == 1, drift.stderr[-2000:]
    assert json.loads(drift.stdout)["counts"]["keyword"]["missing"] == 1
    assert _cli("audit", "-c", str(config)).returncode == 1
    fixed = _cli("reconcile", "-c", str(config))
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert _cli("audit", "-c", str(config), "--doc", "d0", "--json").returncode == 0
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        yaml.safe_dump(
            {
                "keyword": {"kind": "opensearch", "url": "http://127.0.0.1:9", "index": "x"},
                "vector": {"uri": str(tmp_path / "other.db")},
            }
        )
    )
    assert _cli("audit", "-c", str(broken)).returncode == 2
    assert _cli("audit", "-c", str(config), "--sample", "3", "--doc", "d0").returncode == 2


# --- foreign data: documents lockstep did not write ----------------------------------------------


@dataclass(frozen=True)
class _Places:
    """Where a stack's stores keep the active generation's data, for the raw clients."""

    keyword: str  # the physical index name, or the Tantivy directory
    collection: str
    d3_row: dict[str, Any]  # the vector index's row of d3:chunk-0, vector included


def _places(settings: Settings) -> _Places:
    with runtime(settings) as rt:
        keyword = str(rt.keyword.path) if isinstance(rt.keyword, TantivyKeywordIndex) else rt.keyword.name
        held = rt.vector.get([chunk_id("d3", 0)])[chunk_id("d3", 0)]
        row = {
            "chunk_id": held.chunk_id,
            "vector": rt.vector.fetch_vectors([held.chunk_id])[held.chunk_id],
            "doc_id": held.doc_id,
            "chunk_index": held.chunk_index,
            "text": held.text,
            "content_hash": held.content_hash,
            "version": held.version,
            "metadata": dict(held.metadata or {}),
        }
        return _Places(keyword, rt.vector.name, row)


def _foreign_search_engine_docs(url: str, index: str) -> None:
    """Three documents written with opensearch-py: one whose ID is no chunk ID and whose body
    has no lockstep field, one whose body contradicts its ID and engine version (7) and holds a
    metadata array, and a hand edit of a live chunk (internal versioning: its _version goes 1 -> 2)."""
    client = OpenSearch(url, timeout=RAW_TIMEOUT_S)
    try:
        client.index(index=index, id="stray-note", body={"text": "written by hand"})
        body = {
            "chunk_id": chunk_id("d1", 2),
            "doc_id": "d1",
            "chunk_index": 9,
            "text": "by hand",
            "content_hash": content_hash("by hand"),
            "version": 1,
            "metadata": [1],
        }
        client.index(index=index, id=chunk_id("d1", 9), body=body, version=7, version_type="external")
        client.index(index=index, id=chunk_id("d2", 0), body={"text": "edited by hand"})
    finally:
        client.close()


def _foreign_tantivy_docs(path: str) -> None:
    """The same three with the tantivy binding: one with a chunk_id and a text only (no version,
    no seq, no deleted flag), one at version 7 whose metadata is an array, and a second document
    under a live chunk's ID at version 2."""
    index = tantivy.Index.open(path)
    # The index's text field names this analyzer; any analyzer under that name lets us write.
    index.register_tokenizer("lockstep_text", tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple()).build())
    writer = index.writer(heap_size=RAW_TANTIVY_HEAP_BYTES, num_threads=1)
    stray = tantivy.Document()
    stray.add_text("chunk_id", "stray-note")
    stray.add_text("text", "written by hand")
    odd = tantivy.Document()
    odd.add_text("chunk_id", chunk_id("d1", 9))
    odd.add_text("doc_id", "d1")
    odd.add_integer("chunk_index", 9)
    odd.add_text("text", "by hand")
    odd.add_text("content_hash", content_hash("by hand"))
    odd.add_integer("version", 7)
    odd.add_bytes("metadata", b"[1]")
    odd.add_boolean("deleted", False)
    odd.add_integer("seq", 1_000_000)
    edit = tantivy.Document()
    edit.add_text("chunk_id", chunk_id("d2", 0))
    edit.add_text("text", "edited by hand")
    edit.add_integer("version", 2)
    for doc in (stray, odd, edit):
        writer.add_document(doc)
    writer.commit()
    writer.wait_merging_threads()


def _foreign_vector_rows(uri: str, places: _Places, real_milvus: bool) -> None:
    """Three rows written with pymilvus: a primary key that is no chunk ID with an empty text, a
    chunk ID whose doc_id disagrees with it (negative version, metadata an array where the store
    takes one), and a live chunk upserted with a chunk_index that disagrees with its ID."""
    vector = [1.0] + [0.5] * (DIM - 1)
    # Milvus 2.3.5 refuses a JSON field that is not an object; milvus-lite stores any JSON.
    odd_metadata: Any = {"by": "hand"} if real_milvus else [1, 2]
    stray = {"chunk_id": "stray-row", "vector": vector, "doc_id": "stray-row", "chunk_index": 0,
             "text": "", "content_hash": "", "version": 0, "metadata": {}}  # fmt: skip
    odd = {"chunk_id": chunk_id("d1", 9), "vector": vector, "doc_id": "someone-else", "chunk_index": 9,
           "text": "by hand", "content_hash": content_hash("by hand"), "version": -3,
           "metadata": odd_metadata}  # fmt: skip
    client = MilvusClient(uri=uri, timeout=RAW_TIMEOUT_S, dedicated=True)
    try:
        client.insert(places.collection, [stray, odd], timeout=RAW_TIMEOUT_S)
        client.upsert(places.collection, [places.d3_row | {"chunk_index": 5}], timeout=RAW_TIMEOUT_S)
    finally:
        client.close()


def _write_foreign_data(request: pytest.FixtureRequest, name: str, settings: Settings) -> None:
    places = _places(settings)
    if name.startswith("tantivy"):
        _foreign_tantivy_docs(places.keyword)
    else:
        _foreign_search_engine_docs(request.getfixturevalue("opensearch_api_url"), places.keyword)
    _foreign_vector_rows(settings.vector.uri, places, name.endswith("2.3.5"))


def _continuous_round(settings: Settings) -> Report:
    with runtime(settings) as rt:
        auditor = _auditor(settings, rt)
        rounds = ContinuousAudit(auditor, rt.ledger, settings.chunking.to_domain(), sample_docs=DOCS,
                                 rng=random.Random(0), clock=lambda: 0.0)  # fmt: skip
        return rounds.round()


def _invariants_over_scans(settings: Settings) -> list[str]:
    """The chaos suite's checks over what both indexes hold (the ghost document d1 counts as deleted)."""
    with runtime(settings) as rt:
        found = [
            str(v)
            for side, index in (("keyword", rt.keyword), ("vector", rt.vector))
            for v in invariants.check_index(side, {}, {"d1", "stray-note"}, list(index.scan()))
        ]
        return found + [str(v) for v in audit_violations(_auditor(settings, rt))]


def test_foreign_documents_are_findings_that_reconcile_removes_at_the_engines_version(
    request: pytest.FixtureRequest, stack: tuple[str, Settings], tmp_path: Path
) -> None:
    """Documents written with the raw clients (no chunk ID, missing or contradicting fields, odd
    metadata) are `foreign` findings in audit, --doc, the continuous audit and the chaos checks,
    never a crash; reconcile deletes them at the engine's own version, rewrites hand-edited live
    chunks, and the next audit is clean."""
    name, settings = stack
    _loaded(settings)
    _write_foreign_data(request, name, settings)
    continuous = _continuous_round(settings)
    assert continuous.counts["keyword"]["foreign"] == 2, continuous.as_json()
    assert continuous.counts["vector"]["foreign"] == 2, continuous.as_json()
    violations = _invariants_over_scans(settings)
    assert any("stray-note" in v for v in violations) and any("audit:foreign" in v for v in violations)
    if name.startswith("tantivy"):
        server_manager_instance.release_server(settings.vector.uri)
    config = str(_config_file(tmp_path, settings))

    audit = _cli("audit", "-c", config, "--json")
    assert audit.returncode == 1 and "Traceback" not in audit.stderr, audit.stderr[-3000:]
    report = json.loads(audit.stdout)
    assert _nonzero(report["counts"]) == {
        "keyword": {"foreign": 3}, "vector": {"foreign": 3}, "cross_index": 5
    }, report  # fmt: skip
    assert {e["chunk_id"] for e in report["examples"]["keyword"]["foreign"]} == {
        "stray-note", "d1:chunk-9", "d2:chunk-0"
    }  # fmt: skip
    assert {e["chunk_id"] for e in report["examples"]["vector"]["foreign"]} == {
        "stray-row", "d1:chunk-9", "d3:chunk-0"
    }  # fmt: skip
    human = _cli("audit", "-c", config)
    assert human.returncode == 1 and "foreign" in human.stdout and "Traceback" not in human.stderr
    doc = _cli("audit", "-c", config, "--doc", "stray-note", "--json")
    assert doc.returncode == 1, doc.stderr[-3000:]
    findings = json.loads(doc.stdout)["findings"]
    assert sorted((f["category"], f["side"]) for f in findings) == [
        ("cross_index", "indexes"), ("foreign", "keyword")
    ]  # fmt: skip

    fixed = _cli("reconcile", "-c", config)
    assert fixed.returncode == 0 and "Traceback" not in fixed.stderr, fixed.stderr[-3000:]
    summary = json.loads(fixed.stdout)
    deletes = {d["chunk_id"]: d["version"] for r in summary["repairs"] for d in r["deletes"]}
    upserts = {u["chunk_id"]: u["version"] for r in summary["repairs"] for u in r["upserts"]}
    # The engines' own versions: _version 7 (the body said 1); "stray-note" has _version 1 on
    # the search engines and no version at all in Tantivy.
    assert deletes == {
        "d1:chunk-9": 7, "stray-note": 0 if name.startswith("tantivy") else 1, "stray-row": 0
    }, summary["repairs"]  # fmt: skip
    assert upserts[chunk_id("d2", 0)] == 2 and upserts[chunk_id("d3", 0)] == 1, summary["repairs"]
    after = _cli("audit", "-c", config, "--json")
    assert after.returncode == 0, after.stdout[-3000:] + after.stderr[-3000:]


# --- metadata edited behind lockstep's back ------------------------------------------------------

# The metadata the raw clients put in place of a document's own ({"d": doc_id}, from _event): an
# ACL widened in the keyword index, a tenant changed in the vector index.
KEYWORD_EDIT = (chunk_id("d1", 0), {"d": "d1", "acl": "public"})
VECTOR_EDIT = (chunk_id("d2", 1), {"d": "someone-else"})


def _edit_search_engine_metadata(url: str, index: str, cid: str, metadata: dict[str, Any]) -> None:
    """Rewrite one document's metadata with opensearch-py at its own _version (external_gte), so
    that only the metadata differs from what lockstep wrote."""
    client = OpenSearch(url, timeout=RAW_TIMEOUT_S)
    try:
        held = client.get(index=index, id=cid)
        body = held["_source"] | {"metadata": metadata}
        client.index(index=index, id=cid, body=body, version=held["_version"], version_type="external_gte")
    finally:
        client.close()


def _edit_tantivy_metadata(path: str, cid: str, metadata: dict[str, Any]) -> None:
    """Replace one live document with the tantivy binding: every stored field kept, the metadata
    bytes changed."""
    index = tantivy.Index.open(path)
    index.register_tokenizer("lockstep_text", tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple()).build())
    searcher = index.searcher()
    query = index.parse_query(f'"{cid}"', ["chunk_id"])
    [(_, address)] = searcher.search(query, limit=2).hits
    held = searcher.doc(address).to_dict()
    edited = tantivy.Document()
    for field in ("chunk_id", "doc_id", "text", "content_hash"):
        edited.add_text(field, held[field][0])
    for field in ("chunk_index", "version", "seq"):
        edited.add_integer(field, held[field][0])
    edited.add_boolean("deleted", held["deleted"][0])
    edited.add_bytes("metadata", json.dumps(metadata).encode())
    writer = index.writer(heap_size=RAW_TANTIVY_HEAP_BYTES, num_threads=1)
    writer.delete_documents("chunk_id", cid)
    writer.add_document(edited)
    writer.commit()
    writer.wait_merging_threads()


def _edit_vector_metadata(settings: Settings, cid: str, metadata: dict[str, Any]) -> None:
    """Upsert one row with pymilvus: its own vector, text, hash and version, other metadata."""
    with runtime(settings) as rt:
        held = rt.vector.get([cid])[cid]
        vector = rt.vector.fetch_vectors([cid])[cid]
    row = {"chunk_id": cid, "vector": vector, "doc_id": held.doc_id, "chunk_index": held.chunk_index,
           "text": held.text, "content_hash": held.content_hash, "version": held.version,
           "metadata": metadata}  # fmt: skip
    client = MilvusClient(uri=settings.vector.uri, timeout=RAW_TIMEOUT_S, dedicated=True)
    try:
        client.upsert(settings.vector.collection, [row], timeout=RAW_TIMEOUT_S)
    finally:
        client.close()


def _edit_metadata(request: pytest.FixtureRequest, name: str, settings: Settings) -> None:
    places = _places(settings)
    if name.startswith("tantivy"):
        _edit_tantivy_metadata(places.keyword, *KEYWORD_EDIT)
    else:
        _edit_search_engine_metadata(request.getfixturevalue("opensearch_api_url"), places.keyword, *KEYWORD_EDIT)
    _edit_vector_metadata(settings, *VECTOR_EDIT)


def _source_expectation() -> dict[str, invariants.ExpectedChunk]:
    """What the chaos checks expect of every chunk, from the events themselves: the source's own
    text and a digest of its metadata, computed in the check."""
    out = {}
    for i in range(DOCS):
        event = _event(f"d{i}", 1)
        digest = invariants.metadata_digest(event["metadata"])
        for n, piece in enumerate(chunk_text(event["text"], ChunkingSettings(**CHUNKING))):
            out[chunk_id(f"d{i}", n)] = invariants.ExpectedChunk(
                chunk_id(f"d{i}", n), hashlib.sha256(piece.encode()).hexdigest(), piece, digest
            )
    return out


def test_metadata_edited_behind_lockstep_is_found_and_repaired_without_embedding(
    request: pytest.FixtureRequest, stack: tuple[str, Settings], tmp_path: Path
) -> None:
    """Metadata rewritten with the raw clients in one index (texts, hashes and versions untouched)
    is `stale` ("metadata differs") in `lockstep audit`, the continuous audit and the chaos
    checks; `lockstep reconcile` rewrites each copy from the other index's with zero embed calls,
    and both indexes then hold the document's own metadata again."""
    name, settings = stack
    _loaded(settings)
    _edit_metadata(request, name, settings)
    continuous = _continuous_round(settings)
    assert _counts(continuous) == {"keyword": {"stale": 1}, "vector": {"stale": 1}, "cross_index": 2}
    with runtime(settings) as rt:
        chaos = [str(v) for v in audit_violations(_auditor(settings, rt))]
        for side, index in (("keyword", rt.keyword), ("vector", rt.vector)):
            chaos += map(str, invariants.check_index(side, _source_expectation(), set(), list(index.scan(with_text=True))))
    assert sorted(v for v in chaos if v.startswith("I2")) == [
        f"I2 [keyword] {KEYWORD_EDIT[0]}: metadata differs from the source's",
        f"I2 [vector] {VECTOR_EDIT[0]}: metadata differs from the source's",
    ], chaos
    assert sum(v.startswith("audit:stale") and "metadata differs" in v for v in chaos) == 2, chaos
    if name.startswith("tantivy"):
        server_manager_instance.release_server(settings.vector.uri)
    config = str(_config_file(tmp_path, settings))

    audit = _cli("audit", "-c", config, "--json")
    assert audit.returncode == 1, audit.stderr[-3000:]
    report = json.loads(audit.stdout)
    assert _nonzero(report["counts"]) == {"keyword": {"stale": 1}, "vector": {"stale": 1}, "cross_index": 2}
    for side, (cid, _) in (("keyword", KEYWORD_EDIT), ("vector", VECTOR_EDIT)):
        [example] = report["examples"][side]["stale"]
        assert example["chunk_id"] == cid and example["detail"].startswith("metadata differs"), example

    fixed = _cli("reconcile", "-c", config)
    assert fixed.returncode == 0, fixed.stdout[-3000:] + fixed.stderr[-3000:]
    summary = json.loads(fixed.stdout)
    assert summary["embed_calls"] == 0, summary
    assert sorted((r["doc_id"], r["sides"]) for r in summary["repairs"]) == [("d1", ["keyword"]), ("d2", ["vector"])]
    assert _cli("audit", "-c", config).returncode == 0
    keyword, vector = read_keyword(settings), read_vector(settings)
    for cid in (KEYWORD_EDIT[0], VECTOR_EDIT[0]):
        doc_id = cid.split(":")[0]
        assert keyword[cid].metadata == vector[cid].metadata == {"d": doc_id}, (keyword[cid], vector[cid])
        assert keyword[cid].version == vector[cid].version == 1, "a same-version repair keeps the version"


def test_a_tantivy_document_without_any_id_is_reported_unrepairable_not_deleted(embedded: Settings) -> None:
    """A Tantivy document without a chunk_id is a foreign finding that no write can address:
    reconcile lists it as unrepairable (so the CLI exits 1) and sends no delete that would
    be refused into the dead-letter queue."""
    _loaded(embedded)
    with runtime(embedded) as rt:
        path = str(rt.keyword.path)  # type: ignore[attr-defined]  # the embedded stack is Tantivy
    index = tantivy.Index.open(path)
    index.register_tokenizer("lockstep_text", tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple()).build())
    writer = index.writer(heap_size=RAW_TANTIVY_HEAP_BYTES, num_threads=1)
    nameless = tantivy.Document()
    nameless.add_text("text", "no id at all")
    writer.add_document(nameless)
    writer.commit()
    writer.wait_merging_threads()
    assert _counts(_audit(embedded)) == {"keyword": {"foreign": 1}, "cross_index": 1}
    plan = _reconcile(embedded, dry_run=True)
    assert plan["unrepairable"] == [{"chunk_id": "", "reason": NO_ID}], plan
    summary = _reconcile(embedded)
    assert summary["unrepairable"] == [{"chunk_id": "", "reason": NO_ID}], summary
    assert summary["repairs"] == [] and summary["remaining_findings"] == 2
    with runtime(embedded) as rt:
        assert rt.ledger.counts()["dead_letters"] == 0


def _nonzero(counts: dict[str, Any]) -> dict[str, Any]:
    """The non-zero counts of a JSON report."""
    out: dict[str, Any] = {}
    for key, value in counts.items():
        kept = {k: v for k, v in value.items() if v} if isinstance(value, dict) else value
        if kept:
            out[key] = kept
    return out


# --- pure logic: buckets, digests, classification, planning, rate limit --------------------------


def test_buckets_are_stable_and_spread() -> None:
    """A document's bucket never changes between runs and documents spread over the buckets."""
    assert bucket_of("doc-42") == bucket_of("doc-42")
    used = {bucket_of(f"doc-{i}") for i in range(20_000)}
    assert len(used) > 0.95 * BUCKETS


def test_digests_ignore_order_but_see_every_difference() -> None:
    """Digests are order-independent and differ on a changed version, hash, extra or duplicate record."""
    records = [(f"d{i}", f"d{i}:chunk-0", 1, f"h{i}") for i in range(100)]
    a, b = Digests(), Digests()
    for r in records:
        a.add(*r)
    for r in reversed(records):
        b.add(*r)
    assert a.differing(b) == set()
    for change in ((1, 2, "h1"), (1, 1, "hX")):
        c = Digests()
        for r in records:
            c.add(r[0], r[1], *(change[1:] if r[0] == f"d{change[0]}" else r[2:]))
        assert c.differing(a) == {bucket_of("d1")}
    a.add(*records[5])
    assert a.differing(b) == {bucket_of("d5")}, "a duplicate record must not cancel out"
    assert record_digest("x", 1, "h") != record_digest("x", None, "h")


def test_classify_names_each_category() -> None:
    """One view with every kind of index problem yields exactly the expected findings."""
    chunks = tuple(ChunkState(chunk_id("d", i), i, f"h{i}", 3) for i in range(3))
    view = DocView("d", DocState("d", 3, False, chunks))
    view.keyword = {
        chunk_id("d", 0): Observed(chunk_id("d", 0), 3, "h0"),
        chunk_id("d", 1): Observed(chunk_id("d", 1), 2, "h1"),
        chunk_id("d", 2): Observed(chunk_id("d", 2), 3, "h2", text_ok=False),
        chunk_id("d", 5): Observed(chunk_id("d", 5), 3, "h5"),
    }
    view.vector = {c.chunk_id: Observed(c.chunk_id, 3, c.content_hash) for c in chunks[:2]}
    view.duplicates = {chunk_id("d", 0): 2}
    got = sorted((f.category.value, f.side, f.chunk_id) for f in classify(view, ChunkingSettings()))
    assert got == sorted(
        [
            ("stale", "keyword", "d:chunk-1"),
            ("stale", "keyword", "d:chunk-2"),
            ("orphan", "keyword", "d:chunk-5"),
            ("missing", "vector", "d:chunk-2"),
            ("duplicate", "vector", "d:chunk-0"),
            ("cross_index", "indexes", "d:chunk-1"),
            ("cross_index", "indexes", "d:chunk-2"),
            ("cross_index", "indexes", "d:chunk-5"),
        ]
    )
    names = {v.invariant for v in check_view_invariants(view, ChunkingSettings())}
    assert names == {"I1", "I2", "I4"}, "the auditor's categories are the named invariants"


def test_entries_lockstep_cannot_have_written_are_foreign_whatever_their_id() -> None:
    """An ID that is no chunk ID (or not as lockstep spells one), a doc_id or chunk_index that
    disagrees with the ID, a negative version, an empty text and the adapter's own complaint
    each make an entry foreign; a well-formed chunk does not."""

    def problems(cid: str, **changes: Any) -> str:
        base = StoredChunk(cid, "d", 1, content_hash("t"), 3, "t", {})
        return Observed.of(replace(base, **changes)).foreign

    assert problems("d:chunk-1") == ""
    assert "not a chunk ID" in problems("stray")
    assert "as lockstep spells them" in problems("d:chunk-01")
    assert "doc_id 'e'" in problems("d:chunk-1", doc_id="e")
    assert "chunk_index 2" in problems("d:chunk-1", chunk_index=2)
    assert "version -3" in problems("d:chunk-1", version=-3)
    assert "empty" in problems("d:chunk-1", text="")
    assert problems("d:chunk-1", text=None) == "", "a scan without texts has no text to judge"
    assert problems("d:chunk-1", foreign="no seq field") == "no seq field"


def test_classify_reports_foreign_entries_in_and_outside_the_reference() -> None:
    """A foreign entry is `foreign` (never stale, ghost or orphan), whether its ID is a reference
    chunk's, a chunk beyond the count, or no chunk ID; the plan rewrites the first at the store's
    version, deletes the others at theirs, and leaves an entry with no ID to the operator."""
    state = DocState("d", 3, False, (ChunkState("d:chunk-0", 0, content_hash("t"), 3),))
    view = DocView("d", state)
    view.keyword = {
        "d:chunk-0": Observed("d:chunk-0", 5, content_hash("t"), foreign="no doc_id field"),
        "d:chunk-4": Observed("d:chunk-4", 9, "h", foreign="metadata is list, not an object"),
        "": Observed("", NO_VERSION, "", foreign="no chunk_id field"),
    }
    view.vector = {"d:chunk-0": Observed("d:chunk-0", 3, content_hash("t"))}
    got = sorted((f.category.value, f.side, f.chunk_id) for f in classify(view, ChunkingSettings()))
    assert got == [
        ("cross_index", "indexes", ""),
        ("cross_index", "indexes", "d:chunk-0"),
        ("cross_index", "indexes", "d:chunk-4"),
        ("foreign", "keyword", ""),
        ("foreign", "keyword", "d:chunk-0"),
        ("foreign", "keyword", "d:chunk-4"),
    ]
    repair, unrepairable = plan_repair(view, {"d:chunk-0": _stored("d:chunk-0", "t")})
    assert repair is not None
    assert [(c.chunk_id, c.version) for c in repair.upserts] == [("d:chunk-0", 5)]
    assert [(d.chunk_id, d.version, d.overwrite_equal) for d in repair.deletes] == [("d:chunk-4", 9, True)]
    assert unrepairable == [("", NO_ID)]


def test_an_id_scanned_twice_in_one_index_is_foreign_at_its_highest_version() -> None:
    """Two entries under one ID in a store that does not key by ID (Tantivy, written by another
    hand) are one foreign finding at the higher version, which reconcile's delete then uses."""
    good = StoredChunk("z:chunk-0", "z", 0, content_hash("t"), 4, "t", {})
    auditor = Auditor(
        # Read-only stand-ins: a full audit reads only iter_docs/get_docs and scan.
        ledger=_Docs([]),  # type: ignore[arg-type]  # the read side of a Ledger
        keyword=_Scanned([good, replace(good, version=2)]),  # type: ignore[arg-type]  # scan only
        vector=_Scanned([]),  # type: ignore[arg-type]  # scan only
        source=None,
        chunking=ChunkingSettings(),
        reference_name="test",
    )
    result = auditor.full()
    assert [(f.category.value, f.chunk_id) for f in result.findings if f.side == "keyword"] == [
        ("foreign", "z:chunk-0")
    ]
    held = result.views["z"].keyword["z:chunk-0"]
    assert (held.version, held.foreign) == (4, SHARED_ID)
    repair, _ = plan_repair(result.views["z"], {})
    assert repair is not None and [(d.chunk_id, d.version) for d in repair.deletes] == [("z:chunk-0", 4)]


class _Docs:
    """A ledger that knows only the given documents (read side only)."""

    def __init__(self, docs: list[DocState]) -> None:
        self.docs = docs

    def iter_docs(self, *, include_deleted: bool = False) -> Iterator[DocState]:
        return iter([d for d in self.docs if include_deleted or not d.deleted])

    def get_docs(self, doc_ids: Iterable[str]) -> dict[str, DocState]:
        return {d.doc_id: d for d in self.docs if d.doc_id in set(doc_ids)}


class _Scanned:
    """An index that scans the given entries, in order."""

    def __init__(self, chunks: list[StoredChunk]) -> None:
        self.chunks = chunks

    def scan(self, *, with_text: bool = False) -> Iterator[StoredChunk]:
        return iter(self.chunks)


def test_invariant_i3_passes_over_ids_that_are_no_chunk_ids() -> None:
    """The chaos suite's I1-I4 report another writer's entry under an ID that is no chunk ID as
    extra (I1) instead of failing to parse it."""
    stray = StoredChunk("stray-note", "d1", 0, "h", 1)
    found = invariants.check_index("keyword", {}, {"d1"}, [stray])
    assert [(v.invariant, v.chunk_id) for v in found] == [("I1", "stray-note")]


def test_a_same_version_repair_keeps_the_ledger_version() -> None:
    """Repairing a text corrupted at the ledger's version writes at that version (overwrite-equal)
    and keeps the document's committed version; only an index ahead of the ledger raises it."""
    state = DocState("d", 4, False, (ChunkState("d:chunk-0", 0, content_hash("t"), 4),))
    copy = {"d:chunk-0": _stored("d:chunk-0", "t")}
    view = DocView(
        "d", state, keyword={"d:chunk-0": Observed("d:chunk-0", 4, content_hash("t"), text_ok=False)}
    )
    view.vector = {"d:chunk-0": Observed("d:chunk-0", 4, content_hash("t"))}
    repair, missing = plan_repair(view, copy)
    assert repair is not None and not missing
    assert repair.after.version == 4 and repair.version == 5 and not repair.bumped
    assert repair.upserts[0].version == 4 and repair.upserts[0].overwrite_equal
    assert repair.sides == {"keyword"}
    ahead = replace(view, keyword={"d:chunk-0": Observed("d:chunk-0", 6, content_hash("t"))})
    bumped, _ = plan_repair(ahead, copy)
    assert bumped is not None and bumped.bumped and bumped.after.version == 6
    assert bumped.sides == {"vector"}, "keyword already holds v6; the vector side follows the raised version"


def _stored(cid: str, text: str) -> StoredChunk:
    return StoredChunk(cid, "d", 0, content_hash(text), 0, text, {})


def test_reservoir_sampling_is_uniform_and_seeded() -> None:
    """The sample has the asked size, is reproducible by seed, and covers the stream evenly."""
    items = [str(i) for i in range(1000)]
    assert reservoir(items, 10, random.Random(3)) == reservoir(items, 10, random.Random(3))
    hits = sum(int(x) < 500 for seed in range(200) for x in reservoir(items, 10, random.Random(seed)))
    assert 800 < hits < 1200


def test_rate_limiter_spaces_operations() -> None:
    """At 100 ops/s, 300 operations take 3 s of (injected) time."""
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    limiter = RateLimiter(100.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(3):
        limiter.acquire(100)
    assert now[0] == pytest.approx(2.0)
    limiter.acquire(1)
    assert now[0] == pytest.approx(3.0)


def test_a_folder_source_lists_its_files_for_the_audit(tmp_path: Path) -> None:
    """A file edited without a sync is ledger drift (stale in both indexes); reconcile re-drives it."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# A\n\nFirst text.")
    (docs / "b.txt").write_text("Second text.")
    source = {"kind": "folder", "path": str(docs)}
    settings = _settings(
        tmp_path, {"kind": "tantivy", "path": str(tmp_path / "t")}, str(tmp_path / "m.db"), source
    )
    _sync(settings)
    assert _audit(settings).clean
    (docs / "b.txt").write_text("Second text, edited.")
    report = _audit(settings)
    assert _counts(report) == {"keyword": {"stale": 1}, "vector": {"stale": 1}, "ledger_drift": 1}
    assert _reconcile(settings)["redrives"] == [{"doc_id": "b.txt", "op": "upsert", "version": 2}]
    assert _audit(settings).clean
    server_manager_instance.release_server(settings.vector.uri)


def test_metadata_is_compared_exactly_when_contents_are_read() -> None:
    """The full audit digests every index's metadata with its texts: metadata other than the
    ledger's is stale in the index that holds it; `--no-hash-text` reads no texts and compares no
    metadata in any index (a Milvus scan without texts reads none), so it sees neither."""
    text = "t"
    state = DocState("z", 4, False, (ChunkState("z:chunk-0", 0, content_hash(text), 4),),
                     metadata_hash=invariants.metadata_digest({"tenant": "a"}))  # fmt: skip
    good = StoredChunk("z:chunk-0", "z", 0, content_hash(text), 4, text, {"tenant": "a"})

    def audit(hash_text: bool) -> list[tuple[str, str]]:
        auditor = Auditor(
            ledger=_Docs([state]),  # type: ignore[arg-type]  # the read side of a Ledger
            keyword=_Scanned([replace(good, metadata={"tenant": "b"})]),  # type: ignore[arg-type]  # scan only
            vector=_Scanned([good]),  # type: ignore[arg-type]  # scan only
            source=None,
            chunking=ChunkingSettings(),
            reference_name="test",
            hash_text=hash_text,
        )
        return sorted((f.category.value, f.side) for f in auditor.full().findings)

    assert audit(True) == [("cross_index", "indexes"), ("stale", "keyword")]
    assert audit(False) == []
