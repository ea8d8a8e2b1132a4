"""The keyword index on Tantivy: an on-disk index in one directory, in this process.

Tantivy has no conditional writes, so this adapter gates versions itself: before a write it reads
the stored version of every chunk in the call (one term-set query), and an item whose version is
not strictly above it is SUPERSEDED. A delete leaves a *tombstone* document (``deleted=true``,
with the delete's version) so that a late, older upsert after it is SUPERSEDED too; tombstones
are never returned by get, scan, count or search. Unlike ES/OpenSearch (``gc_deletes``), these
tombstones are kept forever.

Each write call is one commit (durable on return) and is visible to reads right after it. One
writer is held for the adapter's life: Tantivy allows one writer per directory, which also makes
this the only process that can write the index.

Every document carries ``seq``, a counter unique per written document. Scans walk ``seq`` in
windows of SCAN_PAGE_SIZE values, so a scan holds one page in memory whatever the index size.

Tantivy has no aliases, so blue-green rebuilds use an *alias file*: a small JSON file naming the
index directory readers should use (``point_alias`` / ``alias_target`` below). It is replaced
atomically (write a temporary file beside it, fsync, rename over it, fsync the directory), so a
reader finds either the old or the new target, never a torn file. A reader opens the current
target with ``TantivyKeywordIndex.open_alias`` and keeps reading that generation until it opens
the alias again.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import suppress
from dataclasses import replace
from pathlib import Path
from typing import Any, Self

import structlog
import tantivy

from adapters.keyword._search_engine import (
    CHUNK_INDEX_MAX,
    BodyReader,
    check_unique_ids,
    metadata_json,
    request_rejection,
)
from adapters.keyword.settings import KeywordSettings
from coordinator.errors import PermanentStoreError, TransientStoreError
from coordinator.model import (
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

# Memory for the writer's indexing buffer; above it Tantivy flushes a segment mid-call. 64 MiB
# holds a few thousand chunks per call comfortably (Tantivy needs >= 15 MB per thread).
WRITER_HEAP_BYTES = 64 * 1024 * 1024
# Indexing threads; these machines have two cores and the embedder wants one.
WRITER_THREADS = 1
# Chunk IDs per version lookup query.
LOOKUP_IDS_MAX = 1000
# seq values per scan window, and documents per scan page (a window holds more only when
# another writer reused seq values; it is then read in several pages).
SCAN_PAGE_SIZE = 1000
# The range of the integer field seq (tantivy's i64).
SEQ_MIN, SEQ_MAX = -(2**63), 2**63 - 1
# The most hits one search may ask for, as on ES/OpenSearch (index.max_result_window).
SEARCH_K_MAX = 10_000
# A reader picks up commits made since its last reload at most this long after them, on its next
# search (ES refreshes every second by default): reloading opens the new segments (well under a
# millisecond here), so it need not wait for a file watcher thread per index.
READER_RELOAD_S = 0.5
# Our own name for the text analyzer, used for the field and for queries alike.
TEXT_ANALYZER = "lockstep_text"
# Tantivy's default tokenizer drops tokens longer than this; ours does the same.
TOKEN_CHARS_MAX = 40
# An alias file holds one short JSON object; anything larger is not one of ours.
ALIAS_FILE_BYTES_MAX = 64 * 1024
# The alias file's format, written into it so that a later format can tell the two apart.
ALIAS_FORMAT = 1


def _text_analyzer() -> tantivy.TextAnalyzer:
    """Split on non-alphanumerics, drop over-long tokens, lowercase: ES's standard analyzer, roughly."""
    return (
        tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple())
        .filter(tantivy.Filter.remove_long(TOKEN_CHARS_MAX))
        .filter(tantivy.Filter.lowercase())
        .build()
    )


def _schema() -> tantivy.Schema:
    builder = tantivy.SchemaBuilder()
    # "raw": IDs are matched exactly, never tokenized.
    builder.add_text_field("chunk_id", stored=True, tokenizer_name="raw", index_option="basic")
    builder.add_text_field("doc_id", stored=True, tokenizer_name="raw", index_option="basic")
    builder.add_integer_field("chunk_index", stored=True)
    builder.add_text_field("text", stored=True, tokenizer_name=TEXT_ANALYZER)
    builder.add_text_field("content_hash", stored=True, tokenizer_name="raw", index_option="basic")
    builder.add_integer_field("version", stored=True)
    # Stored only, as JSON bytes: metadata round-trips exactly and is never indexed.
    builder.add_bytes_field("metadata", stored=True)
    builder.add_boolean_field("deleted", stored=True, indexed=True)
    builder.add_integer_field("seq", stored=True, indexed=True, fast=True)
    return builder.build()


