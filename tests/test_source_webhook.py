"""The webhook source: the inbox on SQLite and Postgres, POST /events over real HTTP, and
`lockstep run` fed by POSTs carrying the chaos suite's delivery faults."""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry
from pydantic import SecretStr
from structlog.testing import capture_logs

from adapters.ledger.postgres import PostgresLedger
from adapters.ledger.sqlite import SqliteLedger
from adapters.sources.webhook import (
    InboxFull,
    Item,
    PostgresInbox,
    SqliteInbox,
    WebhookSource,
    inbox_beside,
    parse_body,
)
from chaos import check
from chaos.stream import DELIVERY_FAULTS, StreamFaults, ensure_deleted_docs
from chaos.workload import CHUNK_CHARS_MAX, SourceModel, random_history
from coordinator.consistency import ConsistencyToken
from coordinator.errors import ConfigError
from coordinator.events import ChangeEvent, Op, event_to_dict
from coordinator.ports import BadRecord
from lockstep import ops_http
from lockstep.ops_http import EventsEndpoint, OpsServer, WebhookClientError, post_events
from lockstep.runtime import runtime
from lockstep.settings import WebhookSourceSettings, load_settings
from tests.support.postgres_servers import PgSchema
from tests.support.service_process import (
    free_port,
    kill_service,
    ready,
    start_service,
    stop_service,
    wait_for,
)

TOKEN = "s3cret-token-" + "x" * 20
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"Content-Type": "application/json"}
NDJSON = {"Content-Type": "application/x-ndjson"}
# Small limits in the in-process server, so the 413s need small bodies.
BODY_BYTES_MAX = 64 * 1024
BATCH_EVENTS_MAX = 50
HTTP_TIMEOUT_S = 30.0


def upsert(doc_id: str, version: int, text: str | None = None) -> dict[str, Any]:
    return {"op": "upsert", "doc_id": doc_id, "version": version, "text": text or f"{doc_id} v{version}",
            "metadata": {"v": version}}


def items(*raw: dict[str, Any]) -> list[Item]:
    return parse_body(json.dumps(list(raw)).encode(), "application/json", items_max=1000)


# --- the inbox, on both backends ---------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def inbox(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqliteInbox | PostgresInbox]:
    """An empty inbox: an SQLite file, or a table in a private Postgres schema."""
    box: SqliteInbox | PostgresInbox
    if request.param == "sqlite":
        box = SqliteInbox(tmp_path / "inbox.db")
    else:
        schema: PgSchema = request.getfixturevalue("pg_schema")
        box = PostgresInbox(schema.dsn, schema=schema.name)
    yield box
    box.close()


def test_the_inbox_keeps_each_doc_version_once_and_records_bad_items_once(inbox: SqliteInbox | PostgresInbox) -> None:
    """A repeated (doc_id, version) is a duplicate, a different body under it a conflict, and a
    bad item sent twice is stored once; rows come back in seq order."""
    first = inbox.append(items(upsert("a", 1), upsert("b", 1), {"op": "upsert", "doc_id": "c"}),
                         committed_seq=0, backlog_max=100)
    assert (first.accepted, first.duplicates) == (2, 0)
    assert [(r.index, r.reason) for r in first.rejected] == [(2, "missing version")]
    again = inbox.append(items(upsert("a", 1), upsert("b", 1, "changed"), {"op": "upsert", "doc_id": "c"}),
                         committed_seq=0, backlog_max=100)
    assert (again.accepted, again.duplicates) == (0, 1)
    assert [r.index for r in again.rejected] == [1, 2] and "conflict" in again.rejected[0].reason
    rows = inbox.read_after(0, 100)
    assert [(r.doc_id, r.version, r.reason is None) for r in rows] == [
        ("a", 1, True), ("b", 1, True), ("c", None, False), ("b", None, False),
    ]
    assert [r.seq for r in rows] == sorted(r.seq for r in rows)
    assert inbox.read_after(rows[1].seq, 100) == rows[2:]


