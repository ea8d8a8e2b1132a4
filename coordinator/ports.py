"""The ports: what the domain needs from the outside world, as typing.Protocols.

Every adapter in ``adapters/`` implements one of these; each port has one contract test suite
parametrized over all of its adapters (``tests/contract``). A capability that only some adapters
have is a port of its own (``FollowingSource``, ``ListableSource``, ``ChangedDocs``,
``DuplicateFinder``…), found by type with ``isinstance``, never by probing attributes. The lease
rules the ledgers apply are not a port: they live in ``coordinator.leases``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from coordinator.crashpoints import CrashHook
from coordinator.events import ChangeEvent
from coordinator.generations import Generation
from coordinator.model import (
    ChunkDelete,
    DeadLetter,
    DocState,
    IndexedChunk,
    PayloadEncoding,
    SearchHit,
    StoredChunk,
    Vector,
    WriteResult,
)

if TYPE_CHECKING:
    # For annotations only: coordinator.apply implements Engine and imports this module.
    from coordinator.apply import ApplyEngine, ApplyStats


@runtime_checkable
class ChunkIndex(Protocol):
    """What both indexes share: versioned writes by chunk ID, real-time reads, full scans.

    Writes are idempotent and version-stamped: an item whose version is not strictly above the
    stored one is reported SUPERSEDED and changes nothing (ES/OpenSearch external versioning; the
    Tantivy adapter gates itself; Milvus cannot, so the ledger gates before it is called).
    Whole-request failures raise TransientStoreError (retry) or PermanentStoreError.
    """

    name: str

    def ensure(self) -> None:
        """Create the index/collection with its explicit schema if it does not exist."""

    def upsert(self, chunks: Sequence[IndexedChunk]) -> WriteResult:
        """Write chunks (one item per chunk ID per call), each at its own version."""

    def delete(self, deletes: Sequence[ChunkDelete]) -> WriteResult:
        """Delete chunks by ID, each at a version above any it was written with."""

    def get(self, chunk_ids: Sequence[str]) -> dict[str, StoredChunk]:
        """Read chunks by ID, bypassing any refresh delay; absent IDs are left out."""

    def scan(self, *, with_text: bool = False) -> Iterator[StoredChunk]:
        """Stream every live chunk once, without loading the index into memory."""

    def count(self) -> int:
        """Number of live chunks, read with the store's strongest consistency."""

    def drop(self) -> None:
        """Remove the whole index/collection (tests, rebuild cleanup)."""

    def close(self) -> None:
        """Release connections and handles."""


@runtime_checkable
class KeywordIndex(ChunkIndex, Protocol):
    """A full-text index over chunk texts (Tantivy, OpenSearch, Elasticsearch)."""

    def search(self, query: str, k: int) -> list[SearchHit]:
        """BM25 top-k chunks for ``query`` (refreshing first if the store needs it)."""


@runtime_checkable
class VectorIndex(ChunkIndex, Protocol):
    """A vector index over chunk embeddings (Milvus in its three forms)."""

    dim: int

    def search(self, vector: Vector, k: int) -> list[SearchHit]:
        """Nearest k chunks to ``vector``."""

    def fetch_vectors(self, chunk_ids: Sequence[str]) -> dict[str, list[float]]:
        """The stored vectors of these chunks (used when the embedding cache lacks them)."""


@runtime_checkable
class AliasedIndex(Protocol):
    """An index that readers reach through an alias, which a blue-green swap moves at once.

    Every keyword and vector adapter is one: a search engine's alias (one ``_aliases`` request),
    a Milvus alias (``alter_alias``), a Tantivy alias file (replaced by an atomic rename). An
    alias is spelled as its store spells one (Tantivy: the alias file's path).
    """

    @property
    def physical_name(self) -> str:
        """How an alias target names this adapter's own index: what ``alias_target`` answers
        for an alias pointed at it (an index or collection name; Tantivy: its absolute path)."""

    def alias_target(self, alias: str, /) -> str | None:
        """The physical name of the one index ``alias`` points at; None when no such alias
        exists. PermanentStoreError when ``alias`` names an index rather than an alias."""

    def point_alias(self, alias: str, target: str, /) -> None:
        """Point ``alias`` at the index whose physical name is ``target`` (and at it alone),
        atomically: a reader sees the old target or the new one, never neither or both.
        Idempotent; the switch has happened when this returns."""


