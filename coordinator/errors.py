"""lockstep's own error hierarchy.

Adapters convert every backend error at their boundary into one of these and raise it
``from`` the original, so the domain never sees a store client's exception type::

    LockstepError
    ├── InvalidEvent            bad input: goes to the dead-letter queue, never retried
    ├── ConfigError             settings that cannot work; raised at start-up
    ├── StoreError              a keyword index, vector index or ledger failed
    │   ├── TransientStoreError     retriable: timeouts, 429, 5xx, connection resets
    │   └── PermanentStoreError     not retriable: mapping conflicts, auth, rejected docs
    │       └── RefusedContent          the request's content was refused (some document in it
    │                                   cannot be stored); without that document it would pass
    ├── EmbedError              the embedding model failed
    │   ├── TransientEmbedError     retriable: timeouts, 429, 5xx
    │   ├── PermanentEmbedError     not retriable: wrong dimension, rejected input
    │   └── EmbedServiceError       not retriable, and not the input's fault: the service refuses
    │                               every request (401, 403, 404: credentials, URL, model name)
    ├── SourceError             a change source cannot be read
    ├── FencedError             this process no longer owns the shard it writes for
    └── SearchError             a search that cannot be answered as asked
        ├── InvalidSearch           the request itself is wrong (a bad mode, k, filter, token)
        ├── SearchUnavailable       the index the request needs cannot be searched now
        └── ConsistencyTimeout      the changes a consistency token covers are not all
                                    committed and visible within the wait; lists them
"""

from __future__ import annotations


class LockstepError(Exception):
    """Root of every error lockstep raises on purpose."""

    retriable: bool = False


class InvalidEvent(LockstepError):
    """A change event that cannot be applied as given; ``reason`` says why in one line."""

    def __init__(self, reason: str, *, doc_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.doc_id = doc_id


class ConfigError(LockstepError):
    """Settings that cannot work together."""


class StoreError(LockstepError):
    """A store (index or ledger) failed; ``retriable`` says whether trying again can help."""

    def __init__(self, message: str, *, store: str = "", retriable: bool = False) -> None:
        super().__init__(message)
        self.store = store
        self.retriable = retriable


class TransientStoreError(StoreError):
    """A store failure that may succeed when retried."""

    def __init__(self, message: str, *, store: str = "") -> None:
        super().__init__(message, store=store, retriable=True)


class IntentConflict(TransientStoreError):
    """Another writer of the same ledger holds a prepared intent for the document, or committed
    a version at or above the one being prepared (a rebuild's backfill and the live service both
    write a new generation). Retrying re-plans against what that writer left."""


class PermanentStoreError(StoreError):
    """A store failure that will fail again the same way."""

    def __init__(self, message: str, *, store: str = "") -> None:
        super().__init__(message, store=store, retriable=False)


class RefusedContent(PermanentStoreError):
    """A store refused a whole write request because of what one of its documents holds (a
    value it cannot store), as opposed to refusing the writer (auth) or being unreachable. The
    apply engine splits such a request until the document is found, then dead-letters it."""


class EmbedError(LockstepError):
    """The embedder failed."""

    def __init__(self, message: str, *, retriable: bool = False) -> None:
        super().__init__(message)
        self.retriable = retriable


class TransientEmbedError(EmbedError):
    """An embedder failure that may succeed when retried."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retriable=True)


class PermanentEmbedError(EmbedError):
    """An embedder failure that will fail again the same way."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retriable=False)


class EmbedServiceError(EmbedError):
    """The embedding service refuses every request (bad credentials, URL or model name): no
    document is at fault, so none is dead-lettered; the operator must fix the configuration."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retriable=False)


class SourceError(LockstepError):
    """A change source cannot be read."""


class FencedError(LockstepError):
    """A write carried an ownership epoch that is no longer current: another owner took over."""


class SearchError(LockstepError):
    """A search that cannot be answered as asked."""


class InvalidSearch(SearchError):
    """The search request itself is wrong; asking again the same way fails the same way."""


class SearchUnavailable(SearchError):
    """An index the request needs could not be searched (down, too slow): worth retrying."""

    retriable = True


class ConsistencyTimeout(SearchError):
    """The changes a consistency token covers were not all committed and visible in time.

    ``pending`` lists each change still waited for, as ``(doc_id, version, why)``; no answer is
    given, so that a partial one is never taken for a complete one."""

    retriable = True

    def __init__(self, message: str, *, pending: tuple[tuple[str, int, str], ...]) -> None:
        super().__init__(message)
        self.pending = pending
