"""The composition root: the one place that builds real adapters from settings."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from adapters.embedders.cached import CachedEmbedder, ReadThroughCache, TieredEmbeddingCache
from adapters.embedders.hashing import HashingEmbedder
from adapters.keyword.settings import KeywordSettings
from adapters.ledger.settings import PostgresLedgerSettings
from adapters.ledger.sqlite import SqliteEmbeddingCache, SqliteLedger
from adapters.sources.debezium import KafkaSourceSettings
from adapters.vector.milvus import MilvusVectorIndex
from coordinator.apply import ApplyEngine
from coordinator.crashpoints import CrashHook, no_crash
from coordinator.errors import ConfigError
from coordinator.generations import Generation, check_embedder, live
from coordinator.multi_apply import MultiEngine
from coordinator.ports import (
    ChangeSource,
    Embedder,
    EmbeddingCache,
    KeywordIndex,
    KeywordSearch,
    VectorSearch,
)
from coordinator.search import SearchService
from lockstep.settings import (
    EmbedderSettings,
    FolderSourceSettings,
    JsonlSourceSettings,
    PgLogicalSourceSettings,
    Settings,
    SqlSourceSettings,
    WebhookSourceSettings,
)

log = structlog.get_logger(__name__)

# Vectors each process keeps in memory in front of the durable embedding cache: a few apply
# batches' worth (the apply path reads each vector twice in a row), ~1.5 KB each at 384 dims.
EMBEDDING_FRONT_ENTRIES_MAX = 8192
# Query vectors a search process keeps in memory (a repeated query is embedded once): ~6 MB.
QUERY_VECTORS_MAX = 4096

if TYPE_CHECKING:
    from adapters.ledger.postgres import PostgresLedger
    from lockstep.generations import GenerationParts

    AnyLedger = SqliteLedger | PostgresLedger
else:
    AnyLedger = SqliteLedger


def build_ledger(settings: Settings, crash: CrashHook = no_crash) -> AnyLedger:
    """The SQLite ledger (embedded default) or the Postgres one (several replicas)."""
    if isinstance(settings.ledger, PostgresLedgerSettings):
        from adapters.ledger.postgres import PostgresLedger

        return PostgresLedger.from_settings(settings.ledger, crash_hook=crash)
    return SqliteLedger(settings.ledger.path, crash_hook=crash)


def build_embedding_cache(ledger: AnyLedger) -> EmbeddingCache:
    """The durable (model, hash) → vector cache lives beside the ledger's tables; recent vectors
    are also kept in memory (EMBEDDING_FRONT_ENTRIES_MAX)."""
    durable: EmbeddingCache
    if isinstance(ledger, SqliteLedger):
        durable = SqliteEmbeddingCache(ledger)
    else:
        from adapters.ledger.postgres import PostgresEmbeddingCache

        durable = PostgresEmbeddingCache(ledger)
    return TieredEmbeddingCache(durable, front_entries_max=EMBEDDING_FRONT_ENTRIES_MAX)


def build_keyword(settings: KeywordSettings) -> KeywordIndex:
    if settings.kind == "tantivy":
        from adapters.keyword.tantivy_index import TantivyKeywordIndex

        assert settings.path is not None, "validated by KeywordSettings"
        return TantivyKeywordIndex(settings.path, settings.index)
    if settings.kind == "opensearch":
        from adapters.keyword.opensearch import OpenSearchKeywordIndex

        return OpenSearchKeywordIndex(settings)
    from adapters.keyword.elasticsearch import ElasticsearchKeywordIndex

    return ElasticsearchKeywordIndex(settings)


def local_model_installed() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("sentence_transformers", "torch"))


def build_embedder(settings: EmbedderSettings) -> Embedder:
    kind = settings.kind
    if kind == "auto":
        kind = "sentence-transformers" if local_model_installed() else "hashing"
    if kind == "hashing":
        return HashingEmbedder(dim=settings.dim)
    if kind == "sentence-transformers":
        from adapters.embedders.sentence_transformer import SentenceTransformerEmbedder

        return SentenceTransformerEmbedder(model_path=settings.model_path, batch_size=settings.batch_size)
    if not (settings.base_url and settings.model):
        raise ConfigError("the openai embedder needs base_url and model")
    from adapters.embedders.openai_http import OpenAIEmbedder

    return OpenAIEmbedder(
        base_url=settings.base_url,
        model=settings.model,
        dim=settings.dim,
        api_key=settings.api_key,
        timeout_s=settings.timeout_s,
        batch_size=settings.batch_size,
    )


def build_source(settings: Settings, ledger: AnyLedger) -> ChangeSource:
    src = settings.source
    if src is None:
        raise ConfigError("this command needs a `source` in the config")
    if isinstance(src, JsonlSourceSettings):
        from adapters.sources.jsonl import JsonlSource

        return JsonlSource(src.path, ledger, name=src.name)
    if isinstance(src, FolderSourceSettings):
        from adapters.sources.folder import FolderSource

        return FolderSource(src.path, ledger, name=src.name, patterns=src.patterns)
    if isinstance(src, WebhookSourceSettings):
        return build_webhook_source(settings, src, ledger)
    if isinstance(src, PgLogicalSourceSettings):
        return build_pg_logical_source(src, ledger)
    if isinstance(src, KafkaSourceSettings):
        from adapters.sources.kafka import KafkaDebeziumSource

        return KafkaDebeziumSource(src, ledger, ledger, name=src.name)
    assert isinstance(src, SqlSourceSettings)
    from adapters.sources.sql_table import SqlTableSource

    return SqlTableSource(
        src.url.get_secret_value(),
        src.table,
        ledger,
        ledger,
        id_column=src.id_column,
        text_column=src.text_column,
        metadata_json_column=src.metadata_column,
        metadata_columns=src.metadata_columns,
        updated_at_column=src.updated_at_column,
        deleted_at_column=src.deleted_at_column,
        version_column=src.version_column,
        name=src.name,
    )


def build_pg_logical_source(
    src: PgLogicalSourceSettings, ledger: AnyLedger, *, resnapshot: bool = False
) -> ChangeSource:
    """Postgres logical replication; ``resnapshot`` re-creates the slot and re-reads the tables
    (``lockstep source resnapshot``)."""
    from adapters.sources.pg_logical import PgLogicalSource

    return PgLogicalSource(
        src.dsn.get_secret_value(),
        src.tables,
        ledger,
        ledger,
        slot=src.slot,
        publication=src.publication,
        id_column=src.id_column,
        text_column=src.text_column,
        metadata_column=src.metadata_column,
        metadata_columns=src.metadata_columns,
        table_prefix_ids=src.table_prefix_ids,
        name=src.name,
        resnapshot=resnapshot,
        poll_interval_s=src.poll_interval_s,
        peek_changes_max=src.peek_changes_max,
        txn_buffer_changes_max=src.txn_buffer_changes_max,
        connect_timeout_s=src.connect_timeout_s,
        statement_timeout_s=src.statement_timeout_s,
        outage_max_s=src.outage_max_s,
    )


def build_webhook_source(settings: Settings, src: WebhookSourceSettings, ledger: AnyLedger) -> ChangeSource:
    """The webhook's inbox lives where the ledger lives: an SQLite file beside the SQLite ledger,
    or a table in the Postgres ledger's schema (every replica can then take POSTs)."""
    from adapters.sources.webhook import Inbox, PostgresInbox, SqliteInbox, WebhookSource, inbox_beside

    inbox: Inbox
    if isinstance(settings.ledger, PostgresLedgerSettings):
        if src.inbox_path is not None:
            raise ConfigError(
                "source.inbox_path is for the SQLite ledger; the Postgres ledger keeps the inbox in its schema"
            )
        inbox = PostgresInbox(
            settings.ledger.dsn.get_secret_value(),
            schema=settings.ledger.schema_name,
            connect_timeout_s=settings.ledger.connect_timeout_s,
            statement_timeout_s=settings.ledger.statement_timeout_s,
        )
    else:
        inbox = SqliteInbox(src.inbox_path or inbox_beside(settings.ledger.path))
    return WebhookSource(inbox, ledger, name=src.name, retention_s=src.retention_s)