@runtime_checkable
class AliasedKeywordIndex(KeywordIndex, AliasedIndex, Protocol):
    """A keyword index that readers reach through an alias: what every keyword adapter is."""


@runtime_checkable
class AliasedVectorIndex(VectorIndex, AliasedIndex, Protocol):
    """A vector index that readers reach through an alias: what the Milvus adapter is."""


@runtime_checkable
class DuplicateFinder(Protocol):
    """A vector index that can list primary keys held by more than one entity (Milvus)."""

    def duplicate_ids(self) -> dict[str, int]: ...


@runtime_checkable
class ScannableIndex(Protocol):
    """An index the auditor can stream whole: every ChunkIndex, not a writer actor's proxy."""

    def scan(self, *, with_text: bool = False) -> Iterator[StoredChunk]: ...
class ChunkReader(Protocol):
    """An index read by chunk ID only: what a probe (``Auditor.probe``) needs. Every ChunkIndex
    is one; so is the service's proxy to a writer actor, which cannot stream a whole index."""

    def get(self, chunk_ids: Sequence[str]) -> dict[str, StoredChunk]:
        """Read chunks by ID, bypassing any refresh delay; absent IDs are left out."""


@runtime_checkable
class ChunkWriter(ChunkReader, Protocol):
    """What the two-phase apply (``ApplyEngine``) needs from either index: versioned writes and
    real-time reads by chunk ID, with ChunkIndex's semantics. Every ChunkIndex is one; so is
    the shard actors' proxy to an index writer actor."""

    def upsert(self, chunks: Sequence[IndexedChunk]) -> WriteResult:
        """Write chunks (one item per chunk ID per call), each at its own version."""

    def delete(self, deletes: Sequence[ChunkDelete]) -> WriteResult:
        """Delete chunks by ID, each at a version above any it was written with."""


@runtime_checkable
class VectorWriter(ChunkWriter, Protocol):
    """What the two-phase apply needs from the vector index: a ChunkWriter that also gives back
    the vectors it holds (a metadata-only rewrite reuses them). Every VectorIndex is one."""

    def fetch_vectors(self, chunk_ids: Sequence[str]) -> dict[str, list[float]]:
        """The stored vectors of these chunks (used when the embedding cache lacks them)."""


# A metadata filter: equality on top-level metadata keys, each value a JSON scalar.
MetadataFilter = Mapping[str, str | int | float | bool | None]


@runtime_checkable
class KeywordSearch(Protocol):
    """The keyword index as the read path uses it: BM25 hits carrying what the fence checks
    (version, chunk index, text, metadata), read at the engine's own search visibility: nothing
    is refreshed for a query (a refresh per query is what a loaded Elasticsearch must not get)."""

    name: str
    # Whether ``search_hits`` filters on metadata itself; otherwise the caller filters after the
    # fence (metadata is stored, not indexed, in every keyword backend).
    filters_metadata: bool

    def search_hits(
        self, query: str, k: int, *, where: MetadataFilter | None = None, timeout_s: float | None = None
    ) -> list[SearchHit]:
        """BM25 top-k chunks for ``query``, best first; ``timeout_s`` bounds the whole call."""

    def visible(self, chunk_ids: Sequence[str]) -> dict[str, int]:
        """The version of each of these chunks that a search sees now (absent: not seen), read
        through the search path, so that it shows what a query would find."""

    def close(self) -> None: ...


class SearchVisibility(Protocol):
    """What a keyword index's searches see of these chunks now: chunk ID -> version."""

    def visible(self, chunk_ids: Sequence[str]) -> dict[str, int]: ...


@runtime_checkable
class VectorSearch(Protocol):
    """The vector index as the read path uses it."""

    name: str
    dim: int
    # Whether ``search_hits`` filters on metadata itself (Milvus does, on its JSON field).
    filters_metadata: bool

    def search_hits(
        self,
        vector: Vector,
        k: int,
        /,
        *,
        where: MetadataFilter | None = None,
        strong: bool = False,
        timeout_s: float | None = None,
    ) -> list[SearchHit]:
        """The k chunks nearest to ``vector``, best first. ``strong``: see every write
        acknowledged before the call (Milvus ``Strong``); otherwise the store's default bounded
        staleness, which the fence makes safe. ``vector`` and ``k`` are positional-only, so
        that an implementation (the service's ``VectorSearchProxy``) may name them as it likes."""

    def close(self) -> None: ...


