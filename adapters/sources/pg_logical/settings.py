"""Settings of the Postgres logical replication source, and the limits they default to.

The DSN is a ``SecretStr`` because it may carry a password. This module imports no database
client, so lockstep's settings can nest it without the ``streaming`` extra installed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

# Slot and publication names go into the publication_names option, which Postgres splits as an
# identifier list: plain lower-case identifiers only, so none needs quoting.
NAME_PATTERN = r"^[a-z_][a-z0-9_]{0,62}$"
# Never inherit libpq's defaults (no connect timeout, no statement timeout).
CONNECT_TIMEOUT_S = 10.0
# A peek decodes from the slot's restart point and a snapshot sorts a whole table: generous.
STATEMENT_TIMEOUT_S = 300.0
# Rows asked of one peek (``upto_nchanges``). Decoding stops at a transaction boundary, so a
# bigger transaction still comes whole; rows already delivered are asked for on top.
PEEK_CHANGES_MAX = 5000
# Row changes of one transaction held in memory until its commit; a bigger transaction is read
# twice: once to learn each document's last change, once more to emit only those.
TXN_BUFFER_CHANGES_MAX = 10_000
# How often a follower looks for new transactions when it has caught up.
POLL_INTERVAL_S = 0.5
# How long an outage of Postgres may last before the source gives up with a SourceError.
OUTAGE_MAX_S = 600.0


class PgLogicalSourceSettings(BaseModel):
    """Postgres logical replication (pgoutput) of one or more tables (``adapters/sources/pg_logical/``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["postgres_logical"] = "postgres_logical"
    # A libpq URI or key=value string; it may carry a password (``LOCKSTEP_SOURCE__DSN``).
    dsn: SecretStr
    tables: tuple[str, ...] = Field(min_length=1)
    name: str = "postgres_logical"
    # Lower-case identifiers: both go into pgoutput's publication_names option unquoted.
    slot: str = Field(default="lockstep", pattern=NAME_PATTERN)
    publication: str = Field(default="lockstep", pattern=NAME_PATTERN)
    id_column: str = "id"
    text_column: str = "text"
    metadata_column: str | None = None
    metadata_columns: tuple[str, ...] = ()
    # doc_id = "<table>/<id>" instead of "<id>"; required with several tables.
    table_prefix_ids: bool = False
    poll_interval_s: float = Field(default=POLL_INTERVAL_S, gt=0)
    peek_changes_max: int = Field(default=PEEK_CHANGES_MAX, ge=1, le=1_000_000)
    txn_buffer_changes_max: int = Field(default=TXN_BUFFER_CHANGES_MAX, ge=1, le=10_000_000)
    connect_timeout_s: float = Field(default=CONNECT_TIMEOUT_S, gt=0)
    statement_timeout_s: float = Field(default=STATEMENT_TIMEOUT_S, gt=0)
    outage_max_s: float = Field(default=OUTAGE_MAX_S, gt=0)
