"""A corpus of hostile input (tests/support/hostile.py), interleaved with good events, through
`lockstep sync` from a JSONL file and through `lockstep run`'s webhook, on the embedded default
and on the OpenSearch-API server + Milvus 2.3.5.

After each run, read back from the stores with their own clients: every good event's final state
is in both indexes, nothing of a bad one is anywhere, every bad line is a dead letter with its
reason and its exact bytes, nothing is pending, `lockstep audit` exits 0 without a reconcile, and
a second run over the same input changes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from adapters.ledger.sqlite import SqliteLedger
from coordinator.model import DeadLetter
from lockstep.settings import load_settings
from tests.support import hostile
from tests.support.milvus_servers import RealMilvus
from tests.support.raw_stores import documents, read_keyword, read_vector
from tests.support.service_process import free_port, ready, start_service, stop_service, wait_for

LOCKSTEP = [sys.executable, "-m", "lockstep"]
CLI_TIMEOUT_S = 600
HTTP_TIMEOUT_S = 60.0
TOKEN = "hostile-corpus-token-" + "k" * 16
# Lines per webhook request (the oversize line goes alone: it is most of a request body).
LINES_PER_REQUEST = 9


@dataclass(frozen=True)
class Corpus:
    good: list[bytes]
    bad: list[hostile.Case]
    # The JSONL byte offset after each bad line: its dead letter's position.
    bad_ends: dict[str, hostile.Case]
    raw: list[tuple[bytes, bytes]]  # every line with its ending, in file order


def build_corpus() -> Corpus:
    lines: list[tuple[bytes, bytes]] = [(hostile.bom_first_line(), b"\n")]
    good = [hostile.bom_first_line()]
    bad: list[hostile.Case] = []
    for i, case in enumerate(hostile.cases()):
        lines.append((hostile.filler(i), b"\n"))
        good.append(hostile.filler(i))
        if i % 20 == 0:
            lines += [(b"", b"\n"), (b"  \t ", b"\n")]  # blank lines are not records
        lines.append((case.line, case.ending))
        if case.bad is None:
            good.append(case.line)
        else:
            bad.append(case)
    ends: dict[str, hostile.Case] = {}
    offset = 0
    by_line = {id(c.line): c for c in bad}
    for line, ending in lines:
        offset += len(line) + len(ending)
        if id(line) in by_line:
            ends[str(offset)] = by_line[id(line)]
    return Corpus(good, bad, ends, lines)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    built = build_corpus()
    assert len(hostile.cases()) >= 60 and len(built.bad) == len(built.bad_ends)
    return built


@pytest.fixture(params=["embedded", "servers"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    if request.param == "embedded":
        return {
            "keyword": {"kind": "tantivy", "path": str(tmp_path / "tantivy")},
            "vector": {"uri": str(tmp_path / "milvus.db")},
        }
    url: str = request.getfixturevalue("opensearch_api_url")
    milvus: RealMilvus = request.getfixturevalue("real_milvus")
    suffix = uuid.uuid4().hex[:8]
    return {
        "keyword": {"kind": "opensearch", "url": url, "index": f"hostile-{suffix}"},
        "vector": {"uri": milvus.uri, "collection": f"hostile_{suffix}"},
    }


def _config(tmp_path: Path, stores: dict[str, Any], source: dict[str, Any], **run: Any) -> Path:
    config = {
        "source": source,
        **stores,
        "ledger": {"path": str(tmp_path / "ledger.db")},
        "embedder": {"kind": "hashing"},
        "chunking": {"max_chars": 200},
        "sync": {"batch_events": 16},
        "run": {"shards": 2, "audit_interval_s": 0, "batch_docs_max": 16, **run},
    }
    path = tmp_path / "lockstep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _lockstep(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LOCKSTEP, *args], capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False,
        stdin=subprocess.DEVNULL, env={**os.environ},
    )  # fmt: skip


def _state(config: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, int], list[tuple[int, DeadLetter]]]:
    """What both stores hold (read raw) and the ledger's counts and dead letters."""
    settings = load_settings(config)
    ledger = SqliteLedger(settings.ledger.path)  # type: ignore[union-attr]
    try:
        counts, letters = ledger.counts(), ledger.dead_letters(limit=1000)
    finally:
        ledger.close()
    return read_keyword(settings), read_vector(settings), counts, letters


def _assert_truth(config: Path, corpus: Corpus, letter_case: dict[int, hostile.Case]) -> None:
    keyword, vector, counts, letters = _state(config)
    live, deleted = hostile.expected_documents(corpus.good)
    for name, chunks in (("keyword", keyword), ("vector", vector)):
        docs = documents(chunks)
        assert set(docs) == {d for d, e in live.items() if e.text}, f"{name}: documents differ from the model"
        for doc_id, (version, text, metadata) in docs.items():
            want = live[doc_id]
            assert text == want.text, f"{name}: {doc_id!r} holds other text"
            assert all(m == want.metadata for m in metadata), f"{name}: {doc_id!r} holds other metadata"
            assert version <= want.version, f"{name}: {doc_id!r} is at v{version}, above v{want.version}"
        assert not deleted & set(docs)
    assert counts["pending_intents"] == 0
    assert counts["live_docs"] == len(live) and counts["tombstones"] >= len(deleted)
    assert len(letters) == len(corpus.bad), [letter.reason for _, letter in letters]
    seen = set()
    for letter_id, letter in letters:
        case = letter_case[letter_id]
        assert case.bad is not None and case.bad in letter.reason, (case.name, letter.reason)
        seen.add(case.name)
        if letter.reason.startswith("conflict"):
            assert json.loads(letter.payload)["text"] == json.loads(case.line)["text"], case.name
        else:
            assert letter.record_bytes() == case.line.rstrip(b"\r"), case.name
    assert seen == {c.name for c in corpus.bad}
    audit = _lockstep("audit", "-c", str(config), "--json")
    assert audit.returncode == 0, audit.stdout[-3000:] + audit.stderr[-3000:]


