"""Network faults between lockstep and a store: a TCP proxy for any protocol, an HTTP proxy for
ES/OpenSearch.

``TcpFaultProxy`` (threads, one pair of pumps per connection) forwards bytes and, when armed,
injects: latency plus jitter per forwarded block (``net_latency``), a reset before the request is
forwarded (``net_reset_before_send``), a reset instead of the answer once the request has been
forwarded and applied (``net_reset_after_send``), a black hole that swallows a connection's bytes
and answers nothing, so the client times out (``net_blackhole``), and a bandwidth cap
(``net_bandwidth``). It works for HTTP (OpenSearch) and gRPC (Milvus) alike.

``HttpFaultProxy`` understands just enough HTTP/1.1 (Content-Length bodies, keep-alive) to answer
whole requests with 429 or 503 (``http_429``, ``http_503``) and to fail some items of a
``_bulk`` request with a per-item 429 while forwarding the rest, merging the upstream's item
results back in order (``bulk_item_429``), as an overloaded cluster does. The upstream's answer
headers pass through (Elasticsearch clients refuse a 2xx answer without ``X-Elastic-Product``), and
requests keep the ``Host`` of the server they were meant for.

Every fault is armed with a count (``arm(kind, n)``) and reports each injection in ``injected``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# Bytes read per forwarded block.
BLOCK_BYTES = 64 * 1024
# How long a pump waits on a socket before checking whether the proxy is stopping.
POLL_S = 0.2
# Latency injected per block while armed: base plus uniform jitter.
LATENCY_BASE_S = 0.005
LATENCY_JITTER_S = 0.02
# How long a black hole lasts before the proxy resets the connection (a gRPC channel would
# otherwise wait on it forever; a real partition also heals or is noticed by keepalives).
BLACKHOLE_S = 3.0
# The bandwidth cap while armed.
BANDWIDTH_BYTES_PER_S = 256 * 1024
# How long the HTTP proxy waits for its upstream (above any client timeout used by the chaos tier).
HTTP_UPSTREAM_TIMEOUT_S = 60.0
# Connection-level headers belong to one hop; the proxy sets its own (and Content-Length).
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host", "content-length"}
)
JSON_HEADERS: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),)
TCP_KINDS = ("net_latency", "net_reset_before_send", "net_reset_after_send", "net_blackhole", "net_bandwidth")
HTTP_KINDS = ("http_429", "http_503", "bulk_item_429")


class _Armed:
    """Counted faults, thread-safe: ``take`` consumes one and reports it."""

    def __init__(self) -> None:
        self.armed: Counter[str] = Counter()
        self.injected: Counter[str] = Counter()
        self._lock = threading.Lock()

    def arm(self, kind: str, count: int) -> None:
        with self._lock:
            self.armed[kind] += count

    def take(self, kind: str) -> bool:
        with self._lock:
            if self.armed[kind] <= 0:
                return False
            self.armed[kind] -= 1
            self.injected[kind] += 1
            return True

    def clear(self) -> None:
        with self._lock:
            self.armed.clear()


def _abort(sock: socket.socket) -> None:
    """Close with RST, as a crashed peer or a broken network would."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


