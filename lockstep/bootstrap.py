"""The composition root: the one place that builds real adapters and apply engines from settings.

Everything else receives what these functions build: the runtime (``lockstep.runtime``), the Ray
actors, the rebuild, the chaos suite's deployment and the benchmarks. A generation's parts (its
ledger namespace, indexes, cached embedder and apply engine) are assembled by
``build_generation`` alone. A new store kind touches this module and its adapter package.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from adapters.embedders.cached import CachedEmbedder, TieredEmbeddingCache
from adapters.embedders.hashing import HashingEmbedder
from adapters.embedders.settings import EmbedderSettings
from adapters.keyword.settings import KeywordSettings
from adapters.ledger.settings import PostgresLedgerSettings
from adapters.ledger.sqlite import SqliteEmbeddingCache, SqliteLedger
from adapters.sources.debezium import KafkaSourceSettings
from adapters.sources.pg_logical.settings import PgLogicalSourceSettings
from adapters.sources.settings import FolderSourceSettings, JsonlSourceSettings, SqlSourceSettings
from adapters.sources.webhook.settings import WebhookSourceSettings
from adapters.vector.settings import VectorSettings
from coordinator.apply import KEYWORD, VECTOR, ApplyEngine
from coordinator.crashpoints import CrashHook, no_crash
from coordinator.errors import ConfigError
from coordinator.generations import Generation, check_embedder
from coordinator.ports import (
    AliasedKeywordIndex,
    ChangeSource,
    ChunkWriter,
    Embedder,
    EmbeddingCache,
    HashedEmbedder,
    VectorWriter,
)
from lockstep.settings import Settings

# Vectors each process keeps in memory in front of the durable embedding cache: a few apply
# batches' worth (the apply path reads each vector twice in a row), ~1.5 KB each at 384 dims.
EMBEDDING_FRONT_ENTRIES_MAX = 8192
# Embedder settings that are secrets: never recorded in the registry, always taken from config.
_SECRET_EMBEDDER_FIELDS = ("api_key",)

if TYPE_CHECKING:
    from adapters.ledger.postgres import PostgresLedger
    from adapters.vector.milvus import MilvusVectorIndex

    AnyLedger = SqliteLedger | PostgresLedger
else:
    AnyLedger = SqliteLedger


def build_ledger(settings: Settings, crash: CrashHook = no_crash, *, generation: int = 1) -> AnyLedger:
    """The SQLite ledger (embedded default) or the Postgres one (several replicas).

    ``generation`` 1 is the home ledger itself; a later one gets its own namespace beside it
    (SQLite ``<ledger>.g<N>.db``, Postgres schema ``<schema>_g<N>``)."""
    if generation == 1:
        return _build_home_ledger(settings, crash)
    if isinstance(settings.ledger, PostgresLedgerSettings):
        from adapters.ledger.postgres import PostgresLedger

        pg = settings.ledger
        own = pg.model_copy(update={"schema_name": generation_schema(pg, generation)})
        return PostgresLedger.from_settings(own, crash_hook=crash, home_schema=pg.schema_name)
    home = Path(settings.ledger.path)
    return SqliteLedger(generation_ledger_path(home, generation), crash_hook=crash, home=home)


def _build_home_ledger(settings: Settings, crash: CrashHook) -> AnyLedger:
    if isinstance(settings.ledger, PostgresLedgerSettings):
        from adapters.ledger.postgres import PostgresLedger

        return PostgresLedger.from_settings(settings.ledger, crash_hook=crash)
    return SqliteLedger(settings.ledger.path, crash_hook=crash)


def generation_ledger_path(home: Path, number: int) -> Path:
    """Where a later generation's SQLite ledger lives, beside the home ledger's file."""
    return home.with_name(f"{home.stem}.g{number}{home.suffix}")


def generation_schema(settings: PostgresLedgerSettings, number: int) -> str:
    """The Postgres schema that holds a later generation's ledger, beside the home schema."""
    return f"{settings.schema_name}_g{number}"


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


def build_keyword(settings: KeywordSettings) -> AliasedKeywordIndex:
    if settings.kind == "tantivy":
        from adapters.keyword.tantivy_index import TantivyKeywordIndex

        return TantivyKeywordIndex.from_settings(settings)
    if settings.kind == "opensearch":
        from adapters.keyword.opensearch import OpenSearchKeywordIndex

        return OpenSearchKeywordIndex(settings)
    from adapters.keyword.elasticsearch import ElasticsearchKeywordIndex

    return ElasticsearchKeywordIndex(settings)


