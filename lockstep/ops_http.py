"""The service's HTTP port: /healthz, /readyz, /metrics, ``POST /events`` (the webhook source) and
``POST /search`` (its handler and statuses: ``lockstep/search_http.py``); and ``post_events``, the
client side of ``POST /events`` (benchmarks, tests, scripts).

``POST /events`` answers the first of these that applies, checked in this order:

| status | when |
|---|---|
| 404 | the service's source is not a webhook |
| 405 | any method but POST on /events (``Allow: POST``) |
| 503 | the webhook source is not open yet (``Retry-After``) |
| 401 | no ``Authorization: Bearer`` token, or the wrong one (compared in constant time) |
| 503 | the service is shutting down or stopped on a fatal error (``Retry-After``) |
| 415 | no Content-Type, one the webhook does not read, or a charset other than UTF-8 |
| 411 | no Content-Length (chunked bodies are not read) |
| 400 | a Content-Length that is not a number |
| 413 | a body above ``body_bytes_max`` |
| 503 | more than ``POSTS_CONCURRENT_MAX`` requests at once for ``POST_SLOT_WAIT_S`` (``Retry-After``) |
| 400 | an empty body, a JSON body that is not UTF-8 or not JSON, a body shorter than its Content-Length |
| 413 | more events than ``batch_events_max`` |
| 422 | valid JSON that is not an event or an array of events, an empty array |
| 503 | the inbox holds ``backlog_events_max`` uncommitted events, or cannot be written (``Retry-After``) |
| 422 | some items are not valid events (listed by index in ``rejected``) |
| 202 | every item is stored durably (new, or a duplicate of one stored before); the body's ``consistency_token`` covers them |

A 422 that lists items (``rejected``) still stored every other item of the request durably, and
the rejected ones are recorded for the dead-letter queue; resending the request is harmless.
Every other 4xx/5xx stored nothing. Refusals made before the body is read close the connection
after discarding at most ``DRAIN_BYTES_MAX`` of the body, so the client can read the answer.
"""

from __future__ import annotations

import hmac
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import islice
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from pydantic import SecretStr

from adapters.sources.webhook import MEDIA_TYPES, AppendResult, BodyError, InboxFull
from coordinator.consistency import ConsistencyToken
from coordinator.errors import LockstepError, StoreError
from lockstep.search_http import SEARCH_BODY_BYTES_MAX, SEARCH_PATH, SearchEndpoint

log = structlog.get_logger(__name__)

# /readyz answers {"ready": bool, "reasons": [...]}; 200 when ready, 503 otherwise.
ReadinessFn = Callable[[], tuple[bool, list[str]]]

EVENTS_PATH = "/events"
# ``POST /search`` takes one JSON object (lockstep/search_wire.py).
SEARCH_MEDIA_TYPES = frozenset({"application/json"})
# A socket read (request line, headers, body) slower than this ends the connection: a client
# trickling bytes must not hold a thread forever.
REQUEST_TIMEOUT_S = 30.0
# POST bodies read and stored at once; each may hold up to body_bytes_max in memory.
POSTS_CONCURRENT_MAX = 8
# How long a POST waits for one of those slots before it is answered 503.
POST_SLOT_WAIT_S = 5.0
# A refused request's body is read and discarded up to this size, so the client (still sending)
# can read the answer; beyond it the connection is simply closed.
DRAIN_BYTES_MAX = 4 * 1024 * 1024
DRAIN_CHUNK_BYTES = 64 * 1024
# What a 503 asks the client to wait before retrying, in seconds.
RETRY_AFTER_S = 5
# Rejected items listed in one answer; ``rejected_count`` has the total.
REJECTIONS_LISTED_MAX = 100
# post_events (the client side): events per request, the timeout of each request, and how often
# and how long at most it waits and retries a request answered 503 or not answered at all.
CLIENT_BATCH_EVENTS = 500
CLIENT_TIMEOUT_S = 60.0
CLIENT_RETRIES_MAX = 10
CLIENT_RETRY_WAIT_S_MAX = 10.0


class EventIntake(Protocol):
    """Stores one request body (``adapters/sources/webhook/intake.py``'s WebhookIntake)."""

    def accept(self, body: bytes, media_type: str) -> AppendResult: ...


@dataclass(frozen=True)
class EventsEndpoint:
    """What ``POST /events`` needs: where bodies go, the token, the body limit, and ``refusal``:
    why events are not taken right now (answered 503), or None."""

    intake: EventIntake
    token: SecretStr
    body_bytes_max: int
    refusal: Callable[[], str | None]


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any]
    headers: tuple[tuple[str, str], ...] = ()
    # Refused before the body was read: discard it and close the connection.
    early: bool = False


