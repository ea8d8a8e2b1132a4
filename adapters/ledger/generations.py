"""The generation registry, stored beside the home ledger's tables (SQLite file or Postgres schema).

One row per generation: its number, its state, and the whole record as JSON. Every change of
several rows (a swap, a rollback) is one transaction, so a crash never leaves two active
generations or none.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from adapters.ledger.sqlite import SqliteLedger
from coordinator.generations import Generation

if TYPE_CHECKING:
    from adapters.ledger.postgres import PostgresLedger

_TABLE = """
CREATE TABLE IF NOT EXISTS generations (
    number INTEGER PRIMARY KEY,
    state TEXT NOT NULL,
    body TEXT NOT NULL
)
"""


class GenerationRegistry(Protocol):
    def all(self) -> list[Generation]: ...

    def put(self, generations: Sequence[Generation]) -> None:
        """Insert or replace these records in one transaction."""

    def put_if_empty(self, generation: Generation) -> bool:
        """Record the first generation unless the registry already holds one; True if written."""


class SqliteGenerations:
    def __init__(self, ledger: SqliteLedger) -> None:
        self._ledger = ledger
        with ledger._tx() as cur:
            cur.execute(_TABLE)

    def all(self) -> list[Generation]:
        rows = self._ledger._read("SELECT body FROM generations ORDER BY number")
        return [Generation.from_json(json.loads(str(r[0]))) for r in rows]

    def put(self, generations: Sequence[Generation]) -> None:
        with self._ledger._tx() as cur:
            cur.executemany(
                "INSERT INTO generations (number, state, body) VALUES (?, ?, ?) "
                "ON CONFLICT (number) DO UPDATE SET state = excluded.state, body = excluded.body",
                [(g.number, g.state.value, json.dumps(g.to_json())) for g in generations],
            )

    def put_if_empty(self, generation: Generation) -> bool:
        with self._ledger._tx() as cur:
            if cur.execute("SELECT 1 FROM generations LIMIT 1").fetchone():
                return False
            cur.execute(
                "INSERT INTO generations (number, state, body) VALUES (?, ?, ?)",
                (generation.number, generation.state.value, json.dumps(generation.to_json())),
            )
            return True


class PostgresGenerations:
    def __init__(self, ledger: PostgresLedger) -> None:
        self._ledger = ledger
        with ledger._tx() as cur:
            cur.execute(_TABLE.replace("INTEGER", "BIGINT"))

    def all(self) -> list[Generation]:
        with self._ledger._tx() as cur:
            rows = cur.execute("SELECT body FROM generations ORDER BY number").fetchall()
        return [Generation.from_json(json.loads(str(r[0]))) for r in rows]

    def put(self, generations: Sequence[Generation]) -> None:
        with self._ledger._tx() as cur:
            cur.executemany(
                "INSERT INTO generations (number, state, body) VALUES (%s, %s, %s) "
                "ON CONFLICT (number) DO UPDATE SET state = excluded.state, body = excluded.body",
                [(g.number, g.state.value, json.dumps(g.to_json())) for g in generations],
            )

    def put_if_empty(self, generation: Generation) -> bool:
        with self._ledger._tx() as cur:
            # Two replicas starting at once: the table lock makes the second one see the first row.
            cur.execute("LOCK TABLE generations IN EXCLUSIVE MODE")
            if cur.execute("SELECT 1 FROM generations LIMIT 1").fetchone():
                return False
            cur.execute(
                "INSERT INTO generations (number, state, body) VALUES (%s, %s, %s)",
                (generation.number, generation.state.value, json.dumps(generation.to_json())),
            )
            return True


def registry_for(ledger: SqliteLedger | PostgresLedger) -> GenerationRegistry:
    if isinstance(ledger, SqliteLedger):
        return SqliteGenerations(ledger)
    return PostgresGenerations(ledger)
