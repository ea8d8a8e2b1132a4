"""``lockstep rebuild`` wired from settings: the use case (``coordinator.rebuild``) over the
configured stores.

``ConfiguredStores`` is the ``GenerationStores`` port over the backends the settings name; the
``Rebuild`` here opens the home ledger and the registry, turns embedder settings into a
``GenerationSpec``, and runs the use case on real time.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.chunking import ChunkingSettings
from coordinator.crashpoints import CrashHook, no_crash
from coordinator.generations import Generation
from coordinator.ports import GenerationReader, KeywordIndex, ListableSource, OpenedGeneration, QuerySearch
from coordinator.rebuild.operations import Rebuild as RebuildUseCase
from coordinator.rebuild.operations import RebuildOptions
from coordinator.rebuild.report import Progress, RebuildReport, no_progress
from lockstep.audit_cli import LISTABLE_SOURCE_KINDS
from lockstep.bootstrap import (
    AnyLedger,
    build_embedder,
    build_generation,
    build_keyword,
    build_ledger,
    build_source,
    build_vector,
    generation_embedder_settings,
    keyword_settings,
    vector_settings,
)
from lockstep.generation_parts import (
    drop_generation_stores,
    generation_names,
    generation_spec,
    load_generations,
    point_aliases,
)
from lockstep.settings import EmbedderSettings, Settings


@dataclass
class _Reader:
    """Generation N as the backfill reads it (the ``GenerationReader`` port)."""

    generation: Generation
    ledger: AnyLedger
    keyword: KeywordIndex


class ConfiguredStores:
    """The generations' stores as ``settings`` configure them (the ``GenerationStores`` port).
    ``home`` is generation 1's ledger: its owner closes it, never these methods."""

    def __init__(self, settings: Settings, home: AnyLedger) -> None:
        self.settings = settings
        self.home = home

    def physical_names(self, number: int) -> tuple[str, str]:
        return generation_names(self.settings, number)

    @contextmanager
    def reading(self, generation: Generation) -> Iterator[GenerationReader]:
        ledger = self.home if generation.number == 1 else build_ledger(self.settings, generation=generation.number)
        reader = _Reader(generation, ledger, build_keyword(keyword_settings(self.settings, generation)))
        try:
            yield reader
        finally:
            reader.keyword.close()
            if ledger is not self.home:
                ledger.close()

    @contextmanager
    def writing(self, generation: Generation, crash: CrashHook = no_crash) -> Iterator[OpenedGeneration]:
        source_name = self.settings.source.name if self.settings.source else "api"
        parts = build_generation(self.settings, generation, self.home, source_name=source_name, crash=crash)
        try:
            yield parts
        finally:
            parts.close(keep_ledger=parts.ledger is self.home)

    @contextmanager
    def searching(self, generation: Generation) -> Iterator[QuerySearch]:
        embedder = build_embedder(generation_embedder_settings(self.settings, generation))
        vector = build_vector(vector_settings(self.settings, generation), dim=generation.dim)
        try:
            yield lambda query, k: vector.search(embedder.embed([query])[0], k)
        finally:
            vector.close()

    @contextmanager
    def listing_source(self, reader: GenerationReader) -> Iterator[tuple[str, ListableSource] | None]:
        src = self.settings.source
        if src is None or src.kind not in LISTABLE_SOURCE_KINDS:
            yield None
            return
        assert isinstance(reader, _Reader), "a reader that reading() opened"
        source = build_source(self.settings, reader.ledger)
        try:
            yield (src.name, source) if isinstance(source, ListableSource) else None
        finally:
            source.close()

    def point_aliases(self, parts: OpenedGeneration) -> dict[str, Any]:
        return point_aliases(self.settings, parts)

    def drop(self, generation: Generation) -> None:
        drop_generation_stores(self.settings, generation)


class Rebuild:
    """One ``lockstep rebuild`` (or ``--rollback`` / ``--abort``, or ``lockstep gc``) process:
    the home ledger, the registry, and the use case over the configured stores."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        crash: CrashHook = no_crash,
    ) -> None:
        """``clock`` and ``sleep`` time every wait of the rebuild (the chaos suite runs it on
        simulated time, stepping the live service while it waits); ``crash`` is passed to the
        new generation's engine and ledger (test only: the chaos suite's crash points)."""
        self.settings = settings
        # Test only: a real SIGKILL of this process after this many saved backfill batches.
        self.crash_after_batches: int | None = None
        self.home = build_ledger(settings)
        try:
            self.configured = build_embedder(settings.embedder)
            self.registry, _ = load_generations(settings, self.home, self.configured)
        except BaseException:
            self.home.close()
            raise
        options = RebuildOptions(settings.rebuild.batch_docs, settings.rebuild.queries_k, self._queries)
        self.use_case = RebuildUseCase(
            self.registry, ConfiguredStores(settings, self.home), options, clock=clock, sleep=sleep,
            unix_now=time.time, crash=crash, batch_saved=self._batch_saved,
        )

    def close(self) -> None:
        self.home.close()

    def generations(self) -> list[Generation]:
        return self.use_case.generations()

    def begin(self, embedder: EmbedderSettings, chunking: ChunkingSettings) -> Generation:
        """Register generation N+1, or return the one being built if it has the same identity."""
        return self.use_case.begin(generation_spec(embedder, build_embedder(embedder), chunking))

    def run(self, embedder: EmbedderSettings, chunking: ChunkingSettings, *, swap: bool = True,
            progress: Progress = no_progress) -> RebuildReport:
        spec = generation_spec(embedder, build_embedder(embedder), chunking)
        return self.use_case.run(spec, swap=swap, progress=progress)

    def swap(self, number: int) -> dict[str, Any]:
        return self.use_case.swap(number)

    def rollback(self) -> dict[str, Any]:
        """Point readers back at the standby generation that was active most recently."""
        return self.use_case.rollback()

    def abort(self) -> int:
        """Give up the generation being built: no writer writes it any more, then its stores go."""
        return self.use_case.abort()

    def gc(self, *, now: float, retention_s: float) -> list[int]:
        return self.use_case.gc(now=now, retention_s=retention_s)

    def _queries(self) -> Sequence[str] | None:
        """The configured query set, one query a line (None: none configured)."""
        path = self.settings.rebuild.queries_path
        if not path:
            return None
        return [q.strip() for q in Path(path).read_text(encoding="utf-8").splitlines() if q.strip()]

    def _batch_saved(self, batches: int) -> None:
        if self.crash_after_batches is not None and batches >= self.crash_after_batches:
            os.kill(os.getpid(), signal.SIGKILL)
