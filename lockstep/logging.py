"""structlog configuration: JSON lines on stderr, with secrets scrubbed as a last line of defence."""

from __future__ import annotations

import logging
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


def configure_logging(level: str = "info") -> None:
    """Route stdlib and structlog logs as JSON to stderr at ``level``."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    logging.basicConfig(stream=sys.stderr, level=numeric, format="%(message)s", force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_Redacting())
    for name, quiet_level in _QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(max(quiet_level, numeric))
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
