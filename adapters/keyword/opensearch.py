"""The keyword index on OpenSearch (or any OpenSearch-API server), through opensearch-py.

Only the wire lives here: client construction, the OpenSearch point-in-time endpoints and the
translation of opensearch-py's exceptions. The behaviour is in ``_search_engine``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from opensearchpy import OpenSearch
from opensearchpy.exceptions import ConnectionError as OpenSearchConnectionError
from opensearchpy.exceptions import OpenSearchException, SSLError, TransportError

from adapters.keyword._search_engine import SearchEngineIndex, WireError, api_wire_error
from adapters.keyword.settings import KeywordSettings


class OpenSearchKeywordIndex(SearchEngineIndex):
    """A KeywordIndex over one OpenSearch index (external versioning, explicit mapping)."""

    store = "opensearch"
    scan_sort = ({"_id": "asc"},)

    def __init__(self, settings: KeywordSettings, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        self._client = _client(settings)

    def _wire_exists(self, name: str) -> bool:
        with _wire():
            return bool(self._client.indices.exists(index=name, request_timeout=self.timeout_s))

    def _wire_get_alias(self, alias: str) -> Mapping[str, Any]:
        with _wire():
            return dict(self._client.indices.get_alias(name=alias, request_timeout=self.timeout_s))

    def _wire_update_aliases(self, actions: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
        with _wire():
            return dict(
                self._client.indices.update_aliases(
                    body={"actions": list(actions)}, request_timeout=self.timeout_s
                )
            )

    def _wire_create(self, mappings: Mapping[str, Any]) -> None:
        with _wire():
            self._client.indices.create(
                index=self.name, body={"mappings": mappings}, request_timeout=self.timeout_s
            )

    def _wire_delete_index(self) -> None:
        with _wire():
            self._client.indices.delete(index=self.name, request_timeout=self.timeout_s)

    def _wire_bulk(self, lines: Sequence[str]) -> Mapping[str, Any]:
        with _wire():
            return dict(self._client.bulk(body=list(lines), request_timeout=self.timeout_s))

    def _wire_mget(self, ids: Sequence[str]) -> Mapping[str, Any]:
        with _wire():
            return dict(
                self._client.mget(index=self.name, body={"ids": list(ids)}, request_timeout=self.timeout_s)
            )

    def _wire_refresh(self) -> None:
        with _wire():
            self._client.indices.refresh(index=self.name, request_timeout=self.timeout_s)

    def _wire_count(self) -> int:
        with _wire():
            return int(self._client.count(index=self.name, request_timeout=self.timeout_s)["count"])

    def _wire_search(
        self, body: Mapping[str, Any], *, scroll: str | None = None, timeout_s: float | None = None
    ) -> Mapping[str, Any]:
        extra = {"scroll": scroll} if scroll else {}
        timeout = self.timeout_s if timeout_s is None else timeout_s
        with _wire():
            return dict(self._client.search(index=self.name, body=dict(body), request_timeout=timeout, **extra))

    def _wire_pit_search(self, body: Mapping[str, Any]) -> Mapping[str, Any]:
        with _wire():
            return dict(self._client.search(body=dict(body), request_timeout=self.timeout_s))

    def _wire_open_pit(self, keep_alive: str) -> str:
        with _wire():
            response = self._client.create_pit(
                index=self.name, keep_alive=keep_alive, request_timeout=self.timeout_s
            )
            return str(response["pit_id"])

    def _wire_close_pit(self, pit_id: str) -> None:
        with _wire():
            self._client.delete_pit(body={"pit_id": [pit_id]}, request_timeout=self.timeout_s)

    def _wire_scroll(self, scroll_id: str, keep_alive: str) -> Mapping[str, Any]:
        with _wire():
            return dict(
                self._client.scroll(
                    body={"scroll_id": scroll_id, "scroll": keep_alive}, request_timeout=self.timeout_s
                )
            )

    def _wire_clear_scroll(self, scroll_id: str) -> None:
        with _wire():
            self._client.clear_scroll(body={"scroll_id": [scroll_id]}, request_timeout=self.timeout_s)

    def close(self) -> None:
        self._client.close()


def _client(settings: KeywordSettings) -> OpenSearch:
    """Build the client; retries are lockstep's (bounded, with backoff), so the client's are off."""
    assert settings.url is not None, "validated by KeywordSettings"
    auth: dict[str, Any] = {}
    if settings.username is not None and settings.password is not None:
        auth["http_auth"] = (settings.username, settings.password.get_secret_value())
    if settings.api_key is not None:
        auth["headers"] = {"authorization": f"ApiKey {settings.api_key.get_secret_value()}"}
    return OpenSearch(
        hosts=[settings.url],
        use_ssl=settings.url.startswith("https:"),
        verify_certs=settings.verify_certs,
        ca_certs=settings.ca_certs,
        timeout=settings.request_timeout_s,
        max_retries=0,
        retry_on_timeout=False,
        **auth,
    )


@contextmanager
def _wire() -> Iterator[None]:
    """Translate opensearch-py's exceptions into WireError at the one call inside."""
    try:
        yield
    except WireError:
        raise
    except SSLError as exc:
        # A certificate problem does not heal by retrying.
        raise WireError(f"TLS failure: {exc.info}", status=None, transient=False) from exc
    except OpenSearchConnectionError as exc:
        raise WireError(f"connection failure: {exc.info}", status=None, transient=True) from exc
    except TransportError as exc:
        raise _status_error(exc) from exc
    except OpenSearchException as exc:
        raise WireError(f"client failure: {exc}", status=None, transient=False) from exc


def _status_error(exc: TransportError) -> WireError:
    status = exc.status_code
    if not isinstance(status, int):
        return WireError(f"transport failure: {exc.error}", status=None, transient=True)
    return api_wire_error(status, exc.info, str(exc.error))
