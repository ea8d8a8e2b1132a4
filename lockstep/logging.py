"""structlog configuration: JSON lines on stderr, with secrets scrubbed as a last line of defence."""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from coordinator.redact import redact

# Values that look like credentials are masked even if some code path forgets to wrap them.
_SECRET_KEYS = re.compile(r"pass(word)?|secret|token|api[_-]?key|authorization|dsn", re.IGNORECASE)


def _scrub(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event):
        if _SECRET_KEYS.search(key):
            event[key] = "**********"
        elif isinstance(event[key], str):
            event[key] = redact(event[key])
    return event


class _Redacting(logging.Filter):
    """Redacts stdlib log records (third-party clients quote requests and responses)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        return True


# Third-party loggers that report expected conditions as warnings or tracebacks:
# - milvus-lite's in-process gRPC server does not implement AllocTimestamp, so every
#   query_iterator makes grpc log a NotImplementedError traceback and pymilvus warn that it
#   falls back to a client-side timestamp (harmless: our scans are cross-checked by count).
_QUIET_LOGGERS = {"grpc._server": logging.CRITICAL, "pymilvus.orm.iterator": logging.ERROR}

# Third-party records that are debug detail to lockstep, whatever level they carry (logger →
# message prefixes; none: every record of that logger). The store clients log every failed call
# (pymilvus at ERROR, the search clients at WARNING, each with a traceback) before raising, and
# the adapter turns that exception into lockstep's own error, which the command reports in one
# line. Ray announces its token authentication and its local instance on every start. Filters
# rather than levels, because Ray's logging set-up resets the levels of the loggers under ``ray``
# when it is imported (after this runs), but keeps their filters.
_DEBUG_ONLY: dict[str, tuple[str, ...]] = {
    "pymilvus.decorators": (),
    "opensearch": (),
    "elastic_transport.transport": (),
    "elastic_transport.node_pool": (),
    "elastic_transport.node": (),
    "ray._private.authentication.authentication_token_setup": (),
    "ray._private.worker": (
        "Started a local Ray instance",
        "Connecting to existing Ray cluster",
        "Connected to Ray cluster",
    ),
}


class _DebugOnly(logging.Filter):
    """Re-levels the records it covers to DEBUG; they pass only when debug logs are on."""

    def __init__(self, threshold: int, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.threshold = threshold
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        if self.prefixes and not record.getMessage().startswith(self.prefixes):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return self.threshold <= logging.DEBUG


def configure_logging(level: str = "info") -> None:
    """Route stdlib and structlog logs as JSON to stderr at ``level``."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    logging.basicConfig(stream=sys.stderr, level=numeric, format="%(message)s", force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_Redacting())
    for name, quiet_level in _QUIET_LOGGERS.items():
        _quiet_below(logging.getLogger(name), max(quiet_level, numeric))
    for name, prefixes in _DEBUG_ONLY.items():
        _only_at_debug(logging.getLogger(name), numeric, prefixes)
    # Model downloads and weight loading draw tqdm bars on stderr (transformers reads this when
    # it is imported, which is later: the local model is loaded lazily).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _scrub,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


class _AtLeast(logging.Filter):
    """Drops the records below ``level``. A filter rather than a level: pymilvus configures its
    loggers with ``dictConfig`` when it is first imported, which may be after this runs (the CLI
    imports it lazily), and that resets the levels of the loggers under ``pymilvus`` but keeps
    their filters."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


def _quiet_below(logger: logging.Logger, level: int) -> None:
    logger.setLevel(level)
    _replace_filter(logger, _AtLeast(level))


def _replace_filter(logger: logging.Logger, new: logging.Filter) -> None:
    """Install ``new``, replacing the logger's filter of the same type (configure_logging may run
    again)."""
    for old in [f for f in logger.filters if type(f) is type(new)]:
        logger.removeFilter(old)
    logger.addFilter(new)


def _only_at_debug(logger: logging.Logger, threshold: int, prefixes: tuple[str, ...]) -> None:
    _replace_filter(logger, _DebugOnly(threshold, prefixes))
