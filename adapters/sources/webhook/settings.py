"""Settings of the webhook source: its token, its request limits, its inbox's retention.

The limits' defaults and the token's minimum length stay with the modules that enforce them
(``body.py``, ``intake.py``, ``source.py``); this module reads them from there, and ``source.py``
names these settings for annotations only, so no import cycle forms.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from adapters.sources.webhook.body import BODY_BYTES_MAX
from adapters.sources.webhook.intake import BACKLOG_EVENTS_MAX, BATCH_EVENTS_MAX, TOKEN_CHARS_MIN
from adapters.sources.webhook.source import RETENTION_S
from coordinator.errors import ConfigError

TOKEN_REQUIRED = (
    "source.token is required to serve POST /events: set LOCKSTEP_SOURCE__TOKEN "
    f"(at least {TOKEN_CHARS_MIN} characters)"
)


class WebhookSourceSettings(BaseModel):
    """``POST /events`` on ``run.http_host:run.http_port`` (``adapters/sources/webhook/``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["webhook"] = "webhook"
    name: str = "webhook"
    # Clients send ``Authorization: Bearer <token>``; set it from a secret
    # (``LOCKSTEP_SOURCE__TOKEN``). Checked for length here without echoing it. Only
    # ``lockstep run`` serves ``POST /events``, so only it needs one (``token`` below).
    token_value: SecretStr | None = Field(default=None, alias="token")
    body_bytes_max: int = Field(default=BODY_BYTES_MAX, ge=1024, le=256 * 1024 * 1024)
    batch_events_max: int = Field(default=BATCH_EVENTS_MAX, ge=1, le=100_000)
    backlog_events_max: int = Field(default=BACKLOG_EVENTS_MAX, ge=1)
    retention_s: float = Field(default=RETENTION_S, ge=0)
    # SQLite ledger only: the inbox file (default: beside the ledger, ``<ledger>.webhook-inbox.db``).
    # With the Postgres ledger the inbox is a table in the ledger's schema.
    inbox_path: str | None = None

    @field_validator("token_value")
    @classmethod
    def _long_enough(cls, token: SecretStr | None) -> SecretStr | None:
        if token is not None and len(token.get_secret_value()) < TOKEN_CHARS_MIN:
            raise ValueError(f"the webhook token must have at least {TOKEN_CHARS_MIN} characters")
        return token

    @property
    def token(self) -> SecretStr:
        """The bearer token ``POST /events`` checks; ConfigError when the config has none."""
        if self.token_value is None:
            raise ConfigError(TOKEN_REQUIRED)
        return self.token_value
