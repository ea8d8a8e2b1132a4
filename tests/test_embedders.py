"""The embedder adapters: hashing, cache wrapper, OpenAI-compatible HTTP client, local model.

The HTTP client is proven against a real HTTP server (tests/support/embed_server.py), never a
mocked transport; the local-model tests fail, not skip, when the ``local-model`` extra is missing.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog
from pydantic import SecretStr

from adapters.embedders import hashing
from adapters.embedders.cached import CachedEmbedder, MemoryEmbeddingCache, TieredEmbeddingCache
from adapters.embedders.hashing import HashingEmbedder
from adapters.embedders.openai_http import OpenAIEmbedder
from adapters.embedders.sentence_transformer import SentenceTransformerEmbedder
from adapters.ledger.sqlite import SqliteEmbeddingCache, SqliteLedger
from coordinator.chunking import content_hash
from coordinator.errors import ConfigError, EmbedServiceError, PermanentEmbedError, TransientEmbedError
from coordinator.ports import Embedder, HashedEmbedder
from tests.support.embed_server import MODEL, EmbedServer

# A subprocess that imports torch and loads the local model: seconds, minutes on a busy machine.
LOCAL_MODEL_LOAD_TIMEOUT_S = 300

REPO = Path(__file__).resolve().parents[1]
SEED = 20261126
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Kafka consumers commit offsets after processing a batch.",
    "",
    "Ünïcödé straße — naïve café!",
    "!!! ??? ...",
    "x" * 5000,
]


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    va, vb = np.asarray(a), np.asarray(b)
    return float(va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb)))


# HashingEmbedder.


def test_hashing_is_deterministic_across_processes() -> None:
    """Another interpreter with a different str-hash salt computes bit-identical vectors."""
    script = ("import json, sys; from adapters.embedders.hashing import HashingEmbedder; "
              "print(json.dumps(HashingEmbedder().embed(json.loads(sys.stdin.read()))))")
    out = subprocess.run([sys.executable, "-c", script], input=json.dumps(TEXTS), capture_output=True,
                         text=True, check=True, cwd=REPO, env={"PYTHONHASHSEED": "12345"}, timeout=60)
    assert json.loads(out.stdout) == HashingEmbedder().embed(TEXTS)


def test_hashing_dim_and_model_id() -> None:
    """Vectors have the configured length and the model id names dimension and seed."""
    assert HashingEmbedder().model_id == "hashing-v1-d384"
    small = HashingEmbedder(dim=64, seed=7)
    assert small.model_id == "hashing-v1-d64-s7"
    assert {len(v) for v in small.embed(TEXTS)} == {64}
    assert isinstance(small, Embedder)


def test_hashing_vectors_are_unit_length() -> None:
    """Every vector, including those of empty and punctuation-only texts, has L2 norm 1."""
    norms = np.linalg.norm(np.asarray(HashingEmbedder().embed(TEXTS)), axis=1)
    assert np.allclose(norms, 1.0, atol=1e-5)


def test_hashing_similar_texts_score_higher_than_unrelated() -> None:
    """Texts sharing words and word forms are closer than unrelated texts."""
    anchor, near, far = HashingEmbedder().embed([
        "The quick brown fox jumps over the lazy dog",
        "A quick brown fox jumped over lazy dogs",
        "Central banks raised interest rates to fight inflation",
    ])
    assert cosine(anchor, near) > 0.5
    assert abs(cosine(anchor, far)) < 0.2


def test_hashing_vector_does_not_depend_on_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A text's vector is the same alone, in a batch, and across internal sub-batch cuts."""
    embedder = HashingEmbedder()
    alone = [embedder.embed([text])[0] for text in TEXTS]
    assert embedder.embed(TEXTS) == alone
    monkeypatch.setattr(hashing, "SUB_BATCH_BYTES_MAX", 64)
    assert embedder.embed(TEXTS) == alone


def test_hashing_seed_changes_the_space() -> None:
    """Different seeds give different vectors for the same text."""
    a, b = HashingEmbedder(seed=1).embed(TEXTS[:1])[0], HashingEmbedder(seed=2).embed(TEXTS[:1])[0]
    assert abs(cosine(a, b)) < 0.5


