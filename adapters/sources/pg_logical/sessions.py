"""The source's Postgres sessions: how one is opened (named timeouts, and the settings that make
pgoutput and the snapshot spell values alike), closed, and waited for while Postgres is away."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import psycopg
import structlog
from psycopg.rows import TupleRow

from adapters.postgres_connection import connect_timeout, ms, session_options
from coordinator.errors import SourceError

# Reconnect backoff while Postgres is unreachable.
RECONNECT_BACKOFF_MIN_S = 0.2
RECONNECT_BACKOFF_MAX_S = 5.0
# Sleeps are cut in slices this long so that stop() is noticed promptly.
SLEEP_SLICE_S = 0.1

# Values become text the same way on both paths: the snapshot reads every column as the text of
# its output function in a session with these settings, and pgoutput (SQL interface) formats
# values with the same functions in that same kind of session.
_SESSION_SETTINGS = {"TimeZone": "UTC", "DateStyle": "ISO,YMD", "IntervalStyle": "iso_8601"}

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Connector:
    """Opens the source's sessions to ``dsn``; every statement is bounded by ``statement_timeout_s``."""

    # Never in a repr: the DSN may carry a password.
    dsn: str = field(repr=False)
    connect_timeout_s: float
    statement_timeout_s: float

    def __call__(
        self, *, autocommit: bool = True, replication: bool = False, idle_timeout_s: float = 0.0
    ) -> psycopg.Connection[TupleRow]:
        settings: dict[str, object] = {**_SESSION_SETTINGS, "statement_timeout": ms(self.statement_timeout_s)}
        if idle_timeout_s:
            settings["idle_in_transaction_session_timeout"] = ms(idle_timeout_s)
        extra: dict[str, Any] = {"replication": "database"} if replication else {}
        return psycopg.connect(
            self.dsn,
            autocommit=autocommit,
            connect_timeout=connect_timeout(self.connect_timeout_s),
            options=session_options(self.dsn, settings),
            client_encoding="UTF8",
            **extra,
        )


@dataclass
class Outage:
    """Backoff while Postgres is unreachable; gives up after ``max_s`` of continuous failure."""

    max_s: float
    since: float | None = None
    backoff_s: float = RECONNECT_BACKOFF_MIN_S

    def wait(self, exc: psycopg.Error, stop: Callable[[], bool]) -> None:
        now = time.monotonic()
        self.since = now if self.since is None else self.since
        if now - self.since > self.max_s:
            raise SourceError(f"Postgres unreachable for {self.max_s:.0f} s: {exc}") from exc
        log.warning("postgres source unavailable", error=str(exc), retry_in_s=self.backoff_s)
        sleep(self.backoff_s, stop)
        self.backoff_s = min(2 * self.backoff_s, RECONNECT_BACKOFF_MAX_S)

    def reset(self) -> None:
        self.since, self.backoff_s = None, RECONNECT_BACKOFF_MIN_S


def sleep(seconds: float, stop: Callable[[], bool]) -> None:
    """Sleep ``seconds``, or less if ``stop()`` becomes true."""
    deadline = time.monotonic() + seconds
    while not stop() and (left := deadline - time.monotonic()) > 0:
        time.sleep(min(SLEEP_SLICE_S, left))


def close(conn: psycopg.Connection[TupleRow] | None) -> None:
    """Close ``conn`` if there is one, whatever state it is in."""
    if conn is not None:
        with suppress(psycopg.Error):
            conn.close()