class TantivyKeywordIndex:
    """A KeywordIndex in the directory ``path``; ``name`` names it to the rest of lockstep."""

    # Metadata is stored as JSON bytes, not indexed: searches cannot filter on it.
    filters_metadata = False

    def __init__(self, path: str, name: str) -> None:
        self.name = name
        self.path = Path(path)
        self._schema = _schema()
        self._index: tantivy.Index | None = None
        self._writer: tantivy.IndexWriter | None = None
        self._next_seq = 0
        # When the reader last picked up commits (monotonic seconds); see ``_reader_searcher``.
        self._reloaded_at = float("-inf")
        self._log = log.bind(store="tantivy", index=name)

    @classmethod
    def from_settings(cls, settings: KeywordSettings) -> Self:
        """The index in the directory ``settings.path``, named ``settings.index``."""
        assert settings.path is not None, "validated by KeywordSettings: a tantivy index has a path"
        return cls(settings.path, settings.index)

    @classmethod
    def open_alias(cls, alias_path: str | os.PathLike[str], name: str) -> Self:
        """An adapter on the index the alias file points at now (opened: a missing index raises).

        The adapter stays on that directory; after the alias is pointed elsewhere, open the
        alias again to read the new generation.
        """
        target = alias_target(alias_path)
        if target is None:
            raise PermanentStoreError(f"no tantivy alias file at {alias_path}", store="tantivy")
        index = cls(target, name)
        index._opened()
        return index

    # --- aliases (the AliasedIndex port): alias files, spelled by their paths -------------

    @property
    def physical_name(self) -> str:
        """This index as an alias file names its target: the directory's absolute path."""
        return os.path.abspath(self.path)

    def alias_target(self, alias: str) -> str | None:
        """The absolute path of the index directory the alias file ``alias`` points at."""
        return alias_target(alias)

    def point_alias(self, alias: str, target: str) -> None:
        """Point the alias file ``alias`` at the index directory ``target``, atomically."""
        point_alias(alias, target)

    # --- lifecycle -------------------------------------------------------------------------

    def exists(self) -> bool:
        """Whether the directory holds a tantivy index (written by ensure in this or another process)."""
        return self.path.is_dir() and bool(tantivy.Index.exists(str(self.path)))

    def ensure(self) -> None:
        """Create the index directory and index unless they exist, then open it."""
        if self._index is not None:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TransientStoreError(f"cannot create {self.path}: {exc}", store="tantivy") from exc
        self._open()

    def _open(self) -> tantivy.Index:
        try:
            index = tantivy.Index(self._schema, path=str(self.path), reuse=True)
        except (OSError, ValueError) as exc:
            raise PermanentStoreError(
                f"cannot open tantivy index at {self.path}: {exc}", store="tantivy"
            ) from exc
        index.register_tokenizer(TEXT_ANALYZER, _text_analyzer())
        # Reads see a commit as soon as write() reloads, not at some later background refresh.
        index.config_reader(reload_policy="Manual")
        self._index = index
        self._next_seq = _max_seq(index.searcher()) + 1
        return index

    def _opened(self) -> tantivy.Index:
        """The open index; a directory written by an earlier process is reopened as it is."""
        if self._index is not None:
            return self._index
        if not self.exists():
            raise PermanentStoreError(f"no tantivy index at {self.path}; call ensure()", store="tantivy")
        return self._open()

    def drop(self) -> None:
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)

    def close(self) -> None:
        """Release the writer (and with it the directory lock) and the reader."""
        if self._writer is not None:
            self._writer.wait_merging_threads()
        self._writer = None
        self._index = None

    # --- writes ----------------------------------------------------------------------------

    def upsert(self, chunks: Sequence[IndexedChunk]) -> WriteResult:
        check_unique_ids([c.chunk_id for c in chunks])
        results: dict[str, ItemResult] = {}
        candidates: list[tuple[IndexedChunk, str]] = []
        for chunk in chunks:
            metadata = metadata_json(chunk.metadata)
            reason = _upsert_rejection(chunk, metadata)
            if reason:
                results[chunk.chunk_id] = self._rejected(chunk.chunk_id, reason)
            else:
                candidates.append((chunk, metadata or "{}"))
        gated = self._gate([(c.chunk_id, c.version, c.overwrite_equal) for c, _ in candidates])
        results |= gated
        docs = [
            (c.chunk_id, self._live_doc(c, meta))
            for c, meta in candidates
            if gated[c.chunk_id].status is ItemStatus.APPLIED
        ]
        self._write(docs)
        return WriteResult(tuple(results[c.chunk_id] for c in chunks))

    def delete(self, deletes: Sequence[ChunkDelete]) -> WriteResult:
        check_unique_ids([d.chunk_id for d in deletes])
        results: dict[str, ItemResult] = {}
        candidates: list[ChunkDelete] = []
        for d in deletes:
            reason = request_rejection(d.chunk_id, d.version)
            if reason:
                results[d.chunk_id] = self._rejected(d.chunk_id, reason)
            else:
                candidates.append(d)
        gated = self._gate([(d.chunk_id, d.version, d.overwrite_equal) for d in candidates])
        results |= gated
        docs = [
            (d.chunk_id, self._tombstone(d))
            for d in candidates
            if gated[d.chunk_id].status is ItemStatus.APPLIED
        ]
        self._write(docs)
        return WriteResult(tuple(results[d.chunk_id] for d in deletes))

    def _gate(self, items: Sequence[tuple[str, int, bool]]) -> dict[str, ItemResult]:
        """APPLIED where the version is above the stored one (tombstones included), else SUPERSEDED.

        A reconciler's repair (``overwrite_equal``) is also applied at an equal version, as ES's
        ``external_gte`` does.
        """
        stored = self._stored_versions([chunk_id for chunk_id, _, _ in items])
        return {
            chunk_id: ItemResult(
                chunk_id,
                ItemStatus.APPLIED
                if version > stored.get(chunk_id, -1) or (equal_ok and version == stored.get(chunk_id))
                else ItemStatus.SUPERSEDED,
            )
            for chunk_id, version, equal_ok in items
        }

    def _rejected(self, chunk_id: str, reason: str) -> ItemResult:
        self._log.warning("keyword item rejected", chunk_id=chunk_id, reason=reason)
        return ItemResult(chunk_id, ItemStatus.REJECTED, reason)

    def _write(self, docs: Sequence[tuple[str, tantivy.Document]]) -> None:
        """Replace each chunk's document (live or tombstone) in one commit, then make it visible."""
        if not docs:
            return
        index = self._opened()
        writer = self._writer_for(index)
        try:
            for chunk_id, doc in docs:
                # Deletes apply to documents added before them, so the new one survives.
                writer.delete_documents_by_term("chunk_id", chunk_id)
                writer.add_document(doc)
            writer.commit()
        except (OSError, ValueError) as exc:
            writer.rollback()
            raise TransientStoreError(f"tantivy commit failed: {exc}", store="tantivy") from exc
        index.reload()
        self._reloaded_at = time.monotonic()

    def _writer_for(self, index: tantivy.Index) -> tantivy.IndexWriter:
        if self._writer is None:
            try:
                self._writer = index.writer(heap_size=WRITER_HEAP_BYTES, num_threads=WRITER_THREADS)
            except ValueError as exc:
                # Most often another process (or adapter) holds the directory's writer lock.
                raise TransientStoreError(f"cannot get the tantivy writer: {exc}", store="tantivy") from exc
        return self._writer

    def _live_doc(self, chunk: IndexedChunk, metadata: str) -> tantivy.Document:
        doc = tantivy.Document()
        doc.add_text("chunk_id", chunk.chunk_id)
        doc.add_text("doc_id", chunk.doc_id)
        doc.add_integer("chunk_index", chunk.chunk_index)
        doc.add_text("text", chunk.text)
        doc.add_text("content_hash", chunk.content_hash)
        doc.add_integer("version", chunk.version)
        doc.add_bytes("metadata", metadata.encode())
        doc.add_boolean("deleted", False)
        doc.add_integer("seq", self._take_seq())
        return doc

    def _tombstone(self, delete: ChunkDelete) -> tantivy.Document:
        doc = tantivy.Document()
        doc.add_text("chunk_id", delete.chunk_id)
        doc.add_integer("version", delete.version)
        doc.add_boolean("deleted", True)
        doc.add_integer("seq", self._take_seq())
        return doc

    def _take_seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        return seq

    # --- reads -----------------------------------------------------------------------------

    def _stored_versions(self, chunk_ids: Sequence[str]) -> dict[str, int]:
        """Highest version of the stored documents (live or tombstone) among ``chunk_ids``. A
        document without a version (another writer's) gates nothing."""
        versions: dict[str, int] = {}
        for doc in self._docs_by_id(chunk_ids):
            chunk_id, version = _first(doc, "chunk_id"), _first(doc, "version")
            if isinstance(version, int):
                versions[chunk_id] = max(version, versions.get(chunk_id, version))
        return versions

    def _docs_by_id(self, chunk_ids: Sequence[str]) -> Iterator[dict[str, list[Any]]]:
        """Every stored document under these IDs (another writer may have put several under one)."""
        index = self._opened()
        searcher = index.searcher()
        for start in range(0, len(chunk_ids), LOOKUP_IDS_MAX):
            part = list(chunk_ids[start : start + LOOKUP_IDS_MAX])
            query = tantivy.Query.term_set_query(self._schema, "chunk_id", part)
            yield from (searcher.doc(address).to_dict() for address in _all_hits(searcher, query, len(part)))

    def get(self, chunk_ids: Sequence[str]) -> dict[str, StoredChunk]:
        """Live chunks by ID, as of the last commit (every write commits before it returns).

        An ID held by several live documents (only another writer can do that) reads as its
        newest one, marked foreign.
        """
        docs = self._docs_by_id(list(dict.fromkeys(chunk_ids)))
        chunks = [_stored_chunk(d, with_text=True) for d in docs if not _first(d, "deleted")]
        held = Counter(c.chunk_id for c in chunks)
        newest: dict[str, StoredChunk] = {}
        for chunk in sorted(chunks, key=lambda c: c.version):
            newest[chunk.chunk_id] = chunk
        return {cid: _shared(c, held[cid]) if held[cid] > 1 else c for cid, c in newest.items()}

    def scan(self, *, with_text: bool = False) -> Iterator[StoredChunk]:
        """Every live chunk once, from one snapshot: windows of SCAN_PAGE_SIZE seq values (empty
        stretches skipped), then the documents without a seq (written by another hand)."""
        searcher = self._opened().searcher()
        for query in self._scan_queries(searcher):
            for address in _all_hits(searcher, query, SCAN_PAGE_SIZE):
                yield _stored_chunk(searcher.doc(address).to_dict(), with_text=with_text)

    def _scan_queries(self, searcher: tantivy.Searcher) -> Iterator[tantivy.Query]:
        low = self._first_seq_from(searcher, SEQ_MIN)
        while low is not None:
            high = low + SCAN_PAGE_SIZE
            if high > SEQ_MAX:
                yield self._live(self._seq_range(low, None))
                break
            yield self._live(self._seq_range(low, high))
            low = self._first_seq_from(searcher, high)
        unsequenced = [(tantivy.Occur.Must, tantivy.Query.all_query()), (tantivy.Occur.MustNot, _has_seq())]
        yield self._live(tantivy.Query.boolean_query(unsequenced))

    def _first_seq_from(self, searcher: tantivy.Searcher, low: int) -> int | None:
        """The lowest seq at or above ``low`` of a live document; None when there is none."""
        query = self._live(self._seq_range(low, None))
        hits = searcher.search(
            query, limit=1, count=False, order_by_field="seq", order=tantivy.Order.Asc
        ).hits
        return int(hits[0][0]) if hits else None

    def _seq_range(self, low: int, high: int | None) -> tantivy.Query:
        """seq in [low, high), or at least ``low`` when ``high`` is None."""
        return tantivy.Query.range_query(
            self._schema,
            "seq",
            tantivy.FieldType.Integer,
            low,
            high,
            include_lower=True,
            include_upper=high is None,
            use_inverted_index=True,
        )

    def _live(self, query: tantivy.Query) -> tantivy.Query:
        """The documents of ``query`` that are not tombstones (another writer's may lack the flag)."""
        return tantivy.Query.boolean_query(
            [(tantivy.Occur.Must, query), (tantivy.Occur.MustNot, self._tombstones())]
        )

    def _tombstones(self) -> tantivy.Query:
        return tantivy.Query.term_query(self._schema, "deleted", True)

    def count(self) -> int:
        """Live documents: everything but tombstones, as scan and search see it."""
        searcher = self._opened().searcher()
        result = searcher.search(self._live(tantivy.Query.all_query()), limit=1, count=True)
        return int(result.count)  # type: ignore[attr-defined]  # in the binding, missing from its stub

    def search(self, query: str, k: int) -> list[SearchHit]:
        """BM25 over the text, any query word matching (like ES ``match``); no query syntax.
        Sees every commit up to now, this process's or another's (the read path uses
        ``search_hits``, which reloads only every READER_RELOAD_S)."""
        self._opened().reload()
        self._reloaded_at = time.monotonic()
        return self.search_hits(query, k)

    def search_hits(
        self, query: str, k: int, *, where: MetadataFilter | None = None, timeout_s: float | None = None
    ) -> list[SearchHit]:
        """``search`` as a reader sees the index now: commits of this process at once, another
        process's within READER_RELOAD_S (Tantivy's counterpart of a refresh interval). Hits carry
        their version, chunk index and metadata; ``where`` is not used (metadata is stored, not
        indexed). In process, so ``timeout_s`` has nothing to bound."""
        words = _text_analyzer().analyze(query)
        if k <= 0 or not words:
            return []
        searcher = self._reader_searcher()
        terms = [(tantivy.Occur.Should, tantivy.Query.term_query(self._schema, "text", w)) for w in words]
        live = self._live(tantivy.Query.boolean_query(terms))
        hits = searcher.search(live, limit=min(k, SEARCH_K_MAX), count=False).hits
        return [_search_hit(searcher.doc(address).to_dict(), float(score)) for score, address in hits]

    def visible(self, chunk_ids: Sequence[str]) -> dict[str, int]:
        """The version of each of these live chunks that ``search_hits`` sees now."""
        searcher = self._reader_searcher()
        seen: dict[str, int] = {}
        ids = list(dict.fromkeys(chunk_ids))
        for start in range(0, len(ids), LOOKUP_IDS_MAX):
            part = ids[start : start + LOOKUP_IDS_MAX]
            query = self._live(tantivy.Query.term_set_query(self._schema, "chunk_id", part))
            for address in _all_hits(searcher, query, len(part)):
                doc = searcher.doc(address).to_dict()
                chunk_id, version = _first(doc, "chunk_id"), _first(doc, "version")
                if isinstance(chunk_id, str) and isinstance(version, int):
                    seen[chunk_id] = max(version, seen.get(chunk_id, version))
        return seen

    def _reader_searcher(self) -> tantivy.Searcher:
        """A searcher on the last commit, reloaded when the last reload is READER_RELOAD_S old
        (a writer reloads after each of its own commits)."""
        index = self._opened()
        now = time.monotonic()
        if now - self._reloaded_at >= READER_RELOAD_S:
            index.reload()
            self._reloaded_at = now
        return index.searcher()