def test_hostile_jsonl_through_sync(tmp_path: Path, stores: dict[str, Any], corpus: Corpus) -> None:
    """Every kind of hostile line in a JSONL file: sync exits 1 (dead letters), applies every
    good event, dead-letters every bad line with its reason, position and exact bytes; a second
    sync from the start of the file changes nothing and exits 0."""
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"".join(line + ending for line, ending in corpus.raw))
    config = _config(tmp_path, stores, {"kind": "jsonl", "path": str(events), "name": "hostile"})
    first = _lockstep("sync", "-c", str(config))
    assert first.returncode == 1, first.stderr[-3000:]
    summary = json.loads(first.stdout)
    assert summary["dead_letters"] == len(corpus.bad)
    letters = _state(config)[3]
    by_position = {letter_id: corpus.bad_ends[str(letter.position)] for letter_id, letter in letters}
    _assert_truth(config, corpus, by_position)
    before = _state(config)

    ledger = SqliteLedger(tmp_path / "ledger.db")
    ledger.set_checkpoint("hostile", "0")
    ledger.close()
    second = _lockstep("sync", "-c", str(config))
    assert second.returncode == 0, second.stdout + second.stderr[-3000:]
    again = json.loads(second.stdout)
    assert again["applied_events"] == 0 and again["dead_letters"] == 0 and again["embed_calls"] == 0
    assert _state(config) == before


def _requests(corpus: Corpus) -> Iterator[bytes]:
    """NDJSON bodies of a few lines each, in file order (the file's BOM line opens the first)."""
    body: list[bytes] = []
    for line, ending in corpus.raw:
        if len(line) > hostile.TEXT_BYTES_MAX:
            if body:
                yield b"".join(body)
            yield line + ending
            body = []
            continue
        body.append(line + ending)
        if len(body) >= LINES_PER_REQUEST and not line.startswith(b"\xef\xbb\xbf"):
            yield b"".join(body)
            body = []
    if body:
        yield b"".join(body)


def _post_all(base: str, corpus: Corpus) -> list[dict[str, Any]]:
    answers = []
    with httpx.Client(timeout=HTTP_TIMEOUT_S) as client:
        for body in _requests(corpus):
            response = client.post(
                f"{base}/events", content=body,
                headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/x-ndjson"},
            )  # fmt: skip
            assert response.status_code in (202, 422), response.text
            answers.append(response.json())
    return answers


def _caught_up(config: Path, corpus: Corpus) -> bool:
    live, deleted = hostile.expected_documents(corpus.good)
    ledger = SqliteLedger(load_settings(config).ledger.path)  # type: ignore[union-attr]
    try:
        docs = ledger.get_docs([*live, *deleted])
        versions_done = all(d in docs and docs[d].version >= e.version for d, e in live.items())
        return versions_done and ledger.counts()["dead_letters"] == len(corpus.bad)
    finally:
        ledger.close()


def _run_and_post(config: Path, port: int, corpus: Corpus) -> list[dict[str, Any]]:
    base = f"http://127.0.0.1:{port}"
    proc = start_service(config)
    try:
        wait_for(lambda: ready(base), "ready", proc)
        answers = _post_all(base, corpus)
        wait_for(lambda: _caught_up(config, corpus), "every good event applied", proc)
        assert ready(base), "a hostile line made the service unready"
    finally:
        err = stop_service(proc)
    assert proc.returncode == 0, err[-3000:]
    assert TOKEN not in err
    return answers


def test_hostile_lines_through_the_webhook(tmp_path: Path, stores: dict[str, Any], corpus: Corpus) -> None:
    """The same corpus POSTed to `lockstep run` as JSON lines: each request is answered (202, or
    422 listing its bad items), the service stays ready and exits 0 on SIGTERM, the stores hold
    exactly the good events' final state and the DLQ the bad lines; posting everything again to
    a restarted service changes nothing."""
    port = free_port()
    config = _config(
        tmp_path, stores, {"kind": "webhook", "name": "hook", "token": TOKEN}, http_port=port
    )
    answers = _run_and_post(config, port, corpus)
    assert sum(len(a["rejected"]) for a in answers) == len(corpus.bad)
    by_bytes = {c.line.rstrip(b"\r"): c for c in corpus.bad}
    letters = _state(config)[3]
    _assert_truth(config, corpus, {i: by_bytes[letter.record_bytes()] for i, letter in letters})
    before = _state(config)

    again = _run_and_post(config, port, corpus)
    assert sum(a["accepted"] for a in again) == 0
    assert _state(config) == before

