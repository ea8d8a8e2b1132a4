"""Real keyword-index servers for the tests, started by the tests themselves.

* ``opensearch_api_url``: an OpenSearch-API server (``chaos.servers.OpenSearchApiServer``, in
  memory) for the whole session.
* ``es_compat_proxy``: the header-translating proxy in front of it, for elasticsearch-py.
* ``real_es_url``: a real Elasticsearch, only when LOCKSTEP_TEST_ES_URL points at one.

A server that cannot start fails the tests that need it; only the optional real Elasticsearch
may be skipped. (The fixture names differ from osmem-server's own pytest plugin on purpose.)
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from adapters.keyword.es_compat_proxy import EsCompatProxy
from chaos.servers import OpenSearchApiServer, ServerStartError

ES_URL_ENV = "LOCKSTEP_TEST_ES_URL"


@pytest.fixture(scope="session")
def opensearch_api_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of a session-wide OpenSearch-API server (empty at start, in memory)."""
    server = OpenSearchApiServer(log_path=tmp_path_factory.mktemp("osmem-server") / "server.log")
    try:
        server.start()
    except ServerStartError as exc:
        pytest.fail(f"the OpenSearch-API test server did not start: {exc}", pytrace=False)
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def es_compat_proxy(opensearch_api_url: str) -> Iterator[EsCompatProxy]:
    """The EsCompatProxy in front of the session's OpenSearch-API server."""
    with EsCompatProxy(opensearch_api_url) as proxy:
        yield proxy


@pytest.fixture(scope="session")
def real_es_url() -> str:
    """URL of a real Elasticsearch; the tests that need one are skipped when none is configured."""
    url = os.environ.get(ES_URL_ENV, "")
    if not url:
        pytest.skip(f"{ES_URL_ENV} is not set: no real Elasticsearch to test against")
    return url
