"""The webhook inbox as a table in the Postgres ledger's schema, shared by every replica."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import structlog

from adapters.ledger.settings import CONNECT_TIMEOUT_S, STATEMENT_TIMEOUT_S, PostgresLedgerSettings
from adapters.postgres_connection import SharedConnection
from adapters.sources.webhook.body import Item
from adapters.sources.webhook.inbox import (
    INBOX_TABLE,
    INSERT_ROW_SQL,
    PRUNE_ROWS_MAX,
    STORE,
    AppendResult,
    InboxRow,
    check_backlog,
    first_int,
    plan_append,
    row_params,
)

if TYPE_CHECKING:
    import psycopg
    from psycopg.rows import TupleRow

# Keys per ``= ANY`` lookup: bounds one statement (a request holds at most BATCH_EVENTS_MAX).
KEYS_PER_QUERY_MAX = 5_000

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {INBOX_TABLE} (
    seq         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    doc_id      TEXT COLLATE "C",
    version     BIGINT,
    payload     TEXT NOT NULL,
    reason      TEXT,
    digest      TEXT UNIQUE,
    received_at DOUBLE PRECISION NOT NULL,
    UNIQUE (doc_id, version)
);
"""

log = structlog.get_logger(__name__)


class PostgresInbox:
    """The inbox as a table in the Postgres ledger's schema, shared by every replica.

    Every append first takes one transaction-scoped advisory lock, so seqs are assigned in
    commit order across replicas (see ``adapters/sources/webhook/inbox.py``). One connection
    behind a lock, reopened after it breaks, as the Postgres ledger's
    (``adapters/postgres_connection.py``).
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        statement_timeout_s: float = STATEMENT_TIMEOUT_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.schema = schema
        self._clock = clock
        self._db = SharedConnection(
            dsn,
            store=STORE,
            application_name="lockstep-webhook-inbox",
            search_path=(schema,),
            connect_timeout_s=connect_timeout_s,
            statement_timeout_s=statement_timeout_s,
            log=log.bind(schema=schema),
        )
        self._append_lock_key = f"lockstep.{INBOX_TABLE}.{schema}"
        self._create()

    @classmethod
    def from_settings(cls, settings: PostgresLedgerSettings) -> PostgresInbox:
        """The inbox table in the Postgres ledger's schema, reached as the ledger is."""
        return cls(
            settings.dsn.get_secret_value(),
            schema=settings.schema_name,
            connect_timeout_s=settings.connect_timeout_s,
            statement_timeout_s=settings.statement_timeout_s,
        )

    def __repr__(self) -> str:
        # Never the DSN itself: it may carry a password.
        return f"PostgresInbox(schema={self.schema!r})"

    def append(self, items: Sequence[Item], *, committed_seq: int, backlog_max: int) -> AppendResult:
        with self._db.transaction() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self._append_lock_key,))
            cur.execute(f"SELECT coalesce(max(seq), 0) FROM {INBOX_TABLE}")
            check_backlog(first_int(cur.fetchone()), committed_seq, backlog_max)
            plan = plan_append(items, self._stored(cur, [i.key for i in items if i.event is not None]))
            now = self._clock()
            if plan.rows:
                cur.executemany(INSERT_ROW_SQL.format(p="%s"), [row_params(r, now) for r in plan.rows])
        return plan.result()

    @staticmethod
    def _stored(cur: psycopg.Cursor[TupleRow], keys: Sequence[tuple[str, int]]) -> dict[tuple[str, int], str]:
        out: dict[tuple[str, int], str] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), KEYS_PER_QUERY_MAX):
            part = unique[start : start + KEYS_PER_QUERY_MAX]
            cur.execute(
                f"SELECT i.doc_id, i.version, i.payload FROM {INBOX_TABLE} i "
                "JOIN unnest(%s::text[], %s::bigint[]) AS k(doc_id, version) "
                "ON i.doc_id = k.doc_id AND i.version = k.version",
                ([d for d, _ in part], [v for _, v in part]),
            )
            out.update(((str(d), int(v)), str(p)) for d, v, p in cur.fetchall())
        return out

    def read_after(self, seq: int, limit: int) -> list[InboxRow]:
        with self._db.transaction() as cur:
            cur.execute(
                f"SELECT seq, doc_id, version, payload, reason FROM {INBOX_TABLE} "
                "WHERE seq > %s ORDER BY seq LIMIT %s",
                (seq, limit),
            )
            return [InboxRow(*row) for row in cur.fetchall()]

    def prune(self, *, through_seq: int, received_before: float) -> int:
        with self._db.transaction() as cur:
            cur.execute(
                f"DELETE FROM {INBOX_TABLE} WHERE seq IN (SELECT seq FROM {INBOX_TABLE} "
                "WHERE seq <= %s AND received_at < %s ORDER BY seq LIMIT %s)",
                (through_seq, received_before, PRUNE_ROWS_MAX),
            )
            return int(cur.rowcount)

    def close(self) -> None:
        self._db.close()

    def _create(self) -> None:
        from psycopg import sql

        with self._db.transaction() as cur:
            # Replicas starting together would race on CREATE ... IF NOT EXISTS; they take turns.
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"lockstep.schema.{self.schema}",))
            cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
            cur.execute(_SCHEMA)
