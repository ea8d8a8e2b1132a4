"""An OpenAI-compatible embeddings client: ``POST {base_url}/v1/embeddings``.

The same wire format is served by OpenAI, Hugging Face TEI, vLLM, Ollama and infinity-emb.
Texts are sent in batches bounded by count and bytes. Each batch is retried on what may pass
(429, 408, 5xx, timeouts, connection errors) with capped exponential backoff and full jitter
drawn from an injected ``random.Random``, at most ``max_attempts`` times, then
TransientEmbedError; other 4xx answers and malformed responses are PermanentEmbedError at once.

The API key lives in a SecretStr and is put into the Authorization header of each request only;
it is never logged and never part of a repr or an error message.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import structlog
from pydantic import SecretStr

from adapters.embedders.settings import EmbedderSettings
from coordinator.errors import ConfigError, EmbedServiceError, PermanentEmbedError, TransientEmbedError
from coordinator.redact import REDACTED, redact

log = structlog.get_logger(__name__)

# Texts per request. OpenAI accepts up to 2048 inputs, TEI's default --max-client-batch-size is
# 32; 32 works everywhere and keeps one retry's wasted work small.
BATCH_TEXTS_MAX = 32
# Request body size (UTF-8 text bytes, JSON overhead aside). Proxies and TEI (--payload-limit,
# 2 MB by default) reject larger bodies; 1 MiB stays well below all the common limits.
BATCH_BYTES_MAX = 1024 * 1024
# Time allowed for one request's response (each read of it, in httpx terms). A CPU-served batch
# of 32 long chunks takes a few seconds; a minute means the server is stuck, not busy.
REQUEST_TIMEOUT_S = 60.0
# Time allowed to open a connection: on a reachable network this is milliseconds.
CONNECT_TIMEOUT_S = 5.0
# Tries per batch, first one included: with the backoff below the last try happens about
# 15 s after the first, enough to ride out a restart or a rate-limit window.
MAX_ATTEMPTS = 5
# Backoff before retry k (k = 1, 2, ...) is uniform in [0, min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**(k-1))].
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 8.0
# Concurrent connections this client may hold: batches are sent one after another, so a few
# are plenty; it stops a caller sharing the client across threads from opening hundreds.
CONNECTIONS_MAX = 4
# Characters of an error response body quoted in an exception message.
ERROR_BODY_CHARS_MAX = 300

_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# Statuses that no input causes: credentials, permissions, the URL or the model name are wrong.
_SERVICE_STATUSES = frozenset({401, 403, 404, 405, 407})


@dataclass(frozen=True)
class RetryPolicy:
    """How a failed batch is retried: bounded attempts, capped exponential backoff, full jitter."""

    max_attempts: int = MAX_ATTEMPTS
    backoff_base_s: float = BACKOFF_BASE_S
    backoff_max_s: float = BACKOFF_MAX_S

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")

    def delay_s(self, retry: int, rng: random.Random, retry_after_s: float | None) -> float:
        """Seconds to wait before retry number ``retry`` (1-based); a server's Retry-After wins,
        capped like any other delay."""
        if retry_after_s is not None:
            return min(self.backoff_max_s, retry_after_s)
        return rng.uniform(0.0, min(self.backoff_max_s, self.backoff_base_s * 2 ** (retry - 1)))


class _Retriable(Exception):
    """One attempt failed in a way another attempt may not."""

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


class OpenAIEmbedder:
    """Embeds through an OpenAI-compatible HTTP API; ``close()`` releases its connections."""

    def __init__(self, base_url: str, model: str, dim: int, *, api_key: SecretStr | None = None,
                 timeout_s: float = REQUEST_TIMEOUT_S, connect_timeout_s: float = CONNECT_TIMEOUT_S,
                 batch_size: int = BATCH_TEXTS_MAX, batch_bytes_max: int = BATCH_BYTES_MAX,
                 max_attempts: int = MAX_ATTEMPTS, backoff_base_s: float = BACKOFF_BASE_S,
                 backoff_max_s: float = BACKOFF_MAX_S, rng: random.Random | None = None,
                 sleep: Callable[[float], None] = time.sleep, send_dimensions: bool = False,
                 model_id: str | None = None) -> None:
        if dim < 1 or batch_size < 1 or batch_bytes_max < 1:
            raise ValueError("dim, batch_size and batch_bytes_max must be positive")
        self.url = _embeddings_url(base_url)
        self.model = model
        self.dim = dim
        self.model_id = model_id or (f"{model}:d{dim}" if send_dimensions else model)
        self.batch_size = batch_size
        self.batch_bytes_max = batch_bytes_max
        self.retry = RetryPolicy(max_attempts, backoff_base_s, backoff_max_s)
        self._api_key = api_key
        self._send_dimensions = send_dimensions
        self._rng = rng if rng is not None else random.Random()
        self._sleep = sleep
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=CONNECTIONS_MAX, max_keepalive_connections=CONNECTIONS_MAX),
        )

    @classmethod
    def from_settings(cls, settings: EmbedderSettings) -> OpenAIEmbedder:
        """The embedder ``settings`` configures; ConfigError when they name no base_url or model."""
        if not (settings.base_url and settings.model):
            raise ConfigError("the openai embedder needs base_url and model")
        return cls(
            settings.base_url,
            settings.model,
            settings.dim,
            api_key=settings.api_key,
            timeout_s=settings.timeout_s,
            batch_size=settings.batch_size,
        )

    def __repr__(self) -> str:
        return f"OpenAIEmbedder(url={self.url!r}, model={self.model!r}, dim={self.dim})"

    def __enter__(self) -> OpenAIEmbedder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One vector of length ``dim`` per text, in order."""
        vectors: list[list[float]] = []
        for batch in _batches(texts, self.batch_size, self.batch_bytes_max):
            vectors.extend(self._embed_batch(batch))
        return vectors

    def _embed_batch(self, batch: Sequence[str]) -> list[list[float]]:
        """One batch, retried per the policy."""
        for attempt in range(1, self.retry.max_attempts + 1):
            try:
                return self._attempt(batch)
            except _Retriable as failure:
                if attempt == self.retry.max_attempts:
                    raise TransientEmbedError(
                        f"embeddings request failed {attempt} times, last: {failure.reason}"
                    ) from failure
                self._back_off(attempt, failure, len(batch))
        raise AssertionError("unreachable: the loop returns or raises")

    def _back_off(self, attempt: int, failure: _Retriable, texts: int) -> None:
        delay_s = self.retry.delay_s(attempt, self._rng, failure.retry_after_s)
        log.warning("embed_retry", url=self.url, attempt=attempt, reason=failure.reason,
                    delay_s=round(delay_s, 3), texts=texts)
        self._sleep(delay_s)

    def _attempt(self, batch: Sequence[str]) -> list[list[float]]:
        try:
            response = self._client.post(self.url, json=self._body(batch), headers=self._headers())
        except httpx.TimeoutException as exc:
            raise _Retriable(f"timeout ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise _Retriable(f"connection error ({type(exc).__name__})") from exc
        _raise_for_status(response, self._api_key)
        return _parse(response, len(batch), self.dim)

    def _body(self, batch: Sequence[str]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "input": list(batch), "encoding_format": "float"}
        if self._send_dimensions:
            body["dimensions"] = self.dim
        return body

    def _headers(self) -> dict[str, str]:
        if self._api_key is None:
            return {}
        return {"Authorization": f"Bearer {self._api_key.get_secret_value()}"}


def _embeddings_url(base_url: str) -> str:
    """``{base_url}/v1/embeddings``, accepting a base URL that already ends in ``/v1``."""
    base = base_url.rstrip("/")
    return f"{base}/embeddings" if base.endswith("/v1") else f"{base}/v1/embeddings"


def _batches(texts: Sequence[str], count_max: int, bytes_max: int) -> Iterator[list[str]]:
    """Consecutive batches of at most ``count_max`` texts and ``bytes_max`` UTF-8 bytes; a text
    larger than ``bytes_max`` on its own goes alone (the server decides whether to accept it)."""
    batch: list[str] = []
    size = 0
    for text in texts:
        text_bytes = len(text.encode("utf-8"))
        if batch and (len(batch) == count_max or size + text_bytes > bytes_max):
            yield batch
            batch, size = [], 0
        batch.append(text)
        size += text_bytes
    if batch:
        yield batch


def _raise_for_status(response: httpx.Response, api_key: SecretStr | None) -> None:
    """Raise for an error status. The body is quoted, short and redacted: a proxy or a server may
    echo the request's Authorization header in it."""
    status = response.status_code
    if status < 300:
        return
    body = response.text[:ERROR_BODY_CHARS_MAX]
    if api_key is not None:
        body = body.replace(api_key.get_secret_value(), REDACTED)
    detail = redact(f"HTTP {status} {response.reason_phrase}: {body}")
    if status in _RETRY_STATUSES:
        raise _Retriable(detail, _retry_after_s(response))
    if status in _SERVICE_STATUSES:
        raise EmbedServiceError(f"the embeddings service refuses every request ({detail}): check base_url, model and api_key")
    raise PermanentEmbedError(f"embeddings request rejected, {detail}")


def _retry_after_s(response: httpx.Response) -> float | None:
    """The Retry-After header in seconds, when it is a number (the HTTP-date form is ignored)."""
    try:
        value = float(response.headers.get("retry-after", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _parse(response: httpx.Response, count: int, dim: int) -> list[list[float]]:
    """The vectors of a 200 response, in input order, each checked for length and finiteness."""
    try:
        data = response.json()["data"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise PermanentEmbedError("malformed embeddings response (no data list)") from exc
    if not isinstance(data, list) or len(data) != count:
        raise PermanentEmbedError(f"malformed embeddings response: {count} inputs, "
                                  f"{len(data) if isinstance(data, list) else 'no'} embeddings")
    ordered = _by_index(data, count)
    return [_vector(item, dim) for item in ordered]


def _by_index(data: list[Any], count: int) -> list[Any]:
    """Items sorted by their ``index``, which must be exactly 0..count-1."""
    try:
        indexed = sorted(data, key=lambda item: int(item["index"]))
        indexes = [int(item["index"]) for item in indexed]
    except (KeyError, TypeError, ValueError) as exc:
        raise PermanentEmbedError("malformed embeddings response (bad index)") from exc
    if indexes != list(range(count)):
        raise PermanentEmbedError("malformed embeddings response (indexes are not 0..n-1)")
    return indexed


def _vector(item: Any, dim: int) -> list[float]:
    try:
        array = np.asarray(item["embedding"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as exc:
        raise PermanentEmbedError("malformed vector (not a list of numbers)") from exc
    if array.shape != (dim,):
        raise PermanentEmbedError(f"malformed vector: shape {array.shape}, expected ({dim},)")
    if not np.isfinite(array).all():
        raise PermanentEmbedError("malformed vector: non-finite values")
    vector: list[float] = array.tolist()
    return vector
