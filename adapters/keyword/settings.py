"""Connection settings of the keyword-index adapters.

One frozen model serves all three kinds; the composition root nests it in lockstep's settings and
builds the adapter it names. Secrets are ``SecretStr``: they print as ``**********`` in ``repr``,
``str`` and logs, and are unwrapped only where a client is constructed.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

# Bounds every request to the search engine; a client's default (10 s, or none) is never inherited.
REQUEST_TIMEOUT_S = 30.0

KeywordKind = Literal["tantivy", "opensearch", "elasticsearch"]


class KeywordSettings(BaseModel):
    """Where the keyword index lives and how to reach it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # The embedded default, as for every section: ``keyword: {path: X}`` is Tantivy at X.
    kind: KeywordKind = "tantivy"
    index: str = Field(default="lockstep-chunks", min_length=1)
    # Tantivy: the directory that holds the index.
    path: str | None = None
    # What readers query: an alias lockstep points at the active generation's index (for
    # Tantivy, a pointer file). Default: ``<index>-live`` (Tantivy: ``<path>.live``).
    alias: str | None = None
    # OpenSearch / Elasticsearch: base URL without credentials (they go in the fields below).
    url: str | None = None
    username: str | None = None
    password: SecretStr | None = None
    # The encoded API key, sent as ``Authorization: ApiKey <api_key>``.
    api_key: SecretStr | None = None
    ca_certs: str | None = None
    verify_certs: bool = True
    request_timeout_s: float = Field(default=REQUEST_TIMEOUT_S, gt=0)

    @property
    def is_embedded(self) -> bool:
        """True when the index is a Tantivy directory written inside this process: it has one
        writer, which takes one call at a time; a server (OpenSearch, Elasticsearch) takes
        concurrent requests from any number of processes."""
        return self.kind == "tantivy"

    @property
    def live_alias(self) -> str:
        """What readers query: ``alias``, by default ``<index>-live`` (Tantivy: the alias file
        ``<path>.live`` beside the index directories)."""
        if self.alias:
            return self.alias
        if self.kind == "tantivy":
            return f"{self._directory()}.live"
        return f"{self.index}-live"

    @property
    def physical_base(self) -> str:
        """What the physical names of generations derive from: the index name (Tantivy: the
        index directory)."""
        return self._directory() if self.kind == "tantivy" else self.index

    def for_physical(self, name: str) -> KeywordSettings:
        """These settings addressing the physical index ``name`` (Tantivy: a directory)."""
        return self.model_copy(update={"path" if self.kind == "tantivy" else "index": name})

    def _directory(self) -> str:
        assert self.path is not None, "validated: a tantivy keyword index has a path"
        return self.path.rstrip("/")

    @model_validator(mode="after")
    def _check_kind_fields(self) -> KeywordSettings:
        if self.kind == "tantivy":
            if self.url:
                raise ValueError("`url` names a server: set `kind` to opensearch or elasticsearch")
            if not self.path:
                raise ValueError("a tantivy keyword index needs `path`")
            return self
        if not self.url:
            raise ValueError(f"an {self.kind} keyword index needs `url`")
        _check_url(self.url)
        _check_auth(self)
        return self


def _check_url(url: str) -> None:
    """Credentials in a URL end up in client logs and tracebacks, so they are refused here."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("`url` must be an http(s) URL with a host")
    if parts.username or parts.password:
        raise ValueError("put credentials in username/password or api_key, not in `url`")


def _check_auth(settings: KeywordSettings) -> None:
    """The clients accept exactly one way to authenticate; say which one is wrong up front."""
    if (settings.username is None) != (settings.password is None):
        raise ValueError("basic auth needs both `username` and `password`")
    if settings.username is not None and settings.api_key is not None:
        raise ValueError("set either basic auth or `api_key`, not both")