# CachedEmbedder and MemoryEmbeddingCache.


class RecordingEmbedder:
    """A real HashingEmbedder that remembers every batch it was asked to embed."""

    def __init__(self) -> None:
        self._inner = HashingEmbedder()
        self.model_id, self.dim = self._inner.model_id, self._inner.dim
        self.batches: list[list[str]] = []

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        self.batches.append(list(texts))
        return self._inner.embed(texts)


def hashed(texts: Sequence[str]) -> list[tuple[str, str]]:
    return [(content_hash(t), t) for t in texts]


def test_cached_embeds_identical_texts_once_then_hits() -> None:
    """Duplicates are embedded once; a second call is served wholly from the cache; counts are exact."""
    inner = RecordingEmbedder()
    cached = CachedEmbedder(inner, MemoryEmbeddingCache(max_entries=100))
    items = hashed(["alpha", "beta", "alpha", "gamma", "beta"])
    first = cached.embed_hashed(items)
    assert inner.batches == [["alpha", "beta", "gamma"]]
    assert (cached.embed_calls, cached.cache_hits) == (3, 0)
    assert first == {h: HashingEmbedder().embed([t])[0] for h, t in items}
    second = cached.embed_hashed(items)
    assert second == first
    assert (cached.embed_calls, cached.cache_hits, len(inner.batches)) == (3, 3, 1)
    cached.embed_hashed(hashed(["alpha", "delta"]))
    assert inner.batches[-1] == ["delta"]
    assert (cached.embed_calls, cached.cache_hits) == (4, 4)


def test_cached_lookup_never_calls_the_model() -> None:
    """lookup answers from the cache only, counting distinct hits, and is a HashedEmbedder."""
    inner = RecordingEmbedder()
    cached = CachedEmbedder(inner, MemoryEmbeddingCache(max_entries=100))
    assert isinstance(cached, HashedEmbedder)
    assert cached.lookup([content_hash("alpha")]) == {}
    stored = cached.embed_hashed(hashed(["alpha"]))
    h = content_hash("alpha")
    assert cached.lookup([h, h, content_hash("beta")]) == stored
    assert (cached.embed_calls, cached.cache_hits, len(inner.batches)) == (1, 1, 1)


def test_an_array_embedder_is_cached_with_the_same_values_as_its_lists(tmp_path: Path) -> None:
    """The hashing embedder's float32 rows go to the caches without a list in between: the
    vectors answered, the ones stored in the ledger and the ones the front answers later are
    all exactly ``embed``'s; the front keeps its own copy of each row, not the whole matrix."""
    texts = ["the first chunk", "a second, other chunk", "und ein dritter"]
    ledger = SqliteLedger(tmp_path / "ledger.db")
    try:
        tiered = TieredEmbeddingCache(SqliteEmbeddingCache(ledger), front_entries_max=10)
        cached = CachedEmbedder(HashingEmbedder(dim=64), tiered)
        expected = dict(zip([h for h, _ in hashed(texts)], HashingEmbedder(dim=64).embed(texts), strict=True))
        answered = cached.embed_hashed(hashed(texts))
        assert answered == expected
        assert all(type(v) is list and type(v[0]) is float for v in answered.values())
        assert SqliteEmbeddingCache(ledger).get_many(cached.model_id, expected) == expected
        assert tiered.get_many(cached.model_id, expected) == expected
        assert all(row.base is None for row in tiered._front.values()), "copies, not views of the matrix"
    finally:
        ledger.close()


def test_cached_rejects_one_hash_with_two_texts() -> None:
    """A content hash given for two different texts is a caller bug and raises ValueError."""
    cached = CachedEmbedder(RecordingEmbedder(), MemoryEmbeddingCache(max_entries=10))
    with pytest.raises(ValueError, match="two different texts"):
        cached.embed_hashed([("h", "one"), ("h", "two")])


def test_memory_cache_evicts_least_recently_used() -> None:
    """The cache holds at most max_entries vectors and evicts the least recently used."""
    cache = MemoryEmbeddingCache(max_entries=2)
    cache.put_many("m", {"a": [1.0], "b": [2.0]})
    assert cache.get_many("m", ["a"]) == {"a": [1.0]}
    cache.put_many("m", {"c": [3.0]})
    assert cache.get_many("m", ["a", "b", "c"]) == {"a": [1.0], "c": [3.0]}
    assert cache.get_many("other-model", ["a"]) == {}
    assert len(cache) == 2


