"""Connection settings of the Milvus vector-index adapter.

One frozen model serves the three forms of Milvus lockstep runs against: a milvus-lite file
(``uri`` is a local path ending in ``.db``), a ``milvus-lite server`` and a real Milvus server
(``uri`` is ``http://host:port`` or ``https://host:port``). Secrets are ``SecretStr``: they print as
``**********`` in ``repr``, ``str`` and logs, and are unwrapped only where the client is built.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

# Bounds every request to Milvus. pymilvus defaults to no timeout (and then retries up to 75
# times), so an unreachable or stalled server would hang the pipeline; this is never inherited.
REQUEST_TIMEOUT_S = 30.0

# How long opening the gRPC channel may take before the server counts as unreachable.
CONNECT_TIMEOUT_S = 10.0

DEFAULT_COLLECTION = "lockstep_chunks"


class VectorSettings(BaseModel):
    """Where the vector index lives and how to reach it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["milvus"] = "milvus"
    # A milvus-lite file (``./data/milvus.db``) or a server URL without credentials.
    uri: str = Field(min_length=1)
    collection: str = Field(default=DEFAULT_COLLECTION, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
    # What readers query: a Milvus alias lockstep points at the active generation's
    # collection. Default: ``<collection>_live``.
    alias: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
    db_name: str = ""
    # Either a token (``user:password`` or an API key) or user + password, never both.
    token: SecretStr | None = None
    user: str | None = None
    password: SecretStr | None = None
    # TLS: ``secure`` turns it on (``https://`` URIs imply it); the CA / server certificate that
    # signs the server's certificate, and the name it was issued for when it differs from the host.
    secure: bool = False
    server_pem_path: str | None = None
    server_name: str | None = None
    request_timeout_s: float = Field(default=REQUEST_TIMEOUT_S, gt=0)
    connect_timeout_s: float = Field(default=CONNECT_TIMEOUT_S, gt=0)

    @property
    def is_embedded(self) -> bool:
        """True when the uri names a milvus-lite file served inside this process."""
        return self.uri.endswith(".db")

    @model_validator(mode="after")
    def _check(self) -> VectorSettings:
        if not self.is_embedded:
            _check_url(self.uri)
        if (self.user is None) != (self.password is None):
            raise ValueError("user/password auth needs both `user` and `password`")
        if self.user is not None and self.token is not None:
            raise ValueError("set either `token` or `user`/`password`, not both")
        if self.server_pem_path is not None and not self.uses_tls:
            raise ValueError("`server_pem_path` needs `secure: true` or an https:// uri")
        return self

    @property
    def uses_tls(self) -> bool:
        return self.secure or self.uri.startswith("https:")


def _check_url(uri: str) -> None:
    """Credentials in a URI end up in client logs and tracebacks, so they are refused here."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https", "tcp") or not parts.hostname:
        raise ValueError("`uri` must be a path ending in .db or an http(s) URL with a host")
    if parts.username or parts.password:
        raise ValueError("put credentials in token or user/password, not in `uri`")
