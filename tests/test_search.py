"""The read path on both engine pairs: the embedded default (Tantivy + a milvus-lite file) and
the servers (the OpenSearch-API server + Milvus 2.3.5), each with an SQLite ledger.

Agreement: ``keyword`` and ``vector`` modes return what each engine's own query returns (asked
with its own client). Fence: states a two-phase write really passes through (a version prepared
and written to one index only, a shrink, a delete an index has not applied) are never served.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from milvus_lite.server_manager import server_manager_instance
from pymilvus import MilvusClient

from adapters.embedders.hashing import HashingEmbedder
from coordinator.chunking import ChunkingSettings, chunk_text
from coordinator.events import ChangeEvent, Op
from coordinator.model import IndexedChunk
from coordinator.search import Mode
from lockstep import ConsistencyToken, Lockstep
from lockstep.corpus import Doc, make_corpus
from lockstep.runtime import runtime
from lockstep.settings import Settings, load_settings
from tests.support.milvus_servers import RealMilvus
from tests.support.raw_stores import raw_keyword_search, raw_vector_search

LOCKSTEP = [sys.executable, "-m", "lockstep"]
DOCS = 40
CHUNK_CHARS = 400
QUERIES = ["refund invoice", "password reset", "parcel tracking number", "webhook API token", "audit log"]
K = 10
CLI_TIMEOUT_S = 180


@dataclass
class Pair:
    name: str
    config: Path

    @property
    def settings(self) -> Settings:
        return load_settings(self.config)


def write_config(tmp_path: Path, keyword: dict[str, Any], vector: dict[str, Any]) -> Path:
    config = {
        "source": {"kind": "jsonl", "path": str(tmp_path / "events.jsonl")},
        "keyword": keyword,
        "vector": vector,
        "ledger": {"path": str(tmp_path / "ledger.db")},
        "embedder": {"kind": "hashing"},
        "chunking": {"max_chars": CHUNK_CHARS},
    }
    path = tmp_path / "lockstep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(params=["embedded", "servers"])
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Pair]:
    suffix = uuid.uuid4().hex[:10]
    if request.param == "embedded":
        lite = str(tmp_path / "milvus.db")
        yield Pair("embedded", write_config(tmp_path, {"path": str(tmp_path / "tantivy")}, {"uri": lite}))
        server_manager_instance.release_server(lite)
        return
    milvus: RealMilvus = request.getfixturevalue("real_milvus")
    keyword = {"kind": "opensearch", "url": request.getfixturevalue("opensearch_api_url"), "index": f"kw-{suffix}"}
    vector = {"uri": milvus.uri, "collection": f"c_{suffix}"}
    yield Pair("servers", write_config(tmp_path, keyword, vector))
    _drop_collection(milvus.uri, f"c_{suffix}")


def _drop_collection(uri: str, collection: str) -> None:
    client = MilvusClient(uri=uri, timeout=30)
    for alias in client.list_aliases(collection).get("aliases", []):
        client.drop_alias(alias)
    client.drop_collection(collection)
    client.close()


def upserts(docs: list[Doc]) -> list[ChangeEvent]:
    return [ChangeEvent(Op.UPSERT, d.doc_id, d.version, d.text, d.metadata) for d in docs]


def corpus() -> list[Doc]:
    docs = make_corpus(DOCS, seed=19, paragraphs=(1, 4), para_chars=300)
    return [replace(d, metadata={**d.metadata, "lang": "en" if i % 3 else "de"}) for i, d in enumerate(docs)]


@pytest.fixture
def indexed(pair: Pair) -> Iterator[tuple[Pair, Lockstep, ConsistencyToken]]:
    """The pair holding the corpus, written through the library; the write's token."""
    ls = Lockstep.open(pair.config)
    receipt = ls.write(upserts(corpus()))
    assert receipt.applied_events == DOCS and receipt.dead_letters == 0
    yield pair, ls, receipt.token
    ls.close()


def test_keyword_mode_returns_what_the_engine_returns(indexed: tuple[Pair, Lockstep, ConsistencyToken]) -> None:
    """For each query, --mode keyword lists the chunks of the engine's own BM25 query, in its order."""
    pair, ls, token = indexed
    for query in QUERIES:
        result = ls.search(query, k=K, mode=Mode.KEYWORD, consistent_with=token)
        assert [h.chunk_id for h in result.hits] == raw_keyword_search(pair.settings, query, K), query
        assert result.fenced == {} and result.legs["vector"].status == "off"


def test_vector_mode_returns_what_the_engine_returns(indexed: tuple[Pair, Lockstep, ConsistencyToken]) -> None:
    """For each query, --mode vector lists the chunks of Milvus's own search for the query's embedding."""
    pair, ls, token = indexed
    embedder = HashingEmbedder(dim=pair.settings.embedder.dim)
    for query in QUERIES:
        result = ls.search(query, k=K, mode=Mode.VECTOR, consistent_with=token)
        expected = raw_vector_search(pair.settings, embedder.embed([query])[0], K)
        assert [h.chunk_id for h in result.hits] == expected, query
        assert all(dict(h.ranks) == {"vector": rank} for rank, h in enumerate(result.hits, start=1))


def test_hybrid_filters_and_collapses_per_document(indexed: tuple[Pair, Lockstep, ConsistencyToken]) -> None:
    """A metadata filter keeps only matching documents on both legs; per-document results hold
    each document once, best chunk first, with its other chunks."""
    _, ls, token = indexed
    german = {d.doc_id for d in corpus() if d.metadata["lang"] == "de"}
    result = ls.search("refund password parcel", k=K, filter={"lang": "de"}, consistent_with=token)
    assert result.hits and {h.doc_id for h in result.hits} <= german
    assert all(h.metadata["lang"] == "de" for h in result.hits)
    docs = ls.search("refund password parcel", k=5, per_doc=True, consistent_with=token).docs
    assert len(docs) == 5 and len({d.doc_id for d in docs}) == 5
    assert all(s.doc_id == d.doc_id and s.score <= d.score for d in docs for s in d.siblings)
    assert [d.score for d in docs] == sorted((d.score for d in docs), reverse=True)


