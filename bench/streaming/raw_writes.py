"""The rows lockstep would write, written straight through the store clients (no lockstep between).

opensearch-py ``bulk`` with external versions and pymilvus ``MilvusClient.upsert``, in the
request sizes lockstep's shards send, on a fresh index and collection with lockstep's own mapping
and schema. ``ceiling.py`` and ``keyword_latency.py`` time these writes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from opensearchpy import OpenSearch
from pymilvus import MilvusClient

from adapters.embedders.hashing import HashingEmbedder
from adapters.keyword._search_engine import BULK_ITEMS_MAX
from adapters.keyword.settings import KeywordSettings
from adapters.vector.milvus import UPSERT_BATCH_ROWS_MAX
from adapters.vector.settings import VectorSettings
from bench.streaming.workload import CHUNKS_PER_DOC, DIM
from coordinator.chunking import ChunkingSettings, chunk_id, chunk_text, content_hash
from lockstep.bootstrap import build_keyword, build_vector
from lockstep.corpus import Doc

# Raw client requests; generous, the servers answer a batch in well under a second.
RAW_REQUEST_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class ChunkRow:
    """One chunk as both stores receive it, vector included."""

    chunk_id: str
    doc_id: str
    chunk_index: int
    text: str
    content_hash: str
    version: int
    metadata: dict[str, Any]
    vector: list[float]


@dataclass(frozen=True)
class StoreRate:
    """Rows written to one store by the raw client, and how long it took."""

    store: str
    rows: int
    requests: int
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds


def chunk_rows(docs: Sequence[Doc], chunking: ChunkingSettings) -> list[ChunkRow]:
    """The chunk rows of ``docs`` with their hashing-embedder vectors (computed here, untimed)."""
    parts = [(d, i, t) for d in docs for i, t in enumerate(chunk_text(d.text, chunking))]
    assert len(parts) == CHUNKS_PER_DOC * len(docs), "the corpus shape fixes the chunks per document"
    vectors = HashingEmbedder(dim=DIM).embed([t for _, _, t in parts])
    return [
        ChunkRow(chunk_id(d.doc_id, i), d.doc_id, i, t, content_hash(t), d.version, d.metadata, v)
        for (d, i, t), v in zip(parts, vectors, strict=True)
    ]


def bulk_body(index: str, rows: Sequence[ChunkRow]) -> list[str]:
    """One ``_bulk`` request: an external-versioned index action and the source per row."""
    lines: list[str] = []
    for r in rows:
        action = {
            "index": {"_index": index, "_id": r.chunk_id, "version": r.version, "version_type": "external"}
        }
        source = {"chunk_id": r.chunk_id, "doc_id": r.doc_id, "chunk_index": r.chunk_index, "text": r.text,
                  "content_hash": r.content_hash, "version": r.version, "metadata": r.metadata}  # fmt: skip
        lines += [json.dumps(action), json.dumps(source, ensure_ascii=False)]
    return lines


def milvus_rows(rows: Sequence[ChunkRow]) -> list[dict[str, Any]]:
    """The entities of one ``upsert`` request, as the Milvus adapter builds them."""
    return [
        {"chunk_id": r.chunk_id, "vector": r.vector, "doc_id": r.doc_id, "chunk_index": r.chunk_index,
         "text": r.text, "content_hash": r.content_hash, "version": r.version, "metadata": r.metadata}
        for r in rows
    ]  # fmt: skip


def split(rows: Sequence[ChunkRow], size: int) -> list[Sequence[ChunkRow]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


KEYWORD_RAW = "keyword (OpenSearch-API)"


def raw_keyword_client(url: str) -> OpenSearch:
    return OpenSearch(hosts=[url], timeout=RAW_REQUEST_TIMEOUT_S, max_retries=0)


def bulk_ok(client: OpenSearch, body: list[str]) -> int:
    """Send one pre-serialized ``_bulk``; every item must succeed. Returns the items written."""
    reply = client.bulk(body=body, request_timeout=RAW_REQUEST_TIMEOUT_S)
    assert not reply["errors"], f"raw bulk failed: {json.dumps(reply['items'][:2])}"
    return len(reply["items"])


def write_keyword_raw(url: str, index: str, requests: Sequence[list[str]]) -> StoreRate:
    """Send pre-serialized ``_bulk`` requests one after the other, as the keyword writer actor does."""
    client = raw_keyword_client(url)
    rows = 0
    started = time.perf_counter()
    for body in requests:
        rows += bulk_ok(client, body)
    seconds = time.perf_counter() - started
    client.close()
    return StoreRate(KEYWORD_RAW, rows, len(requests), seconds)


def write_vector_raw(uri: str, collection: str, requests: Sequence[list[dict[str, Any]]]) -> StoreRate:
    """Send ``upsert`` requests one after the other, as the vector writer actor does."""
    client = MilvusClient(uri=uri, timeout=RAW_REQUEST_TIMEOUT_S)
    rows = 0
    started = time.perf_counter()
    for batch in requests:
        reply = client.upsert(collection, batch, timeout=RAW_REQUEST_TIMEOUT_S)
        assert reply["upsert_count"] == len(batch), f"raw upsert acknowledged {reply} of {len(batch)}"
        rows += len(batch)
    seconds = time.perf_counter() - started
    client.close()
    return StoreRate("vector (Milvus 2.3.5)", rows, len(requests), seconds)


@contextmanager
def fresh_stores(url: str, uri: str, name: str) -> Iterator[tuple[str, str]]:
    """A new index and collection with lockstep's own mapping and schema; dropped afterwards."""
    keyword = build_keyword(KeywordSettings(kind="opensearch", url=url, index=f"raw-{name}"))
    vector = build_vector(VectorSettings(uri=uri, collection=f"raw_{name}"), dim=DIM)
    keyword.ensure()
    vector.ensure()
    try:
        yield keyword.name, vector.name
    finally:
        keyword.drop()
        vector.drop()
        keyword.close()
        vector.close()


def keyword_raw_requests(index: str, rows: Sequence[ChunkRow], rows_per_request: int) -> list[list[str]]:
    """The ``_bulk`` requests of ``rows`` in lockstep's request size (at most BULK_ITEMS_MAX)."""
    return [bulk_body(index, b) for b in split(rows, min(rows_per_request, BULK_ITEMS_MAX))]


def vector_raw_requests(rows: Sequence[ChunkRow], rows_per_request: int) -> list[list[dict[str, Any]]]:
    """The ``upsert`` requests of ``rows`` in lockstep's request size (at most UPSERT_BATCH_ROWS_MAX)."""
    return [milvus_rows(b) for b in split(rows, min(rows_per_request, UPSERT_BATCH_ROWS_MAX))]
