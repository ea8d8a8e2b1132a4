"""What the stores really hold, read with their own clients (tantivy, HTTP, pymilvus), never
through lockstep's adapters: the proof that a check is not the code it checks.

Each reader returns ``{chunk_id: RawChunk}`` for the live chunks of generation 1's physical
index (the configured path, index name or collection).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx
import tantivy
from pymilvus import MilvusClient

from lockstep.settings import Settings

# Rows asked of one Milvus query (Milvus caps a query's limit at 16,384).
MILVUS_QUERY_ROWS_MAX = 16_384
# Hits asked of one OpenSearch search (index.max_result_window's default).
SEARCH_HITS_MAX = 10_000
# Documents asked of one Tantivy search.
TANTIVY_DOCS_MAX = 1_000_000
HTTP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class RawChunk:
    doc_id: str
    chunk_index: int
    text: str
    version: int
    metadata: Any


def read_keyword(settings: Settings) -> dict[str, RawChunk]:
    if settings.keyword.kind == "tantivy":
        assert settings.keyword.path is not None
        return _read_tantivy(settings.keyword.path)
    assert settings.keyword.url is not None
    return _read_search_engine(settings.keyword.url, settings.keyword.index)


def _read_tantivy(path: str) -> dict[str, RawChunk]:
    index = tantivy.Index.open(path)
    index.reload()
    searcher = index.searcher()
    hits = searcher.search(tantivy.Query.all_query(), limit=TANTIVY_DOCS_MAX).hits
    out: dict[str, RawChunk] = {}
    for _, address in hits:
        doc = searcher.doc(address).to_dict()
        if doc["deleted"][0]:
            continue
        cid = doc["chunk_id"][0]
        assert cid not in out, f"tantivy holds two live documents for {cid!r}"
        out[cid] = RawChunk(
            doc["doc_id"][0], doc["chunk_index"][0], doc["text"][0], doc["version"][0],
            json.loads(bytes(doc["metadata"][0])),
        )  # fmt: skip
    return out


def _read_search_engine(url: str, index: str) -> dict[str, RawChunk]:
    with httpx.Client(base_url=url, timeout=HTTP_TIMEOUT_S) as client:
        client.post(f"/{index}/_refresh").raise_for_status()
        response = client.post(
            f"/{index}/_search", json={"query": {"match_all": {}}, "size": SEARCH_HITS_MAX, "version": True}
        )
        response.raise_for_status()
    hits = response.json()["hits"]["hits"]
    assert len(hits) < SEARCH_HITS_MAX, "more chunks than one page holds"
    return {
        h["_id"]: RawChunk(
            h["_source"]["doc_id"], h["_source"]["chunk_index"], h["_source"]["text"], h["_version"],
            h["_source"].get("metadata"),
        )
        for h in hits
    }


def read_vector(settings: Settings) -> dict[str, RawChunk]:
    client = MilvusClient(uri=settings.vector.uri, timeout=HTTP_TIMEOUT_S)
    try:
        client.load_collection(settings.vector.collection)
        rows = client.query(
            settings.vector.collection,
            filter="",
            output_fields=["chunk_id", "doc_id", "chunk_index", "text", "version", "metadata"],
            limit=MILVUS_QUERY_ROWS_MAX,
            consistency_level="Strong",
        )
    finally:
        client.close()
        if settings.vector.is_embedded:
            # The in-process milvus-lite server holds the file until released (ENVIRONMENT.md):
            # a lockstep process started next must be able to open it.
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(settings.vector.uri)
    assert len(rows) < MILVUS_QUERY_ROWS_MAX, "more chunks than one query holds"
    out: dict[str, RawChunk] = {}
    for r in rows:
        assert r["chunk_id"] not in out, f"milvus holds two entities for {r['chunk_id']!r}"
        out[r["chunk_id"]] = RawChunk(r["doc_id"], r["chunk_index"], r["text"], r["version"], r["metadata"])
    return out


def documents(chunks: dict[str, RawChunk]) -> dict[str, tuple[int, str, list[Any]]]:
    """Chunks grouped back into documents: (newest chunk version, text joined in chunk order,
    each chunk's metadata). Fails if a document's chunks are not numbered 0..n-1. (Chunks an
    edit left unchanged keep the version that wrote them.)"""
    by_doc: dict[str, list[RawChunk]] = {}
    for chunk in chunks.values():
        by_doc.setdefault(chunk.doc_id, []).append(chunk)
    out: dict[str, tuple[int, str, list[Any]]] = {}
    for doc_id, parts in by_doc.items():
        parts.sort(key=lambda c: c.chunk_index)
        assert [c.chunk_index for c in parts] == list(range(len(parts))), f"{doc_id!r} has gaps: orphans or losses"
        out[doc_id] = (max(c.version for c in parts), "".join(c.text for c in parts), [c.metadata for c in parts])
    return out


# --- raw queries: what each engine answers to a query, asked with its own client -----------------


def raw_keyword_search(settings: Settings, query: str, k: int) -> list[str]:
    """The chunk IDs of the engine's own BM25 query for ``query`` (a refresh first: the raw view)."""
    if settings.keyword.kind == "tantivy":
        assert settings.keyword.path is not None
        return _tantivy_search(settings.keyword.path, query, k)
    assert settings.keyword.url is not None
    body = {"query": {"match": {"text": query}}, "size": k, "_source": False}
    with httpx.Client(base_url=settings.keyword.url, timeout=HTTP_TIMEOUT_S) as client:
        client.post(f"/{settings.keyword.index}/_refresh").raise_for_status()
        response = client.post(f"/{settings.keyword.index}/_search", json=body)
        response.raise_for_status()
    return [str(h["_id"]) for h in response.json()["hits"]["hits"]]


def _tantivy_search(path: str, query: str, k: int) -> list[str]:
    """Tantivy's own query parser over the text field, with the analyzer the index was built with
    (lowercased alphanumeric tokens of at most 40 characters); tombstones have no text to match."""
    index = tantivy.Index.open(path)
    analyzer = (
        tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple())
        .filter(tantivy.Filter.remove_long(40))
        .filter(tantivy.Filter.lowercase())
        .build()
    )
    index.register_tokenizer("lockstep_text", analyzer)
    index.reload()
    searcher = index.searcher()
    hits = searcher.search(index.parse_query(query, ["text"]), limit=k).hits
    return [str(searcher.doc(address).to_dict()["chunk_id"][0]) for _, address in hits]


def raw_vector_search(settings: Settings, vector: list[float], k: int) -> list[str]:
    """The chunk IDs of Milvus's own nearest-neighbour search (COSINE, Strong consistency)."""
    client = MilvusClient(uri=settings.vector.uri, timeout=HTTP_TIMEOUT_S)
    try:
        result = client.search(
            settings.vector.collection,
            data=[vector],
            limit=k,
            anns_field="vector",
            search_params={"metric_type": "COSINE"},
            output_fields=["chunk_id"],
            consistency_level="Strong",
        )
    finally:
        client.close()
    return [str(h["entity"]["chunk_id"]) for h in result[0]]
