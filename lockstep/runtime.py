"""A lockstep process's collaborators, opened together and closed together.

``runtime`` opens the write path (the home ledger, every live generation's parts and the apply
engine over them); ``open_search`` the read path on the active generation. What they open is
built by ``lockstep.bootstrap`` (each generation's parts by ``build_generation``); which
generations there are, by ``lockstep.generation_parts``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import structlog

from adapters.embedders.cached import CachedEmbedder, ReadThroughCache
from adapters.ledger.registry import registry_for
from adapters.vector.milvus import MilvusVectorIndex
from coordinator.apply import ApplyEngine
from coordinator.crashpoints import CrashHook, no_crash
from coordinator.errors import ConfigError
from coordinator.generations import Generation, check_embedder, live
from coordinator.multi_apply import MultiEngine
from coordinator.ports import KeywordIndex, KeywordSearch, VectorSearch
from coordinator.search import SearchService
from lockstep.bootstrap import (
    AnyLedger,
    GenerationParts,
    build_embedder,
    build_embedding_cache,
    build_generation,
    build_keyword,
    build_keyword_reader,
    build_ledger,
    build_vector,
    generation_embedder_settings,
    keyword_settings,
    vector_settings,
)
from lockstep.generation_parts import (
    WriterAnnouncement,
    config_matches,
    heal_aliases,
    keyword_alias,
    load_generations,
    vector_alias,
    writer_owner,
)
from lockstep.leftovers import clear_dead_runs
from lockstep.settings import Settings

log = structlog.get_logger(__name__)

# Query vectors a search process keeps in memory (a repeated query is embedded once): ~6 MB.
QUERY_VECTORS_MAX = 4096


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
            built.append(build_generation(settings, gen, home, source_name=name, crash=crash, inner=reuse))
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
        heal_aliases(settings, active_parts)
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
    home = build_ledger(settings)
    closers: list[Callable[[], None]] = [home.close]
    try:
        gen = active_generation(registry_for(home).all())
        ledger = home if gen.number == 1 else build_ledger(settings, generation=gen.number)
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
    """The keyword index readers use: its alias (for Tantivy, the directory the alias file
    names), or the active generation's own index while no alias exists yet (a deployment only
    ever written by ``lockstep run``, which leaves aliases to the one-shot commands)."""
    alias = keyword_alias(settings)
    index = build_keyword(keyword_settings(settings, gen))
    if index.alias_target(alias) is not None:
        index.close()
        index = build_keyword_reader(settings.keyword, alias)
    assert isinstance(index, KeywordSearch), "every keyword adapter offers the read path"
    return index


def open_vector_reader(settings: Settings, gen: Generation) -> MilvusVectorIndex:
    """The vector index readers use: its alias, or the active generation's own collection while
    no alias exists yet."""
    alias = vector_alias(settings)
    reader = build_vector(settings.vector.model_copy(update={"collection": alias}), dim=gen.dim)
    if reader.alias_target(alias) is None:
        reader.close()
        reader = build_vector(vector_settings(settings, gen), dim=gen.dim)
    reader.load()
    return reader
