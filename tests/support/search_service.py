"""``lockstep run`` with a webhook source on one engine pair, and a client of its ``/events`` and
``/search``, for the read path's end-to-end tests."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from pymilvus import MilvusClient

from tests.support.milvus_servers import RealMilvus
from tests.support.service_process import free_port

WEBHOOK_TOKEN = "search-tests-webhook-token-0123"
HTTP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Stores:
    """One engine pair's keyword and vector sections (the ledger is SQLite beside them)."""

    name: str
    keyword: dict[str, Any]
    vector: dict[str, Any]


def stores(request: pytest.FixtureRequest, tmp_path: Path, name: str) -> Stores:
    """``embedded``: Tantivy + a milvus-lite file; ``servers``: the OpenSearch-API server + Milvus 2.3.5."""
    suffix = uuid.uuid4().hex[:10]
    if name == "embedded":
        return Stores(name, {"path": str(tmp_path / "tantivy")}, {"uri": str(tmp_path / "milvus.db")})
    milvus: RealMilvus = request.getfixturevalue("real_milvus")
    url = request.getfixturevalue("opensearch_api_url")
    return Stores(name, {"kind": "opensearch", "url": url, "index": f"kw-{suffix}"},
                  {"uri": milvus.uri, "collection": f"c_{suffix}"})


def drop_collection(stores: Stores) -> None:
    """Drop a server pair's collection (and the aliases lockstep made for it)."""
    if stores.name != "servers":
        return
    client = MilvusClient(uri=stores.vector["uri"], timeout=30)
    collection = stores.vector["collection"]
    if client.has_collection(collection):
        for alias in client.list_aliases(collection).get("aliases", []):
            client.drop_alias(alias)
        client.drop_collection(collection)
    client.close()


def run_config(tmp_path: Path, stores: Stores, port: int, **run: Any) -> Path:
    config = {
        "source": {"kind": "webhook", "name": "hook", "token": WEBHOOK_TOKEN},
        "keyword": stores.keyword,
        "vector": stores.vector,
        "ledger": {"path": str(tmp_path / "ledger.db")},
        "embedder": {"kind": "hashing"},
        "chunking": {"max_chars": 400},
        "run": {"shards": 2, "http_port": port, "batch_docs_max": 50, "audit_interval_s": 0, **run},
        "search": {"leg_timeout_s": 2.0, "consistency_wait_s": 60.0},
    }
    path = tmp_path / "lockstep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Client:
    """POST /events and POST /search of one running service."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.base, timeout=HTTP_TIMEOUT_S)

    def post(self, events: list[dict[str, Any]]) -> str:
        """Store ``events``; returns the 202's consistency token."""
        response = self.http.post("/events", json=events, headers={"Authorization": f"Bearer {WEBHOOK_TOKEN}"})
        assert response.status_code == 202, response.text
        token: str = response.json()["consistency_token"]
        return token

    def search(self, query: str, **options: Any) -> httpx.Response:
        return self.http.post("/search", json={"query": query, **options})

    def search_open(self) -> bool:
        """Whether POST /search answers (it opens in the background once the shards are up)."""
        try:
            return self.search("probe").status_code == 200
        except httpx.TransportError:
            return False

    def close(self) -> None:
        self.http.close()


def new_port() -> int:
    return free_port()
