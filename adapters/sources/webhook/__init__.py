"""Change events POSTed to ``/events``: request bodies, a durable inbox, the intake that fills it,
and the source that reads it.

- ``body.py``: a request body split into items (valid events and bad items with their reasons);
- ``inbox.py``: what an inbox is (durability, idempotency, bad rows, seq order) and how a
  request's items become rows; ``inbox_sqlite.py`` and ``inbox_postgres.py`` store them;
- ``intake.py``: one request into the inbox, answered only once it is committed;
- ``source.py``: the inbox as a ChangeSource, with its checkpoint and retention;
- ``settings.py``: what the source is configured with (its token and limits).

The names below are loaded from those modules on first use (as ``lockstep/__init__.py`` does):
the modules import one another, so this package imports none of them while it is imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adapters.sources.webhook.body import BODY_BYTES_MAX, MEDIA_TYPES, BodyError, Item, parse_body
    from adapters.sources.webhook.inbox import AppendResult, Inbox, InboxFull, InboxRow, Rejection
    from adapters.sources.webhook.inbox_postgres import PostgresInbox
    from adapters.sources.webhook.inbox_sqlite import SqliteInbox, inbox_beside
    from adapters.sources.webhook.intake import (
        BACKLOG_EVENTS_MAX,
        BATCH_EVENTS_MAX,
        TOKEN_CHARS_MIN,
        WebhookIntake,
    )
    from adapters.sources.webhook.settings import WebhookSourceSettings
    from adapters.sources.webhook.source import RETENTION_S, WebhookSource

_EXPORTS = {
    "BODY_BYTES_MAX": "adapters.sources.webhook.body",
    "MEDIA_TYPES": "adapters.sources.webhook.body",
    "BodyError": "adapters.sources.webhook.body",
    "Item": "adapters.sources.webhook.body",
    "parse_body": "adapters.sources.webhook.body",
    "AppendResult": "adapters.sources.webhook.inbox",
    "Inbox": "adapters.sources.webhook.inbox",
    "InboxFull": "adapters.sources.webhook.inbox",
    "InboxRow": "adapters.sources.webhook.inbox",
    "Rejection": "adapters.sources.webhook.inbox",
    "PostgresInbox": "adapters.sources.webhook.inbox_postgres",
    "SqliteInbox": "adapters.sources.webhook.inbox_sqlite",
    "inbox_beside": "adapters.sources.webhook.inbox_sqlite",
    "BACKLOG_EVENTS_MAX": "adapters.sources.webhook.intake",
    "BATCH_EVENTS_MAX": "adapters.sources.webhook.intake",
    "TOKEN_CHARS_MIN": "adapters.sources.webhook.intake",
    "WebhookIntake": "adapters.sources.webhook.intake",
    "RETENTION_S": "adapters.sources.webhook.source",
    "WebhookSource": "adapters.sources.webhook.source",
    "WebhookSourceSettings": "adapters.sources.webhook.settings",
}

__all__ = [
    "BACKLOG_EVENTS_MAX",
    "BATCH_EVENTS_MAX",
    "BODY_BYTES_MAX",
    "MEDIA_TYPES",
    "RETENTION_S",
    "TOKEN_CHARS_MIN",
    "AppendResult",
    "BodyError",
    "Inbox",
    "InboxFull",
    "InboxRow",
    "Item",
    "PostgresInbox",
    "Rejection",
    "SqliteInbox",
    "WebhookIntake",
    "WebhookSource",
    "WebhookSourceSettings",
    "inbox_beside",
    "parse_body",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'adapters.sources.webhook' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
