"""Read-your-writes through ``lockstep run``: the webhook's 202 token makes a search that follows
at once see the change (and never the deleted document), on both engine pairs; without it, the
same search shows the window in which the change is not visible yet."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.search_service import Client, Stores, drop_collection, new_port, run_config, stores
from tests.support.service_process import start_service, stop_service, wait_for

ROUNDS = 12
# Background documents, so that a query has neighbours to compete with in the vector leg.
SEED_DOCS = 30
LEGS = ("keyword", "vector")
# The window the token closes, shown at will if the rounds did not happen to show it (a fast
# apply on an idle engine can beat the search that follows a one-document write): one request
# of this many documents takes far longer to apply than a search takes to answer.
WINDOW_BATCH_DOCS = 200
WINDOW_TRIES_MAX = 5
CLI_TIMEOUT_S = 120


@pytest.fixture(params=["embedded", "servers"])
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stores]:
    chosen = stores(request, tmp_path, request.param)
    yield chosen
    drop_collection(chosen)


def _doc(i: int, version: int, text: str) -> dict[str, object]:
    return {"op": "upsert", "doc_id": f"tok-{i}", "version": version, "text": text, "metadata": {"round": i}}


def _found(client: Client, query: str, doc_id: str, **options: object) -> bool:
    answer = client.search(query, k=50, **options)
    assert answer.status_code == 200, answer.text
    return doc_id in {h["doc_id"] for h in answer.json()["hits"]}


def test_a_search_with_the_webhook_token_always_sees_the_write(pair: Stores, tmp_path: Path) -> None:
    """Each round writes a document (then edits it, then deletes it) through POST /events and
    searches with the 202's token at once, on each leg alone: the new text is always found, the
    deleted document never; the same search without a token, made first, misses the new
    document at least once (the window the token closes), if not in the rounds then right after
    a write of WINDOW_BATCH_DOCS documents."""
    port = new_port()
    config = run_config(tmp_path, pair, port)
    proc = start_service(config)
    client = Client(port)
    missed_without_token = 0
    try:
        wait_for(client.search_open, "POST /search open", proc)
        seed = [_doc(1000 + i, 1, f"background note {i} about parcels and refunds") for i in range(SEED_DOCS)]
        client.search("background", consistent_with=client.post(seed), k=1)
        for i in range(ROUNDS):
            word = f"zebra{i}x"
            token = client.post([_doc(i, 1, f"{word} first words of round {i}")])
            missed_without_token += not _found(client, word, f"tok-{i}")
            for leg in LEGS:
                assert _found(client, word, f"tok-{i}", mode=leg, consistent_with=token), (leg, i)
            edited = f"quagga{i}y"
            token = client.post([_doc(i, 2, f"{edited} second words of round {i}")])
            for leg in LEGS:
                answer = client.search(edited, k=50, mode=leg, consistent_with=token).json()
                mine = [h for h in answer["hits"] if h["doc_id"] == f"tok-{i}"]
                assert mine and all(h["version"] == 2 and edited in h["text"] for h in mine), (leg, i, mine)
            token = client.post([{"op": "delete", "doc_id": f"tok-{i}", "version": 3}])
            for leg in LEGS:
                assert not _found(client, edited, f"tok-{i}", mode=leg, consistent_with=token), (leg, i)
        for attempt in range(WINDOW_TRIES_MAX if not missed_without_token else 0):
            word, target = f"okapi{attempt}z", f"tok-{5000 + attempt}"
            batch = [_doc(2000 + attempt * WINDOW_BATCH_DOCS + j, 1, f"filler {j} of window batch {attempt}")
                     for j in range(WINDOW_BATCH_DOCS - 1)]
            token = client.post([*batch, _doc(5000 + attempt, 1, f"{word} the window's document")])
            missed_without_token += not _found(client, word, target)
            assert _found(client, word, target, consistent_with=token), attempt
            if missed_without_token:
                break
        if pair.name == "embedded":
            _cli_goes_through_the_service(config, client)
    finally:
        client.close()
        err = stop_service(proc)
    assert proc.returncode == 0, err[-3000:]
    assert missed_without_token >= 1, "no search without a token ever missed a fresh write: the test shows no window"


def _cli_goes_through_the_service(config: Path, client: Client) -> None:
    """While lockstep run holds the milvus-lite file, lockstep search asks its POST /search."""
    token = client.post([_doc(99, 1, "okapi99z words for the command line")])
    result = subprocess.run(
        [sys.executable, "-m", "lockstep", "search", "-c", str(config), "okapi99z", "--json", "--consistent-with", token],
        capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tok-99" in {h["doc_id"] for h in json.loads(result.stdout)["hits"]}


def test_a_token_that_cannot_be_met_answers_504_with_what_is_pending(pair: Stores, tmp_path: Path) -> None:
    """A token naming a version nobody wrote waits search.consistency_wait_s, then 504 lists it;
    a damaged token is a 400."""
    from coordinator.consistency import ConsistencyToken

    port = new_port()
    config = run_config(tmp_path, pair, port)
    config.write_text(config.read_text().replace("consistency_wait_s: 60.0", "consistency_wait_s: 1.0"))
    proc = start_service(config)
    client = Client(port)
    try:
        wait_for(client.search_open, "POST /search open", proc)
        never = ConsistencyToken.of([("never-written", 5)]).encode()
        answer = client.search("anything", consistent_with=never)
        assert answer.status_code == 504, answer.text
        assert answer.json()["pending"] == [{"doc_id": "never-written", "version": 5, "why": "not committed yet"}]
        assert client.search("anything", consistent_with="lsc1.zz").status_code == 400
        metrics = client.http.get("/metrics").text
        assert 'lockstep_search_requests_total{mode="hybrid",status="504"} 1.0' in metrics
    finally:
        client.close()
        err = stop_service(proc)
    assert proc.returncode == 0, err[-3000:]
