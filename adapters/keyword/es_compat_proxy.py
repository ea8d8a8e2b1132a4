"""A small HTTP proxy that lets elasticsearch-py 8/9 talk to an OpenSearch-API server.

The Elasticsearch clients send ``application/vnd.elasticsearch+json; compatible-with=N`` (and
``+x-ndjson`` for _bulk), which an OpenSearch-API server refuses with 406, and they refuse any
2xx answer that lacks ``X-Elastic-Product: Elasticsearch``. The proxy rewrites the former to
plain ``application/json`` / ``application/x-ndjson`` on requests and adds the latter on
responses. Bodies are streamed both ways (Content-Length or chunked), and both sides keep their
connections alive.

The chaos suite subclasses ``EsCompatProxy`` and overrides the two hooks, ``before_upstream``
(answer instead of the server: 429s, latency, resets before the write) and ``after_upstream``
(replace the server's answer after it applied the request: lost acknowledgements).
Headers are never logged: they carry credentials.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import re
import socket
import struct
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import urlsplit

import structlog

log = structlog.get_logger(__name__)

# How long the proxy waits for the upstream server's answer; above any client request timeout,
# so that the client's own timeout is the one that fires.
UPSTREAM_TIMEOUT_S = 120.0
# How long an idle client connection is kept open between two requests.
CLIENT_IDLE_TIMEOUT_S = 60.0
# Bytes copied per read when streaming a body.
STREAM_BLOCK_BYTES = 64 * 1024
# How long stop() waits for the serving thread to finish.
STOP_TIMEOUT_S = 5.0

# Connection-level headers are between one client and one server; a proxy must not forward them.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
_COMPAT_MIME = re.compile(
    r"application/vnd\.elasticsearch\+([a-z0-9.-]+)\s*(;\s*compatible-with\s*=\s*\d+)?", re.I
)
PRODUCT_HEADER = "X-Elastic-Product"
PRODUCT_VALUE = "Elasticsearch"


def plain_mime(value: str) -> str:
    """``application/vnd.elasticsearch+json; compatible-with=9`` → ``application/json``."""
    return _COMPAT_MIME.sub(r"application/\1", value)


@dataclass(frozen=True)
class ProxyRequest:
    """What a hook sees of a request: method, path with query, and the (translated) headers."""

    method: str
    path: str
    headers: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Reply:
    """An answer the proxy sends itself instead of (or in place of) the upstream one."""

    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = field(default=(("Content-Type", "application/json"),))


class DropConnection(Exception):
    """Raised by a hook to close the client connection without any answer (a reset)."""


class EsCompatProxy:
    """Header-translating proxy in front of ``upstream_url``; ``url`` is where clients connect."""

    def __init__(self, upstream_url: str, *, host: str = "127.0.0.1", port: int = 0) -> None:
        parts = urlsplit(upstream_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError("the proxy forwards to a plain http:// upstream")
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port or 80
        self._bind = (host, port)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- hooks for subclasses ----------------------------------------------------------------

    def before_upstream(self, request: ProxyRequest) -> Reply | None:
        """Called before forwarding; a Reply is sent instead; DropConnection resets the client."""
        return None

    def after_upstream(self, request: ProxyRequest, status: int) -> Reply | None:
        """Called once upstream answered ``status``; a Reply replaces that answer."""
        return None

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("proxy not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> Self:
        self._server = _Server(self._bind, _Handler, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="es-compat-proxy", daemon=True
        )
        self._thread.start()
        log.info("es compat proxy started", url=self.url, upstream_port=self.upstream_port)
        return self

    def stop(self) -> None:
        """Stop accepting, then cut every open client connection (they would idle on otherwise)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server.close_all_connections()
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_S)
        self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], handler: type[_Handler], proxy: EsCompatProxy) -> None:
        super().__init__(address, handler)
        self.proxy = proxy
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that went away mid-answer is normal for a proxy. No traceback: its frames hold
        # the request headers, credentials included.
        log.debug("es compat proxy connection failed", error=repr(sys.exc_info()[1]))

    def close_all_connections(self) -> None:
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            _abort(conn)