@dataclass
class Runtime:
    """Every collaborator of one lockstep process, built once and closed together.

    ``ledger``, ``keyword``, ``vector`` and ``embedder`` are the active generation's; ``home``
    is generation 1's ledger (registry, checkpoints, dead letters, leases, embedding cache);
    ``engine`` applies to every live generation (one, except while a rebuild is under way or a
    rollback target is kept)."""

    settings: Settings
    ledger: AnyLedger
    keyword: KeywordIndex
    vector: MilvusVectorIndex
    embedder: CachedEmbedder
    engine: ApplyEngine | MultiEngine
    home: AnyLedger
    generations: list[GenerationParts]

    def close(self) -> None:
        for parts in self.generations:
            parts.close(keep_ledger=parts.ledger is self.home)
        self.home.close()


@contextmanager
def runtime(settings: Settings, *, source_name: str = "", crash: CrashHook = no_crash) -> Iterator[Runtime]:
    """Build the ledger, then each live generation's indexes, cached embedder and apply engine."""
    from adapters.ledger.generations import registry_for
    from lockstep.generations import (
        WriterAnnouncement,
        build_parts,
        config_matches,
        heal_aliases,
        load_generations,
        writer_owner,
    )
    from lockstep.leftovers import clear_dead_runs

    # A run killed with its process group may have left actors holding the embedded stores.
    clear_dead_runs(settings)
    home = build_ledger(settings, crash)
    built: list[GenerationParts] = []
    writer: WriterAnnouncement | None = None
    try:
        # Before the registry is read: a rebuild started meanwhile waits for this process
        # (it writes a fixed set of generations until it ends).
        writer = WriterAnnouncement(registry_for(home), writer_owner("runtime"))
        writer.starting()
        configured = build_embedder(settings.embedder)
        _, gens = load_generations(settings, home, configured, writer.registry)
        name = source_name or (settings.source.name if settings.source else "api")
        for gen in live(gens):
            reuse = configured if configured.model_id == gen.model_id and configured.dim == gen.dim else None
            built.append(build_parts(settings, gen, home, source_name=name, crash=crash, inner=reuse))
        active_parts = built[0]
        gen = active_parts.generation
        if not config_matches(settings, gen, configured.model_id):
            log.warning(
                "the config's embedder or chunking differs from the active generation's; the "
                "generation's own are used (a change is a `lockstep rebuild`)",
                generation=gen.number,
                active_model=gen.model_id,
                config_model=configured.model_id,
                active_chunking=gen.chunking.fingerprint,
                config_chunking=settings.chunking.to_domain().fingerprint,
            )
        heal_aliases(settings, gen, active_parts.keyword, active_parts.vector)
        writer.writing([p.generation.number for p in built])
        writer.renew_in_background()
    except BaseException:
        for parts in built:
            parts.close(keep_ledger=parts.ledger is home)
        if writer is not None:
            writer.withdraw()
        home.close()
        raise
    engines = [p.engine for p in built]
    engine: ApplyEngine | MultiEngine = engines[0] if len(engines) == 1 else MultiEngine(engines, sleep=time.sleep)
    log.info("runtime ready", keyword=settings.keyword.kind, embedder=gen.model_id, dim=gen.dim,
             generations=[p.generation.number for p in built])
    rt = Runtime(settings, active_parts.ledger, active_parts.keyword, active_parts.vector,
                 active_parts.embedder, engine, home, built)
    try:
        yield rt
    finally:
        writer.withdraw()
        rt.close()