# --- the alias file ---------------------------------------------------------------------------


def point_alias(alias_path: str | os.PathLike[str], target_dir: str | os.PathLike[str]) -> None:
    """Point the alias file at the index in ``target_dir``, atomically and durably.

    The target is stored relative to the alias file's directory, so moving the whole data
    directory keeps the alias valid. The target must already hold an index, as an ES alias
    can only point at an existing index.
    """
    alias = _alias_file(alias_path)
    target = Path(target_dir).absolute()
    if not (target.is_dir() and tantivy.Index.exists(str(target))):
        raise PermanentStoreError(f"cannot point {alias} at {target}: no tantivy index there", store="tantivy")
    record = {"format": ALIAS_FORMAT, "target": os.path.relpath(target, alias.parent)}
    try:
        _replace_atomically(alias, json.dumps(record).encode())
    except OSError as exc:
        raise TransientStoreError(f"cannot write the alias file {alias}: {exc}", store="tantivy") from exc
    log.info("alias pointed", store="tantivy", alias=str(alias), target=str(target))


def alias_target(alias_path: str | os.PathLike[str]) -> str | None:
    """The absolute path of the index directory the alias file points at; None if there is no file."""
    alias = _alias_file(alias_path)
    try:
        with alias.open("rb") as file:
            raw = file.read(ALIAS_FILE_BYTES_MAX + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise TransientStoreError(f"cannot read the alias file {alias}: {exc}", store="tantivy") from exc
    relative = _alias_record_target(raw)
    if relative is None:
        raise PermanentStoreError(f"{alias} is not a lockstep alias file", store="tantivy")
    return os.path.normpath(alias.parent / relative)


def _alias_file(alias_path: str | os.PathLike[str]) -> Path:
    """The alias file's absolute path; a directory there is an index, never an alias."""
    alias = Path(alias_path).absolute()
    if alias.is_dir():
        raise PermanentStoreError(f"{alias} is a directory (an index?), not an alias file", store="tantivy")
    return alias


def _alias_record_target(raw: bytes) -> str | None:
    """The target written in an alias file's content, or None if the content is not ours."""
    if len(raw) > ALIAS_FILE_BYTES_MAX:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(record, dict) or record.get("format") != ALIAS_FORMAT:
        return None
    target = record.get("target")
    return target if isinstance(target, str) and target else None


def _replace_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    # The rename itself is durable only once the directory entry is.
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _upsert_rejection(chunk: IndexedChunk, metadata: str | None) -> str:
    """The same refusals as the search engines, so every keyword backend accepts the same chunks."""
    reason = request_rejection(chunk.chunk_id, chunk.version)
    if reason:
        return reason
    if not 0 <= chunk.chunk_index <= CHUNK_INDEX_MAX:
        return f"chunk_index {chunk.chunk_index} is outside 0..{CHUNK_INDEX_MAX}"
    if metadata is None:
        return "metadata is not JSON-serializable"
    return ""


def _max_seq(searcher: tantivy.Searcher) -> int:
    """The highest seq in the snapshot, or -1 for an index holding none."""
    hits = searcher.search(_has_seq(), limit=1, count=False, order_by_field="seq").hits
    return int(hits[0][0]) if hits else -1


def _has_seq() -> tantivy.Query:
    return tantivy.Query.exists_query("seq")


def _all_hits(searcher: tantivy.Searcher, query: tantivy.Query, page: int) -> Iterator[tantivy.DocAddress]:
    """Every hit of ``query`` in this snapshot, ``page`` at a time. Hits of equal score come in
    document-address order, which a snapshot keeps, so offsets neither repeat nor skip one."""
    offset = 0
    while True:
        hits = searcher.search(query, limit=page, count=False, offset=offset).hits
        yield from (address for _, address in hits)
        if len(hits) < page:
            return
        offset += page


def _first(doc: dict[str, list[Any]], field: str) -> Any:
    values = doc.get(field) or [None]
    return values[0]


def _stored_chunk(doc: dict[str, list[Any]], *, with_text: bool) -> StoredChunk:
    """A stored document; ``chunk_id`` and ``version`` are this adapter's own ID and version.
    A document lacking one of lockstep's fields, or holding another type there, is foreign."""
    metadata, metadata_problem = _decoded_metadata(_first(doc, "metadata"))
    body = BodyReader({name: _first(doc, name) for name in doc} | {"metadata": metadata})
    body.problems += [metadata_problem] if metadata_problem else []
    chunk = StoredChunk(
        chunk_id=body.text("chunk_id"),
        doc_id=body.text("doc_id"),
        chunk_index=body.integer("chunk_index"),
        content_hash=body.text("content_hash"),
        version=body.integer("version"),
        text=body.text("text") if with_text else None,
        metadata=body.mapping("metadata"),
    )
    body.integer("seq")
    body.flag("deleted")
    return replace(chunk, foreign=body.foreign)


def _decoded_metadata(raw: Any) -> tuple[Any, str]:
    """The stored metadata JSON, decoded; or None and why it could not be."""
    if raw is None:
        return None, ""
    try:
        return json.loads(bytes(raw)), ""
    except (TypeError, ValueError):
        return None, "metadata is not JSON"


def _shared(chunk: StoredChunk, documents: int) -> StoredChunk:
    problem = f"{documents} documents hold this chunk_id"
    return replace(chunk, foreign=f"{chunk.foreign}; {problem}" if chunk.foreign else problem)


def _search_hit(doc: dict[str, list[Any]], score: float) -> SearchHit:
    # A document another writer put in the index is found too; it must not fail the search (its
    # missing fields read as neutral values, which the read path's fence refuses).
    metadata, _ = _decoded_metadata(_first(doc, "metadata"))
    body = BodyReader({name: _first(doc, name) for name in doc} | {"metadata": metadata})
    return SearchHit(
        chunk_id=body.text("chunk_id"),
        doc_id=body.text("doc_id"),
        score=score,
        text=body.text("text"),
        version=body.integer("version"),
        chunk_index=body.integer("chunk_index"),
        metadata=body.mapping("metadata"),
    )
