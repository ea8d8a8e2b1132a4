"""The configured query set run against both generations: how much their results agree."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from coordinator.model import SearchHit
from coordinator.ports import GenerationReader, OpenedGeneration, QuerySearch


def compare_queries(
    queries: Sequence[str], k: int, reader: GenerationReader, old_vector: QuerySearch, target: OpenedGeneration
) -> dict[str, Any]:
    """Each query's top-k documents on generation N (``reader``'s keyword index, ``old_vector``)
    and on N+1 (``target``), and the share of them both found."""
    per_query = []
    for query in queries:
        kw = _overlap(_docs(reader.keyword.search(query, k)), _docs(target.keyword.search(query, k)))
        vec = _overlap(
            _docs(old_vector(query, k)),
            _docs(target.vector.search(target.embedder.embed([query])[0], k)),
        )
        per_query.append({"query": query, "keyword_overlap": kw, "vector_overlap": vec})
    return {"k": k, "queries": len(per_query), "keyword_overlap_mean": _mean(per_query, "keyword_overlap"),
            "vector_overlap_mean": _mean(per_query, "vector_overlap"), "per_query": per_query}


def _docs(hits: Sequence[SearchHit]) -> list[str]:
    out: list[str] = []
    for hit in hits:
        if hit.doc_id not in out:
            out.append(hit.doc_id)
    return out


def _mean(rows: Sequence[dict[str, Any]], key: str) -> float | None:
    return round(sum(float(r[key]) for r in rows) / len(rows), 3) if rows else None


def _overlap(a: list[str], b: list[str]) -> float:
    if not a and not b:
        return 1.0
    return round(len(set(a) & set(b)) / max(len(set(a)), len(set(b))), 3)
