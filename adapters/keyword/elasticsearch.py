"""The keyword index on Elasticsearch, through elasticsearch-py 9.

Only the wire lives here: client construction, the Elasticsearch point-in-time endpoints and the
translation of elasticsearch-py / elastic-transport exceptions. The behaviour is in
``_search_engine``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from elastic_transport import ConnectionError as TransportConnectionError
from elastic_transport import ConnectionTimeout, ObjectApiResponse, TlsError
from elastic_transport import TransportError as ElasticTransportError
from elasticsearch import ApiError, Elasticsearch

from adapters.keyword._search_engine import SearchEngineIndex, WireError, api_wire_error
from adapters.keyword.settings import KeywordSettings


class ElasticsearchKeywordIndex(SearchEngineIndex):
    """A KeywordIndex over one Elasticsearch index (external versioning, explicit mapping)."""

    store = "elasticsearch"
    scan_sort = ("_shard_doc",)

    def __init__(self, settings: KeywordSettings, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        self._base_client = _client(settings)
        # Every call carries the timeout explicitly rather than relying on the client default.
        self._client = self._base_client.options(request_timeout=self.timeout_s)

    def _wire_exists(self, name: str) -> bool:
        with _wire():
            return bool(self._client.indices.exists(index=name))

    def _wire_get_alias(self, alias: str) -> Mapping[str, Any]:
        with _wire():
            return _body(self._client.indices.get_alias(name=alias))

    def _wire_update_aliases(self, actions: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
        with _wire():
            return _body(self._client.indices.update_aliases(actions=list(actions)))

    def _wire_create(self, mappings: Mapping[str, Any]) -> None:
        with _wire():
            self._client.indices.create(index=self.name, mappings=dict(mappings))

    def _wire_delete_index(self) -> None:
        with _wire():
            self._client.indices.delete(index=self.name)

    def _wire_bulk(self, lines: Sequence[str]) -> Mapping[str, Any]:
        with _wire():
            # Pre-serialized lines go through the NDJSON serializer unchanged.
            return _body(self._client.bulk(operations=list(lines)))  # type: ignore[arg-type]  # elasticsearch-py types operations as mappings; str lines are sent as they are

    def _wire_mget(self, ids: Sequence[str]) -> Mapping[str, Any]:
        with _wire():
            return _body(self._client.mget(index=self.name, ids=list(ids)))

    def _wire_refresh(self) -> None:
        with _wire():
            self._client.indices.refresh(index=self.name)

    def _wire_count(self) -> int:
        with _wire():
            return int(self._client.count(index=self.name)["count"])

    def _wire_search(
        self, body: Mapping[str, Any], *, scroll: str | None = None, timeout_s: float | None = None
    ) -> Mapping[str, Any]:
        client = self._client if timeout_s is None else self._base_client.options(request_timeout=timeout_s)
        with _wire():
            return _body(client.search(index=self.name, body=dict(body), scroll=scroll))

    def _wire_pit_search(self, body: Mapping[str, Any]) -> Mapping[str, Any]:
        with _wire():
            return _body(self._client.search(body=dict(body)))

    def _wire_open_pit(self, keep_alive: str) -> str:
        with _wire():
            return str(self._client.open_point_in_time(index=self.name, keep_alive=keep_alive)["id"])

    def _wire_close_pit(self, pit_id: str) -> None:
        with _wire():
            self._client.close_point_in_time(id=pit_id)

    def _wire_scroll(self, scroll_id: str, keep_alive: str) -> Mapping[str, Any]:
        with _wire():
            return _body(self._client.scroll(scroll_id=scroll_id, scroll=keep_alive))

    def _wire_clear_scroll(self, scroll_id: str) -> None:
        with _wire():
            self._client.clear_scroll(scroll_id=scroll_id)

    def close(self) -> None:
        self._base_client.close()


def _client(settings: KeywordSettings) -> Elasticsearch:
    """Build the client; retries are lockstep's (bounded, with backoff), so the client's are off."""
    assert settings.url is not None, "validated by KeywordSettings"
    options: dict[str, Any] = {"ca_certs": settings.ca_certs} if settings.ca_certs else {}
    if settings.username is not None and settings.password is not None:
        options["basic_auth"] = (settings.username, settings.password.get_secret_value())
    if settings.api_key is not None:
        options["api_key"] = settings.api_key.get_secret_value()
    return Elasticsearch(
        hosts=[settings.url],
        verify_certs=settings.verify_certs,
        request_timeout=settings.request_timeout_s,
        max_retries=0,
        retry_on_timeout=False,
        **options,
    )


def _body(response: ObjectApiResponse[Any]) -> dict[str, Any]:
    return dict(response.body)


@contextmanager
def _wire() -> Iterator[None]:
    """Translate elasticsearch-py's exceptions into WireError at the one call inside."""
    try:
        yield
    except WireError:
        raise
    except ApiError as exc:
        # Without a body (a HEAD answer, a proxy's 401) the client's message is the text "None".
        raise api_wire_error(exc.meta.status, exc.body, str(exc.message) if exc.body else "") from exc
    except TlsError as exc:
        # A certificate problem does not heal by retrying.
        raise WireError(f"TLS failure: {exc.message}", status=None, transient=False) from exc
    except (TransportConnectionError, ConnectionTimeout) as exc:
        raise WireError(f"connection failure: {exc.message}", status=None, transient=True) from exc
    except ElasticTransportError as exc:
        # Serialization errors and the like: the same request would fail the same way.
        raise WireError(f"client failure: {exc.message}", status=None, transient=False) from exc
