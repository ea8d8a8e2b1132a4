"""Real Milvus servers for the tests: the Milvus 2.3.5 standalone server and a milvus-lite server.

Thin pytest fixtures over ``chaos.servers`` (where the process control and the workarounds for
the ``milvus`` package live). Both servers are session-scoped and started on first use; a server
that cannot start fails the tests that need it (never a skip), with the tail of its log in the
message. ``RealMilvus.kill9_and_restart`` crashes the 2.3.5 server and brings it back on the same
ports and data, for the fault tests.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from chaos.servers import ManagedServer, MilvusLiteServer, RealMilvusServer, ServerStartError, free_port

# The names the tests import; the classes are the product's.
RealMilvus = RealMilvusServer
LiteServer = MilvusLiteServer

__all__ = ["LiteServer", "RealMilvus", "free_port", "lite_server", "real_milvus", "start_or_fail"]


def start_or_fail(server: ManagedServer) -> None:
    """Start ``server``; a server that cannot start fails the test, it is never skipped."""
    try:
        server.start()
    except ServerStartError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def real_milvus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealMilvus]:
    """The Milvus 2.3.5 standalone server, started once per session (~10 s)."""
    server = RealMilvus(tmp_path_factory.mktemp("milvus-2.3.5"))
    start_or_fail(server)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def lite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiteServer]:
    """A milvus-lite gRPC server on a free port, started once per session."""
    server = LiteServer(tmp_path_factory.mktemp("milvus-lite") / "data")
    start_or_fail(server)
    yield server
    server.stop()
