"""Settings of the embedders: which one to build and how to reach or load it.

The API key is a ``SecretStr``: it prints as ``**********`` in ``repr``, ``str`` and logs, and is
unwrapped only where a request is sent. This module imports no HTTP client and no model library,
so lockstep's settings can nest it without the ``local-model`` extra installed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from coordinator.redact import has_userinfo


class EmbedderSettings(BaseModel):
    """``auto`` uses the local model when its extra is installed, else the hashing embedder."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["auto", "hashing", "sentence-transformers", "openai"] = "auto"
    dim: int = Field(default=384, gt=0)
    model_path: str | None = None
    # Without credentials: the key goes in ``api_key`` (a secret, never stored or printed).
    base_url: str | None = None
    model: str | None = None
    api_key: SecretStr | None = None
    timeout_s: float = Field(default=30.0, gt=0)
    batch_size: int = Field(default=64, gt=0)

    @field_validator("base_url")
    @classmethod
    def _no_credentials(cls, url: str | None) -> str | None:
        if url is not None and has_userinfo(url):
            raise ValueError("put the key in api_key, not in base_url (URLs with credentials are refused)")
        return url
