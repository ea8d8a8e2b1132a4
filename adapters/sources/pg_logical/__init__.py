"""Postgres logical replication as a change source: pgoutput, read through the SQL interface.

- ``settings.py``: what the source is configured with (no database client imported);
- ``slot.py``: set-up and teardown on the server (checks, tables, publication, slot);
- ``snapshot.py``: the initial snapshot, read inside the snapshot a new slot exported;
- ``wal.py``: peeking at the slot's WAL and advancing the slot;
- ``transactions.py``: pgoutput messages assembled into transactions and records (pure);
- ``rows.py``: a row change as a document change (pure);
- ``positions.py``, ``inflight.py``, ``sessions.py``: positions, in-flight documents, sessions;
- ``source.py``: the ChangeSource that composes them.

The names below are loaded from those modules on first use (as ``lockstep/__init__.py`` does):
the modules import one another, and lockstep's settings import ``settings.py`` without psycopg.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adapters.sources.pg_logical.settings import PgLogicalSourceSettings
    from adapters.sources.pg_logical.slot import RECOVERY_COMMAND
    from adapters.sources.pg_logical.source import PgLogicalSource

_EXPORTS = {
    "PgLogicalSource": "adapters.sources.pg_logical.source",
    "PgLogicalSourceSettings": "adapters.sources.pg_logical.settings",
    "RECOVERY_COMMAND": "adapters.sources.pg_logical.slot",
}

__all__ = ["RECOVERY_COMMAND", "PgLogicalSource", "PgLogicalSourceSettings"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'adapters.sources.pg_logical' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