class TcpFaultProxy(_Armed):
    """Listens on 127.0.0.1:``port`` and forwards every connection to ``upstream``."""

    def __init__(self, upstream_host: str, upstream_port: int, *, seed: int = 0) -> None:
        super().__init__()
        self.upstream = (upstream_host, upstream_port)
        self.rng = random.Random(seed)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(POLL_S)
        self.port = int(self._listener.getsockname()[1])
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="chaos-tcp-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TcpFaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(POLL_S * 5)
        self._listener.close()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._connection, args=(client,), daemon=True).start()

    def _connection(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=POLL_S * 10)
        except OSError:
            _abort(client)
            return
        for sock in (client, upstream):
            sock.settimeout(POLL_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        state: dict[str, Any] = {"dead": False, "blackholed": 0.0}
        threading.Thread(target=self._pump, args=(upstream, client, state, False), daemon=True).start()
        self._pump(client, upstream, state, True)

    def _pump(self, src: socket.socket, dst: socket.socket, state: dict[str, Any], request: bool) -> None:
        """Copy src -> dst block by block, injecting the armed faults of this direction."""
        while not state["dead"] and not self._stopping.is_set():
            if state["blackholed"] and time.monotonic() - state["blackholed"] > BLACKHOLE_S:
                _abort(src)
                _abort(dst)
                break
            try:
                block = src.recv(BLOCK_BYTES)
            except TimeoutError:
                continue
            except OSError:
                block = b""
            if not block:
                break
            if not self._forward(block, src, dst, state, request):
                break
        state["dead"] = True
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.close()

    def _forward(
        self, block: bytes, src: socket.socket, dst: socket.socket, state: dict[str, Any], request: bool
    ) -> bool:
        if request and not state["blackholed"] and self.take("net_blackhole"):
            state["blackholed"] = time.monotonic()
        if state["blackholed"]:
            return True  # swallowed: the client waits until its own timeout
        client = src if request else dst
        reset = "net_reset_before_send" if request else "net_reset_after_send"
        if self.take(reset):
            state["dead"] = True
            _abort(client)
            _abort(dst if request else src)
            return False
        self._shape(len(block))
        try:
            dst.sendall(block)
        except OSError:
            return False
        return True

    def _shape(self, size: int) -> None:
        if self.take("net_latency"):
            time.sleep(LATENCY_BASE_S + self.rng.uniform(0, LATENCY_JITTER_S))
        if self.take("net_bandwidth"):
            time.sleep(size / BANDWIDTH_BYTES_PER_S)


@dataclass(frozen=True)
class HttpAnswer:
    """What the HTTP proxy sends back: the upstream's answer, or one it made up."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = JSON_HEADERS


class HttpFaultProxy(_Armed):
    """An HTTP/1.1 proxy in front of an ES/OpenSearch upstream, injecting 429/503 faults.

    ``host_header`` is the ``Host`` sent upstream (default: the upstream's own address); a proxy
    chained in front of another proxy passes the real server's name on.
    """

    def __init__(
        self, upstream_host: str, upstream_port: int, *, seed: int = 0, host_header: str | None = None
    ) -> None:
        super().__init__()
        self.upstream = (upstream_host, upstream_port)
        self.host_header = host_header
        self.rng = random.Random(seed)
        self._server = _QuietServer(("127.0.0.1", 0), _HttpHandler)
        self._server.proxy = self  # type: ignore[attr-defined]  # the handler finds its proxy here
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="chaos-http-proxy", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> HttpFaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def forward(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> HttpAnswer:
        conn = http.client.HTTPConnection(*self.upstream, timeout=HTTP_UPSTREAM_TIMEOUT_S)
        upstream_headers = {k: v for k, v in headers.items() if k.lower() != "accept-encoding"}
        if self.host_header is not None:
            upstream_headers["Host"] = self.host_header
        # The bulk merge reads the upstream's JSON, so it must not arrive compressed.
        upstream_headers["Accept-Encoding"] = "identity"
        try:
            conn.request(method, path, body=body or None, headers=upstream_headers)
            response = conn.getresponse()
            kept = tuple((k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP)
            return HttpAnswer(response.status, response.read(), kept)
        finally:
            conn.close()

    def handle(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> HttpAnswer:
        for kind, status in (("http_429", 429), ("http_503", 503)):
            if self.take(kind):
                return HttpAnswer(status, _error_body(status))
        if "_bulk" in path and body and self.take("bulk_item_429"):
            return self._partial_bulk(method, path, body, headers)
        return self.forward(method, path, body, headers)

    def _partial_bulk(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> HttpAnswer:
        """Fail some items with 429 without sending them; forward the rest and merge the answers."""
        ops = _bulk_ops(body)
        failed = set(self.rng.sample(range(len(ops)), max(1, len(ops) // 2)))
        kept = [op for i, op in enumerate(ops) if i not in failed]
        answered: list[Any] = []
        answer_headers = JSON_HEADERS
        if kept:
            upstream = self.forward(method, path, b"".join(line for op in kept for line in op), headers)
            if upstream.status != 200:
                return upstream
            answered = list(json.loads(upstream.body)["items"])
            answer_headers = upstream.headers
        items = [_rejected_item(ops[i]) if i in failed else answered.pop(0) for i in range(len(ops))]
        merged = json.dumps({"took": 1, "errors": True, "items": items}).encode()
        return HttpAnswer(200, merged, answer_headers)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (its timeout fired during a fault) is what the faults are for.
        return None


class _HttpHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def _any(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        try:
            answer = self.server.proxy.handle(self.command, self.path, body, headers)
        except OSError:
            answer = HttpAnswer(502, _error_body(502))
        self.send_response(answer.status)
        for name, value in answer.headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(answer.body)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _any

    def log_message(self, format: str, *args: Any) -> None:
        return None


def _bulk_ops(body: bytes) -> list[list[bytes]]:
    """Split an ndjson _bulk body into items: an action line, plus a source line unless a delete."""
    lines = [line + b"\n" for line in body.split(b"\n") if line.strip()]
    ops: list[list[bytes]] = []
    while lines:
        action = lines.pop(0)
        is_delete = b'"delete"' in action.split(b":", 1)[0]
        ops.append([action] if is_delete else [action, lines.pop(0)])
    return ops


def _rejected_item(op: list[bytes]) -> dict[str, Any]:
    action = json.loads(op[0])
    [(verb, meta)] = action.items()
    error = {"type": "es_rejected_execution_exception", "reason": "rejected execution (injected)"}
    return {verb: {"_index": meta.get("_index"), "_id": meta.get("_id"), "status": 429, "error": error}}


def _error_body(status: int) -> bytes:
    kind = "es_rejected_execution_exception" if status == 429 else "unavailable_shards_exception"
    return json.dumps({"error": {"type": kind, "reason": f"injected {status}"}, "status": status}).encode()