class CommittedState(Protocol):
    """The read side of the ledger the search path needs."""

    def get_docs(self, doc_ids: Iterable[str]) -> dict[str, DocState]:
        """Committed state of the given documents, in one read; unknown documents left out."""

    def get_checkpoint(self, source: str) -> str | None:
        """The position after the last applied event of ``source``, or None."""


@runtime_checkable
class Embedder(Protocol):
    """Turns chunk texts into vectors. ``model_id`` names the vector space (cache key part).

    Both are read-only here: nothing changes an embedder's space, and a wrapper (the chaos
    suite's ``FaultyEmbedder``) may answer them from the embedder it wraps."""

    @property
    def model_id(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One vector of length ``dim`` per text, in order."""


@runtime_checkable
class HashedEmbedder(Protocol):
    """An embedder behind a cache keyed by (model id, content hash).

    ``embed_calls`` counts texts actually sent to the model; ``cache_hits`` counts texts served
    from the cache. Identical texts in one call are embedded once.
    """

    model_id: str
    dim: int
    embed_calls: int
    cache_hits: int

    def embed_hashed(self, items: Sequence[tuple[str, str]]) -> dict[str, list[float]]:
        """Vectors for (content_hash, text) pairs, embedding only hashes the cache lacks."""

    def lookup(self, hashes: Iterable[str]) -> dict[str, list[float]]:
        """Cached vectors only; never calls the model."""


@runtime_checkable
class EmbeddingCache(Protocol):
    """Vectors already computed, keyed by (model id, content hash)."""

    def get_many(self, model_id: str, hashes: Iterable[str]) -> dict[str, list[float]]: ...

    def put_many(self, model_id: str, vectors: Mapping[str, Vector]) -> None: ...


@dataclass(frozen=True)
class Fence:
    """Proof of shard ownership: writes carrying a stale epoch are rejected with FencedError."""

    shard: int
    epoch: int


@dataclass(frozen=True)
class Intent:
    """A prepared document change: what must reach both indexes before ``after`` is committed.

    ``upserts`` carry no vectors (they live in the embedding cache); ``done`` holds the names of
    the sides that already hold this intent. ``restores`` marks the intent that replaced one a
    store refused: it brings both indexes back to the document's committed state.
    """

    doc_id: str
    version: int
    upserts: tuple[IndexedChunk, ...]
    deletes: tuple[ChunkDelete, ...]
    after: DocState
    done: frozenset[str] = frozenset()
    restores: bool = False


class Ledger(Protocol):
    """Durable per-document state, the two-phase protocol's intents, checkpoints and the DLQ.

    Every method is one transaction: a crash between statements leaves no half-state.
    """

    def get_docs(self, doc_ids: Iterable[str]) -> dict[str, DocState]:
        """Committed state of the given documents; unknown documents are left out."""

    def iter_docs(self, *, include_deleted: bool = False) -> Iterator[DocState]:
        """Every document (tombstones too when asked), in doc_id order."""

    def prepare(
        self, intents: Sequence[Intent], fence: Fence | None = None, *, skip_conflicts: bool = False
    ) -> list[str]:
        """Record intents durably, all or none. Raises IntentConflict if a document already has
        one pending or if an intent's version is not above the committed version (the ledger's
        gate), and FencedError if ``fence`` is no longer the shard's current epoch.
        ``skip_conflicts``: record the others and return the doc_ids that met the gate (a
        rebuild's backfill, which must not wait for the live service's writes of a document)."""

    def mark_done(
        self, side: str, doc_versions: Sequence[tuple[str, int]], fence: Fence | None = None
    ) -> None:
        """Record that ``side`` now holds these (doc_id, version) intents."""

    def commit(
        self, doc_versions: Sequence[tuple[str, int]], sides: frozenset[str], fence: Fence | None = None
    ) -> int:
        """Commit every listed intent that all ``sides`` hold: its ``after`` state becomes the
        document's state and the intent is removed. Returns the number committed."""

    def claim_shard(self, shard: int, owner: str, lease_s: float) -> Fence:
        """Own ``shard`` for ``lease_s`` seconds; the rules are ``coordinator.leases.claimed_epoch``'s."""

    def renew_shard(self, fence: Fence, owner: str, lease_s: float) -> None:
        """Extend a lease; FencedError if ``fence`` is no longer current or has expired."""

    def replace_intents(self, intents: Sequence[Intent], fence: Fence | None = None) -> None:
        """Replace pending intents (same doc_id and version) with new ones, no side done yet: a
        document a store refused becomes, in one transaction, the intent that brings both
        indexes back to its committed state (driven, and re-driven after a crash, as any)."""

    def abort(self, doc_versions: Sequence[tuple[str, int]]) -> None:
        """Drop these intents without committing (a side rejected them for good; they go to the
        dead-letter queue and the committed state stays as it was)."""

    def pending(self) -> list[Intent]:
        """Every prepared, not yet committed intent (re-driven on start)."""

    def applied_versions(self, side: str, doc_ids: Iterable[str]) -> dict[str, int]:
        """Per-index applied version of each document."""

    def get_checkpoint(self, source: str) -> str | None:
        """The position after the last applied event of ``source``, or None."""

    def set_checkpoint(self, source: str, position: str) -> None: ...

    def add_dead_letters(self, letters: Sequence[DeadLetter]) -> list[DeadLetter]: ...

    def dead_letters(self, *, limit: int, after_id: int = 0) -> list[tuple[int, DeadLetter]]: ...

    def counts(self) -> dict[str, int]:
        """Numbers per ledger state: live_docs, tombstones, chunks, pending_intents, dead_letters."""

    def drop_namespace(self) -> None:
        """Remove a later generation's ledger storage for good (its documents, intents and
        applied versions; what it shares with home stays) and close this ledger. ConfigError on
        a home ledger: its storage holds what every generation shares."""

    def close(self) -> None: ...


