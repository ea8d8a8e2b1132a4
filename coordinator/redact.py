"""Redaction of secrets from text that came from outside: store and embedder error bodies,
exception messages, dead-letter reasons.

Two kinds of secret are removed: the values configured as secrets (tokens, passwords, API
keys, DSNs; registered once per process by the composition root) and anything that *looks*
like a credential whatever its origin (an ``Authorization`` header echoed in a 401 body, a
``user:pass@`` URL, ``api_key=...``). Every path from such text to a log line, a dead letter,
the ledger or the terminal goes through ``redact``.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable

REDACTED = "[redacted]"
# Shorter configured secrets are not searched for: redacting every "a" would hide the message
# without protecting anything (such secrets are refused as too weak where lockstep checks).
SECRET_CHARS_MIN = 4

# Values that follow a credential-ish key: `Authorization: Bearer x`, `"api_key": "x"`,
# `password=x`, `X-Api-Key: x`.
_KEYED = re.compile(
    r"""(?ix)
    (?P<key>["']?\b(?:authorization|proxy-authorization|x-api-key|api[-_ ]?key|apikey|access[-_]?token
        |refresh[-_]?token|auth[-_]?token|token|secret|client[-_]?secret|password|passwd|pwd)\b["']?
        \s*[:=]\s*["']?)
    (?:(?P<scheme>bearer|basic|token|apikey|api-key)\s+)?
    (?P<value>[^\s"',;&}{\]\[)]+)
    """
)
# A scheme and value on their own: `Bearer abc.def`, `Basic dXNlcjpwYXNz`.
_SCHEMED = re.compile(r"(?i)\b(?P<scheme>bearer|basic)\s+(?P<value>[A-Za-z0-9._~+/=-]{6,})")
# Credentials inside a URL: `scheme://user:password@host` or `scheme://token@host`.
_URL_USERINFO = re.compile(r"(?i)(?P<scheme>\b[a-z][a-z0-9+.-]*://)(?P<userinfo>[^/\s@]+)@")
# Well-known key shapes: OpenAI-style `sk-...`.
_KEY_SHAPES = re.compile(r"\bsk-[A-Za-z0-9_-]{16,}")


class Redactor:
    """Removes registered secrets and credential patterns from text; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._secrets: tuple[str, ...] = ()

    def register(self, secrets: Iterable[str | None]) -> None:
        """Add configured secret values (None and short values are ignored)."""
        with self._lock:
            known = set(self._secrets)
            known.update(s for s in secrets if s is not None and len(s) >= SECRET_CHARS_MIN)
            # Longest first, so that a secret containing another is removed whole.
            self._secrets = tuple(sorted(known, key=len, reverse=True))

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
        text = _KEYED.sub(_keep_key, text)
        text = _SCHEMED.sub(lambda m: f"{m['scheme']} {REDACTED}", text)
        return _KEY_SHAPES.sub(REDACTED, text)


def _keep_key(match: re.Match[str]) -> str:
    scheme = f"{match['scheme']} " if match["scheme"] else ""
    if match["value"] == REDACTED:
        return match.group(0)
    return f"{match['key']}{scheme}{REDACTED}"


# The process's redactor: the composition root registers the configured secrets in it.
REDACTOR = Redactor()


def redact(text: str) -> str:
    """``text`` without the process's registered secrets and without credential patterns."""
    return REDACTOR(text)


def register_secrets(secrets: Iterable[str | None]) -> None:
    """Register configured secret values with the process's redactor."""
    REDACTOR.register(secrets)


def has_userinfo(url: str) -> bool:
    """Whether a URL carries ``user[:password]@`` (settings refuse such URLs)."""
    return _URL_USERINFO.search(url) is not None
