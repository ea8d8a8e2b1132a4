"""A hostile HTTP server for secret-leak tests: it refuses every request with a fixed status and a
body that echoes the request back, Authorization header included, as some proxies and
misconfigured gateways do. Whatever a client puts in a request can thus reach its error text."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


class EchoServer:
    """Answers every request with ``status`` and a JSON body echoing method, path and headers."""

    def __init__(self, status: int = 401) -> None:
        self.status = status
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _echo(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode("utf-8", "replace") if length else ""
                echoed = {
                    "error": "refused",
                    "request": {"method": self.command, "path": self.path, "headers": dict(self.headers)},
                    "body": body[:2000],
                }
                data = json.dumps(echoed).encode()
                self.send_response(server.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _echo

            def log_message(self, *_args: object) -> None:
                return None

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def echo_server() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()
