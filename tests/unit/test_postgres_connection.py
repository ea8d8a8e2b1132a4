"""The connection settings every Postgres client of lockstep shares (``adapters/postgres_connection.py``)."""

from __future__ import annotations

import pytest

from adapters.postgres_connection import connect_timeout, describe, ms, session_options
from coordinator.errors import ConfigError

DSN = "postgresql://lockstep:hunter2@db.example:5433/app"


def test_our_session_settings_come_after_the_dsns_own_options() -> None:
    """A setting the DSN's ``options`` also sets is ours in the end (the last ``-c`` wins), and
    its other options are kept."""
    dsn = "host=db dbname=app options='-c search_path=theirs -c work_mem=64MB'"
    merged = session_options(dsn, {"search_path": "ours", "statement_timeout": 30_000})
    assert merged == "-c search_path=theirs -c work_mem=64MB -c search_path=ours -c statement_timeout=30000"
    assert session_options(DSN, {"statement_timeout": 1}) == "-c statement_timeout=1"


def test_timeouts_never_become_libpqs_unbounded_defaults() -> None:
    """connect_timeout is whole seconds and at least libpq's floor; a server timeout is never 0 ms (no limit)."""
    assert [connect_timeout(s) for s in (0.1, 2.0, 2.5, 10.0)] == [2, 2, 3, 10]
    assert [ms(s) for s in (0.0001, 0.3, 30.0)] == [1, 300, 30_000]


def test_a_dsn_is_described_without_its_password() -> None:
    """Logs, errors and repr name host, port, database and user, never the password; a
    malformed DSN is refused without quoting it."""
    assert describe(DSN, "ledger") == "host=db.example port=5433 dbname=app user=lockstep"
    with pytest.raises(ConfigError, match="the postgres ledger DSN cannot be parsed") as refused:
        describe("postgresql://lockstep:hunter2@db:notaport/app host==", "ledger")
    assert "hunter2" not in str(refused.value) and refused.value.__cause__ is None
