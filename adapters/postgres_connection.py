"""One Postgres connection shared by a store's threads, and the connection settings every Postgres
client of lockstep uses.

``SharedConnection`` is what the Postgres ledger and the webhook's Postgres inbox (a table in the
ledger's schema) stand on: one autocommit connection behind a lock, opened on first use with
named timeouts, reopened on the next call after it breaks; every use is one explicit transaction.
A pool would add a dependency (psycopg_pool) and idle connections without adding throughput: a
replica's calls are short transactions, and replicas scale by process.

Errors leave as lockstep's store errors (``coordinator/errors.py``)::

    psycopg.DatabaseError
    ├── the connection is lost, or OperationalError (timeout, deadlock,
    │   serialisation failure, shutdown)                    -> TransientStoreError
    └── constraint, data and SQL errors, and the operational
        SQLSTATE classes that fail the same way again
        (28 wrong password, 3D no such database)             -> PermanentStoreError

Redaction: a DSN may carry a password, so it never appears in a message, a log line or a repr;
``describe`` names host, port, database and user instead.

psycopg is imported inside the functions that need it (and for annotations only): the webhook
package builds on this module and lockstep's settings import that package, which must work
without the ``streaming`` extra installed.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from coordinator.errors import ConfigError, PermanentStoreError, StoreError, TransientStoreError

if TYPE_CHECKING:
    import psycopg
    from psycopg.rows import TupleRow
    from structlog.typing import FilteringBoundLogger

# libpq rounds connect_timeout to whole seconds and treats anything below 2 as 2.
CONNECT_TIMEOUT_MIN_S = 2
# A session frozen inside a transaction (SIGSTOP, a stalled VM) holds its row and advisory locks
# for at most this long before the server ends it.
IDLE_IN_TRANSACTION_TIMEOUT_S = 60.0
# SQLSTATE classes that fail the same way on retry although psycopg calls them operational:
# 28 = invalid authorization (wrong password), 3D = invalid catalog name (no such database).
PERMANENT_SQLSTATE_CLASSES = ("28", "3D")


class SharedConnection:
    """One connection to ``dsn`` with ``search_path`` set, shared behind a lock.

    ``store`` names the store in errors and log events (``"ledger"`` gives ``ledger connected``);
    ``log`` carries the caller's context.
    """

    def __init__(
        self,
        dsn: str,
        *,
        store: str,
        application_name: str,
        search_path: Sequence[str],
        connect_timeout_s: float,
        statement_timeout_s: float,
        log: FilteringBoundLogger,
    ) -> None:
        self.store = store
        self.where = describe(dsn, store)
        self._dsn = dsn
        self._application_name = application_name
        self._connect_timeout_s = connect_timeout_s
        self._options = session_options(
            dsn,
            {
                "statement_timeout": ms(statement_timeout_s),
                "idle_in_transaction_session_timeout": ms(IDLE_IN_TRANSACTION_TIMEOUT_S),
                "search_path": ",".join(search_path),
            },
        )
        self._log = log
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[TupleRow] | None = None

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Cursor[TupleRow]]:
        """One transaction on the shared connection; backend errors leave as StoreErrors."""
        import psycopg

        with self._lock:
            try:
                conn = self._connection()
                with conn.transaction(), conn.cursor() as cur:
                    yield cur
            except psycopg.DatabaseError as exc:
                raise self._store_error(exc) from exc

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _connection(self) -> psycopg.Connection[TupleRow]:
        import psycopg

        if self._conn is not None and not self._conn.closed:
            return self._conn
        self._conn = psycopg.connect(
            self._dsn,
            autocommit=True,  # transactions are explicit: conn.transaction() in transaction()
            connect_timeout=connect_timeout(self._connect_timeout_s),
            options=self._options,
            application_name=self._application_name,
        )
        self._log.info(f"{self.store} connected")
        return self._conn

    def _store_error(self, exc: psycopg.DatabaseError) -> StoreError:
        """Map a backend error; a lost connection is dropped so the next call reconnects."""
        lost = self._conn is None or self._conn.broken or self._conn.closed
        if lost:
            self._drop()
        message = f"postgres {self.store} {self.where}: {type(exc).__name__}: {exc}"
        if lost or is_transient(exc):
            self._log.warning(f"{self.store} transient error", error=type(exc).__name__, connection_lost=lost)
            return TransientStoreError(message, store=self.store)
        self._log.error(f"{self.store} permanent error", error=type(exc).__name__, sqlstate=exc.sqlstate)
        return PermanentStoreError(message, store=self.store)

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None


def connect_timeout(seconds: float) -> int:
    """libpq's ``connect_timeout`` for a wait of ``seconds``: whole seconds, never below libpq's floor."""
    return max(CONNECT_TIMEOUT_MIN_S, math.ceil(seconds))


def ms(seconds: float) -> int:
    """A server timeout setting in milliseconds; 0 would mean no timeout at all, so at least 1."""
    return max(1, round(seconds * 1000))


def session_options(dsn: str, settings: Mapping[str, object]) -> str:
    """``-c name=value`` for each setting, after any options the DSN sets (the last one wins)."""
    from psycopg.conninfo import conninfo_to_dict

    ours = " ".join(f"-c {name}={value}" for name, value in settings.items())
    theirs = conninfo_to_dict(dsn).get("options")
    return f"{theirs} {ours}" if theirs else ours


def describe(dsn: str, store: str) -> str:
    """Host, port, database and user of a DSN, for logs, errors and repr: never its password."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        parts = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        # ``from None``: psycopg's message quotes the malformed DSN, password included.
        raise ConfigError(f"the postgres {store} DSN cannot be parsed") from None
    keys = ("host", "port", "dbname", "user")
    return " ".join(f"{k}={parts[k]}" for k in keys if parts.get(k))


def is_transient(exc: psycopg.DatabaseError) -> bool:
    """Timeouts, deadlocks, serialisation failures, shutdowns: psycopg's OperationalError,
    except the SQLSTATE classes that fail the same way on retry."""
    import psycopg

    sqlstate = exc.sqlstate or ""
    return isinstance(exc, psycopg.OperationalError) and not sqlstate.startswith(PERMANENT_SQLSTATE_CLASSES)