def test_the_inbox_refuses_beyond_its_backlog_and_never_reuses_a_seq(inbox: SqliteInbox | PostgresInbox) -> None:
    """With backlog_max events waiting above the committed seq the inbox is full; pruning the
    committed rows never lets a later row take an old seq."""
    inbox.append(items(*(upsert(f"d{i}", 1) for i in range(3))), committed_seq=0, backlog_max=3)
    with pytest.raises(InboxFull):
        inbox.append(items(upsert("d9", 1)), committed_seq=0, backlog_max=3)
    assert len(inbox.read_after(0, 100)) == 3
    assert inbox.prune(through_seq=2, received_before=float("inf")) == 2
    assert [r.doc_id for r in inbox.read_after(0, 100)] == ["d2"]
    inbox.append(items(upsert("d9", 1)), committed_seq=2, backlog_max=3)
    assert [r.seq for r in inbox.read_after(0, 100)] == [3, 4]


def test_concurrent_replicas_appending_to_postgres_never_make_a_reader_skip_a_row(pg_schema: PgSchema) -> None:
    """Two inboxes (two connections, as two replicas) append at once while a third reads by seq:
    every row committed is read exactly once, none is skipped by a seq committed out of order."""
    writers = [PostgresInbox(pg_schema.dsn, schema=pg_schema.name) for _ in range(2)]
    reader = PostgresInbox(pg_schema.dsn, schema=pg_schema.name)
    seen: list[tuple[int, str | None]] = []

    def write(box: PostgresInbox, name: str) -> None:
        for i in range(150):
            box.append(items(upsert(f"{name}-{i}", 1)), committed_seq=0, backlog_max=10_000)

    threads = [threading.Thread(target=write, args=(box, f"w{n}")) for n, box in enumerate(writers)]
    for thread in threads:
        thread.start()
    after = 0
    while True:
        writing = any(t.is_alive() for t in threads)
        for row in reader.read_after(after, 1000):
            seen.append((row.seq, row.doc_id))
            after = row.seq
        if not writing:
            break
    for box in [*writers, reader]:
        box.close()
    assert len(seen) == 300 and len({d for _, d in seen}) == 300, "a reader skipped or repeated rows"


# --- POST /events over real HTTP --------------------------------------------------------------


class Webhook:
    """An in-process OpsServer with POST /events in front of a real inbox and ledger."""

    def __init__(self, tmp_path: Path) -> None:
        self.ledger = SqliteLedger(tmp_path / "ledger.db")
        self.source = WebhookSource(SqliteInbox(tmp_path / "inbox.db"), self.ledger, name="hook")
        self.refusal: str | None = None
        self.ops = OpsServer("127.0.0.1", 0, CollectorRegistry(), lambda: (True, []), events=True).start()
        intake = self.source.intake(batch_events_max=BATCH_EVENTS_MAX)
        self.ops.attach_events(EventsEndpoint(intake, SecretStr(TOKEN), BODY_BYTES_MAX, lambda: self.refusal))
        self.url = f"http://127.0.0.1:{self.ops.port}/events"
        self.inbox_path = tmp_path / "inbox.db"

    def post(self, body: bytes | Any = None, headers: dict[str, str] | None = None, **kw: Any) -> httpx.Response:
        hdrs = {**AUTH, **JSON, **(headers or {})}
        if body is not None:
            kw["content"] = body
        return httpx.post(self.url, headers=hdrs, timeout=HTTP_TIMEOUT_S, **kw)

    def stored(self) -> list[tuple[str | None, int | None, str | None]]:
        """The inbox's rows as a fresh connection (another process, say) sees them."""
        with sqlite3.connect(self.inbox_path) as db:
            return list(db.execute("SELECT doc_id, version, reason FROM webhook_inbox ORDER BY seq"))

    def close(self) -> None:
        self.ops.stop()
        self.source.close()
        self.ledger.close()


