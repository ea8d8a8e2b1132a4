"""``POST /search``: one handler for ``lockstep run`` and ``lockstep serve``.

| status | when |
|---|---|
| 200 | answered; ``degraded`` says when a hybrid search had one leg only |
| 400 | a body that is not UTF-8 JSON, a request ``lockstep.search_wire`` refuses, a bad token |
| 401 | ``search.token`` is set and the request lacks it (compared in constant time) |
| 411, 413, 415 | no Content-Length, a body over ``SEARCH_BODY_BYTES_MAX``, not ``application/json`` |
| 503 | starting; more than ``SEARCHES_CONCURRENT_MAX`` searches at once; the index a request needs cannot be searched (``Retry-After``) |
| 504 | the consistency token's changes were not committed and visible within ``search.consistency_wait_s``; ``pending`` lists them |

Every answer is JSON. Fenced hits, degraded answers, latencies and waits go to ``/metrics``.
"""

from __future__ import annotations

import hmac
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from pydantic import SecretStr

from coordinator.errors import ConsistencyTimeout, InvalidSearch, LockstepError, SearchUnavailable
from coordinator.search import SearchRequest, SearchResult
from lockstep.metrics import SearchMetrics
from lockstep.search_wire import request_from_json, result_to_json, timeout_to_json

log = structlog.get_logger(__name__)

SEARCH_PATH = "/search"
# A request is a query, a filter and at most one consistency token (coordinator.consistency's
# TOKEN_CHARS_MAX, 8 MiB): nothing bigger is a search.
SEARCH_BODY_BYTES_MAX = 9 * 1024 * 1024
# Searches answered at once; each holds two engine calls and a ledger read.
SEARCHES_CONCURRENT_MAX = 32
# How long a search waits for one of those slots before it is answered 503.
SEARCH_SLOT_WAIT_S = 2.0
# What a 503 asks the client to wait before retrying, in seconds.
RETRY_AFTER_S = 1

Searcher = Callable[[SearchRequest], tuple[SearchResult, int]]


@dataclass(frozen=True)
class SearchReply:
    status: int
    body: dict[str, object]
    headers: tuple[tuple[str, str], ...] = ()


@dataclass
class SearchEndpoint:
    """What ``POST /search`` runs: ``searcher`` answers a request (and names the generation it
    read); ``token``, when set, is required as a bearer token."""

    searcher: Searcher
    metrics: SearchMetrics
    token: SecretStr | None = None
    clock: Callable[[], float] = time.monotonic
    slots: threading.BoundedSemaphore = field(
        default_factory=lambda: threading.BoundedSemaphore(SEARCHES_CONCURRENT_MAX)
    )

    def handle(self, body: bytes, authorization: str | None) -> SearchReply:
        if self.token is not None and not _authorized(authorization, self.token):
            return SearchReply(401, {"error": "missing or invalid bearer token"},
                               (("WWW-Authenticate", 'Bearer realm="lockstep"'),))
        if not self.slots.acquire(timeout=SEARCH_SLOT_WAIT_S):
            return _unavailable(f"more than {SEARCHES_CONCURRENT_MAX} searches at once")
        try:
            return self._answer(body)
        finally:
            self.slots.release()

    def _answer(self, body: bytes) -> SearchReply:
        mode = "invalid"
        started = self.clock()
        try:
            request = request_from_json(_decoded(body))
            mode = request.mode.value
            result, generation = self.searcher(request)
        except InvalidSearch as exc:
            reply = SearchReply(400, {"error": str(exc)})
        except ConsistencyTimeout as exc:
            reply = SearchReply(504, timeout_to_json(exc))
        except SearchUnavailable as exc:
            reply = _unavailable(str(exc))
        except LockstepError as exc:
            log.warning("search failed", error=str(exc), error_type=type(exc).__name__)
            reply = _unavailable(f"{type(exc).__name__}: {exc}")
        else:
            self._count(result, mode)
            reply = SearchReply(200, result_to_json(result, request, generation))
        self.metrics.requests.labels(mode, str(reply.status)).inc()
        self.metrics.seconds.labels(mode).observe(self.clock() - started)
        return reply

    def _count(self, result: SearchResult, mode: str) -> None:
        for reason, n in result.fenced.items():
            self.metrics.fenced.labels(reason).inc(n)
        self.metrics.served.inc(len(result.hits))
        for leg, report in result.legs.items():
            if report.status == "failed":
                self.metrics.degraded.labels(leg).inc()
        if result.waited_s:
            self.metrics.waited.observe(result.waited_s)


def _decoded(body: bytes) -> object:
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidSearch(f"the body is not UTF-8 JSON: {exc}") from exc
    except RecursionError as exc:
        raise InvalidSearch("the body is not JSON: nested too deeply") from exc


def _authorized(header: str | None, token: SecretStr) -> bool:
    scheme, _, presented = (header or "").partition(" ")
    expected = token.get_secret_value().encode("utf-8")
    return scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode("utf-8"), expected)


def _unavailable(reason: str) -> SearchReply:
    return SearchReply(503, {"error": reason}, (("Retry-After", str(RETRY_AFTER_S)),))