@dataclass
class SearchRuntime:
    """A search service on the active generation, read-only: its ledger for the fence, both
    readers' aliases, and the generation's embedder for queries (``close`` releases them)."""

    service: SearchService
    generation: int
    home: AnyLedger
    closers: list[Callable[[], None]]

    def close(self) -> None:
        self.service.close()
        for close in reversed(self.closers):
            close()


def open_search(
    settings: Settings, *, vector: VectorSearch | None = None, fenced: bool = True
) -> SearchRuntime:
    """Build the read path: nothing is written (no registry record, no alias, no cache entry).

    ``vector``: a reader to use instead of opening the vector alias (``lockstep run`` passes its
    writer's, since a milvus-lite file admits one process). ``fenced=False`` is test-only."""
    from adapters.ledger.generations import registry_for
    from lockstep.generations import generation_embedder_settings, generation_ledger

    home = build_ledger(settings)
    closers: list[Callable[[], None]] = [home.close]
    try:
        gen = active_generation(registry_for(home).all())
        ledger = home if gen.number == 1 else generation_ledger(settings, gen.number)
        if ledger is not home:
            closers.append(ledger.close)
        inner = build_embedder(generation_embedder_settings(settings, gen))
        check_embedder(gen, inner.model_id, inner.dim)
        keyword = open_keyword_reader(settings, gen)
        closers.append(keyword.close)
        if vector is None:
            opened = open_vector_reader(settings, gen)
            closers.append(opened.close)
            vector = opened
        service = SearchService(
            ledger=ledger,
            keyword=keyword,
            vector=vector,
            embedder=CachedEmbedder(
                inner, ReadThroughCache(build_embedding_cache(home), memory_entries_max=QUERY_VECTORS_MAX)
            ),
            params=settings.search.to_domain(),
            clock=time.monotonic,
            sleep=time.sleep,
            sources=[settings.source.name] if settings.source else [],
            fenced=fenced,
        )
    except BaseException:
        for close in reversed(closers):
            close()
        raise
    return SearchRuntime(service, gen.number, home, closers)


