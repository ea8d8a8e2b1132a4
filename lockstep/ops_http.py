"""The service's HTTP port: /healthz, /readyz and /metrics (and later the webhook)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

# /readyz answers {"ready": bool, "reasons": [...]}; 200 when ready, 503 otherwise.
ReadinessFn = Callable[[], tuple[bool, list[str]]]


class OpsServer:
    """A small threaded HTTP server; ``port=0`` picks a free port (see ``.port``)."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, readiness: ReadinessFn) -> None:
        handler = _handler(registry, readiness)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="ops-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> OpsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(registry: CollectorRegistry, readiness: ReadinessFn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/healthz":
                self._send(200, "application/json", b'{"alive": true}')
            elif self.path == "/readyz":
                ready, reasons = readiness()
                body = json.dumps({"ready": ready, "reasons": reasons}).encode()
                self._send(200 if ready else 503, "application/json", body)
            elif self.path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
            else:
                self._send(404, "application/json", b'{"error": "not found"}')

        def _send(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return None

    return Handler