def build_keyword_reader(settings: KeywordSettings, alias: str) -> AliasedKeywordIndex:
    """An adapter that reads what ``alias`` points at. A search engine resolves the alias at
    each request, so its adapter follows a swap; a Tantivy alias file is read here, once, and
    the adapter stays on the directory it named until the alias is opened again."""
    if settings.kind == "tantivy":
        from adapters.keyword.tantivy_index import TantivyKeywordIndex

        return TantivyKeywordIndex.open_alias(alias, settings.index)
    return build_keyword(settings.model_copy(update={"index": alias}))


def build_vector(settings: VectorSettings, *, dim: int, model_id: str | None = None) -> MilvusVectorIndex:
    """The Milvus (or milvus-lite) collection ``settings`` names; ``model_id`` guards it against
    vectors of another embedder (None: a reader, no guard). pymilvus (with pandas and gRPC) is
    imported here, by the first command that opens a collection."""
    from adapters.vector.milvus import MilvusVectorIndex

    return MilvusVectorIndex(settings, dim=dim, model_id=model_id)


def build_engine(
    gen: Generation,
    *,
    ledger: AnyLedger,
    keyword: ChunkWriter,
    vector: VectorWriter,
    embedder: HashedEmbedder,
    source_name: str,
    crash: CrashHook = no_crash,
) -> ApplyEngine:
    """The two-phase apply engine that writes ``gen``: its ledger namespace, its chunking, and
    the index clients (or proxies) it is given."""
    return ApplyEngine(
        ledger=ledger,
        keyword=keyword,
        vector=vector,
        embedder=embedder,
        chunking=gen.chunking,
        source_name=source_name,
        crash=crash,
        clock=time.monotonic,
    )


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

        return SentenceTransformerEmbedder.from_settings(settings)
    from adapters.embedders.openai_http import OpenAIEmbedder

    return OpenAIEmbedder.from_settings(settings)


def build_source(settings: Settings, ledger: AnyLedger) -> ChangeSource:
    src = settings.source
    if src is None:
        raise ConfigError("this command needs a `source` in the config")
    if isinstance(src, JsonlSourceSettings):
        from adapters.sources.jsonl import JsonlSource

        return JsonlSource.from_settings(src, ledger)
    if isinstance(src, FolderSourceSettings):
        from adapters.sources.folder import FolderSource

        return FolderSource.from_settings(src, ledger)
    if isinstance(src, WebhookSourceSettings):
        return build_webhook_source(settings, src, ledger)
    if isinstance(src, PgLogicalSourceSettings):
        return build_pg_logical_source(src, ledger)
    if isinstance(src, KafkaSourceSettings):
        from adapters.sources.kafka import KafkaDebeziumSource

        return KafkaDebeziumSource(src, ledger, ledger)
    assert isinstance(src, SqlSourceSettings)
    from adapters.sources.sql_table import SqlTableSource

    return SqlTableSource.from_settings(src, ledger, ledger)


def build_pg_logical_source(
    src: PgLogicalSourceSettings, ledger: AnyLedger, *, resnapshot: bool = False
) -> ChangeSource:
    """Postgres logical replication; ``resnapshot`` re-creates the slot and re-reads the tables
    (``lockstep source resnapshot``)."""
    from adapters.sources.pg_logical import PgLogicalSource

    return PgLogicalSource(src, ledger, ledger, resnapshot=resnapshot)


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
        inbox = PostgresInbox.from_settings(settings.ledger)
    else:
        inbox = SqliteInbox(src.inbox_path or inbox_beside(settings.ledger.path))
    return WebhookSource.from_settings(src, inbox, ledger)


# --- one generation's settings and parts ---------------------------------------------------------


def keyword_settings(settings: Settings, gen: Generation) -> KeywordSettings:
    return settings.keyword.for_physical(gen.keyword_index)


def vector_settings(settings: Settings, gen: Generation) -> VectorSettings:
    return settings.vector.model_copy(update={"collection": gen.vector_collection})


def embedder_record(es: EmbedderSettings) -> dict[str, Any]:
    """The embedder settings a generation records: the resolved kind, no secrets."""
    kind = es.kind
    if kind == "auto":
        kind = "sentence-transformers" if local_model_installed() else "hashing"
    data = es.model_dump(mode="json", exclude=set(_SECRET_EMBEDDER_FIELDS))
    data["kind"] = kind
    return data


def generation_embedder_settings(settings: Settings, gen: Generation) -> EmbedderSettings:
    """What builds ``gen``'s embedder: its record, plus the config's secrets for the same kind."""
    data = dict(gen.embedder)
    if data.get("kind") == embedder_record(settings.embedder)["kind"]:
        data.update({f: getattr(settings.embedder, f) for f in _SECRET_EMBEDDER_FIELDS})
    return EmbedderSettings(**data)


def generation_settings(settings: Settings, gen: Generation) -> Settings:
    """``settings`` as seen by one generation's writers (Ray actors build from this)."""
    return settings.model_copy(
        update={
            "keyword": keyword_settings(settings, gen),
            "vector": vector_settings(settings, gen),
            "embedder": generation_embedder_settings(settings, gen),
            "chunking": settings.chunking.model_copy(
                update={"max_chars": gen.chunking.max_chars, "overlap_chars": gen.chunking.overlap_chars}
            ),
        }
    )


IndexWrap = Callable[[str, Any], Any]


def _unwrapped(_side: str, index: Any) -> Any:
    return index


@dataclass
class GenerationWriter:
    """What writes one generation: its ledger namespace, its cached embedder and its two-phase
    engine (which writes through whatever index clients or proxies it was given)."""

    generation: Generation
    ledger: AnyLedger
    embedder: CachedEmbedder
    engine: ApplyEngine

    def close(self, *, keep_ledger: bool = False) -> None:
        self.engine.close()
        if not keep_ledger:
            self.ledger.close()


@dataclass
class GenerationParts(GenerationWriter):
    """A generation's writer together with its own index stores."""

    keyword: AliasedKeywordIndex
    vector: MilvusVectorIndex

    def close(self, *, keep_ledger: bool = False) -> None:
        self.engine.close()
        self.keyword.close()
        self.vector.close()
        if not keep_ledger:
            self.ledger.close()


@dataclass(frozen=True)
class IndexWriters:
    """The index clients a generation's engine writes through when this process does not hold
    the stores itself (the Ray shard actors' proxies to the index writer actors)."""

    keyword: ChunkWriter
    vector: VectorWriter


@overload
def build_generation(
    settings: Settings,
    gen: Generation,
    home: AnyLedger,
    *,
    source_name: str,
    crash: CrashHook = ...,
    inner: Embedder | None = ...,
    ensure: bool = ...,
    wrap: IndexWrap = ...,
    writers: None = ...,
) -> GenerationParts: ...


@overload
def build_generation(
    settings: Settings,
    gen: Generation,
    home: AnyLedger,
    *,
    source_name: str,
    crash: CrashHook = ...,
    inner: Embedder | None = ...,
    writers: IndexWriters,
) -> GenerationWriter: ...


def build_generation(
    settings: Settings,
    gen: Generation,
    home: AnyLedger,
    *,
    source_name: str,
    crash: CrashHook = no_crash,
    inner: Embedder | None = None,
    ensure: bool = True,
    wrap: IndexWrap = _unwrapped,
    writers: IndexWriters | None = None,
) -> GenerationWriter:
    """Everything that writes ``gen``; refuses an embedder other than the generation's own.

    ``home`` is generation 1's ledger: generation 1 writes it, and every generation keeps its
    embedding cache there. Without ``writers`` the generation's own stores are opened (and
    created if ``ensure``) and returned with it; ``wrap(side, index)`` is what the engine then
    writes through (the chaos suite's fault injectors). With ``writers`` no store is opened
    here: the engine writes through them."""
    if inner is None:
        inner = build_embedder(generation_embedder_settings(settings, gen))
    check_embedder(gen, inner.model_id, inner.dim)
    ledger = home if gen.number == 1 else build_ledger(settings, crash, generation=gen.number)
    if writers is not None:
        return _generation_writer(gen, ledger, home, writers, inner, source_name, crash)
    keyword = build_keyword(keyword_settings(settings, gen))
    vector = build_vector(vector_settings(settings, gen), dim=inner.dim, model_id=inner.model_id)
    if ensure:
        keyword.ensure()
        vector.ensure()
    wrapped = IndexWriters(wrap(KEYWORD, keyword), wrap(VECTOR, vector))
    writer = _generation_writer(gen, ledger, home, wrapped, inner, source_name, crash)
    return GenerationParts(gen, ledger, writer.embedder, writer.engine, keyword, vector)


def _generation_writer(
    gen: Generation,
    ledger: AnyLedger,
    home: AnyLedger,
    writers: IndexWriters,
    inner: Embedder,
    source_name: str,
    crash: CrashHook,
) -> GenerationWriter:
    embedder = CachedEmbedder(inner, build_embedding_cache(home))
    engine = build_engine(
        gen,
        ledger=ledger,
        keyword=writers.keyword,
        vector=writers.vector,
        embedder=embedder,
        source_name=source_name,
        crash=crash,
    )
    return GenerationWriter(gen, ledger, embedder, engine)