def test_uncommitted_shrunk_and_deleted_states_are_never_served(indexed: tuple[Pair, Lockstep, ConsistencyToken]) -> None:
    """A version prepared and written to one index only, a chunk a shrink cut off that an index
    brought back, and a deleted document one index still holds are all fenced, with their
    reasons; the committed state is what is served."""
    pair, ls, token = indexed
    docs = {d.doc_id: d for d in corpus()}
    long_doc = next(d for d in docs.values() if len(chunk_text(d.text, ChunkingSettings(CHUNK_CHARS))) >= 3)
    edited = next(d for d in docs.values() if d is not long_doc and len(d.paragraphs) >= 2)
    deleted = next(d for d in docs.values() if d not in (long_doc, edited))
    ls.close()  # its writer holds the Tantivy index's writer lock
    with runtime(pair.settings) as rt:
        engine = rt.engine
        cut_id = f"{long_doc.doc_id}:chunk-2"
        cut = rt.vector.get([cut_id])[cut_id]
        cut_vector = rt.vector.fetch_vectors([cut_id])[cut_id]
        engine.apply([ChangeEvent(Op.UPSERT, long_doc.doc_id, 2, long_doc.paragraphs[0] + "\n\nzebra shrink",
                                  long_doc.metadata)])
        # A row the shrink deleted comes back (milvus#33015 did this on 2.3.x).
        assert cut.text is not None
        rt.vector.upsert([IndexedChunk(cut_id, cut.doc_id, cut.chunk_index, cut.text, cut.content_hash,
                                       cut.version, dict(cut.metadata or {}), cut_vector)])
        # Prepared, and written to the vector index only: the keyword write never happened.
        [intent] = engine.prepare([ChangeEvent(Op.UPSERT, edited.doc_id, 2, edited.text + " zebra uncommitted",
                                               edited.metadata)])
        engine._write_side("vector", [intent])
        [gone] = engine.prepare([ChangeEvent(Op.DELETE, deleted.doc_id, 2)])
        engine._write_side("keyword", [gone])
        rt.ledger.mark_done("keyword", [(gone.doc_id, gone.version)])
        rt.ledger.mark_done("vector", [(gone.doc_id, gone.version)])
        rt.ledger.commit([(gone.doc_id, gone.version)], frozenset({"keyword", "vector"}))
    shrunk_query = " ".join(cut.text.split()[:12])
    seen = ls.search(shrunk_query + " zebra uncommitted " + deleted.paragraphs[-1][:80], k=50,
                     consistent_with=token)
    served = {(h.doc_id, h.chunk_index): h for h in seen.hits}
    assert all(i < 2 for d, i in served if d == long_doc.doc_id), "chunks cut off by the shrink are served"
    assert all(h.version == 1 and "uncommitted" not in h.text for h in seen.hits if h.doc_id == edited.doc_id)
    assert deleted.doc_id not in {h.doc_id for h in seen.hits}
    assert {"past_end", "uncommitted", "deleted"} <= set(seen.fenced), seen.fenced


def test_the_command_line_prints_a_table_or_the_json_answer_and_fails_in_one_line(tmp_path: Path) -> None:
    """lockstep sync prints a token, lockstep search honours it (table and --json), and a bad
    token or a held milvus-lite file nobody serves ends with one line and exit 2."""
    config = write_config(tmp_path, {"path": str(tmp_path / "tantivy")}, {"uri": str(tmp_path / "milvus.db")})
    lines = "".join(json.dumps({"op": "upsert", "doc_id": d.doc_id, "version": 1, "text": d.text,
                                "metadata": d.metadata}) + "\n" for d in corpus())
    (tmp_path / "events.jsonl").write_text(lines)
    summary = json.loads(_lockstep("sync", "-c", str(config)).stdout)
    assert summary["consistency_token_docs"] == DOCS and summary["consistency_token_complete"]
    token = summary["consistency_token"]
    answer = json.loads(_lockstep("search", "-c", str(config), "refund invoice", "-k", "3", "--json",
                                  "--consistent-with", token, "--filter", "lang=en").stdout)
    assert len(answer["hits"]) == 3 and answer["fenced_total"] == 0
    assert all(h["metadata"]["lang"] == "en" for h in answer["hits"])
    assert answer["ledger_position"] == {"checkpoints": {"jsonl": str(len(lines.encode()))}, "generation": 1}
    table = _lockstep("search", "-c", str(config), "password reset", "--per-doc").stdout
    assert "document" in table and "fenced out: none" in table
    bad = _lockstep("search", "-c", str(config), "x", "--consistent-with", "lsc1.AAAA", code=2)
    assert bad.stderr.count("\n") == 1 and "consistency token is damaged" in bad.stderr
    holder = _hold_lite_file(tmp_path / "milvus.db")
    try:
        held = _lockstep("search", "-c", str(config), "x", code=2)
    finally:
        holder.kill()
        holder.wait()
    assert held.stderr.count("\n") == 1 and f"held by process {holder.pid}" in held.stderr


def _lockstep(*args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*LOCKSTEP, *args], capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert result.returncode == code, result.stderr[-2000:]
    return result


def _hold_lite_file(path: Path) -> subprocess.Popen[str]:
    """Another process holding the milvus-lite file (as a running ``lockstep run`` would)."""
    script = f"from pymilvus import MilvusClient; c = MilvusClient({str(path)!r}); print('held', flush=True); input()"
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc
