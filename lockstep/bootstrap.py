"""The composition root: the one place that builds real adapters from settings."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from adapters.embedders.cached import CachedEmbedder
from adapters.embedders.hashing import HashingEmbedder
from adapters.keyword.settings import KeywordSettings
from adapters.ledger.settings import PostgresLedgerSettings
from adapters.ledger.sqlite import SqliteEmbeddingCache, SqliteLedger
from adapters.vector.milvus import MilvusVectorIndex
from coordinator.apply import ApplyEngine
from coordinator.crashpoints import CrashHook, no_crash
from coordinator.errors import ConfigError
from coordinator.ports import ChangeSource, Embedder, EmbeddingCache, KeywordIndex
from lockstep.settings import (
    EmbedderSettings,
    FolderSourceSettings,
    JsonlSourceSettings,
    Settings,
    SqlSourceSettings,
)

log = structlog.get_logger(__name__)

if TYPE_CHECKING:
    from adapters.ledger.postgres import PostgresLedger

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
    """The durable (model, hash) → vector cache lives beside the ledger's tables."""
    if isinstance(ledger, SqliteLedger):
        return SqliteEmbeddingCache(ledger)
    from adapters.ledger.postgres import PostgresEmbeddingCache

    return PostgresEmbeddingCache(ledger)


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


@dataclass
class Runtime:
    """Every collaborator of one lockstep process, built once and closed together."""

    settings: Settings
    ledger: AnyLedger
    keyword: KeywordIndex
    vector: MilvusVectorIndex
    embedder: CachedEmbedder
    engine: ApplyEngine

    def close(self) -> None:
        self.engine.close()
        for part in (self.keyword, self.vector, self.ledger):
            part.close()


@contextmanager
def runtime(settings: Settings, *, source_name: str = "", crash: CrashHook = no_crash) -> Iterator[Runtime]:
    """Build ledger, both indexes, the cached embedder and the apply engine; close them after."""
    ledger = build_ledger(settings, crash)
    inner = build_embedder(settings.embedder)
    embedder = CachedEmbedder(inner, build_embedding_cache(ledger))
    keyword = build_keyword(settings.keyword)
    vector = MilvusVectorIndex(settings.vector, dim=inner.dim)
    keyword.ensure()
    vector.ensure()
    engine = ApplyEngine(
        ledger=ledger,
        keyword=keyword,
        vector=vector,
        embedder=embedder,
        chunking=settings.chunking.to_domain(),
        source_name=source_name or (settings.source.name if settings.source else "api"),
        crash=crash,
        clock=time.monotonic,
    )
    log.info("runtime ready", keyword=settings.keyword.kind, embedder=inner.model_id, dim=inner.dim)
    rt = Runtime(settings, ledger, keyword, vector, embedder, engine)
    try:
        yield rt
    finally:
        rt.close()