class DeadLetterQueue(Protocol):
    """The dead-letter queue: records and events that could not be applied, kept whole.

    Letters are numbered in the order they were added; a letter keeps its first reason, and
    each later failed attempt (a replay) adds its own to the letter's history."""

    def add_dead_letters(self, letters: Sequence[DeadLetter]) -> list[DeadLetter]:
        """Add letters; returns those added (a record delivered again is kept once)."""

    def dead_letters(self, *, limit: int, after_id: int = 0) -> list[tuple[int, DeadLetter]]:
        """Up to ``limit`` letters numbered above ``after_id``, oldest first."""

    def dead_letter(self, letter_id: int) -> tuple[DeadLetter, float] | None:
        """One letter and when it was first recorded (seconds since the epoch), or None."""

    def drop_dead_letters(self, letter_ids: Sequence[int]) -> int:
        """Remove letters for good; returns how many existed."""

    def record_attempt(self, letter_id: int, reason: str) -> bool:
        """Count a failed attempt and keep its reason in the history; False if no such letter."""


# Writer -> the generation numbers its writes reach (None: starting, not known yet).
Writers = dict[str, tuple[int, ...] | None]


class GenerationRegistry(Protocol):
    """The generations of one deployment and the processes writing them, stored beside the home
    ledger's tables (SQLite file or Postgres schema): every change of several records is one
    transaction."""

    def all(self) -> list[Generation]: ...

    def put(self, generations: Sequence[Generation]) -> None:
        """Insert or replace these records in one transaction."""

    def put_if_empty(self, generation: Generation) -> bool:
        """Record the first generation unless the registry already holds one; True if written."""

    def announce(self, owner: str, generations: Sequence[int] | None, ttl_s: float) -> None:
        """Record that ``owner``'s writes reach these generations (None: not known yet), for
        ``ttl_s`` seconds unless announced again."""

    def withdraw(self, owner: str) -> None:
        """``owner`` stopped writing."""

    def writers(self) -> Writers:
        """Every writer whose announcement has not expired."""


