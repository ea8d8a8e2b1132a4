"""The composition root: the one place that builds real adapters and apply engines from settings.

Everything else receives what these functions build: the runtime (``lockstep.runtime``), each
generation's parts (``lockstep.generation_parts``), the Ray actors, the rebuild, the chaos suite's
deployment and the benchmarks. A new store kind touches this module and its adapter package.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import TYPE_CHECKING

from adapters.embedders.cached import TieredEmbeddingCache
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
from coordinator.apply import ApplyEngine
from coordinator.crashpoints import CrashHook, no_crash
from coordinator.errors import ConfigError
from coordinator.generations import Generation
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
