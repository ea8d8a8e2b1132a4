"""The vector index on Milvus, through pymilvus's MilvusClient: one adapter for all three forms.

It runs unchanged against a milvus-lite file (``uri`` ends in ``.db``; pymilvus serves it from an
in-process server), a ``milvus-lite server`` and a real Milvus server (2.3.5 here). What it relies
on, and why (see shared/reference/semantics.md, "Milvus"):

- Milvus has no conditional writes, so the ledger gates versions before calling this adapter;
  upserts and deletes are reported APPLIED, and the ``version`` field is still written so that an
  auditor can compare it with the ledger.
- Upsert only, never insert (insert never checks primary keys: duplicate entities). Each batch is
  collapsed to one row per primary key, keeping the highest version: Milvus 2.3.5 keeps *both*
  rows when one upsert request names a key twice.
- Deletes go by primary key only. pymilvus's ``delete(ids=...)`` builds ``chunk_id in ['...']``
  without escaping (an id holding a quote breaks the expression, ``a','b`` would delete ``b`` as
  well), so this adapter builds the same primary-key expression itself, with every id escaped.
- Every call carries ``timeout=``: pymilvus's own default is no timeout with up to 75 retries.
  Given a timeout, pymilvus retries only until that much time has passed (``retry_times`` is then
  ignored), so the timeout also bounds its retries; lockstep's own retry loop sits above.
- Verification reads (``get``, ``scan``, ``count``, ``fetch_vectors``) use Strong consistency.
- ``scan`` streams with ``query_iterator`` and checks the result against ``count(*)``; iterators
  have had gaps (milvus#52055), so on disagreement it falls back to primary-key range scans.
- Blue-green rebuilds: each generation is its own collection and readers use an alias
  (``point_alias``: ``create_alias`` / ``alter_alias``, atomic in Milvus). An adapter whose
  collection name is an alias reads and searches whatever the alias points at.
- Model guard: given a ``model_id``, the adapter records the embedder's model and dimension in
  the collection's properties when it creates it, and refuses (ConfigError) a collection recorded
  with another model or dimension before writing anything. Collection properties set at creation
  are the one place found to survive on all three forms (milvus-lite keeps no schema or field
  description; on Milvus 2.3.5, properties set later by ``alter_collection_properties`` were gone
  after a restart).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import structlog
from pymilvus import DataType, MilvusClient, MilvusException
from pymilvus.exceptions import (
    ConnectError,
    DataNotMatchException,
    DataTypeNotMatchException,
    MilvusUnavailableException,
    ParamError,
)

from adapters.vector.settings import VectorSettings
from coordinator.errors import (
    ConfigError,
    PermanentStoreError,
    RefusedContent,
    StoreError,
    TransientStoreError,
)
from coordinator.events import metadata_rejection
from coordinator.model import (
    NO_VERSION,
    ChunkDelete,
    IndexedChunk,
    ItemResult,
    ItemStatus,
    SearchHit,
    StoredChunk,
    Vector,
    WriteResult,
)
from coordinator.ports import MetadataFilter

log = structlog.get_logger(__name__)

STORE = "milvus"
# A connect refused at once (not timed out) is tried this many times in all, this far apart.
CONNECT_ATTEMPTS = 3
CONNECT_RETRY_PAUSE_S = 0.5
# A milvus-lite file admits one process, which holds its lock till it ends. After a crash, what
# is left of the process that had it open (a killed service's Ray actors) may hold it a few
# seconds more: opening the file waits this long for its holder to go before failing.
LITE_LOCK_WAIT_S = 30.0
LITE_LOCK_POLL_S = 0.1
# milvus-lite's lock file inside the data directory its ``.db`` path names (milvus_lite/db.py),
# and the kernel's table of file locks, which names their holders (Linux).
LITE_LOCK_FILE = "LOCK"
LOCKS_TABLE = Path("/proc/locks")

# Schema limits. Document IDs are at most 512 bytes (coordinator.events.DOC_ID_BYTES_MAX); a chunk
# ID adds a separator and an index. VARCHAR lengths are bytes; 1 KiB leaves room for both.
ID_BYTES_MAX = 1024
TEXT_BYTES_MAX = 65_535  # Milvus's largest VARCHAR
CONTENT_HASH_CHARS_MAX = 64  # a hex SHA-256
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# Write requests: Milvus refuses requests of tens of MB (and 2.3.5 buffers whole requests in
# memory), so a request carries at most this many rows and (estimated) bytes.
UPSERT_BATCH_ROWS_MAX = 1_000
UPSERT_BATCH_BYTES_MAX = 4 * 1024 * 1024
# Requests by primary key (get, delete, fetch_vectors) list their IDs in one expression; these
# bound the expression to a size every Milvus parses quickly.
IDS_PER_REQUEST_MAX = 1_000
ID_EXPRESSION_BYTES_MAX = 256 * 1024

# Milvus caps a query's ``limit`` and a search's top-k at 16,384.
QUERY_LIMIT_MAX = 16_384
SEARCH_K_MAX = 16_384
# Rows per query_iterator page. A page may carry texts of up to 64 KiB each; 1,000 of them stay
# far below the 256 MiB gRPC message limit of Milvus standalone and milvus-lite.
SCAN_PAGE_ROWS_MAX = 1_000
# Rows per query of the range-scan fallback (ranges holding more are split in two).
RANGE_PAGE_ROWS_MAX = 4_096

STRONG = "Strong"
# The read path's level without a consistency token: the server's bounded staleness; the fence
# makes whatever it returns safe to serve.
BOUNDED = "Bounded"
# Fields a read-path search returns: what the fence checks and what a caller is served.
SEARCH_FIELDS = ("chunk_id", "doc_id", "chunk_index", "version", "text", "metadata")
METRIC = "COSINE"
# AUTOINDEX is accepted by Milvus 2.3.5 and milvus-lite alike (each picks its own index type).
INDEX_TYPE = "AUTOINDEX"

# Milvus status codes worth retrying: 1 unexpected / service not ready (also pymilvus's own
# "retry timeout"), 2 unavailable / connect failed, 3-5 and 7-8 memory, request, internal, disk
# and rate limits, 101 collection not loaded (a restarted server reloads it on its own).
TRANSIENT_CODES = frozenset({1, 2, 3, 4, 5, 7, 8, 101})
# gRPC statuses worth retrying: the server or the network is down, overloaded or slow.
TRANSIENT_GRPC_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
    }
)

# Metadata is read on every scan: the audit and the invariants compare it on each chunk.
STORED_FIELDS = ("chunk_id", "doc_id", "chunk_index", "content_hash", "version", "metadata")

# The collection property recording the embedder whose vectors a collection holds:
# ``{"model_id": ..., "dim": ...}`` as JSON.
EMBEDDER_PROPERTY = "lockstep.embedder"
# Milvus status codes of "no such alias": milvus-lite answers 100, Milvus 2.3.5 1600.
ALIAS_NOT_FOUND_CODES = frozenset({100, 1600})

T = TypeVar("T")


class QuietMissingAlias(logging.Filter):
    """Drops pymilvus's ERROR record (with a traceback) of a describe_alias that found no alias.

    pymilvus logs every failed call at ERROR before raising. ``alias_target`` asks for an alias
    that does not exist yet at every first start, and answers None: an expected outcome, handled,
    that would otherwise print a traceback on a newcomer's first run. Every other failure,
    describe_alias's included, is still logged.
    """

    _CALL = "RPC error: [describe_alias]"
    _MISSING = re.compile(r"alias\b.*\b(not found|does not exist)")

    def filter(self, record: logging.LogRecord) -> bool:
        first_line = record.getMessage().split("\n", 1)[0]
        return not (first_line.startswith(self._CALL) and self._MISSING.search(first_line))


# pymilvus's logger of failed calls (``pymilvus/decorators.py``).
PYMILVUS_CALL_LOGGER = "pymilvus.decorators"
logging.getLogger(PYMILVUS_CALL_LOGGER).addFilter(QuietMissingAlias())


class MilvusVectorIndex:
    """A VectorIndex over one Milvus collection (explicit schema, COSINE metric)."""

    # Searches filter on the JSON ``metadata`` field themselves (see ``search_hits``).
    filters_metadata = True

    def __init__(self, settings: VectorSettings, dim: int, *, model_id: str | None = None) -> None:
        """``model_id`` names the embedder whose vectors this adapter writes (None: no guard)."""
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        if model_id is not None and not model_id:
            raise ValueError("model_id must be a non-empty string or None")
        self.settings = settings
        self.dim = dim
        self.model_id = model_id
        self.name = settings.collection
        self.timeout_s = settings.request_timeout_s
        self._client: MilvusClient | None = None
        # Set once the collection's recorded embedder has been found compatible (see _guard).
        self._model_checked = model_id is None
        # The collection's description, for column-based upserts (see _write_schema).
        self._described: dict[str, Any] | None = None
        self._log = log.bind(store=STORE, collection=self.name)

    # --- lifecycle ---------------------------------------------------------------------------

    def ensure(self) -> None:
        """Create the collection, its vector index and load it; check an existing one's schema.

        An existing collection recorded with another embedder (model or dimension) raises
        ConfigError before anything is changed.
        """
        client = self._connect()
        if not self._call("has_collection", client.has_collection, self.name):
            self._create(client)
        described = self._call("describe_collection", client.describe_collection, self.name)
        self._check_model(described)
        self._check_schema(described)
        self._ensure_index(client)
        self._ensure_loaded(client)

    def load(self) -> None:
        """Load the collection for searches without changing anything else (a reader's ``ensure``:
        a reopened milvus-lite file or a restarted server may hold it unloaded)."""
        self._ensure_loaded(self._connect())

    def recorded_model(self) -> str | None:
        """The model id recorded with the collection (None if it was created without one)."""
        client = self._connect()
        described = self._call("describe_collection", client.describe_collection, self.name)
        record = _embedder_record(described, self.name)
        return None if record is None else record[0]

    def drop(self) -> None:
        """Drop the collection, and first the aliases that point at it (Milvus 2.3 refuses to
        drop an aliased collection; lockstep re-creates a readers' alias at its next start)."""
        client = self._connect()
        if not self._call("has_collection", client.has_collection, self.name):
            return
        described = self._call("list_aliases", client.list_aliases, self.name)
        for alias in described.get("aliases", []) if isinstance(described, dict) else []:
            self._call("drop_alias", client.drop_alias, alias)
            self._log.warning("alias dropped with its collection", alias=alias)
        self._call("drop_collection", client.drop_collection, self.name)
        self._log.info("collection dropped")

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        self._described = None

    # --- writes ------------------------------------------------------------------------------

    def upsert(self, chunks: Sequence[IndexedChunk]) -> WriteResult:
        """Upsert chunks, one row per chunk ID (the newest version of any ID named twice)."""
        self._guard()
        vectors, vector_rejections = _vector_matrix(chunks, self.dim)
        rejected = {
            i: reason
            for i, c in enumerate(chunks)
            if (reason := _id_rejection(c.chunk_id) or _field_rejection(c) or vector_rejections.get(i, ""))
        }
        newest = _newest_by_id((i, c) for i, c in enumerate(chunks) if i not in rejected)
        kept = sorted(newest.values())
        for batch in _batches(
            kept, lambda i: _chunk_bytes(chunks[i]), UPSERT_BATCH_ROWS_MAX, UPSERT_BATCH_BYTES_MAX
        ):
            self._upsert_batch(_columns([chunks[i] for i in batch], vectors[batch], self._write_schema()))
        self._log.debug("upserted", rows=len(kept), rejected=len(rejected))
        return WriteResult(tuple(_write_item(i, c.chunk_id, newest, rejected) for i, c in enumerate(chunks)))

    def delete(self, deletes: Sequence[ChunkDelete]) -> WriteResult:
        """Delete chunks by primary key; IDs that could never be stored are trivially absent."""
        self._guard()
        newest = _newest_by_id(enumerate(deletes))
        storable = [
            deletes[i].chunk_id for i in sorted(newest.values()) if not _id_rejection(deletes[i].chunk_id)
        ]
        client = self._connect()
        for batch in _batches(storable, _id_bytes, IDS_PER_REQUEST_MAX, ID_EXPRESSION_BYTES_MAX):
            self._call("delete", client.delete, self.name, filter=_pk_in(batch))
        self._log.debug("deleted", ids=len(storable))
        return WriteResult(tuple(_write_item(i, d.chunk_id, newest, {}) for i, d in enumerate(deletes)))

    # --- reads -------------------------------------------------------------------------------

    def get(self, chunk_ids: Sequence[str]) -> dict[str, StoredChunk]:
        """Read chunks (with text and metadata) by ID at Strong consistency; absent IDs are left out."""
        fields = [*STORED_FIELDS, "text"]
        rows = self._query_by_ids(chunk_ids, fields)
        return {str(r["chunk_id"]): _stored(r, with_text=True) for r in rows}

    def fetch_vectors(self, chunk_ids: Sequence[str]) -> dict[str, list[float]]:
        """The stored vectors of these chunks; absent IDs are left out."""
        rows = self._query_by_ids(chunk_ids, ["chunk_id", "vector"])
        return {str(r["chunk_id"]): [float(x) for x in r["vector"]] for r in rows}

    def count(self) -> int:
        """Number of entities, by ``count(*)`` at Strong consistency."""
        return self._count_where("")

    def search(self, vector: Vector, k: int) -> list[SearchHit]:
        """The k chunks nearest to ``vector`` by cosine similarity, best first, at Strong
        consistency (every acknowledged write is seen)."""
        return self.search_hits(vector, k, strong=True)

    def search_hits(
        self,
        vector: Vector,
        k: int,
        *,
        where: MetadataFilter | None = None,
        strong: bool = False,
        timeout_s: float | None = None,
    ) -> list[SearchHit]:
        """The k chunks nearest to ``vector``, best first, with each hit's version, chunk index
        and metadata. ``where`` is pushed down as equality on the JSON ``metadata`` field (a
        ``None`` value is left to the caller). ``strong``: Strong consistency, else Bounded
        (the server's default staleness, without waiting for its time tick)."""
        if not 1 <= k <= SEARCH_K_MAX:
            raise ValueError(f"k must be within 1..{SEARCH_K_MAX}, got {k}")
        if len(vector) != self.dim:
            raise ValueError(f"vector has {len(vector)} dimensions, the index {self.dim}")
        client = self._connect()
        result = self._call(
            "search",
            client.search,
            self.name,
            data=[[float(x) for x in vector]],
            limit=k,
            filter=_metadata_filter(where or {}),
            anns_field="vector",
            search_params={"metric_type": METRIC},
            output_fields=list(SEARCH_FIELDS),
            consistency_level=STRONG if strong else BOUNDED,
            call_timeout_s=timeout_s,
        )
        return [_hit(h) for h in result[0]]

    def scan(self, *, with_text: bool = False) -> Iterator[StoredChunk]:
        """Stream every live chunk once, cross-checked against ``count(*)``.

        Holds the IDs seen so far (not the chunks). If the iterator's rows disagree with
        ``count(*)``, the chunks it missed are found by primary-key range scans.
        """
        expected = self.count()
        seen: set[str] = set()
        for row in self._iterate(_scan_fields(with_text)):
            if row["chunk_id"] not in seen:
                seen.add(str(row["chunk_id"]))
                yield _stored(row, with_text=with_text)
        if len(seen) == expected:
            return
        self._log.warning("query_iterator disagrees with count(*)", rows=len(seen), count=expected)
        for chunk in self.range_scan(with_text=with_text):
            if chunk.chunk_id not in seen:
                seen.add(chunk.chunk_id)
                yield chunk
        if len(seen) != expected:
            self._log.warning("range scan disagrees with count(*) too", rows=len(seen), count=expected)

    def range_scan(
        self, *, with_text: bool = False, page_rows: int = RANGE_PAGE_ROWS_MAX
    ) -> Iterator[StoredChunk]:
        """Stream every live chunk once, by primary-key ranges, in primary-key order.

        A range whose query comes back full is split at the median ID of what came back, so each
        half holds strictly fewer entities and the splitting ends; nothing relies on the order in
        which Milvus returns rows.
        """
        if not 2 <= page_rows <= QUERY_LIMIT_MAX:
            raise ValueError(f"page_rows must be within 2..{QUERY_LIMIT_MAX}, got {page_rows}")
        for rows in self._complete_ranges(_scan_fields(with_text), page_rows):
            for row in sorted(rows, key=lambda r: str(r["chunk_id"])):
                yield _stored(row, with_text=with_text)

    def duplicate_ids(self, *, page_rows: int = RANGE_PAGE_ROWS_MAX) -> dict[str, int]:
        """Every chunk ID held by more than one entity, with its number of entities (invariant I4).

        Queries return one row per primary key, but ``count(*)`` counts entities; a primary-key
        range where the two differ holds a duplicate, and is narrowed down to single IDs.
        """
        found: dict[str, int] = {}
        for lo, hi, ids in self._ranges_of_ids(page_rows):
            if self._count_where(_range_expr(lo, hi)) > len(ids):
                found |= self._duplicates_among(ids)
        return found

    # --- aliases -----------------------------------------------------------------------------

    @property
    def physical_name(self) -> str:
        """The collection this adapter addresses, as an alias names its target."""
        return self.name

    def alias_target(self, alias: str) -> str | None:
        """The collection ``alias`` points at, or None when no such alias exists.

        Raises PermanentStoreError when ``alias`` names a collection rather than an alias.
        """
        client = self._connect()
        try:
            described = self._call("describe_alias", client.describe_alias, alias)
        except StoreError as exc:
            if not _alias_missing(exc):
                raise
            if self._call("has_collection", client.has_collection, alias):
                raise PermanentStoreError(f"{alias!r} is a collection, not an alias", store=STORE) from exc
            return None
        return str(described["collection_name"])

    def point_alias(self, alias: str, collection: str) -> None:
        """Point ``alias`` at ``collection`` (``create_alias`` when absent, else ``alter_alias``).

        Milvus switches an alias atomically. Idempotent: nothing is sent when it already points
        there. The switch has happened when this returns (read back to make sure), so a caller
        that wants the moment of the switch times the call itself.
        """
        client = self._connect()
        current = self.alias_target(alias)
        if current == collection:
            return
        if current is None:
            self._create_alias(client, alias, collection)
        else:
            self._call("alter_alias", client.alter_alias, collection, alias)
        now = self.alias_target(alias)
        if now != collection:
            # Another writer moved the alias in between; the caller decides whether to repeat.
            raise TransientStoreError(
                f"alias {alias!r} points at {now!r} right after pointing it at {collection!r}", store=STORE
            )
        self._log.info("alias pointed", alias=alias, target=collection, was=current)

    def _create_alias(self, client: MilvusClient, alias: str, collection: str) -> None:
        try:
            self._call("create_alias", client.create_alias, collection, alias)
        except StoreError as exc:
            # Another process may have created it meanwhile; then it is moved like any alias.
            if self.alias_target(alias) is not None:
                self._call("alter_alias", client.alter_alias, collection, alias)
                return
            if "already exist" not in str(exc):
                raise
            # Milvus 2.3 lets an aliased collection be dropped and keeps the alias, dangling:
            # describe_alias no longer finds it, create_alias still does. Drop it and create anew.
            self._log.warning("dropping a dangling alias", alias=alias)
            self._call("drop_alias", client.drop_alias, alias)
            self._call("create_alias", client.create_alias, collection, alias)

    # --- collection set-up -------------------------------------------------------------------

    def _create(self, client: MilvusClient) -> None:
        try:
            self._call(
                "create_collection",
                client.create_collection,
                self.name,
                schema=self._schema(client),
                index_params=self._index_params(client),
                consistency_level=STRONG,
                **self._creation_properties(),
            )
            self._log.info("collection created", dim=self.dim, model_id=self.model_id)
        except PermanentStoreError:
            # Another process may have created it meanwhile; then the schema check decides.
            if not self._call("has_collection", client.has_collection, self.name):
                raise

    def _schema(self, client: MilvusClient) -> Any:
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("chunk_id", DataType.VARCHAR, is_primary=True, max_length=ID_BYTES_MAX)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        schema.add_field("doc_id", DataType.VARCHAR, max_length=ID_BYTES_MAX)
        schema.add_field("chunk_index", DataType.INT64)
        schema.add_field("text", DataType.VARCHAR, max_length=TEXT_BYTES_MAX)
        schema.add_field("content_hash", DataType.VARCHAR, max_length=CONTENT_HASH_CHARS_MAX)
        schema.add_field("version", DataType.INT64)
        schema.add_field("metadata", DataType.JSON)
        return schema

    def _index_params(self, client: MilvusClient) -> Any:
        params = client.prepare_index_params()
        params.add_index("vector", index_type=INDEX_TYPE, metric_type=METRIC)
        return params

    def _creation_properties(self) -> dict[str, Any]:
        """The ``properties`` argument recording this adapter's embedder (none without a model id)."""
        if self.model_id is None:
            return {}
        record = json.dumps({"model_id": self.model_id, "dim": self.dim}, ensure_ascii=False)
        return {"properties": {EMBEDDER_PROPERTY: record}}

    def _guard(self) -> None:
        """Check the collection's recorded embedder once per adapter, before its first write."""
        if self._model_checked:
            return
        client = self._connect()
        self._check_model(self._call("describe_collection", client.describe_collection, self.name))

    def _check_model(self, described: Mapping[str, Any]) -> None:
        """Raise ConfigError if the collection holds vectors of another model or dimension."""
        record = _embedder_record(described, self.name)
        if record is not None and not _same_embedder(record, self.model_id, self.dim):
            recorded_model, recorded_dim = record
            own = "an unnamed model" if self.model_id is None else repr(self.model_id)
            raise ConfigError(
                f"collection {self.name!r} holds vectors of model {recorded_model!r} (dim {recorded_dim}),"
                f" but this embedder is {own} (dim {self.dim}): refusing to write into it; rebuild"
                " into a new collection (generation) for this embedder"
            )
        self._model_checked = True

    def _check_schema(self, described: Mapping[str, Any]) -> None:
        problem = _schema_problem(described, self.dim)
        if problem:
            raise PermanentStoreError(
                f"collection {self.name!r} exists with another schema: {problem}", store=STORE
            )

    def _ensure_index(self, client: MilvusClient) -> None:
        """Create the vector index if a crash struck between creating the collection and it."""
        if "vector" in self._call("list_indexes", client.list_indexes, self.name):
            return
        self._call("create_index", client.create_index, self.name, self._index_params(client))
        self._log.info("vector index created")

    def _ensure_loaded(self, client: MilvusClient) -> None:
        """Load the collection: a reopened milvus-lite file or a restarted server may not have."""
        state = self._call("get_load_state", client.get_load_state, self.name)
        if str(state.get("state")) != "Loaded":
            self._call("load_collection", client.load_collection, self.name)
            self._log.info("collection loaded", was=str(state.get("state")))

    # --- wire helpers ------------------------------------------------------------------------

    def _connect(self) -> MilvusClient:
        """The client, built on first use (so constructing the adapter does no I/O).

        A connect refused at once with a transient status is tried again (CONNECT_ATTEMPTS,
        CONNECT_RETRY_PAUSE_S apart): gRPC shares one connection between channels to the same
        address, and a server that has just sent it GOAWAY ("too many pings": milvus-lite's
        server allows fewer keepalive pings than pymilvus sends) fails the next handshake on it.
        A connect that used up its timeout is not tried again here; the caller's retry decides.
        """
        if self._client is not None:
            return self._client
        for attempt in range(1, CONNECT_ATTEMPTS + 1):
            started = time.monotonic()
            try:
                with _wire("connect"):
                    self._client = _client(self.settings)
                return self._client
            except TransientStoreError as exc:
                fast = time.monotonic() - started < self.settings.connect_timeout_s / 2
                if attempt == CONNECT_ATTEMPTS or not fast:
                    raise
                self._log.warning("milvus connect refused; trying again", attempt=attempt, error=str(exc))
                time.sleep(CONNECT_RETRY_PAUSE_S)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _call(self, operation: str, method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call one pymilvus method with the request timeout (``call_timeout_s=`` overrides it for
        this call), translating its errors.

        A collection found not loaded (after a server restart, or released by an operator) is
        loaded once and the call repeated: a restarted milvus-lite server never reloads on its
        own, and a 2.3.5 server may take tens of seconds to.
        """
        call_timeout_s = kwargs.pop("call_timeout_s", None)
        timeout_s = self.timeout_s if call_timeout_s is None else float(call_timeout_s)
        try:
            with _wire(operation):
                return method(*args, timeout=timeout_s, **kwargs)
        except TransientStoreError as exc:
            if operation in _LOAD_OPERATIONS or not _not_loaded(exc):
                raise
        self._log.warning("collection not loaded; loading it", operation=operation)
        self._ensure_loaded(self._connect())
        with _wire(operation):
            return method(*args, timeout=timeout_s, **kwargs)

    def _upsert_batch(self, columns: list[dict[str, Any]]) -> None:
        """One upsert request, column by column (see ``_columns``)."""
        rows = len(columns[0]["values"])
        try:
            result = self._call("upsert", self._connect()._get_connection().upsert, self.name, columns,
                                schema=self._write_schema())  # fmt: skip
        except StoreError as exc:
            # Described again before the next write, in case the collection was recreated.
            self._described = None
            if _refuses_content(exc):
                raise RefusedContent(str(exc), store=STORE) from exc.__cause__
            raise
        acknowledged = _upsert_count(result)
        if acknowledged is not None and acknowledged != rows:
            # The rows are idempotent to send again, so a short acknowledgement is retriable.
            raise TransientStoreError(
                f"milvus acknowledged {acknowledged} of {rows} upserted rows", store=STORE
            )

    def _write_schema(self) -> dict[str, Any]:
        """The collection's description, which pymilvus's column-based upsert needs (kept, so
        that a write costs one request, not two)."""
        if self._described is None:
            handler = self._connect()._get_connection()
            self._described = self._call("describe_collection", handler.describe_collection, self.name)
        return self._described

    def _query(self, expr: str, fields: Sequence[str], limit: int | None = None) -> list[dict[str, Any]]:
        extra = {} if limit is None else {"limit": limit}
        rows = self._call(
            "query",
            self._connect().query,
            self.name,
            filter=expr,
            output_fields=list(fields),
            consistency_level=STRONG,
            **extra,
        )
        return [dict(r) for r in rows]

    def _query_by_ids(self, chunk_ids: Iterable[str], fields: Sequence[str]) -> list[dict[str, Any]]:
        ids = sorted({i for i in chunk_ids if not _id_rejection(i)})
        rows: list[dict[str, Any]] = []
        for batch in _batches(ids, _id_bytes, IDS_PER_REQUEST_MAX, ID_EXPRESSION_BYTES_MAX):
            rows.extend(self._query(_pk_in(batch), fields))
        return rows

    def _count_where(self, expr: str) -> int:
        [row] = self._query(expr, ["count(*)"])
        return int(row["count(*)"])

    def _iterate(self, fields: Sequence[str]) -> Iterator[dict[str, Any]]:
        """Rows of a Strong query_iterator over the whole collection, page by page."""
        iterator = self._call(
            "query_iterator",
            self._connect().query_iterator,
            self.name,
            batch_size=SCAN_PAGE_ROWS_MAX,
            filter="",
            output_fields=list(fields),
            consistency_level=STRONG,
        )
        try:
            while page := self._next_page(iterator):
                yield from (dict(r) for r in page)
        finally:
            iterator.close()

    def _next_page(self, iterator: Any) -> list[Any]:
        with _wire("query_iterator.next"):
            return list(iterator.next())

    def _complete_ranges(self, fields: Sequence[str], page_rows: int) -> Iterator[list[dict[str, Any]]]:
        """The rows of primary-key ranges small enough to come back whole, in key order."""
        pending: list[tuple[str, str | None]] = [("", None)]
        while pending:
            lo, hi = pending.pop()
            rows = self._query(_range_expr(lo, hi), fields, limit=page_rows)
            if len(rows) < page_rows:
                yield rows
                continue
            mid = _median_id(rows)
            # Pushed high half first so that the low half is scanned first: key order overall.
            pending.extend([(mid, hi), (lo, mid)])

    def _ranges_of_ids(self, page_rows: int) -> Iterator[tuple[str, str | None, list[str]]]:
        """Primary-key ranges [lo, hi) covering the collection, each with all its IDs."""
        pending: list[tuple[str, str | None]] = [("", None)]
        while pending:
            lo, hi = pending.pop()
            ids = [
                str(r["chunk_id"]) for r in self._query(_range_expr(lo, hi), ["chunk_id"], limit=page_rows)
            ]
            if len(ids) < page_rows:
                yield lo, hi, ids
                continue
            mid = sorted(ids)[len(ids) // 2]
            pending.extend([(mid, hi), (lo, mid)])

    def _duplicates_among(self, ids: list[str]) -> dict[str, int]:
        """Entity counts of the duplicated IDs among ``ids``, halving the list down to single IDs."""
        found: dict[str, int] = {}
        pending = [sorted(ids)]
        while pending:
            group = pending.pop()
            entities = self._count_where(_pk_in(group))
            if entities <= len(group):
                continue
            if len(group) == 1:
                found[group[0]] = entities
                continue
            half = len(group) // 2
            pending.extend([group[:half], group[half:]])
        return found


# --- client and errors -------------------------------------------------------------------------


def _client(settings: VectorSettings) -> MilvusClient:
    """A dedicated client (its own channel: closing it never affects another adapter's)."""
    if settings.is_embedded:
        # pymilvus refuses a .db path whose directory does not exist yet.
        Path(settings.uri).parent.mkdir(parents=True, exist_ok=True)
    auth: dict[str, Any] = {}
    if settings.token is not None:
        auth["token"] = settings.token.get_secret_value()
    if settings.user is not None and settings.password is not None:
        auth["user"] = settings.user
        auth["password"] = settings.password.get_secret_value()
    if settings.uses_tls:
        auth["secure"] = True
    if settings.server_pem_path is not None:
        auth["server_pem_path"] = settings.server_pem_path
    if settings.server_name is not None:
        auth["server_name"] = settings.server_name

    def connect() -> MilvusClient:
        return MilvusClient(
            uri=settings.uri, db_name=settings.db_name, timeout=settings.connect_timeout_s, dedicated=True, **auth
        )

    return _open_lite(Path(settings.uri), connect) if settings.is_embedded else connect()


def _open_lite(path: Path, connect: Callable[[], MilvusClient]) -> MilvusClient:
    """Open a milvus-lite file once no other process holds it, waiting at most LITE_LOCK_WAIT_S
    (then the open fails as it would have at once)."""
    deadline = time.monotonic() + LITE_LOCK_WAIT_S
    holder = _lite_holder(path)
    if holder is not None:
        log.warning("another process holds the milvus-lite file; waiting for it to let go",
                    path=str(path), holder_pid=holder, wait_s=LITE_LOCK_WAIT_S)
    while holder is not None and time.monotonic() < deadline:
        time.sleep(LITE_LOCK_POLL_S)
        holder = _lite_holder(path)
    return connect()


def lite_holder(uri: str) -> int | None:
    """The PID of another process that holds the milvus-lite file ``uri`` (0 if it runs in
    another PID namespace), or None: a command that only reads can then ask that process instead
    of waiting for the file."""
    return _lite_holder(Path(uri))


def _lite_holder(path: Path) -> int | None:
    """The PID of another process holding the lock of the milvus-lite file at ``path`` (0 if it
    runs in another PID namespace), from /proc/locks; None if no other process holds it."""
    try:
        stat = (path / LITE_LOCK_FILE).stat()
        table = LOCKS_TABLE.read_text()
    except OSError:
        return None
    # By inode alone: the device the table names is not always the one stat() reports (btrfs),
    # and a lock on another device's file of the same inode number costs only a bounded wait.
    inode = f":{stat.st_ino}"
    for line in table.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 4449 08:01:1234 0 EOF"; a waiter's line has "->" second.
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].endswith(inode) and int(fields[4]) != os.getpid():
            return int(fields[4])
    return None


@contextmanager
def _wire(operation: str) -> Iterator[None]:
    """Translate pymilvus and gRPC errors into lockstep's transient / permanent store errors."""
    started = time.monotonic()
    try:
        yield
    except (MilvusException, grpc.RpcError) as exc:
        elapsed_s = round(time.monotonic() - started, 3)
        message = f"milvus {operation} failed after {elapsed_s} s: {_describe(exc)}"
        if _is_transient(exc):
            raise TransientStoreError(message, store=STORE) from exc
        raise PermanentStoreError(message, store=STORE) from exc


# Milvus's "collection not loaded" status code.
COLLECTION_NOT_LOADED_CODE = 101
_LOAD_OPERATIONS = frozenset({"get_load_state", "load_collection"})


# Milvus's "parameter invalid" status (merr.ErrParameterInvalid): a row the server will not store.
PARAMETER_INVALID_CODE = 1100
# milvus-lite answers a row it will not store (a VARCHAR over its max_length) with this code and
# a message naming the field.
LITE_INVALID_ROW_CODE = 6


def _refuses_content(exc: StoreError) -> bool:
    """Whether a failed write was refused for what its rows hold (pymilvus's own checks of the
    data, or the server's invalid-parameter status), not for the connection or the writer."""
    cause = exc.__cause__
    if isinstance(cause, DataNotMatchException | DataTypeNotMatchException):
        return True
    if isinstance(cause, ParamError):
        # pymilvus checks each value against the collection's schema ("invalid input of field").
        return "field" in str(cause.message)
    if not isinstance(cause, MilvusException):
        return False
    code = _code(cause)
    return code == PARAMETER_INVALID_CODE or (code == LITE_INVALID_ROW_CODE and "field" in str(cause.message))


def _not_loaded(exc: TransientStoreError) -> bool:
    cause = exc.__cause__
    return isinstance(cause, MilvusException) and str(cause.code) == str(COLLECTION_NOT_LOADED_CODE)


def _alias_missing(exc: StoreError) -> bool:
    """Whether a describe_alias failed because there is no such alias."""
    cause = exc.__cause__
    if not isinstance(cause, MilvusException):
        return False
    return _code(cause) in ALIAS_NOT_FOUND_CODES and "alias" in str(cause.message)


def _code(exc: MilvusException) -> int | None:
    try:
        return int(exc.code)
    except (TypeError, ValueError):
        return None


def _is_transient(exc: MilvusException | grpc.RpcError) -> bool:
    if isinstance(exc, ConnectError | MilvusUnavailableException):
        return True
    if isinstance(exc, grpc.RpcError):
        return _grpc_code(exc) in TRANSIENT_GRPC_CODES
    if type(exc) is not MilvusException:
        # pymilvus's subclasses name client-side checks: parameters, types, schema mismatches.
        return False
    code = exc.code
    if isinstance(code, grpc.StatusCode):
        return code in TRANSIENT_GRPC_CODES
    return int(code) in TRANSIENT_CODES


def _grpc_code(exc: grpc.RpcError) -> grpc.StatusCode | None:
    code = getattr(exc, "code", None)
    return code() if callable(code) else None


def _describe(exc: MilvusException | grpc.RpcError) -> str:
    if isinstance(exc, MilvusException):
        return f"code={exc.code} {exc.message}"
    return f"grpc {_grpc_code(exc)}"


# --- rows, expressions and batches -------------------------------------------------------------


def _columns(
    chunks: Sequence[IndexedChunk], vectors: np.ndarray, schema: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """One upsert request's rows as columns: pymilvus packs a column in one pass, where a list
    of row dicts costs it a per-row, per-field conversion (about four times the CPU)."""
    types = {f["name"]: f["type"] for f in schema["fields"]}
    values: dict[str, list[Any]] = {
        "chunk_id": [c.chunk_id for c in chunks],
        "vector": vectors.tolist(),  # float32, as Milvus stores it
        "doc_id": [c.doc_id for c in chunks],
        "chunk_index": [c.chunk_index for c in chunks],
        "text": [c.text for c in chunks],
        "content_hash": [c.content_hash for c in chunks],
        "version": [c.version for c in chunks],
        "metadata": [dict(c.metadata) for c in chunks],
    }
    return [{"name": name, "type": types[name], "values": column} for name, column in values.items()]


def _chunk_bytes(chunk: IndexedChunk) -> int:
    """An estimate of a row's size on the wire (strings, 4 bytes per float, JSON, overhead)."""
    strings = (chunk.chunk_id, chunk.doc_id, chunk.text, chunk.content_hash)
    metadata = json.dumps(dict(chunk.metadata), ensure_ascii=False)
    vector_floats = len(chunk.vector) if chunk.vector is not None else 0
    return sum(len(s.encode()) for s in strings) + len(metadata.encode()) + 4 * vector_floats + 64


def _id_bytes(chunk_id: str) -> int:
    return len(chunk_id.encode()) + 4  # the quotes and separator around it in an expression


def _batches(
    items: Sequence[T], size_of: Callable[[T], int], count_max: int, bytes_max: int
) -> Iterator[list[T]]:
    """Split items into batches of at most ``count_max`` items and ``bytes_max`` bytes."""
    batch: list[T] = []
    size = 0
    for item in items:
        item_size = size_of(item)
        if batch and (len(batch) == count_max or size + item_size > bytes_max):
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += item_size
    if batch:
        yield batch


def _quote(value: str) -> str:
    """``value`` as a double-quoted string literal that Milvus 2.3 and milvus-lite both parse."""
    escaped = (
        value.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
    )
    return f'"{escaped}"'


def _pk_in(chunk_ids: Sequence[str]) -> str:
    return f"chunk_id in [{','.join(_quote(i) for i in chunk_ids)}]"


def _range_expr(lo: str, hi: str | None) -> str:
    """Primary keys in [lo, hi); ``hi`` None means no upper bound. Strings compare bytewise."""
    lower = f"chunk_id >= {_quote(lo)}"
    return lower if hi is None else f"{lower} and chunk_id < {_quote(hi)}"


def _median_id(rows: Sequence[Mapping[str, Any]]) -> str:
    ids = sorted(str(r["chunk_id"]) for r in rows)
    return ids[len(ids) // 2]


def _scan_fields(with_text: bool) -> list[str]:
    return [*STORED_FIELDS, "text"] if with_text else list(STORED_FIELDS)


def _newest_by_id(items: Iterable[tuple[int, IndexedChunk | ChunkDelete]]) -> dict[str, int]:
    """For each chunk ID, the position of its item with the highest version (the last on ties)."""
    newest: dict[str, tuple[int, int]] = {}
    for position, item in items:
        kept = newest.get(item.chunk_id)
        if kept is None or item.version >= kept[0]:
            newest[item.chunk_id] = (item.version, position)
    return {chunk_id: position for chunk_id, (_, position) in newest.items()}


def _write_item(
    position: int, chunk_id: str, newest: Mapping[str, int], rejected: Mapping[int, str]
) -> ItemResult:
    if position in rejected:
        return ItemResult(chunk_id, ItemStatus.REJECTED, rejected[position])
    if newest.get(chunk_id) == position:
        return ItemResult(chunk_id, ItemStatus.APPLIED)
    return ItemResult(chunk_id, ItemStatus.SUPERSEDED, "a newer version of this chunk is in the same call")


def _upsert_count(result: Any) -> int | None:
    """The number of rows Milvus says it upserted, when the answer says so."""
    if isinstance(result, Mapping) and "upsert_count" in result:
        return int(result["upsert_count"])
    count = getattr(result, "upsert_count", None)
    return None if count is None else int(count)


# --- validation --------------------------------------------------------------------------------


def _id_rejection(chunk_id: str) -> str:
    if not chunk_id:
        return "empty chunk_id"
    if "\x00" in chunk_id:
        return "chunk_id contains a NUL character"
    return _utf8_rejection("chunk_id", chunk_id, ID_BYTES_MAX)


def _utf8_rejection(field: str, value: str, bytes_max: int) -> str:
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return f"{field} is not valid UTF-8"
    return f"{field} is longer than {bytes_max} bytes" if size > bytes_max else ""


def _field_rejection(chunk: IndexedChunk) -> str:
    return (
        _utf8_rejection("doc_id", chunk.doc_id, ID_BYTES_MAX)
        or _utf8_rejection("text", chunk.text, TEXT_BYTES_MAX)
        or _utf8_rejection("content_hash", chunk.content_hash, CONTENT_HASH_CHARS_MAX)
        or _int64_rejection("version", chunk.version)
        or _int64_rejection("chunk_index", chunk.chunk_index)
        or _metadata_rejection(chunk.metadata)
    )


def _int64_rejection(field: str, value: int) -> str:
    return "" if INT64_MIN <= value <= INT64_MAX else f"{field} {value} does not fit in INT64"


def _metadata_rejection(metadata: Mapping[str, Any]) -> str:
    """The domain's own metadata rule (int64 integers, bounded depth and size) is this store's:
    checked per row here, since pymilvus refuses a whole request for one bad value."""
    return metadata_rejection(metadata)


def _vector_matrix(chunks: Sequence[IndexedChunk], dim: int) -> tuple[np.ndarray, dict[int, str]]:
    """The chunks' vectors as one (n, dim) float32 matrix, as Milvus stores them, and why any of
    them would be refused (by position). One C pass in the common case of well-formed vectors;
    a malformed one (missing, ragged, not numbers) sends every chunk through ``_vector_rejection``."""
    try:
        with np.errstate(over="ignore"):
            # A float beyond float32's range becomes infinite, as it would in Milvus.
            matrix = np.asarray([c.vector for c in chunks], dtype=np.float32)
    except (TypeError, ValueError):
        matrix = None
    if matrix is None or matrix.shape != (len(chunks), dim):
        matrix = np.zeros((len(chunks), dim), dtype=np.float32)
        reasons = {i: r for i, c in enumerate(chunks) if (r := _vector_rejection(c.vector, dim))}
        for i, c in enumerate(chunks):
            if i not in reasons:
                matrix[i] = np.asarray(c.vector, dtype=np.float32)
        return matrix, reasons
    not_finite = set(np.flatnonzero(~np.isfinite(matrix).all(axis=1)).tolist())
    all_zeros = set(np.flatnonzero(~matrix.any(axis=1)).tolist())
    return matrix, {
        i: "vector has a NaN or infinite component"
        if i in not_finite
        else "vector is all zeros (no cosine similarity)"
        for i in sorted(not_finite | all_zeros)
    }


def _vector_rejection(vector: Vector | None, dim: int) -> str:
    if vector is None:
        return "chunk has no vector"
    if len(vector) != dim:
        return f"vector has {len(vector)} dimensions, the index {dim}"
    try:
        # As Milvus stores it (a float beyond float32's range becomes infinite), in one C pass.
        with np.errstate(over="ignore"):
            values = np.asarray(vector, dtype=np.float32)
    except (TypeError, ValueError):
        return "vector has a component that is not a number"
    if values.ndim != 1 or not np.isfinite(values).all():
        return "vector has a NaN or infinite component"
    if not values.any():
        return "vector is all zeros (no cosine similarity)"
    return ""


# --- reading rows back -------------------------------------------------------------------------


def _stored(row: Mapping[str, Any], *, with_text: bool) -> StoredChunk:
    """A row as a StoredChunk; the schema types every field, but a row another writer inserted
    may hold JSON metadata that is no object (milvus-lite stores any JSON), which makes it foreign."""
    metadata = row.get("metadata")
    foreign = "" if metadata is None or isinstance(metadata, Mapping) else _not_an_object(metadata)
    return StoredChunk(
        chunk_id=str(row["chunk_id"]),
        doc_id=str(row["doc_id"]),
        chunk_index=int(row["chunk_index"]),
        content_hash=str(row["content_hash"]),
        version=int(row["version"]),
        text=str(row["text"]) if with_text else None,
        metadata=dict(metadata) if isinstance(metadata, Mapping) else {},
        foreign=foreign,
    )


def _not_an_object(metadata: Any) -> str:
    return f"metadata is {type(metadata).__name__}, not an object"


def _hit(hit: Mapping[str, Any]) -> SearchHit:
    entity = hit["entity"]
    metadata = entity.get("metadata")
    return SearchHit(
        chunk_id=str(entity["chunk_id"]),
        doc_id=str(entity["doc_id"]),
        score=float(hit["distance"]),
        text=str(entity["text"]),
        version=int(entity.get("version", NO_VERSION)),
        chunk_index=int(entity.get("chunk_index", -1)),
        metadata=dict(metadata) if isinstance(metadata, Mapping) else {},
    )


def _metadata_filter(where: MetadataFilter) -> str:
    """Equality on keys of the JSON ``metadata`` field, as a Milvus boolean expression ("" for
    none). ``None`` values are left out: what JSON null compares equal to differs between
    servers, so the caller's own filter decides those."""
    terms = [f"metadata[{_quote(key)}] == {_literal(value)}" for key, value in where.items() if value is not None]
    return " and ".join(terms)


def _literal(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _quote(value)
    return repr(value)


def _embedder_record(described: Mapping[str, Any], collection: str) -> tuple[str, int] | None:
    """The (model id, dim) recorded with a collection; None for one created without a record."""
    raw = (described.get("properties") or {}).get(EMBEDDER_PROPERTY)
    if raw is None:
        return None
    try:
        record = json.loads(raw)
        return str(record["model_id"]), int(record["dim"])
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError(
            f"collection {collection!r} has an unreadable {EMBEDDER_PROPERTY} property: {raw!r}"
        ) from exc


def _same_embedder(record: tuple[str, int], model_id: str | None, dim: int) -> bool:
    """Whether the recorded (model id, dim) fits this adapter (no model id: the dim alone)."""
    recorded_model, recorded_dim = record
    return recorded_dim == dim and model_id in (None, recorded_model)


def _schema_problem(described: Mapping[str, Any], dim: int) -> str:
    """How an existing collection's fields differ from the schema this adapter writes ("" if not)."""
    fields = {f["name"]: f for f in described.get("fields", [])}
    expected = {
        "chunk_id": DataType.VARCHAR,
        "vector": DataType.FLOAT_VECTOR,
        "doc_id": DataType.VARCHAR,
        "chunk_index": DataType.INT64,
        "text": DataType.VARCHAR,
        "content_hash": DataType.VARCHAR,
        "version": DataType.INT64,
        "metadata": DataType.JSON,
    }
    for name, data_type in expected.items():
        if name not in fields:
            return f"field {name!r} is missing"
        if fields[name]["type"] != data_type:
            return f"field {name!r} is {fields[name]['type']}, expected {data_type}"
    if not fields["chunk_id"].get("is_primary"):
        return "chunk_id is not the primary key"
    stored_dim = int(fields["vector"].get("params", {}).get("dim", -1))
    return "" if stored_dim == dim else f"vector dim is {stored_dim}, expected {dim}"