class CountingCache:
    """Counts the hashes asked of the durable cache it wraps."""

    def __init__(self, inner: SqliteEmbeddingCache) -> None:
        self.inner = inner
        self.asked: list[str] = []

    def get_many(self, model_id: str, hashes: Any) -> dict[str, list[float]]:
        wanted = list(hashes)
        self.asked += wanted
        return self.inner.get_many(model_id, wanted)

    def put_many(self, model_id: str, vectors: Any) -> None:
        self.inner.put_many(model_id, vectors)


def test_tiered_cache_answers_recent_vectors_from_memory_exactly_as_the_ledger_would(tmp_path: Path) -> None:
    """A vector just stored or read is answered again without the database, as the same float32
    values the SQLite table returns; the durable table holds everything; the front stays bounded."""
    ledger = SqliteLedger(tmp_path / "ledger.db")
    try:
        durable = CountingCache(SqliteEmbeddingCache(ledger))
        tiered = TieredEmbeddingCache(durable, front_entries_max=2)
        vectors = {"a": [0.1, 0.2, 0.3], "b": [1 / 3, 2 / 3, 1.0], "c": [0.7, 0.8, 0.9]}
        tiered.put_many("m", {"a": vectors["a"], "b": vectors["b"]})
        from_ledger = SqliteEmbeddingCache(ledger).get_many("m", ["a", "b"])
        assert from_ledger["b"] != vectors["b"], "float32 storage rounds these values"
        assert tiered.get_many("m", ["a", "b"]) == from_ledger
        assert durable.asked == [], "both were answered from memory"
        tiered.put_many("m", {"c": vectors["c"]})  # evicts "a", the least recently used
        assert len(tiered) == 2
        assert tiered.get_many("m", ["a", "c", "missing"]) == SqliteEmbeddingCache(ledger).get_many("m", ["a", "c"])
        assert durable.asked == ["a", "missing"]
        assert tiered.get_many("m", ["a"]) and durable.asked == ["a", "missing"], "a read fills the front"
        assert tiered.get_many("other-model", ["a"]) == {}
    finally:
        ledger.close()


def test_a_ledger_made_with_the_old_embeddings_table_keeps_its_vectors(tmp_path: Path) -> None:
    """Ledger files made before the embeddings table became a rowid table keep their WITHOUT
    ROWID table: the vectors stored there are answered, and new ones are stored beside them."""
    path = tmp_path / "ledger.db"
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE embeddings (model TEXT NOT NULL, content_hash TEXT NOT NULL, vector BLOB NOT NULL,"
        " PRIMARY KEY (model, content_hash)) WITHOUT ROWID"
    )
    old.execute("INSERT INTO embeddings VALUES ('m', 'a', ?)", (np.array([0.5, 0.25], dtype=np.float32).tobytes(),))
    old.commit()
    old.close()
    ledger = SqliteLedger(path)
    try:
        cache = SqliteEmbeddingCache(ledger)
        cache.put_many("m", {"b": [0.125, 1.0]})
        assert cache.get_many("m", ["a", "b", "c"]) == {"a": [0.5, 0.25], "b": [0.125, 1.0]}
        layout = ledger._read("SELECT sql FROM sqlite_master WHERE name = 'embeddings'")[0][0]
        assert "WITHOUT ROWID" in str(layout)
    finally:
        ledger.close()
    fresh = SqliteLedger(tmp_path / "fresh.db")
    try:
        layout = fresh._read("SELECT sql FROM sqlite_master WHERE name = 'embeddings'")[0][0]
        assert "WITHOUT ROWID" not in str(layout), "a new ledger makes the rowid table"
    finally:
        fresh.close()


# OpenAIEmbedder against a real HTTP server.