@dataclass(frozen=True)
class BadRecord:
    """A source record that could not be turned into a ChangeEvent: ``payload`` holds it exactly,
    spelled as ``encoding`` says (see ``coordinator.model.spell_record``)."""

    reason: str
    payload: str
    position: str | None = None
    doc_id: str | None = None
    encoding: PayloadEncoding = PayloadEncoding.TEXT
    truncated: bool = False


SourceRecord = ChangeEvent | BadRecord


class CheckpointStore(Protocol):
    """Where a source keeps "the position after the last applied event" (the ledger does this)."""

    def get_checkpoint(self, source: str) -> str | None: ...

    def set_checkpoint(self, source: str, position: str) -> None: ...


class KnownDocs(Protocol):
    """The read side of the ledger that sources diffing a snapshot need."""

    def get_docs(self, doc_ids: Iterable[str]) -> dict[str, DocState]: ...

    def iter_docs(self, *, include_deleted: bool = False) -> Iterator[DocState]: ...


@runtime_checkable
class ChangedDocs(Protocol):
    """A ledger that lists documents by commit time: behind ``lockstep audit --since`` and the
    continuous audit's "changed since the last round"."""

    def iter_docs_changed_since(self, since: float) -> Iterator[DocState]:
        """Every document (tombstones too) committed at or after ``since`` (Unix seconds)."""


class ChangeSource(Protocol):
    """A stream or snapshot of document changes.

    Checkpoint semantics: ``commit(position)`` records "the position after the last applied
    event"; ``read()`` after a restart resumes from the last committed position, so events after
    it are delivered again (at-least-once) and the ledger's version gate makes that harmless.
    """

    name: str

    def read(self) -> Iterator[SourceRecord]:
        """Records from the last committed position to the current end of the source."""

    def commit(self, position: str) -> None:
        """Persist ``position`` as the place to resume from."""

    def close(self) -> None: ...


@runtime_checkable
class ReconcilableSource(Protocol):
    """A snapshot source that can tell which known documents vanished without a trace
    (hard deletes in a SQL table); ``sync`` applies these deletes after reading changes."""

    def reconcile_ids(self) -> Iterator[ChangeEvent]:
        """Delete events for ledger documents that no longer exist at the source."""


@runtime_checkable
class FollowingSource(Protocol):
    """A source that keeps reading as changes arrive (a stream, a replication slot, an inbox, an
    appended file): ``lockstep run`` follows it instead of polling ``read()``."""

    def follow(self, stop: Callable[[], bool]) -> Iterator[SourceRecord]:
        """Like ``read()``, then keep yielding new records until ``stop()`` is true."""


class SourceDoc(Protocol):
    """One live document as the source holds it now."""

    @property
    def doc_id(self) -> str: ...

    @property
    def version(self) -> int: ...

    @property
    def text(self) -> str: ...

    @property
    def metadata(self) -> Mapping[str, Any]: ...


@runtime_checkable
class ListableSource(Protocol):
    """A source that can list its current state (SQL table, folder); event streams cannot."""

    def iter_current(self) -> Iterator[SourceDoc | BadRecord]: ...


@runtime_checkable
class FetchableSource(Protocol):
    """A listable source that also reads chosen documents (a generation snapshot): a probe then
    reads only the documents it looks at instead of listing the whole source."""

    def iter_current(self) -> Iterator[SourceDoc | BadRecord]: ...

    def get_current(self, doc_ids: Sequence[str]) -> Iterator[SourceDoc | BadRecord]:
        """The live ones among ``doc_ids``, as ``iter_current`` would list them."""
        ...