def active_generation(generations: list[Generation]) -> Generation:
    current = live(generations)
    if not current:
        raise ConfigError(
            "nothing is indexed yet (no generation in the ledger): run `lockstep sync` or `lockstep run` first"
        )
    return current[0]


def open_keyword_reader(settings: Settings, gen: Generation) -> KeywordSearch:
    """The keyword index readers use: its alias (for Tantivy, the directory the pointer file
    names), or the active generation's own index while no alias exists yet (a deployment only
    ever written by ``lockstep run``, which leaves aliases to the one-shot commands)."""
    from lockstep.generations import keyword_alias, keyword_settings

    alias = keyword_alias(settings)
    if settings.keyword.kind == "tantivy":
        from adapters.keyword.tantivy_index import TantivyKeywordIndex, alias_target

        if alias_target(alias) is not None:
            return TantivyKeywordIndex.open_alias(alias, settings.keyword.index)
        own = keyword_settings(settings, gen)
        assert own.path is not None, "validated by KeywordSettings"
        return TantivyKeywordIndex(own.path, own.index)
    index = build_keyword(settings.keyword.model_copy(update={"index": alias}))
    if index.alias_target(alias) is None:  # type: ignore[attr-defined]  # both search engines have aliases
        index.close()
        index = build_keyword(keyword_settings(settings, gen))
    assert isinstance(index, KeywordSearch), "every keyword adapter offers the read path"
    return index


def open_vector_reader(settings: Settings, gen: Generation) -> MilvusVectorIndex:
    """The vector index readers use: its alias, or the active generation's own collection while
    no alias exists yet."""
    from lockstep.generations import vector_alias, vector_settings

    alias = vector_alias(settings)
    reader = MilvusVectorIndex(settings.vector.model_copy(update={"collection": alias}), dim=gen.dim)
    if reader.alias_target(alias) is None:
        reader.close()
        reader = MilvusVectorIndex(vector_settings(settings, gen), dim=gen.dim)
    reader.load()
    return reader