@dataclass
class _Routes:
    registry: CollectorRegistry
    readiness: ReadinessFn
    events_enabled: bool
    events: EventsEndpoint | None = None
    search_enabled: bool = False
    search: SearchEndpoint | None = None
    slots: threading.BoundedSemaphore = field(default_factory=lambda: threading.BoundedSemaphore(POSTS_CONCURRENT_MAX))

    def __post_init__(self) -> None:
        self.requests = Counter(
            "lockstep_webhook_requests", "POST /events requests by status.", ["status"], registry=self.registry
        )
        self.items = Counter(
            "lockstep_webhook_events", "Webhook items by outcome.", ["outcome"], registry=self.registry
        )


class OpsServer:
    """A small threaded HTTP server; ``port=0`` picks a free port (see ``.port``).

    With ``events=True`` it serves ``POST /events`` once ``attach_events`` gave it an endpoint
    (until then such requests are answered 503); with ``search=True``, ``POST /search`` once
    ``attach_search`` did (lockstep/search_http.py).
    """

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        readiness: ReadinessFn,
        *,
        events: bool = False,
        search: bool = False,
    ) -> None:
        self._routes = _Routes(registry, readiness, events, search_enabled=search)
        self._server = ThreadingHTTPServer((host, port), _handler(self._routes))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="ops-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> OpsServer:
        self._thread.start()
        return self

    def attach_events(self, endpoint: EventsEndpoint) -> None:
        self._routes.events = endpoint

    def attach_search(self, endpoint: SearchEndpoint) -> None:
        self._routes.search = endpoint

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _OpsHandler(BaseHTTPRequestHandler):
    """One request on the ops port; ``routes`` is set per server by ``_handler``."""

    routes: _Routes
    # Keep-alive, so a client posting many requests does not pay a connection per request.
    protocol_version = "HTTP/1.1"
    timeout = REQUEST_TIMEOUT_S

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/healthz":
            self._send(200, "application/json", b'{"alive": true}')
        elif path == "/readyz":
            ready, reasons = self.routes.readiness()
            body = json.dumps({"ready": ready, "reasons": reasons}).encode()
            self._send(200 if ready else 503, "application/json", body)
        elif path == "/metrics":
            self._send(200, CONTENT_TYPE_LATEST, generate_latest(self.routes.registry))
        elif path == EVENTS_PATH and self.routes.events_enabled:
            self._reply(_not_allowed())
        elif path == SEARCH_PATH and self.routes.search_enabled:
            self._reply(_not_allowed(SEARCH_PATH))
        else:
            self._reply(Reply(404, {"error": "not found"}))

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        if path == SEARCH_PATH and self.routes.search_enabled:
            self._reply(self._search())
            return
        if path != EVENTS_PATH or not self.routes.events_enabled:
            self._reply(Reply(404, {"error": "not found"}, early=True))
            return
        reply = self._events()
        self.routes.requests.labels(str(reply.status)).inc()
        self._reply(reply)

    def _search(self) -> Reply:
        endpoint = self.routes.search
        if endpoint is None:
            return _unavailable("starting: the search service is not open yet")
        refused = _unsupported(self.headers.get("Content-Type"), SEARCH_MEDIA_TYPES) or _bad_length(
            self.headers, SEARCH_BODY_BYTES_MAX
        )
        if refused is not None:
            return refused
        body = self._body()
        if isinstance(body, Reply):
            return body
        answer = endpoint.handle(body, self.headers.get("Authorization"))
        return Reply(answer.status, answer.body, answer.headers)

    def _other_method(self) -> None:
        path = urlsplit(self.path).path
        if path == EVENTS_PATH and self.routes.events_enabled:
            self._reply(_not_allowed())
        elif path == SEARCH_PATH and self.routes.search_enabled:
            self._reply(_not_allowed(SEARCH_PATH))
        else:
            self._reply(Reply(405, {"error": "method not allowed"}, (("Allow", "GET"),), early=True))

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _other_method

    def _events(self) -> Reply:
        endpoint = self.routes.events
        if endpoint is None:
            return _unavailable("starting: the webhook source is not open yet")
        refused = _before_body(self.headers, endpoint)
        if refused is not None:
            return refused
        if not self.routes.slots.acquire(timeout=POST_SLOT_WAIT_S):
            return _unavailable(f"more than {POSTS_CONCURRENT_MAX} requests at once")
        try:
            return self._read_and_store(endpoint)
        finally:
            self.routes.slots.release()

    def _read_and_store(self, endpoint: EventsEndpoint) -> Reply:
        body = self._body()
        if isinstance(body, Reply):
            return body
        return _store(endpoint.intake, body, _media_type(self.headers.get("Content-Type")), self.routes)

    def _body(self) -> bytes | Reply:
        """The whole body its checked Content-Length announced, or a 400 when the client stopped short."""
        length = int(self.headers["Content-Length"])
        body = self.rfile.read(length)
        if len(body) < length:
            self.close_connection = True
            return Reply(400, {"error": f"body ended after {len(body)} of {length} bytes"})
        return body

    def _reply(self, reply: Reply) -> None:
        if reply.status >= 400:
            log.info("http request refused", path=urlsplit(self.path).path, method=self.command,
                     status=reply.status, reason=reply.body.get("error"))
        headers = reply.headers
        if reply.early:
            self._discard_body()
            self.close_connection = True
            headers += (("Connection", "close"),)
        self._send(reply.status, "application/json", json.dumps(reply.body).encode(), headers)

    def _discard_body(self) -> None:
        """Read and drop a small unread body, so the client is not cut off mid-send."""
        length = self.headers.get("Content-Length", "")
        if not length.isdigit() or int(length) > DRAIN_BYTES_MAX:
            return
        remaining = int(length)
        while remaining > 0:
            piece = self.rfile.read(min(remaining, DRAIN_CHUNK_BYTES))
            if not piece:
                return
            remaining -= len(piece)

    def _send(
        self, status: int, content_type: str, body: bytes, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return None



def _handler(routes: _Routes) -> type[BaseHTTPRequestHandler]:
    """A handler class bound to one server's routes (http.server builds one instance per request)."""
    return type("Handler", (_OpsHandler,), {"routes": routes})


# --- POST /events, step by step -----------------------------------------------------------------


def _before_body(headers: Any, endpoint: EventsEndpoint) -> Reply | None:
    """The refusals decided from the headers alone, in the order the module docstring lists."""
    return (
        _unauthorized(headers.get("Authorization"), endpoint.token)
        or _refusing(endpoint)
        or _unsupported(headers.get("Content-Type"))
        or _bad_length(headers, endpoint.body_bytes_max)
    )


def _unauthorized(header: str | None, token: SecretStr) -> Reply | None:
    challenge = (("WWW-Authenticate", 'Bearer realm="lockstep"'),)
    if not header:
        return Reply(401, {"error": "missing bearer token"}, challenge, early=True)
    scheme, _, presented = header.partition(" ")
    expected = token.get_secret_value().encode("utf-8")
    if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode("utf-8"), expected):
        return Reply(401, {"error": "invalid bearer token"}, challenge, early=True)
    return None