class Sleeps:
    """An injected sleep that records the delays instead of waiting."""

    def __init__(self) -> None:
        self.delays_s: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays_s.append(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def client_factory(sleeps: Sleeps) -> Iterator[Any]:
    """Builds OpenAIEmbedders with a seeded rng and recorded sleeps; closes them afterwards."""
    made: list[OpenAIEmbedder] = []

    def make(server: EmbedServer, **overrides: Any) -> OpenAIEmbedder:
        settings: dict[str, Any] = {"timeout_s": 5.0, "connect_timeout_s": 1.0, "max_attempts": 4,
                                    "rng": random.Random(SEED), "sleep": sleeps, **overrides}
        embedder = OpenAIEmbedder(server.url, MODEL, 384, **settings)
        made.append(embedder)
        return embedder

    yield make
    for embedder in made:
        embedder.close()


def test_openai_returns_the_servers_vectors_in_order(embed_server: EmbedServer, client_factory: Any) -> None:
    """Vectors come back one per text, in input order, equal to what the server's model computes."""
    vectors = client_factory(embed_server).embed(TEXTS)
    assert vectors == HashingEmbedder().embed(TEXTS)


def test_openai_batching_bounds_texts_and_bytes(embed_server: EmbedServer, client_factory: Any) -> None:
    """Requests carry at most batch_size texts and at most batch_bytes_max bytes each."""
    texts = [f"text number {i}" for i in range(70)]
    client_factory(embed_server, batch_size=32).embed(texts)
    assert [r.batch_size for r in embed_server.requests] == [32, 32, 6]
    embed_server.requests.clear()
    client_factory(embed_server, batch_size=32, batch_bytes_max=100).embed(["y" * 40] * 5 + ["z" * 500])
    assert [r.batch_size for r in embed_server.requests] == [2, 2, 1, 1]


def test_openai_retries_429_and_503_then_succeeds(embed_server: EmbedServer, client_factory: Any,
                                                  sleeps: Sleeps) -> None:
    """429 and 503 answers are retried with capped, jittered, growing backoff until success."""
    embed_server.fail_next(2, status=429)
    embed_server.fail_next(1, status=503)
    vectors = client_factory(embed_server, backoff_base_s=0.5, backoff_max_s=1.5).embed(["hello"])
    assert len(vectors) == 1
    assert [r.status for r in embed_server.requests] == [429, 429, 503, 200]
    caps_s = [0.5, 1.0, 1.5]
    assert len(sleeps.delays_s) == 3
    assert all(0.0 <= d <= cap for d, cap in zip(sleeps.delays_s, caps_s, strict=True)), sleeps.delays_s


def test_openai_honours_retry_after_capped(embed_server: EmbedServer, client_factory: Any,
                                           sleeps: Sleeps) -> None:
    """A numeric Retry-After sets the delay, but never beyond backoff_max_s."""
    embed_server.fail_next(1, status=429, retry_after_s=0.25)
    embed_server.fail_next(1, status=429, retry_after_s=3600)
    client_factory(embed_server, backoff_max_s=2.0).embed(["hello"])
    assert sleeps.delays_s == [0.25, 2.0]


def test_openai_gives_up_after_max_attempts(embed_server: EmbedServer, client_factory: Any,
                                            sleeps: Sleeps) -> None:
    """A batch failing on every attempt raises TransientEmbedError after exactly max_attempts tries."""
    embed_server.fail_next(10, status=503)
    with pytest.raises(TransientEmbedError, match="failed 3 times"):
        client_factory(embed_server, max_attempts=3).embed(["hello"])
    assert len(embed_server.requests) == 3
    assert len(sleeps.delays_s) == 2


def test_openai_poison_input_fails_transient_after_bounded_tries(embed_server: EmbedServer,
                                                                 client_factory: Any) -> None:
    """An input the server always 500s on ends in TransientEmbedError after max_attempts, not a loop."""
    embed_server.poison("bad chunk")
    embedder = client_factory(embed_server, max_attempts=2, batch_size=2)
    with pytest.raises(TransientEmbedError):
        embedder.embed(["fine", "bad chunk"])
    assert [r.status for r in embed_server.requests] == [500, 500]
    assert embedder.embed(["fine"]) == HashingEmbedder().embed(["fine"])


def test_openai_timeout_is_transient_within_bounded_time(embed_server: EmbedServer,
                                                         client_factory: Any) -> None:
    """An answer slower than timeout_s is abandoned and, after max_attempts, is TransientEmbedError."""
    embed_server.delay_next(2, seconds=10.0)
    started = time.monotonic()
    with pytest.raises(TransientEmbedError, match="timeout"):
        client_factory(embed_server, timeout_s=0.3, max_attempts=2).embed(["slow"])
    assert time.monotonic() - started < 2.0


def test_openai_retries_a_dropped_connection(embed_server: EmbedServer, client_factory: Any) -> None:
    """A connection closed without an answer is retried like any transient failure."""
    embed_server.disconnect_next(1)
    assert len(client_factory(embed_server).embed(["hello"])) == 1
    assert [r.status for r in embed_server.requests] == [0, 200]


def test_openai_unreachable_server_is_transient(client_factory: Any) -> None:
    """A refused connection is retried and then reported as TransientEmbedError."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    server = EmbedServer()
    server.url = f"http://127.0.0.1:{closed_port}"
    with pytest.raises(TransientEmbedError, match="connection error"):
        client_factory(server, max_attempts=2).embed(["hello"])


def test_openai_wrong_dimension_is_permanent(embed_server: EmbedServer, client_factory: Any) -> None:
    """A vector of the wrong length is PermanentEmbedError 'malformed vector', without retry."""
    embed_server.wrong_dimension_next(1)
    with pytest.raises(PermanentEmbedError, match="malformed vector"):
        client_factory(embed_server).embed(["a", "b"])
    assert len(embed_server.requests) == 1


def test_openai_non_finite_vector_is_permanent(embed_server: EmbedServer, client_factory: Any) -> None:
    """A NaN in a vector is PermanentEmbedError 'malformed vector'."""
    embed_server.non_finite_next(1)
    with pytest.raises(PermanentEmbedError, match="malformed vector"):
        client_factory(embed_server).embed(["a", "b"])


def test_openai_orders_by_index_not_position(embed_server: EmbedServer, client_factory: Any) -> None:
    """Items listed out of order are put back in input order by their ``index``."""
    embed_server.shuffle_order()
    texts = [f"distinct text {i} about topic {i * 7}" for i in range(20)]
    vectors = client_factory(embed_server).embed(texts)
    assert vectors == HashingEmbedder().embed(texts)


@pytest.mark.parametrize("status", [400, 413, 422])
def test_openai_client_errors_are_permanent_without_retry(embed_server: EmbedServer, client_factory: Any,
                                                          sleeps: Sleeps, status: int) -> None:
    """A 4xx that an input can cause (400, 413, 422) is PermanentEmbedError after a single request."""
    embed_server.fail_next(1, status=status)
    with pytest.raises(PermanentEmbedError, match=f"HTTP {status}"):
        client_factory(embed_server).embed(["hello"])
    assert len(embed_server.requests) == 1
    assert sleeps.delays_s == []


def test_openai_unknown_model_is_a_service_error_not_the_inputs(embed_server: EmbedServer) -> None:
    """The server's 404 for a model it does not serve is EmbedServiceError: no input is at fault,
    so nothing may be dead-lettered for it."""
    with OpenAIEmbedder(embed_server.url, "no-such-model", 384, timeout_s=5.0) as embedder, \
            pytest.raises(EmbedServiceError, match="HTTP 404"):
        embedder.embed(["hello"])
    assert not isinstance(EmbedServiceError("x"), PermanentEmbedError)


def test_openai_accepts_base_url_ending_in_v1(embed_server: EmbedServer) -> None:
    """A base URL given with its /v1 suffix (as OpenAI documents it) is not doubled."""
    with OpenAIEmbedder(f"{embed_server.url}/v1/", MODEL, 384, timeout_s=5.0) as embedder:
        assert len(embed_server.requests) == 0
        assert len(embedder.embed(["hello"])) == 1


def test_openai_api_key_is_sent_but_never_logged(embed_server_factory: Any, client_factory: Any,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """The bearer key reaches the server, yet appears in no log record, repr or error message."""
    key = "sk-test-7c1e0f2b9a4d4e8f"
    server = embed_server_factory(api_key=key).start()
    for name in ("", "httpx", "httpcore", "adapters"):
        caplog.set_level(logging.DEBUG, logger=name)
    with structlog.testing.capture_logs() as events:
        server.fail_next(1, status=503)
        embedder = client_factory(server, api_key=SecretStr(key))
        assert len(embedder.embed(["hello"])) == 1
        wrong = client_factory(server, api_key=SecretStr("sk-wrong-key-000"))
        with pytest.raises(EmbedServiceError, match="HTTP 401") as failure:
            wrong.embed(["hello"])
    assert server.requests[-2].authorization == f"Bearer {key}"
    assert any(e["event"] == "embed_retry" for e in events)
    assert any(r.name.startswith("httpcore") for r in caplog.records)
    seen = [caplog.text, repr(events), repr(embedder), repr(vars(embedder)), str(failure.value)]
    assert not [s for s in seen if key in s or "sk-wrong-key-000" in s]


def test_openai_over_http_serving_the_local_model_matches_it(
    embed_server_factory: Any, local_model: SentenceTransformerEmbedder
) -> None:
    """The OpenAI adapter talking to a server that runs the bundled MiniLM gets the model's vectors."""
    server = embed_server_factory(local_model).start()
    with OpenAIEmbedder(server.url, server.model, 384, timeout_s=60.0) as embedder:
        remote = embedder.embed(TEXTS[:4])
    for a, b in zip(remote, local_model.embed(TEXTS[:4]), strict=True):
        assert cosine(a, b) > 0.99


# SentenceTransformerEmbedder (the local-model extra; CI installs it, so these must not skip).


def _refuse_network(*args: Any, **kwargs: Any) -> None:
    raise OSError("network access attempted while loading the local model")


@pytest.fixture(scope="module")
def local_model() -> SentenceTransformerEmbedder:
    """The bundled all-MiniLM-L6-v2, loaded once (by its first embed) with every outgoing
    connection refused."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", _refuse_network)
        patch.setattr(socket, "create_connection", _refuse_network)
        model = SentenceTransformerEmbedder(batch_size=16)
        assert len(model.embed(["loads the weights"])) == 1
        return model


def test_local_model_loads_offline_as_384_d(local_model: SentenceTransformerEmbedder) -> None:
    """The model loads with the network refused and gives 384-d unit vectors, one per text."""
    vectors = local_model.embed(TEXTS)
    assert local_model.dim == 384
    assert local_model.model_id == "sentence-transformers/all-MiniLM-L6-v2"
    assert np.asarray(vectors).shape == (len(TEXTS), 384)
    assert np.allclose(np.linalg.norm(np.asarray(vectors), axis=1), 1.0, atol=1e-4)
    assert local_model.embed([]) == []


def test_local_model_similar_sentences_are_closer(local_model: SentenceTransformerEmbedder) -> None:
    """Paraphrases score higher than unrelated sentences, though they share almost no words."""
    cat, kitten, finance = local_model.embed([
        "A cat is sleeping on the sofa.",
        "The kitten naps on the couch.",
        "Quarterly revenue fell by ten percent.",
    ])
    assert cosine(cat, kitten) > 0.5
    assert cosine(cat, kitten) > cosine(cat, finance) + 0.3


def test_local_model_missing_directory_is_config_error(tmp_path: Path) -> None:
    """A model path without a sentence-transformers model is ConfigError at construction."""
    with pytest.raises(ConfigError, match=r"modules\.json"):
        SentenceTransformerEmbedder(model_path=str(tmp_path))


def test_building_the_local_model_loads_no_torch_until_something_is_embedded() -> None:
    """A one-shot command with nothing to embed never pays for torch and the weights: building
    the embedder reads the model directory only; the first embed loads it."""
    code = (
        "import sys\n"
        "from adapters.embedders.sentence_transformer import SentenceTransformerEmbedder\n"
        "model = SentenceTransformerEmbedder()\n"
        "assert model.dim == 384 and model.embed([]) == []\n"
        "assert 'torch' not in sys.modules, 'built'\n"
        "assert len(model.embed(['now it loads'])[0]) == 384\n"
        "assert 'torch' in sys.modules\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=LOCAL_MODEL_LOAD_TIMEOUT_S,
                          check=False, stdin=subprocess.DEVNULL)  # fmt: skip
    assert done.returncode == 0 and done.stdout.splitlines()[-1] == "ok", done.stderr[-2000:]