@pytest.fixture
def webhook(tmp_path: Path) -> Iterator[Webhook]:
    hook = Webhook(tmp_path)
    yield hook
    hook.close()


def _chunked() -> Iterator[bytes]:
    yield json.dumps(upsert("a", 1)).encode()


BAD_REQUESTS: list[tuple[str, dict[str, Any], int, str]] = [
    ("no token", {"headers": {"Authorization": ""}}, 401, "missing bearer token"),
    ("wrong token", {"headers": {"Authorization": "Bearer " + "y" * 33}}, 401, "invalid bearer token"),
    ("basic auth", {"headers": {"Authorization": "Basic dXNlcjpwYXNz"}}, 401, "invalid bearer token"),
    ("no content type", {"headers": {"Content-Type": ""}}, 415, "no Content-Type"),
    ("text/plain", {"headers": {"Content-Type": "text/plain"}}, 415, "unsupported media type"),
    ("latin-1", {"headers": {"Content-Type": "application/json; charset=latin-1"}}, 415, "charset"),
    ("chunked", {"body": _chunked}, 411, "Content-Length"),
    ("too big", {"body": b" " * (BODY_BYTES_MAX + 1)}, 413, f"at most {BODY_BYTES_MAX}"),
    ("too many", {"body": json.dumps([upsert(f"m{i}", 1) for i in range(BATCH_EVENTS_MAX + 1)]).encode()},
     413, f"at most {BATCH_EVENTS_MAX}"),
    ("empty", {"body": b""}, 400, "empty body"),
    ("not utf-8", {"body": b'{"op": "upsert", "doc_id": "\xff"}'}, 400, "not valid UTF-8"),
    ("not json", {"body": b'{"op": "upsert",'}, 400, "not valid JSON"),
    ("json scalar", {"body": b"42"}, 422, "JSON int"),
    ("empty array", {"body": b"[]"}, 422, "no events"),
    ("one bad event", {"body": json.dumps({"op": "upsert", "doc_id": "a", "version": 1}).encode()},
     422, "rejected"),
]