def _refusing(endpoint: EventsEndpoint) -> Reply | None:
    reason = endpoint.refusal()
    return None if reason is None else _unavailable(reason)


def _unsupported(content_type: str | None, media_types: frozenset[str] = MEDIA_TYPES) -> Reply | None:
    if not content_type:
        return Reply(415, {"error": f"no Content-Type; use one of {sorted(media_types)}"}, early=True)
    media = _media_type(content_type)
    if media not in media_types:
        return Reply(415, {"error": f"unsupported media type {media!r}; use one of {sorted(media_types)}"}, early=True)
    charset = _charset(content_type)
    if charset is not None and charset not in ("utf-8", "utf8"):
        return Reply(415, {"error": f"unsupported charset {charset!r}; bodies are UTF-8"}, early=True)
    return None


def _bad_length(headers: Any, body_bytes_max: int) -> Reply | None:
    if headers.get("Transfer-Encoding"):
        return Reply(411, {"error": "send a Content-Length; chunked bodies are not read"}, early=True)
    length = headers.get("Content-Length")
    if length is None:
        return Reply(411, {"error": "Content-Length required"}, early=True)
    if not length.strip().isdigit():
        return Reply(400, {"error": f"invalid Content-Length {length[:40]!r}"}, early=True)
    if int(length) > body_bytes_max:
        return Reply(413, {"error": f"body of {int(length)} bytes; at most {body_bytes_max}"}, early=True)
    return None


def _store(intake: EventIntake, body: bytes, media_type: str, routes: _Routes) -> Reply:
    try:
        result = intake.accept(body, media_type)
    except BodyError as exc:
        return Reply(exc.status, {"error": exc.reason})
    except InboxFull as exc:
        return _unavailable(f"inbox full: {exc}", early=False)
    except StoreError as exc:
        log.warning("webhook inbox unavailable", error=str(exc), retriable=exc.retriable)
        return _unavailable("the inbox is unavailable", early=False)
    routes.items.labels("accepted").inc(result.accepted)
    routes.items.labels("duplicate").inc(result.duplicates)
    routes.items.labels("rejected").inc(len(result.rejected))
    return _outcome(result)