class Engine(Protocol):
    """The two-phase apply as its drivers use it: ``run_sync`` (whole batches), ``ShardWorker``
    (prepare and drive split, so that a shard can prepare a batch while another is driven) and the
    service's shard actors. One generation's ``ApplyEngine`` and the ``MultiEngine`` over every
    live generation both implement it."""

    @property
    def stats(self) -> ApplyStats:
        """The counters of this engine's run (the active generation's, over several)."""

    def recover(self, fence: Fence | None = None, owns: Callable[[str], bool] | None = None) -> int:
        """Drive every pending intent (only documents ``owns`` accepts, if given) to both sides and
        commit it; returns how many were driven."""

    def apply(self, records: Sequence[SourceRecord], fence: Fence | None = None) -> list[str]:
        """Prepare and drive one batch; raises a transient error with nothing lost if a store
        fails. Returns the doc_ids left out for another writer's intent: none unless the engine
        was asked to leave such documents out (``ApplyEngine.apply``'s ``skip_conflicts``)."""

    def prepare_some(
        self, records: Sequence[SourceRecord], fence: Fence | None = None
    ) -> tuple[list[Intent], list[str]]:
        """Phase 1 of a batch, leaving out the documents another writer holds: the prepared
        intents, one per document, and the doc_ids left out (the caller keeps them waiting)."""

    def drive(self, intents: Sequence[Intent], fence: Fence | None = None) -> None:
        """Phase 2: bring what is prepared for these intents' documents to both sides and commit
        it. A transient store failure is raised with the intents still prepared, to retry."""

    def pending(self) -> list[Intent]:
        """Every prepared, not yet committed intent, one per document: what a retry or a takeover
        of a document another writer left prepared hands back to ``drive``."""

    def dead_letter_event(self, event: ChangeEvent, reason: str, attempts: int) -> None:
        """Give up on one event (a poison document): it goes to the dead-letter queue."""

    def crash(self, point: str) -> None:
        """The crash hook at a named ``point`` (``coordinator.crashpoints``): nothing in production,
        a simulated or real crash in a crash test."""

    def close(self) -> None: ...


# --- a rebuild's view of the generations ---------------------------------------------------------


class CountingEmbedder(Protocol):
    """A generation's cached embedder as a rebuild sees it: it embeds the query set, and counts
    the texts it sent to the model (``embed_calls``) and those the cache served (``cache_hits``)."""

    embed_calls: int
    cache_hits: int

    def embed(self, texts: Sequence[str]) -> list[list[float]]: ...


class GenerationReader(Protocol):
    """A generation as a rebuild's backfill reads it: its ledger and its keyword index (never its
    vector collection, which a running service may hold open)."""

    @property
    def generation(self) -> Generation: ...

    @property
    def ledger(self) -> Ledger: ...

    @property
    def keyword(self) -> KeywordIndex: ...


class OpenedGeneration(Protocol):
    """Everything that writes one generation, opened: its ledger namespace, its own indexes, its
    cached embedder and the two-phase engine over them."""

    @property
    def generation(self) -> Generation: ...

    @property
    def ledger(self) -> Ledger: ...

    @property
    def keyword(self) -> AliasedKeywordIndex: ...

    @property
    def vector(self) -> AliasedVectorIndex: ...

    @property
    def embedder(self) -> CountingEmbedder: ...

    @property
    def engine(self) -> ApplyEngine: ...


# A generation's vector search by query text: (query, k) -> the k nearest chunks.
QuerySearch = Callable[[str, int], list[SearchHit]]


class GenerationStores(Protocol):
    """The stores of the deployment's generations, as a rebuild opens, points and drops them.

    Each ``…ing`` method opens a generation's stores for the ``with`` block and closes what it
    opened after it (never the home ledger, which its owner closes). The app layer implements it
    over the configured adapters (``lockstep.rebuild.ConfiguredStores``); ``tests/test_rebuild.py``
    drives it on real stores."""

    def physical_names(self, number: int) -> tuple[str, str]:
        """The keyword index and the vector collection of generation ``number``."""

    def reading(self, generation: Generation) -> AbstractContextManager[GenerationReader]:
        """``generation`` to read its committed documents and their texts."""

    def writing(self, generation: Generation, crash: CrashHook) -> AbstractContextManager[OpenedGeneration]:
        """``generation`` to write (its stores created if missing); ``crash`` reaches its engine
        and ledger."""

    def searching(self, generation: Generation) -> AbstractContextManager[QuerySearch]:
        """``generation``'s vector search, with its own embedder (nothing is written)."""

    def listing_source(self, reader: GenerationReader) -> AbstractContextManager[tuple[str, ListableSource] | None]:
        """The configured source and its name, when it can list its current state (its known
        documents are ``reader``'s); None for an event stream."""

    def point_aliases(self, parts: OpenedGeneration) -> dict[str, Any]:
        """Point both readers' aliases at ``parts``' indexes; returns when each switched."""

    def drop(self, generation: Generation) -> None:
        """Remove ``generation``'s indexes and ledger namespace for good."""