@pytest.mark.parametrize(("case", "request_kw", "status", "error"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_each_kind_of_bad_request_gets_its_own_status_and_nothing_else_breaks(
    webhook: Webhook, case: str, request_kw: dict[str, Any], status: int, error: str
) -> None:
    """A malformed request is answered with its 4xx and a reason, stores no event, and the next
    valid request on the same server is accepted."""
    body = request_kw.get("body", json.dumps(upsert("a", 1)).encode())
    headers = {k: v for k, v in {**AUTH, **JSON, **request_kw.get("headers", {})}.items() if v}
    content = body() if callable(body) else body
    response = httpx.post(webhook.url, headers=headers, content=content, timeout=HTTP_TIMEOUT_S)
    assert response.status_code == status, response.text
    assert error in response.json()["error"]
    if status == 401:
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert all(reason is not None for _, _, reason in webhook.stored()), "a refused request stored an event"
    after = webhook.post(json.dumps(upsert("ok", 1)).encode())
    assert after.status_code == 202 and after.json()["accepted"] == 1


def test_other_methods_paths_and_a_stopping_service_are_refused(webhook: Webhook) -> None:
    """GET/PUT on /events answer 405 with Allow: POST, POST elsewhere 404, and while the service
    stops 503 with Retry-After; none of them stores anything."""
    for method in ("GET", "PUT", "DELETE"):
        response = httpx.request(method, webhook.url, headers=AUTH, timeout=HTTP_TIMEOUT_S)
        assert response.status_code == 405 and response.headers["Allow"] == "POST"
    assert httpx.post(webhook.url.replace("/events", "/other"), headers=AUTH, timeout=HTTP_TIMEOUT_S).status_code == 404
    webhook.refusal = "shutting down"
    refused = webhook.post(json.dumps(upsert("a", 1)).encode())
    assert refused.status_code == 503 and refused.headers["Retry-After"].isdigit()
    assert "shutting down" in refused.json()["error"]
    assert webhook.stored() == []


def test_bad_items_of_a_batch_are_listed_and_dead_lettered_while_the_others_are_stored(webhook: Webhook) -> None:
    """A JSON array and a JSONL body with bad items: 422 lists each bad item by index with its
    reason, the valid items are stored, and the source delivers the bad ones as BadRecords."""
    batch = [upsert("a", 1), {"op": "upsert", "doc_id": "b"}, upsert("c", 2), "just a string",
             {"op": "upsert", "doc_id": "x:chunk-1", "version": 1, "text": "t"}]
    response = webhook.post(json.dumps(batch).encode())
    assert response.status_code == 422
    body = response.json()
    assert (body["accepted"], body["duplicates"], body["rejected_count"]) == (2, 0, 3)
    assert [(r["index"], r["doc_id"]) for r in body["rejected"]] == [(1, "b"), (3, None), (4, "x:chunk-1")]
    assert "missing version" in body["rejected"][0]["reason"]
    lines = b'{"op":"delete","doc_id":"a","version":2}\n\n\xff\xfe\n{"op":\n'
    response = webhook.post(lines, NDJSON)
    assert response.status_code == 422
    assert [(r["index"], r["reason"].split(" ")[1]) for r in response.json()["rejected"]] == [(2, "UTF-8"), (3, "JSON:")]
    records = list(webhook.source.read())
    assert [(type(r).__name__, r.doc_id) for r in records] == [
        ("ChangeEvent", "a"), ("BadRecord", "b"), ("ChangeEvent", "c"), ("BadRecord", None),
        ("BadRecord", "x:chunk-1"), ("ChangeEvent", "a"), ("BadRecord", None), ("BadRecord", None),
    ]
    bad = [r for r in records if isinstance(r, BadRecord)]
    assert all(r.reason and r.position for r in bad)


def test_a_retried_request_is_acknowledged_without_a_second_row(webhook: Webhook) -> None:
    """The same batch sent twice: the second answer is 202 with every item a duplicate, and the
    inbox (read from another connection, so durably committed) holds each event once."""
    batch = json.dumps([upsert("a", 1), upsert("a", 2), {"op": "delete", "doc_id": "b", "version": 7}]).encode()
    first = webhook.post(batch)
    token = ConsistencyToken.of([("a", 2), ("b", 7)]).encode()
    assert first.status_code == 202 and first.json() == {"accepted": 3, "duplicates": 0, "rejected": [],
                                                          "rejected_count": 0, "consistency_token": token}
    assert webhook.stored() == [("a", 1, None), ("a", 2, None), ("b", 7, None)]
    second = webhook.post(batch)
    assert second.status_code == 202 and second.json()["duplicates"] == 3 and second.json()["accepted"] == 0
    assert second.json()["consistency_token"] == token, "a retry's token covers its duplicates too"
    assert len(webhook.stored()) == 3
    events = [r for r in webhook.source.read() if isinstance(r, ChangeEvent)]
    assert [(e.op, e.doc_id, e.version, e.position) for e in events] == [
        (Op.UPSERT, "a", 1, "1"), (Op.UPSERT, "a", 2, "2"), (Op.DELETE, "b", 7, "3"),
    ]
    webhook.source.commit("2")
    assert [e.position for e in webhook.source.read()] == ["3"]


def test_the_token_never_reaches_a_log_line_or_an_error(webhook: Webhook, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests with the right and a wrong token log nothing of either; a token from the
    environment is used, and a too-short one is refused without being echoed."""
    wrong = "Bearer wrong-" + "z" * 30
    with capture_logs() as logs:
        assert webhook.post(json.dumps(upsert("a", 1)).encode()).status_code == 202
        assert webhook.post(b"{}", {"Authorization": wrong}).status_code == 401
        assert webhook.post(b"[1]").status_code == 422
    assert logs, "the refusals were not logged"
    assert TOKEN not in repr(logs) and wrong not in repr(logs)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"source": {"kind": "webhook"}, "ledger": {"path": str(tmp_path / "l.db")}}))
    monkeypatch.setenv("LOCKSTEP_SOURCE__TOKEN", TOKEN)
    settings = load_settings(config)
    assert isinstance(settings.source, WebhookSourceSettings)
    assert settings.source.token.get_secret_value() == TOKEN and TOKEN not in repr(settings)
    monkeypatch.setenv("LOCKSTEP_SOURCE__TOKEN", "short-secret")
    with pytest.raises(ConfigError) as refused:
        load_settings(config)
    assert "at least 16 characters" in str(refused.value) and "short-secret" not in str(refused.value)


def test_post_events_batches_retries_a_503_and_reports_bad_items_by_global_index(
    webhook: Webhook, monkeypatch: pytest.MonkeyPatch
) -> None:
    """post_events sends JSON lines in batches, waits out a 503 and sends the batch again, sums
    the answers, numbers rejected items over everything posted, and raises on a wrong token."""
    monkeypatch.setattr(ops_http, "RETRY_AFTER_S", 0)
    # One 503, then accepting.
    endpoint_refusal = partial(next, iter(["busy for a moment"]), None)
    webhook.ops.attach_events(EventsEndpoint(webhook.source.intake(batch_events_max=BATCH_EVENTS_MAX),
                                             SecretStr(TOKEN), BODY_BYTES_MAX, endpoint_refusal))
    events: list[dict[str, Any]] = [upsert(f"p{i}", 1) for i in range(120)]
    events[75] = {"op": "upsert", "doc_id": "p75"}
    summary = post_events(webhook.url, SecretStr(TOKEN), events, batch_events=BATCH_EVENTS_MAX)
    assert (summary.requests, summary.accepted, summary.duplicates) == (3, 119, 0)
    assert [(r["index"], r["doc_id"]) for r in summary.rejected] == [(75, "p75")]
    assert len(webhook.stored()) == 120
    again = post_events(webhook.url, TOKEN, events[:10])
    assert (again.accepted, again.duplicates) == (0, 10)
    with pytest.raises(WebhookClientError, match="401"):
        post_events(webhook.url, "not-the-token-" + "q" * 20, events[:1])


# --- lockstep run fed over HTTP ---------------------------------------------------------------


def _config(tmp_path: Path, port: int, ledger: dict[str, Any], **source: Any) -> Path:
    suffix = uuid.uuid4().hex[:8]
    config = {
        "source": {"kind": "webhook", "name": "hook", "token": TOKEN, **source},
        "keyword": {"kind": "tantivy", "path": str(tmp_path / "tantivy")},
        "vector": {"uri": str(tmp_path / "milvus.db"), "collection": f"wh_{suffix}"},
        "ledger": ledger,
        "embedder": {"kind": "hashing"},
        "chunking": {"max_chars": CHUNK_CHARS_MAX},
        "run": {"shards": 2, "http_port": port, "batch_docs_max": 50, "audit_interval_s": 0},
    }
    path = tmp_path / "lockstep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def faulty_deliveries(seed: int, namespace: str) -> tuple[SourceModel, list[ChangeEvent]]:
    """A random history with source faults, delivered with every delivery fault of the chaos suite."""
    rng = random.Random(seed)
    model = SourceModel(namespace)
    random_history(model, rng, 90)
    faults = StreamFaults(rng)
    faults.pk_change(model)
    faults.truncate(model)
    ensure_deleted_docs(model, rng)
    deliveries = list(model.history)
    for fault in DELIVERY_FAULTS.values():
        deliveries = fault(faults, deliveries)
    missing = [k for k in (*DELIVERY_FAULTS, "pk_change", "truncate") if faults.injected[k] == 0]
    assert missing == [], f"seed {seed} injected no {missing}"
    return model, deliveries


class Poster:
    """POSTs deliveries in random-sized requests, as single objects, arrays or JSON lines."""

    def __init__(self, base: str, rng: random.Random) -> None:
        self.url = f"{base}/events"
        self.rng = rng
        self.client = httpx.Client(timeout=HTTP_TIMEOUT_S)
        self.sent: list[tuple[bytes, dict[str, str]]] = []

    def post_all(self, events: list[ChangeEvent]) -> None:
        at = 0
        while at < len(events):
            size = self.rng.randint(1, 25)
            self.post(events[at : at + size])
            at += size

    def post(self, events: list[ChangeEvent]) -> None:
        body, headers = self._encode([event_to_dict(e) for e in events])
        response = self.client.post(self.url, content=body, headers={**AUTH, **headers})
        assert response.status_code == 202, response.text
        assert response.json()["accepted"] + response.json()["duplicates"] == len(events)
        self.sent.append((body, headers))

    def _encode(self, raw: list[Any]) -> tuple[bytes, dict[str, str]]:
        style = self.rng.choice(["object", "array", "lines"]) if len(raw) == 1 else self.rng.choice(["array", "lines"])
        if style == "object":
            return json.dumps(raw[0]).encode(), JSON
        if style == "array":
            return json.dumps(raw).encode(), JSON
        return "".join(json.dumps(r) + "\n" for r in raw).encode(), NDJSON

    def post_with_bad_items(self, events: list[ChangeEvent]) -> list[str]:
        """One request mixing events with two bad items; returns the bad items' reasons."""
        raw: list[Any] = [event_to_dict(e) for e in events]
        raw.insert(1, {"op": "upsert", "doc_id": "bad-no-version"})
        raw.append({"op": "remove", "doc_id": "bad-op", "version": 1})
        response = self.client.post(self.url, json=raw, headers=AUTH)
        assert response.status_code == 422, response.text
        rejected = response.json()["rejected"]
        assert [r["index"] for r in rejected] == [1, len(raw) - 1]
        return [r["reason"] for r in rejected]


def _ledger_caught_up(ledger: SqliteLedger | PostgresLedger, model: SourceModel, dead: int) -> bool:
    docs = ledger.get_docs(model.latest)
    versions_done = all(d in docs and docs[d].version == e.version for d, e in model.latest.items())
    return versions_done and ledger.counts()["dead_letters"] == dead


def _assert_converged(config: Path, model: SourceModel, bad_reasons: list[str]) -> None:
    """Both indexes equal the model (I1-I4), every change is committed, and the DLQ holds exactly
    the bad items."""
    with runtime(load_settings(config)) as rt:
        violations = [
            *check.index_against_source("keyword", model, set(), rt.keyword.scan(with_text=True)),
            *check.index_against_source("vector", model, set(), rt.vector.scan(with_text=True)),
        ]
        docs = {d.doc_id: d for d in rt.ledger.iter_docs(include_deleted=True)}
        letters = [letter for _, letter in rt.ledger.dead_letters(limit=100)]
        violations += check.accounted(model, docs, letters) + check.nothing_pending(rt.ledger)
    assert violations == [], "\n".join(map(str, violations[:20]))
    assert sorted(letter.reason for letter in letters) == sorted(bad_reasons)
    assert all(letter.source == "hook" for letter in letters)


def test_lockstep_run_converges_on_a_faulty_delivery_history_posted_to_the_webhook(tmp_path: Path) -> None:
    """Reordered, duplicated, delayed, redelivered and replayed events POSTed to a running
    service (SQLite ledger, inbox file beside it), with a client retry and a batch carrying bad
    items: both indexes converge to the model and the bad items are in the DLQ."""
    model, deliveries = faulty_deliveries(seed=3, namespace="wh")
    port = free_port()
    config = _config(tmp_path, port, {"path": str(tmp_path / "ledger.db")})
    base = f"http://127.0.0.1:{port}"
    proc = start_service(config)
    try:
        wait_for(lambda: ready(base), "ready", proc)
        poster = Poster(base, random.Random(4))
        poster.post_all(deliveries[: len(deliveries) // 2])
        bad_reasons = poster.post_with_bad_items(deliveries[len(deliveries) // 2 : len(deliveries) // 2 + 3])
        poster.post_all(deliveries[len(deliveries) // 2 + 3 :])
        body, headers = poster.sent[0]
        retried = poster.client.post(poster.url, content=body, headers={**AUTH, **headers})
        assert retried.status_code == 202 and retried.json()["accepted"] == 0
        ledger = SqliteLedger(tmp_path / "ledger.db")
        wait_for(lambda: _ledger_caught_up(ledger, model, dead=2), "every change applied", proc)
        ledger.close()
    finally:
        err = stop_service(proc)
    assert proc.returncode == 0, err[-3000:]
    assert TOKEN not in err
    inbox = SqliteInbox(inbox_beside(tmp_path / "ledger.db"))
    checkpoint = SqliteLedger(tmp_path / "ledger.db").get_checkpoint("hook")
    assert checkpoint is not None and inbox.read_after(int(checkpoint), 10) == [], "the checkpoint lags"
    inbox.close()
    _assert_converged(config, model, bad_reasons)


def test_acknowledged_events_survive_a_kill_and_reach_both_indexes_on_the_postgres_ledger(
    tmp_path: Path, pg_schema: PgSchema
) -> None:
    """On the Postgres ledger (inbox table in its schema; retention 0, so committed rows are
    pruned and a late duplicate of one reaches the ledger's version gate instead): the service is
    SIGKILLed right after a 202, every acknowledged event is still in the inbox or already
    committed, and after a restart everything converges."""
    model, deliveries = faulty_deliveries(seed=8, namespace="pg")
    port = free_port()
    ledger_settings = {"kind": "postgres", "dsn": pg_schema.dsn, "schema": pg_schema.name}
    config = _config(tmp_path, port, ledger_settings, retention_s=0)
    base = f"http://127.0.0.1:{port}"
    first_half, second_half = deliveries[: len(deliveries) // 2], deliveries[len(deliveries) // 2 :]
    proc = start_service(config)
    try:
        wait_for(lambda: ready(base), "ready", proc)
        Poster(base, random.Random(1)).post_all(first_half)
    finally:
        kill_service(proc)
    assert _unaccounted(pg_schema, first_half) == [], "an acknowledged event was lost"
    proc = start_service(config)
    try:
        wait_for(lambda: ready(base), "ready after the restart", proc)
        summary = post_events(f"{base}/events", TOKEN, [event_to_dict(e) for e in second_half], batch_events=17)
        assert summary.accepted + summary.duplicates == len(second_half) and summary.rejected == []
        ledger = PostgresLedger(pg_schema.dsn, schema=pg_schema.name)
        wait_for(lambda: _ledger_caught_up(ledger, model, dead=0), "every change applied", proc)
        ledger.close()
    finally:
        err = stop_service(proc)
    assert proc.returncode == 0, err[-3000:]
    _assert_converged(config, model, [])


def _unaccounted(schema: PgSchema, events: list[ChangeEvent]) -> list[ChangeEvent]:
    """Events neither stored in the inbox nor reached by the ledger's committed version (a
    committed row may have been pruned from the inbox)."""
    inbox = PostgresInbox(schema.dsn, schema=schema.name)
    ledger = PostgresLedger(schema.dsn, schema=schema.name)
    try:
        stored = {(r.doc_id, r.version) for r in inbox.read_after(0, 100_000)}
        docs = ledger.get_docs({e.doc_id for e in events})
    finally:
        inbox.close()
        ledger.close()
    return [
        e for e in events
        if (e.doc_id, e.version) not in stored and (e.doc_id not in docs or docs[e.doc_id].version < e.version)
    ]