def _outcome(result: AppendResult) -> Reply:
    body: dict[str, Any] = {
        "accepted": result.accepted,
        "duplicates": result.duplicates,
        "rejected": [
            {"index": r.index, "reason": r.reason, "doc_id": r.doc_id} for r in result.rejected[:REJECTIONS_LISTED_MAX]
        ],
        "rejected_count": len(result.rejected),
    }
    if result.keys:
        # Read-your-writes: a search given this token waits until these events are committed
        # and visible in both indexes (docs/search.md).
        body["consistency_token"] = ConsistencyToken.of(result.keys).encode()
    if not result.rejected:
        return Reply(202, body)
    body["error"] = (
        f"{len(result.rejected)} item(s) rejected and recorded in the dead-letter queue; "
        "every other item was accepted"
    )
    return Reply(422, body)


def _unavailable(reason: str, *, early: bool = True) -> Reply:
    return Reply(503, {"error": reason}, (("Retry-After", str(RETRY_AFTER_S)),), early=early)


def _not_allowed(path: str = EVENTS_PATH) -> Reply:
    return Reply(405, {"error": f"use POST on {path}"}, (("Allow", "POST"),), early=True)


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _charset(content_type: str) -> str | None:
    for param in content_type.split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip('"').lower()
    return None


# --- the client side: posting events (benchmarks, tests, scripts) -------------------------------


class WebhookClientError(LockstepError):
    """A request to ``POST /events`` was refused for good (any 4xx but a 422 listing items)."""


@dataclass
class PostSummary:
    """What ``post_events`` did: requests sent and the servers' item counts, summed."""

    requests: int = 0
    accepted: int = 0
    duplicates: int = 0
    # Each rejected item with ``index`` counted over all the events posted.
    rejected: list[dict[str, Any]] = field(default_factory=list)


def post_events(
    url: str,
    token: str | SecretStr,
    events: Iterable[Mapping[str, Any]],
    *,
    batch_events: int = CLIENT_BATCH_EVENTS,
    client: httpx.Client | None = None,
    timeout_s: float = CLIENT_TIMEOUT_S,
) -> PostSummary:
    """POST ``events`` (dicts in the JSONL event schema) to ``url`` (``http://host:port/events``)
    as JSON lines, ``batch_events`` per request, one request at a time.

    A 503 or a connection failure is retried after ``Retry-After`` (at most
    ``CLIENT_RETRY_WAIT_S_MAX``) up to ``CLIENT_RETRIES_MAX`` times: safe, because the inbox is
    idempotent. A 422 listing items is summed up in ``rejected``; any other refusal raises
    WebhookClientError.
    """
    secret = token.get_secret_value() if isinstance(token, SecretStr) else token
    headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/x-ndjson"}
    summary = PostSummary()
    own = client is None
    http = httpx.Client(timeout=timeout_s) if client is None else client
    try:
        offset = 0
        for batch in _chunks(events, batch_events):
            body = "".join(json.dumps(event) + "\n" for event in batch).encode()
            _count(summary, _post_with_retries(http, url, body, headers), offset)
            offset += len(batch)
    finally:
        if own:
            http.close()
    return summary


def _chunks(events: Iterable[Mapping[str, Any]], size: int) -> Iterator[list[Mapping[str, Any]]]:
    iterator = iter(events)
    while batch := list(islice(iterator, size)):
        yield batch


def _post_with_retries(http: httpx.Client, url: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    attempt = 0
    while True:
        response: httpx.Response | None = None
        try:
            response = http.post(url, content=body, headers=headers)
        except httpx.TransportError:
            if attempt == CLIENT_RETRIES_MAX:
                raise
        if response is not None and (response.status_code != 503 or attempt == CLIENT_RETRIES_MAX):
            return response
        time.sleep(_retry_wait_s(response, attempt))
        attempt += 1


def _retry_wait_s(response: httpx.Response | None, attempt: int) -> float:
    """The server's Retry-After, or a doubling wait after a connection failure; capped."""
    retry_after = "" if response is None else response.headers.get("Retry-After", "")
    wait_s = float(retry_after) if retry_after.isdigit() else 0.1 * 2.0**attempt
    return min(CLIENT_RETRY_WAIT_S_MAX, wait_s)


def _count(summary: PostSummary, response: httpx.Response, offset: int) -> None:
    if response.status_code not in (202, 422) or "accepted" not in response.json():
        raise WebhookClientError(f"POST /events answered {response.status_code}: {response.text[:500]}")
    answer = response.json()
    summary.requests += 1
    summary.accepted += answer["accepted"]
    summary.duplicates += answer["duplicates"]
    summary.rejected += [{**item, "index": item["index"] + offset} for item in answer["rejected"]]
