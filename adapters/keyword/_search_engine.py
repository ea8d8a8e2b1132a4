"""What the OpenSearch and Elasticsearch keyword adapters share.

Both speak the same REST dialect for everything lockstep needs; they differ in how the client is
built, in the point-in-time endpoints and in the client's exception types. ``SearchEngineIndex``
holds the behaviour (explicit mapping, versioned ``_bulk`` writes with per-item outcomes, bounded
retries, real-time reads, scans, BM25 search) and leaves a handful of one-line *wire* methods to
each subclass. A wire method calls the client and raises ``WireError`` (never a client exception),
so the retry logic here is the only place that decides what is transient.

Every write is versioned (``version_type=external``): an unversioned write would bump the
internal version and block later external-versioned writes (see reference/semantics.md).

Aliases (blue-green rebuilds): each generation is its own physical index and readers go through
an alias. ``point_alias`` moves an alias in ONE ``POST /_aliases`` request (remove from the
indexes holding it + add to the new one), which the engine applies atomically, so a reader never
sees zero or two indexes behind it. An adapter built with an alias as its index name reads
(get, count, search, scan) whatever the alias points at.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus
from typing import Any, ClassVar, TypeVar

import structlog

from adapters.keyword.settings import KeywordSettings
from coordinator.errors import PermanentStoreError, TransientStoreError
from coordinator.model import (
    NO_VERSION,
    ChunkDelete,
    IndexedChunk,
    ItemResult,
    ItemStatus,
    SearchHit,
    StoredChunk,
    WriteResult,
)
from coordinator.ports import MetadataFilter

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Items per _bulk request: one apply batch (a few thousand chunks) is one round trip. Larger
# requests also make larger segments: measured on the OpenSearch-API server, an index loaded in
# 1,000-item requests answered 100 later random updates in ~10 s, one loaded in 2,500-item
# requests in 0.03 s (see docs/benchmarks.md).
BULK_ITEMS_MAX = 5000
# Bytes per _bulk request, within the engines' guidance of 5-15 MB (http.max_content_length
# defaults to 100 MB, far above this).
BULK_BYTES_MAX = 12 * 1024 * 1024
# IDs per _mget request, for the same reason as BULK_ITEMS_MAX.
MGET_IDS_MAX = 1000
# Attempts per request (first try included) before a transient failure is raised to the caller,
# which retries the whole batch later; bounded so a sick cluster cannot stall a writer forever.
RETRY_ATTEMPTS_MAX = 6
# Backoff before retry n is min(BASE * 2**(n-1), MAX): 0.1, 0.2, 0.4, 0.8, 1.6 s (3.1 s in all).
RETRY_BACKOFF_BASE_S = 0.1
RETRY_BACKOFF_MAX_S = 2.0
# Hits per scan page; the default index.max_result_window (10,000) bounds a single page.
SCAN_PAGE_SIZE = 1000
# How long a point in time / scroll context lives between two pages of a scan.
SCAN_KEEP_ALIVE_S = 120
# The most hits one search may ask for (index.max_result_window's default).
SEARCH_K_MAX = 10_000
# Attempts of a read-path search (first try included): a query is answered within its leg's
# timeout or not at all, so it is retried once at most, never with the writes' long backoff.
SEARCH_ATTEMPTS_MAX = 2
# Fields a read-path search returns: what the fence checks and what a caller is served.
SEARCH_FIELDS = ("chunk_id", "doc_id", "chunk_index", "text", "metadata")

# Limits the engines enforce. An over-long _id or a bad version fails a whole _bulk request (a
# request validation error, not an item error), so they are checked before sending; Tantivy
# checks the same limits, so that every keyword backend refuses the same chunks.
ID_BYTES_MAX = 512
VERSION_MAX = 2**63 - 1  # external versions are non-negative longs
CHUNK_INDEX_MAX = 2**31 - 1  # the mapping's `integer` type; the engine rejects larger per item

# Characters that make a name a pattern or a list in the alias APIs, never one alias.
ALIAS_FORBIDDEN_CHARS = "*,?"

# Scans read the whole ``_source``: source filtering re-nests dotted keys on some engines (osmem
# answers a filtered read of ``{"a.b": 1}`` as ``{"a": {"b": 1}}``, or drops the key), so a filtered
# read would see metadata the index does not hold. ``text`` is dropped after the read unless asked.
SCAN_SOURCE = True

INDEX_MAPPINGS: dict[str, Any] = {
    # Strict: a document with a field we did not declare is a bug, and must fail loudly.
    "dynamic": "strict",
    "properties": {
        "chunk_id": {"type": "keyword"},
        "doc_id": {"type": "keyword"},
        "chunk_index": {"type": "integer"},
        "text": {"type": "text"},
        "content_hash": {"type": "keyword"},
        "version": {"type": "long"},
        # Stored in _source only: arbitrary source metadata must never cause a mapping conflict.
        "metadata": {"type": "object", "enabled": False},
    },
}


class WireError(Exception):
    """A failed call to the engine, stripped of the client's exception type."""

    def __init__(self, reason: str, *, status: int | None, error_type: str = "", transient: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.error_type = error_type
        self.transient = transient


# The longest detail an error message quotes from an answer's body: a proxy or a load balancer
# in front of the engine may answer with a whole HTML page.
ERROR_DETAIL_CHARS_MAX = 300


def api_wire_error(status: int, body: Any, fallback: str) -> WireError:
    """The WireError for an HTTP error answer; ``body`` is the decoded error body, if any, and
    ``fallback`` the client's own text for it.

    The reason always starts with the status and its phrase (``HTTP 401 Unauthorized``): the
    answer to a HEAD request, or a proxy's, has no body to explain it."""
    error = body.get("error") if isinstance(body, Mapping) else None
    error_type = str(error.get("type", "")) if isinstance(error, Mapping) else ""
    detail = " ".join((error_reason(error, status) if error else str(fallback or "")).split())
    reason = _status_line(status)
    if detail and detail.lower() not in reason.lower():
        reason = f"{reason}: {detail[:ERROR_DETAIL_CHARS_MAX]}"
    return WireError(reason, status=status, error_type=error_type, transient=is_transient_status(status))


def _status_line(status: int) -> str:
    try:
        return f"HTTP {status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


def is_transient_status(status: int) -> bool:
    """429 (queue full) and 5xx are worth retrying; every other 4xx fails the same way again."""
    return status == 429 or status >= 500


def backoff_s(retry: int) -> float:
    """Delay before the ``retry``-th retry (1-based), capped at RETRY_BACKOFF_MAX_S."""
    return float(min(RETRY_BACKOFF_BASE_S * 2 ** (retry - 1), RETRY_BACKOFF_MAX_S))


def request_rejection(chunk_id: str, version: int) -> str:
    """Why this item would fail a whole _bulk request, so must be refused alone ("" if fine)."""
    if not chunk_id:
        return "empty chunk_id"
    if len(chunk_id.encode()) > ID_BYTES_MAX:
        return f"chunk_id is longer than {ID_BYTES_MAX} bytes"
    if not 0 <= version <= VERSION_MAX:
        return f"version {version} is outside 0..{VERSION_MAX}"
    return ""


def check_alias_name(alias: str) -> None:
    """An alias is one literal name; a wildcard or a list would match several, silently."""
    if not alias or any(c in alias for c in ALIAS_FORBIDDEN_CHARS):
        raise ValueError(f"not a single alias name: {alias!r}")


def alias_switch_actions(alias: str, holders: Sequence[str], index: str) -> list[dict[str, Any]]:
    """The ``_aliases`` actions moving ``alias`` from ``holders`` (concrete names) to ``index``."""
    removes = [{"remove": {"index": holder, "alias": alias}} for holder in holders if holder != index]
    return [*removes, {"add": {"index": index, "alias": alias}}]


def check_unique_ids(chunk_ids: Sequence[str]) -> None:
    """The port allows one item per chunk ID per call; two would race inside one request."""
    if len(set(chunk_ids)) != len(chunk_ids):
        raise ValueError("a write call must not name the same chunk_id twice")


def metadata_json(metadata: Mapping[str, Any]) -> str | None:
    """The metadata as JSON, or None if it cannot be represented (the item is then rejected)."""
    try:
        return json.dumps(dict(metadata), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class BulkOp:
    """One _bulk item, already serialized (so its size is known and it is encoded once)."""

    chunk_id: str
    is_delete: bool
    lines: tuple[str, ...]

    @property
    def size_bytes(self) -> int:
        return sum(len(line) + 1 for line in self.lines)


def upsert_op(index: str, chunk: IndexedChunk, metadata: str) -> BulkOp:
    action = {"index": _action_meta(index, chunk.chunk_id, chunk.version, chunk.overwrite_equal)}
    source = (
        f'{{"chunk_id":{json.dumps(chunk.chunk_id)},"doc_id":{json.dumps(chunk.doc_id)},'
        f'"chunk_index":{chunk.chunk_index},"text":{json.dumps(chunk.text, ensure_ascii=False)},'
        f'"content_hash":{json.dumps(chunk.content_hash)},"version":{chunk.version},"metadata":{metadata}}}'
    )
    return BulkOp(chunk.chunk_id, False, (json.dumps(action), source))


def delete_op(index: str, delete: ChunkDelete) -> BulkOp:
    action = {"delete": _action_meta(index, delete.chunk_id, delete.version, delete.overwrite_equal)}
    return BulkOp(delete.chunk_id, True, (json.dumps(action),))


def _action_meta(index: str, chunk_id: str, version: int, overwrite_equal: bool = False) -> dict[str, Any]:
    # external_gte only for a reconciler's repair, which rewrites what the ledger holds for that
    # very version (coordinator/reconcile.py); every live write stays strictly greater.
    version_type = "external_gte" if overwrite_equal else "external"
    return {"_index": index, "_id": chunk_id, "version": version, "version_type": version_type}


def batches(ops: Sequence[BulkOp]) -> Iterator[list[BulkOp]]:
    """Split ops into _bulk requests of at most BULK_ITEMS_MAX items and BULK_BYTES_MAX bytes."""
    batch: list[BulkOp] = []
    size = 0
    for op in ops:
        if batch and (len(batch) == BULK_ITEMS_MAX or size + op.size_bytes > BULK_BYTES_MAX):
            yield batch
            batch, size = [], 0
        batch.append(op)
        size += op.size_bytes
    if batch:
        yield batch


def item_outcome(op: BulkOp, item: Mapping[str, Any]) -> ItemResult | None:
    """The result of one _bulk item, or None if it failed transiently and must be sent again."""
    body = item.get("delete" if op.is_delete else "index") or {}
    status = int(body.get("status", 0))
    error = body.get("error")
    if 200 <= status < 300:
        return ItemResult(op.chunk_id, ItemStatus.APPLIED)
    if status == 409:
        # Under external versioning: an equal or newer version is already there.
        return ItemResult(op.chunk_id, ItemStatus.SUPERSEDED)
    if status == 404 and op.is_delete and not error:
        # "not_found": nothing to delete, but the engine still recorded the delete's version.
        return ItemResult(op.chunk_id, ItemStatus.APPLIED)
    if is_transient_status(status):
        return None
    return ItemResult(op.chunk_id, ItemStatus.REJECTED, error_reason(error, status))


def error_reason(error: Any, status: int | None) -> str:
    """A one-line reason from an engine error body (a dict or a bare string)."""
    if isinstance(error, Mapping):
        return f"{error.get('type', 'error')}: {error.get('reason', '')}".strip()
    return str(error) if error else f"status {status}"


class BodyReader:
    """Reads a stored body's fields by type, noting each field that is missing or mistyped.

    A body lockstep wrote has every field with its type; anything else was written by another
    hand, so it is read as far as it goes (neutral values for the rest: "", ``UNREAD_INT``,
    False, {}) and ``foreign`` says why.
    """

    # Below every version and chunk index lockstep writes.
    UNREAD_INT = NO_VERSION

    def __init__(self, body: Any) -> None:
        self.body: Mapping[str, Any] = body if isinstance(body, Mapping) else {}
        self.problems: list[str] = [] if isinstance(body, Mapping) else ["the stored body is not an object"]
        # Fields found missing or mistyped (each is reported once, by the read that found it).
        self.unreadable: set[str] = set()

    @property
    def foreign(self) -> str:
        return "; ".join(self.problems)

    def text(self, name: str) -> str:
        value = self.body.get(name)
        if isinstance(value, str):
            return value
        self._unreadable(name, value, "a string")
        return ""

    def integer(self, name: str) -> int:
        value = self.body.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        self._unreadable(name, value, "an integer")
        return self.UNREAD_INT

    def flag(self, name: str) -> bool:
        value = self.body.get(name)
        if isinstance(value, bool):
            return value
        self._unreadable(name, value, "a boolean")
        return False

    def mapping(self, name: str) -> dict[str, Any]:
        """An object field; an absent one reads as empty (it holds no lockstep data)."""
        value = self.body.get(name)
        if value is None or isinstance(value, Mapping):
            return dict(value or {})
        self._unreadable(name, value, "an object")
        return {}

    def agrees(self, name: str, claimed: Any, own: Any, problem: str) -> None:
        """Note ``problem`` if the readable field ``name`` (read as ``claimed``) is not ``own``."""
        if name not in self.unreadable and claimed != own:
            self.problems.append(problem)

    def _unreadable(self, name: str, value: Any, expected: str) -> None:
        self.unreadable.add(name)
        if value is None:
            self.problems.append(f"no {name} field")
        else:
            self.problems.append(f"{name} is {type(value).__name__}, not {expected}")


def stored_chunk(hit: Mapping[str, Any], *, with_text: bool, store: str) -> StoredChunk:
    """A search hit or an mget doc. ID and version are the engine's own (``_id``, ``_version``);
    a body that lacks a field or contradicts them makes the chunk foreign, never an error."""
    chunk_id, version = str(hit["_id"]), hit.get("_version")
    if not isinstance(version, int):
        raise PermanentStoreError(f"{store} answered {chunk_id!r} without its _version", store=store)
    body = BodyReader(hit.get("_source"))
    claimed_id, claimed_version = body.text("chunk_id"), body.integer("version")
    body.agrees("chunk_id", claimed_id, chunk_id, f"body chunk_id {claimed_id!r} is not its _id")
    body.agrees(
        "version", claimed_version, version, f"body version {claimed_version} is not its _version {version}"
    )
    return StoredChunk(
        chunk_id=chunk_id,
        doc_id=body.text("doc_id"),
        chunk_index=body.integer("chunk_index"),
        content_hash=body.text("content_hash"),
        version=version,
        text=body.text("text") if with_text else None,
        metadata=body.mapping("metadata"),
        foreign=body.foreign,
    )


class SearchEngineIndex(ABC):
    """A KeywordIndex over an OpenSearch-API or Elasticsearch index; subclasses supply the wire."""

    store: ClassVar[str]
    # Metadata is stored in _source only (``enabled: false``): searches cannot filter on it.
    filters_metadata: ClassVar[bool] = False
    # The sort of a point-in-time scan: one value per document, so that search_after pages
    # through ties (ES: ``_shard_doc``; OpenSearch has no such field but sorts on ``_id``).
    scan_sort: ClassVar[tuple[Any, ...]]

    def __init__(self, settings: KeywordSettings, *, sleep: Callable[[float], None] = time.sleep) -> None:
        self.name = settings.index
        self.timeout_s = settings.request_timeout_s
        # Injected so that tests and the chaos suite can run retries without waiting.
        self._sleep = sleep
        # None until a scan has found out whether this engine offers a point in time.
        self._pit_supported: bool | None = None
        self._log = log.bind(store=self.store, index=self.name)

    # --- the wire: one client call each, raising WireError ---------------------------------

    @abstractmethod
    def _wire_exists(self, name: str) -> bool:
        """Whether an index or an alias called ``name`` exists."""

    @abstractmethod
    def _wire_get_alias(self, alias: str) -> Mapping[str, Any]:
        """``GET /_alias/{alias}``: ``{index: {"aliases": {alias: {...}}}}``; a 404 when there is none."""

    @abstractmethod
    def _wire_update_aliases(self, actions: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
        """One ``POST /_aliases`` request carrying ``actions`` (applied atomically by the engine)."""

    @abstractmethod
    def _wire_create(self, mappings: Mapping[str, Any]) -> None: ...

    @abstractmethod
    def _wire_delete_index(self) -> None: ...

    @abstractmethod
    def _wire_bulk(self, lines: Sequence[str]) -> Mapping[str, Any]: ...

    @abstractmethod
    def _wire_mget(self, ids: Sequence[str]) -> Mapping[str, Any]: ...

    @abstractmethod
    def _wire_refresh(self) -> None: ...

    @abstractmethod
    def _wire_count(self) -> int: ...

    @abstractmethod
    def _wire_search(
        self, body: Mapping[str, Any], *, scroll: str | None = None, timeout_s: float | None = None
    ) -> Mapping[str, Any]:
        """Search this index (``body`` may not carry a ``pit``); ``timeout_s`` overrides the
        request timeout for this call."""

    @abstractmethod
    def _wire_pit_search(self, body: Mapping[str, Any]) -> Mapping[str, Any]:
        """Search a point in time (``body["pit"]`` names it; no index in the path)."""

    @abstractmethod
    def _wire_open_pit(self, keep_alive: str) -> str: ...

    @abstractmethod
    def _wire_close_pit(self, pit_id: str) -> None: ...

    @abstractmethod
    def _wire_scroll(self, scroll_id: str, keep_alive: str) -> Mapping[str, Any]: ...

    @abstractmethod
    def _wire_clear_scroll(self, scroll_id: str) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    # --- retries ---------------------------------------------------------------------------

    def _retrying(self, operation: str, call: Callable[[], T], *, attempts: int = RETRY_ATTEMPTS_MAX) -> T:
        """Run ``call``, retrying transient WireErrors with capped backoff; raise lockstep errors."""
        for attempt in range(1, attempts + 1):
            try:
                return call()
            except WireError as err:
                self._give_up_unless_transient(operation, err, attempt, attempts)
                delay_s = backoff_s(attempt)
                self._log.warning(
                    "keyword request failed, retrying",
                    operation=operation,
                    attempt=attempt,
                    delay_s=delay_s,
                    status=err.status,
                    reason=err.reason,
                )
                self._sleep(delay_s)
        raise AssertionError("unreachable: the last attempt raises")

    def _give_up_unless_transient(self, operation: str, err: WireError, attempt: int, attempts: int) -> None:
        message = f"{self.store} {operation} on {self.name!r} failed: {err.reason}"
        if not err.transient:
            raise PermanentStoreError(message, store=self.store) from err
        if attempt == attempts:
            raise TransientStoreError(f"{message} (after {attempt} attempts)", store=self.store) from err

    # --- lifecycle -------------------------------------------------------------------------

    def ensure(self) -> None:
        """Create the index with the explicit mapping unless it exists (idempotent, race-safe)."""
        if self.exists():
            return
        try:
            self._retrying("create", lambda: self._wire_create(INDEX_MAPPINGS))
        except PermanentStoreError as exc:
            if not _is_error_type(exc, "resource_already_exists_exception"):
                raise
        self._log.info("keyword index ensured")

    def exists(self) -> bool:
        """Whether this adapter's index exists (an alias of that name counts: reads go through it)."""
        return self._retrying("exists", partial(self._wire_exists, self.name))

    def drop(self) -> None:
        try:
            self._retrying("delete index", self._wire_delete_index)
        except PermanentStoreError as exc:
            if not _is_error_type(exc, "index_not_found_exception"):
                raise

    # --- aliases ---------------------------------------------------------------------------

    @property
    def physical_name(self) -> str:
        """The index this adapter addresses, as an alias names its target."""
        return self.name

    def alias_target(self, alias: str) -> str | None:
        """The one physical index ``alias`` points at, or None when no such alias exists.

        Raises PermanentStoreError when the alias points at several indexes (a reader would
        search them all) or when ``alias`` names a concrete index rather than an alias.
        """
        check_alias_name(alias)
        holders = self._retrying("get alias", partial(self._alias_holders, alias))
        if len(holders) > 1:
            raise PermanentStoreError(
                f"alias {alias!r} points at {len(holders)} indexes {holders}, not one", store=self.store
            )
        if holders:
            return holders[0]
        if self._retrying("exists", partial(self._wire_exists, alias)):
            raise PermanentStoreError(f"{alias!r} is a concrete index, not an alias", store=self.store)
        return None

    def point_alias(self, alias: str, index: str) -> None:
        """Point ``alias`` at ``index`` alone, atomically; idempotent.

        One ``POST /_aliases`` request removes the alias from every index holding it and adds it
        to ``index``; the engine applies both together. Nothing is sent if it already points at
        ``index`` alone. The switch has happened when this returns (read back to make sure), so
        a caller that wants the moment of the switch times the call itself. A transient failure
        is retried from the read, so a retry after a lost answer finds the switch done.
        """
        check_alias_name(alias)
        self._retrying("point alias", partial(self._switch_alias, alias, index))
        holders = self._retrying("get alias", partial(self._alias_holders, alias))
        if holders != [index]:
            # Another writer moved the alias in between; the caller decides whether to repeat.
            raise TransientStoreError(
                f"alias {alias!r} points at {holders} right after pointing it at {index!r}",
                store=self.store,
            )
        self._log.info("alias pointed", alias=alias, target=index)

    def _switch_alias(self, alias: str, index: str) -> None:
        holders = self._alias_holders(alias)
        if holders == [index]:
            return
        self._wire_update_aliases(alias_switch_actions(alias, holders, index))

    def _alias_holders(self, alias: str) -> list[str]:
        """The indexes ``alias`` points at, sorted (a wire call: raises WireError)."""
        try:
            response = self._wire_get_alias(alias)
        except WireError as err:
            if err.status == 404:
                return []
            raise
        return sorted(name for name, body in response.items() if alias in (body.get("aliases") or {}))

    # --- writes ----------------------------------------------------------------------------

    def upsert(self, chunks: Sequence[IndexedChunk]) -> WriteResult:
        check_unique_ids([c.chunk_id for c in chunks])
        ops: list[BulkOp] = []
        refused: dict[str, ItemResult] = {}
        for chunk in chunks:
            reason = request_rejection(chunk.chunk_id, chunk.version)
            metadata = metadata_json(chunk.metadata)
            if metadata is None:
                reason = reason or "metadata is not JSON-serializable"
            if reason:
                refused[chunk.chunk_id] = ItemResult(chunk.chunk_id, ItemStatus.REJECTED, reason)
            else:
                ops.append(upsert_op(self.name, chunk, metadata or "{}"))
        return self._write([c.chunk_id for c in chunks], ops, refused)

    def delete(self, deletes: Sequence[ChunkDelete]) -> WriteResult:
        check_unique_ids([d.chunk_id for d in deletes])
        ops: list[BulkOp] = []
        refused: dict[str, ItemResult] = {}
        for d in deletes:
            reason = request_rejection(d.chunk_id, d.version)
            if reason:
                refused[d.chunk_id] = ItemResult(d.chunk_id, ItemStatus.REJECTED, reason)
            else:
                ops.append(delete_op(self.name, d))
        return self._write([d.chunk_id for d in deletes], ops, refused)

    def _write(
        self, order: Sequence[str], ops: Sequence[BulkOp], refused: dict[str, ItemResult]
    ) -> WriteResult:
        results = dict(refused)
        for batch in batches(ops):
            results.update(self._write_batch(batch))
        for item in refused.values():
            self._log.warning(
                "keyword item refused before sending", chunk_id=item.chunk_id, reason=item.reason
            )
        return WriteResult(tuple(results[chunk_id] for chunk_id in order))

    def _write_batch(self, batch: Sequence[BulkOp]) -> dict[str, ItemResult]:
        """Send one _bulk request; items that failed transiently are re-sent, alone, with backoff."""
        settled: dict[str, ItemResult] = {}
        pending = list(batch)

        def send_pending() -> None:
            nonlocal pending
            response = self._wire_bulk([line for op in pending for line in op.lines])
            pending, reason = self._settle(pending, response, settled)
            if pending:
                raise WireError(
                    f"{len(pending)} bulk items failed transiently, e.g. {reason}",
                    status=None,
                    transient=True,
                )

        self._retrying("bulk", send_pending)
        return settled

    def _settle(
        self, ops: Sequence[BulkOp], response: Mapping[str, Any], settled: dict[str, ItemResult]
    ) -> tuple[list[BulkOp], str]:
        """Record the final outcomes into ``settled``; return the ops to send again and why."""
        items = response.get("items") or []
        if len(items) != len(ops):
            raise WireError(f"bulk answered {len(items)} items for {len(ops)}", status=None, transient=False)
        retry: list[BulkOp] = []
        reason = ""
        for op, item in zip(ops, items, strict=True):
            outcome = item_outcome(op, item)
            if outcome is None:
                retry.append(op)
                body = item.get("delete" if op.is_delete else "index") or {}
                reason = reason or error_reason(body.get("error"), body.get("status"))
            else:
                settled[op.chunk_id] = outcome
                if outcome.status is ItemStatus.REJECTED:
                    self._log.warning("keyword item rejected", chunk_id=op.chunk_id, reason=outcome.reason)
        return retry, reason

    # --- reads -----------------------------------------------------------------------------

    def get(self, chunk_ids: Sequence[str]) -> dict[str, StoredChunk]:
        """Real-time read by ID (mget does not wait for a refresh)."""
        found: dict[str, StoredChunk] = {}
        ids = [i for i in dict.fromkeys(chunk_ids) if not request_rejection(i, 0)]
        for start in range(0, len(ids), MGET_IDS_MAX):
            part = ids[start : start + MGET_IDS_MAX]
            response = self._retrying("mget", partial(self._wire_mget, part))
            for doc in response.get("docs") or []:
                if doc.get("found"):
                    chunk = stored_chunk(doc, with_text=True, store=self.store)
                    found[chunk.chunk_id] = chunk
        return found

    def count(self) -> int:
        self._retrying("refresh", self._wire_refresh)
        return self._retrying("count", self._wire_count)

    def search(self, query: str, k: int) -> list[SearchHit]:
        """BM25 ``match`` on the text, after a refresh so that every applied write is visible
        (for checks and the demo; the read path uses ``search_hits``, which never refreshes)."""
        if k <= 0 or not query.strip():
            return []
        self._retrying("refresh", self._wire_refresh)
        return self.search_hits(query, k)

    def search_hits(
        self, query: str, k: int, *, where: MetadataFilter | None = None, timeout_s: float | None = None
    ) -> list[SearchHit]:
        """BM25 ``match`` on the text as the engine's searches see it now (no refresh), with each
        hit's ``_version``, chunk index and metadata. ``where`` is not used: metadata is stored,
        not indexed (``filters_metadata`` is False), so the caller filters."""
        if k <= 0 or not query.strip():
            return []
        body = {
            "query": {"match": {"text": query}},
            "size": min(k, SEARCH_K_MAX),
            "version": True,
            "_source": list(SEARCH_FIELDS),
        }
        response = self._retrying(
            "search", lambda: self._wire_search(body, timeout_s=timeout_s), attempts=SEARCH_ATTEMPTS_MAX
        )
        return [_search_hit(hit) for hit in response["hits"]["hits"]]

    def visible(self, chunk_ids: Sequence[str]) -> dict[str, int]:
        """The ``_version`` a search sees of each of these chunks (an ``ids`` query: the search
        path, so a chunk written but not yet refreshed is not seen)."""
        ids = [i for i in dict.fromkeys(chunk_ids) if not request_rejection(i, 0)]
        seen: dict[str, int] = {}
        for start in range(0, len(ids), MGET_IDS_MAX):
            part = ids[start : start + MGET_IDS_MAX]
            body = {"query": {"ids": {"values": part}}, "size": len(part), "version": True, "_source": False}
            response = self._retrying("visibility search", partial(self._wire_search, body))
            seen.update((str(h["_id"]), int(h["_version"])) for h in response["hits"]["hits"] if "_version" in h)
        return seen

    def scan(self, *, with_text: bool = False) -> Iterator[StoredChunk]:
        """Every live chunk once: a point in time + search_after where offered, else a scroll.

        Both read one consistent snapshot of the index, so writes during a scan neither repeat
        nor skip chunks that existed when it started.
        """
        self._retrying("refresh", self._wire_refresh)
        pit_id = self._open_pit_if_supported()
        if pit_id is None:
            yield from self._scan_scroll(with_text)
        else:
            yield from self._scan_pit(pit_id, with_text)

    def _open_pit_if_supported(self) -> str | None:
        if self._pit_supported is False:
            return None
        try:
            pit_id = self._retrying("open point in time", lambda: self._wire_open_pit(_keep_alive()))
        except PermanentStoreError as exc:
            if not _is_unsupported_endpoint(exc):
                raise
            self._log.info("no point-in-time API, scanning with scroll")
            self._pit_supported = False
            return None
        self._pit_supported = True
        return pit_id

    def _scan_pit(self, pit_id: str, with_text: bool) -> Iterator[StoredChunk]:
        search_after: list[Any] | None = None
        try:
            while True:
                body = _pit_page_body(pit_id, self.scan_sort, with_text, search_after)
                response = self._retrying("scan page", partial(self._wire_pit_search, body))
                pit_id = response.get("pit_id", pit_id)
                hits = response["hits"]["hits"]
                yield from (stored_chunk(h, with_text=with_text, store=self.store) for h in hits)
                if len(hits) < SCAN_PAGE_SIZE:
                    return
                search_after = hits[-1]["sort"]
        finally:
            self._close_quietly("close point in time", lambda: self._wire_close_pit(pit_id))

    def _scan_scroll(self, with_text: bool) -> Iterator[StoredChunk]:
        body = {"size": SCAN_PAGE_SIZE, "sort": ["_doc"], "_source": SCAN_SOURCE, "version": True}
        response = self._retrying("scan page", partial(self._wire_search, body, scroll=_keep_alive()))
        scroll_id = response.get("_scroll_id")
        try:
            while hits := response["hits"]["hits"]:
                yield from (stored_chunk(h, with_text=with_text, store=self.store) for h in hits)
                scroll_id = response.get("_scroll_id", scroll_id)
                # Never retried: the server may have advanced the cursor before its answer was
                # lost, and a retry would then silently skip a page. The caller rescans instead.
                response = self._retrying(
                    "scan page", partial(self._wire_scroll, str(scroll_id), _keep_alive()), attempts=1
                )
        finally:
            if scroll_id:
                self._close_quietly("clear scroll", lambda: self._wire_clear_scroll(str(scroll_id)))

    def _close_quietly(self, operation: str, call: Callable[[], None]) -> None:
        """Release a scan context; failing to is harmless (it expires by itself), so only log it."""
        try:
            call()
        except WireError as err:
            self._log.info("could not release scan context", operation=operation, reason=err.reason)


def _keep_alive() -> str:
    return f"{SCAN_KEEP_ALIVE_S}s"


def _pit_page_body(
    pit_id: str, sort: Sequence[Any], with_text: bool, search_after: list[Any] | None
) -> dict[str, Any]:
    # ``sort`` is unique per document, so search_after never skips a tie. (The body's chunk_id is
    # not: a document another writer put in the index may lack it or repeat another's.)
    body: dict[str, Any] = {
        "size": SCAN_PAGE_SIZE,
        "pit": {"id": pit_id, "keep_alive": _keep_alive()},
        "sort": list(sort),
        "_source": SCAN_SOURCE,
        "version": True,
        "track_total_hits": False,
    }
    if search_after is not None:
        body["search_after"] = search_after
    return body


def _search_hit(hit: Mapping[str, Any]) -> SearchHit:
    # A document another writer put in the index is found too; it must not fail the search (its
    # missing fields read as neutral values, which the fence refuses).
    body = BodyReader(hit.get("_source"))
    version = hit.get("_version")
    return SearchHit(
        chunk_id=str(hit["_id"]),
        doc_id=body.text("doc_id"),
        score=float(hit.get("_score") or 0.0),
        text=body.text("text"),
        version=version if isinstance(version, int) else NO_VERSION,
        chunk_index=body.integer("chunk_index"),
        metadata=body.mapping("metadata"),
    )


def _is_error_type(exc: PermanentStoreError, error_type: str) -> bool:
    cause = exc.__cause__
    return isinstance(cause, WireError) and cause.error_type == error_type


def _is_unsupported_endpoint(exc: PermanentStoreError) -> bool:
    """Whether the engine lacks the endpoint (an older or OpenSearch-API server) rather than failing."""
    cause = exc.__cause__
    if not isinstance(cause, WireError):
        return False
    return cause.status == 405 or (cause.status in (400, 404) and "no handler found" in cause.reason)