class _UpstreamConnection(http.client.HTTPConnection):
    def connect(self) -> None:
        super().connect()
        # Headers and body go out in separate writes; with Nagle's algorithm on, the body would
        # wait for the server's delayed ACK (40 ms per request).
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive towards the client
    timeout = CLIENT_IDLE_TIMEOUT_S
    disable_nagle_algorithm = True  # as for _UpstreamConnection, towards the client
    server: _Server

    def setup(self) -> None:
        super().setup()
        # One upstream connection per client connection, kept alive alongside it.
        self.upstream = _UpstreamConnection(
            self.server.proxy.upstream_host, self.server.proxy.upstream_port, timeout=UPSTREAM_TIMEOUT_S
        )

    def finish(self) -> None:
        self.upstream.close()
        # The client (or a DropConnection hook) may already have closed the socket.
        with contextlib.suppress(OSError):
            super().finish()

    def do_GET(self) -> None:
        self._proxy()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        # The stdlib writes to stderr; route it to structlog (method, path and status only).
        log.debug("es compat proxy", line=format % args)

    # --- one request -------------------------------------------------------------------------

    def _proxy(self) -> None:
        request = ProxyRequest(self.command, self.path, _translated(self.headers.items()))
        try:
            reply = self.server.proxy.before_upstream(request)
            if reply is not None:
                self._drain_body()
                self._send_reply(reply)
                return
            response = self._forward(request)
        except DropConnection:
            self._reset()
            return
        except OSError as exc:
            # The request body may be half read: this client connection cannot be reused.
            self.close_connection = True
            self.upstream.close()
            self._send_reply(Reply(502, f'{{"error":"upstream unreachable: {type(exc).__name__}"}}'.encode()))
            return
        self._relay(request, response)

    def _forward(self, request: ProxyRequest) -> http.client.HTTPResponse:
        headers = dict(request.headers)
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        length = self.headers.get("Content-Length")
        body: Iterator[bytes] | None = None
        if chunked:
            body = _read_chunked(self.rfile)
            headers["Transfer-Encoding"] = "chunked"
        elif length is not None:
            body = _read_exactly(self.rfile, int(length))
            headers["Content-Length"] = length
        self.upstream.request(
            request.method, request.path, body=body, headers=headers, encode_chunked=chunked
        )
        return self.upstream.getresponse()

    def _relay(self, request: ProxyRequest, response: http.client.HTTPResponse) -> None:
        try:
            replacement = self.server.proxy.after_upstream(request, response.status)
        except DropConnection:
            _discard(response)
            self._reset()
            return
        if replacement is not None:
            _discard(response)
            self._send_reply(replacement)
            return
        self._stream_response(response)

    def _stream_response(self, response: http.client.HTTPResponse) -> None:
        # send_response_only: the upstream's own Date and Server headers are relayed below.
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in HOP_BY_HOP and name.lower() != PRODUCT_HEADER.lower():
                self.send_header(name, value)
        self.send_header(PRODUCT_HEADER, PRODUCT_VALUE)
        length = response.getheader("Content-Length")
        has_body = self.command != "HEAD" and response.status not in (204, 304)
        if length is not None or not has_body:
            self.send_header("Content-Length", length or "0")
            self.end_headers()
            if has_body:
                self._copy(response, chunked=False)
        else:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self._copy(response, chunked=True)
        # Closing a fully read response frees the upstream connection for the next request.
        response.close()
        if response.will_close:
            self.upstream.close()

    def _copy(self, response: http.client.HTTPResponse, *, chunked: bool) -> None:
        while block := response.read1(STREAM_BLOCK_BYTES):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _send_reply(self, reply: Reply) -> None:
        self.send_response(reply.status)
        for name, value in reply.headers:
            self.send_header(name, value)
        self.send_header(PRODUCT_HEADER, PRODUCT_VALUE)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)
        self.wfile.flush()

    def _drain_body(self) -> None:
        length = self.headers.get("Content-Length")
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            for _ in _read_chunked(self.rfile):
                pass
        elif length is not None:
            for _ in _read_exactly(self.rfile, int(length)):
                pass

    def _reset(self) -> None:
        self.close_connection = True
        _abort(self.connection)


def _translated(headers: Any) -> tuple[tuple[str, str], ...]:
    """Request headers to forward: hop-by-hop ones dropped, compatible-with MIME types made plain."""
    kept = []
    for name, value in headers:
        if name.lower() in HOP_BY_HOP:
            continue
        if name.lower() in ("content-type", "accept"):
            value = plain_mime(value)
        kept.append((name, value))
    return tuple(kept)


def _read_exactly(stream: io.BufferedIOBase, length: int) -> Iterator[bytes]:
    remaining = length
    while remaining > 0:
        block = stream.read(min(remaining, STREAM_BLOCK_BYTES))
        if not block:
            raise ConnectionResetError("client closed the connection mid-body")
        remaining -= len(block)
        yield block


def _read_chunked(stream: io.BufferedIOBase) -> Iterator[bytes]:
    """Decode a chunked request body, yielding each chunk as it arrives."""
    while True:
        size_line = stream.readline()
        if not size_line:
            raise ConnectionResetError("client closed the connection mid-body")
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while stream.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers are dropped
            return
        yield from _read_exactly(stream, size)
        stream.readline()  # the CRLF after each chunk


def _discard(response: http.client.HTTPResponse) -> None:
    """Read and drop an answer nobody will see, so the upstream connection stays usable."""
    response.read()
    response.close()


def _abort(conn: socket.socket) -> None:
    """Close with RST rather than FIN, as a crashed peer or a broken network would."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
    except OSError:
        pass  # already closed: nothing left to reset
