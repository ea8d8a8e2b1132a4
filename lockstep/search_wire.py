"""Search requests and results as JSON: one spelling for ``POST /search``, ``lockstep search
--json`` and the client that forwards a ``lockstep search`` to a running service.

Request::

    {"query": "refund policy", "k": 10, "mode": "hybrid", "filter": {"lang": "en"},
     "per_doc": false, "consistent_with": "lsc1....", "require_both": false}

Only ``query`` is required. Result: ``hits`` (chunks, best first: id, document, position,
version, fused score, rank per leg, text, metadata), ``docs`` (with ``per_doc``: each document's
best chunk and its siblings' ranks), ``fenced`` (hits not served, by reason) and
``fenced_total``, ``filtered``, ``legs`` (per leg: status, hits asked, served, error),
``degraded``, ``ledger_position`` (each source's checkpoint read before the fence) and
``waited_s`` (the consistency token's wait).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from coordinator.consistency import ConsistencyToken
from coordinator.errors import ConsistencyTimeout, InvalidSearch
from coordinator.search import DocHit, Hit, Mode, SearchRequest, SearchResult

_FIELDS = frozenset({"query", "k", "mode", "filter", "per_doc", "consistent_with", "require_both"})
# The most keys a metadata filter may name.
FILTER_KEYS_MAX = 32


def request_from_json(body: object) -> SearchRequest:
    """The request a decoded JSON body asks for; InvalidSearch naming the first thing wrong."""
    if not isinstance(body, Mapping):
        raise InvalidSearch("the body must be a JSON object with at least a `query`")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise InvalidSearch(f"unknown field(s) {unknown}; known: {sorted(_FIELDS)}")
    token = body.get("consistent_with")
    return SearchRequest(
        query=_typed(body, "query", str, None),
        k=_typed(body, "k", int, 10),
        mode=_mode(body.get("mode", Mode.HYBRID.value)),
        where=metadata_filter(body.get("filter") or {}),
        per_doc=_typed(body, "per_doc", bool, False),
        consistent_with=None if token is None else ConsistencyToken.decode(_typed(body, "consistent_with", str, "")),
        require_both=_typed(body, "require_both", bool, False),
    )


def _typed(body: Mapping[str, Any], name: str, kind: type, default: Any) -> Any:
    value = body.get(name, default)
    if value is None or not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidSearch(f"`{name}` must be a {kind.__name__}")
    return value


def _mode(value: object) -> Mode:
    try:
        return Mode(str(value))
    except ValueError:
        raise InvalidSearch(f"`mode` must be one of {[m.value for m in Mode]}") from None


def metadata_filter(value: object) -> dict[str, str | int | float | bool | None]:
    """A filter object: top-level keys to JSON scalars (strings, numbers, booleans, null)."""
    if not isinstance(value, Mapping) or len(value) > FILTER_KEYS_MAX:
        raise InvalidSearch(f"`filter` must be an object of at most {FILTER_KEYS_MAX} keys")
    for key, item in value.items():
        if not isinstance(key, str) or not (item is None or isinstance(item, str | int | float | bool)):
            raise InvalidSearch(f"`filter` values must be strings, numbers, booleans or null (key {key!r})")
    return dict(value)


def request_to_json(request: SearchRequest) -> dict[str, Any]:
    body: dict[str, Any] = {
        "query": request.query,
        "k": request.k,
        "mode": request.mode.value,
        "filter": dict(request.where),
        "per_doc": request.per_doc,
        "require_both": request.require_both,
    }
    if request.consistent_with is not None:
        body["consistent_with"] = request.consistent_with.encode()
    return body


def result_to_json(result: SearchResult, request: SearchRequest, generation: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "query": request.query,
        "mode": request.mode.value,
        "k": request.k,
        "hits": [hit_to_json(h) for h in result.hits],
        "fenced": dict(result.fenced),
        "fenced_total": sum(result.fenced.values()),
        "filtered": result.filtered,
        "legs": {name: asdict(report) for name, report in result.legs.items()},
        "degraded": result.degraded,
        "ledger_position": {"checkpoints": dict(result.checkpoints), "generation": generation},
        "waited_s": round(result.waited_s, 4),
    }
    if request.per_doc:
        body["docs"] = [_doc_to_json(d) for d in result.docs]
    if not result.fenced_check:
        body["unfenced"] = True
    return body


def hit_to_json(hit: Hit) -> dict[str, Any]:
    return {
        "chunk_id": hit.chunk_id,
        "doc_id": hit.doc_id,
        "chunk_index": hit.chunk_index,
        "version": hit.version,
        "score": hit.score,
        "ranks": dict(hit.ranks),
        "text": hit.text,
        "metadata": dict(hit.metadata),
    }


def _doc_to_json(doc: DocHit) -> dict[str, Any]:
    return {
        "doc_id": doc.doc_id,
        "score": doc.score,
        "best": hit_to_json(doc.best),
        "siblings": [
            {"chunk_id": h.chunk_id, "chunk_index": h.chunk_index, "score": h.score, "ranks": dict(h.ranks)}
            for h in doc.siblings
        ],
    }


def timeout_to_json(exc: ConsistencyTimeout) -> dict[str, Any]:
    return {
        "error": str(exc),
        "pending": [{"doc_id": d, "version": v, "why": why} for d, v, why in exc.pending],
    }
