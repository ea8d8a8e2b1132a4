"""The generation registry, stored beside the home ledger's tables (SQLite file or Postgres schema).

One row per generation: its number, its state, and the whole record as JSON. Every change of
several rows (a swap, a rollback) is one transaction, so a crash never leaves two active
generations or none.

Beside it, one row per process that applies live changes (``lockstep run``, ``lockstep sync``…):
which generations its writes reach right now, until when the claim holds (renewed while it runs).
A rebuild validates its new generation only once every writer reports writing it too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

from adapters.ledger.sqlite import SqliteLedger
from coordinator.generations import Generation
from coordinator.ports import GenerationRegistry, Writers

if TYPE_CHECKING:
    from adapters.ledger.postgres import PostgresLedger

_TABLE = """
CREATE TABLE IF NOT EXISTS generations (
    number INTEGER PRIMARY KEY,
    state TEXT NOT NULL,
    body TEXT NOT NULL
)
"""

# generations: a JSON list of numbers; NULL while the writer is starting (it has not yet read
# the registry, so it may be about to write any set).
_WRITERS_TABLE = """
CREATE TABLE IF NOT EXISTS generation_writers (
    owner TEXT PRIMARY KEY,
    generations TEXT,
    expires_at {real} NOT NULL
)
"""

def _encode(numbers: Sequence[int] | None) -> str | None:
    return None if numbers is None else json.dumps(sorted(numbers))


def _decode(rows: Sequence[Sequence[object]]) -> Writers:
    return {str(r[0]): None if r[1] is None else tuple(json.loads(str(r[1]))) for r in rows}


class SqliteGenerations:
    def __init__(self, ledger: SqliteLedger) -> None:
        self._ledger = ledger
        with ledger._tx() as cur:
            cur.execute(_TABLE)
            cur.execute(_WRITERS_TABLE.format(real="REAL"))

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

    def announce(self, owner: str, generations: Sequence[int] | None, ttl_s: float) -> None:
        now = self._ledger._clock()
        with self._ledger._tx() as cur:
            cur.execute("DELETE FROM generation_writers WHERE expires_at <= ?", (now,))
            cur.execute(
                "INSERT INTO generation_writers (owner, generations, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT (owner) DO UPDATE SET generations = excluded.generations, expires_at = excluded.expires_at",
                (owner, _encode(generations), now + ttl_s),
            )

    def withdraw(self, owner: str) -> None:
        with self._ledger._tx() as cur:
            cur.execute("DELETE FROM generation_writers WHERE owner = ?", (owner,))

    def writers(self) -> Writers:
        rows = self._ledger._read(
            "SELECT owner, generations FROM generation_writers WHERE expires_at > ? ORDER BY owner", (self._ledger._clock(),)
        )
        return _decode(rows)


class PostgresGenerations:
    def __init__(self, ledger: PostgresLedger) -> None:
        self._ledger = ledger
        with ledger._tx() as cur:
            cur.execute(_TABLE.replace("INTEGER", "BIGINT"))
            cur.execute(_WRITERS_TABLE.format(real="DOUBLE PRECISION"))

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

    def announce(self, owner: str, generations: Sequence[int] | None, ttl_s: float) -> None:
        now = self._ledger._clock()
        with self._ledger._tx() as cur:
            cur.execute("DELETE FROM generation_writers WHERE expires_at <= %s", (now,))
            cur.execute(
                "INSERT INTO generation_writers (owner, generations, expires_at) VALUES (%s, %s, %s) "
                "ON CONFLICT (owner) DO UPDATE SET generations = excluded.generations, expires_at = excluded.expires_at",
                (owner, _encode(generations), now + ttl_s),
            )

    def withdraw(self, owner: str) -> None:
        with self._ledger._tx() as cur:
            cur.execute("DELETE FROM generation_writers WHERE owner = %s", (owner,))

    def writers(self) -> Writers:
        with self._ledger._tx() as cur:
            rows = cur.execute(
                "SELECT owner, generations FROM generation_writers WHERE expires_at > %s ORDER BY owner", (self._ledger._clock(),)
            ).fetchall()
        return _decode(rows)


def registry_for(ledger: SqliteLedger | PostgresLedger) -> GenerationRegistry:
    if isinstance(ledger, SqliteLedger):
        return SqliteGenerations(ledger)
    return PostgresGenerations(ledger)
