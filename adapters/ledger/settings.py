"""Connection settings of the Postgres ledger (several replicas sharing one database).

The DSN is a ``SecretStr`` because it may carry a password: it prints as ``**********`` in
``repr``, ``str`` and logs, and is unwrapped only where the ledger is built. This module imports
no database client, so lockstep's settings can nest it without the ``streaming`` extra installed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

# How long opening a connection may take before the database counts as unreachable; libpq's
# default is to wait forever, which would hang a replica on a black-holed address.
CONNECT_TIMEOUT_S = 10.0
# Bounds every statement on the server, lock waits included: a replica blocked behind another
# replica's row lock gives up with a retriable error instead of hanging.
STATEMENT_TIMEOUT_S = 30.0

DEFAULT_SCHEMA = "lockstep"
# Lower-case unquoted identifiers only (at most 63 bytes, Postgres's NAMEDATALEN - 1), so the
# schema name needs no quoting in ``search_path`` and reads the same in psql.
SCHEMA_PATTERN = r"^[a-z_][a-z0-9_]{0,62}$"


class PostgresLedgerSettings(BaseModel):
    """Where the Postgres ledger lives; ``schema`` holds its tables (created if missing)."""

    # ``populate_by_name``: the field is ``schema_name`` in Python (``schema`` would shadow a
    # BaseModel attribute) and ``schema`` in YAML and environment variables.
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    kind: Literal["postgres"] = "postgres"
    # A libpq URI or key=value string, e.g. ``postgresql://lockstep:pw@db:5432/lockstep``.
    dsn: SecretStr
    schema_name: str = Field(default=DEFAULT_SCHEMA, alias="schema", pattern=SCHEMA_PATTERN)
    connect_timeout_s: float = Field(default=CONNECT_TIMEOUT_S, gt=0)
    statement_timeout_s: float = Field(default=STATEMENT_TIMEOUT_S, gt=0)
