"""The generations' registry, their writers' announcements, dropping a generation's stores, and
readers' aliases. A generation's parts are built by ``lockstep.bootstrap.build_generation``.

The registry lives in the *home* ledger (generation 1's). A later generation has its own ledger
namespace (SQLite ``<ledger>.g<N>.db``, Postgres schema ``<schema>_g<N>``) for its documents,
intents and applied versions, and shares checkpoints, dead letters, shard leases and the
embedding cache with home: a swap never moves a source's checkpoint, and a chunk text already
embedded by the same model is never embedded again.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import structlog

from adapters.ledger.registry import registry_for
from coordinator.chunking import ChunkingSettings
from coordinator.errors import LockstepError
from coordinator.generations import Generation, GenerationSpec, GenState, physical_names
from coordinator.ports import AliasedIndex, Embedder, GenerationRegistry, OpenedGeneration
from lockstep.bootstrap import (
    AnyLedger,
    GenerationParts,
    build_keyword,
    build_ledger,
    build_vector,
    embedder_record,
    keyword_settings,
    vector_settings,
)
from lockstep.settings import EmbedderSettings, Settings

log = structlog.get_logger(__name__)

# A writer's announcement of the generations it writes holds this long unless renewed; a
# process killed without withdrawing holds a rebuild's validation up at most this long.
WRITER_TTL_S = 30.0
# A running writer renews its announcement this often (well inside WRITER_TTL_S).
WRITER_RENEW_S = 2.0


class WriterAnnouncement:
    """This process's row among the generations' writers (adapters/ledger/registry.py).

    ``starting()`` comes before the process reads the registry, so a rebuild that registered a
    generation a moment earlier never mistakes it for a writer of the old set only; ``writing()``
    comes once every write it makes reaches ``numbers``; ``renew()`` keeps the row alive (a
    thread does it for one-shot commands, the service's loop for ``lockstep run``).
    """

    def __init__(self, registry: GenerationRegistry, owner: str) -> None:
        self.registry = registry
        self.owner = owner
        self.numbers: list[int] | None = None
        self._renewed_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def starting(self) -> None:
        self.numbers = None
        self._announce()

    def writing(self, numbers: list[int]) -> None:
        self.numbers = sorted(numbers)
        self._announce()
        log.info("writing generations", owner=self.owner, generations=self.numbers)

    def renew(self) -> None:
        """Announce again if WRITER_RENEW_S has passed; a failure is logged, not raised (the row
        expires and a rebuild waits for it, which is the safe side)."""
        if time.monotonic() - self._renewed_at < WRITER_RENEW_S:
            return
        try:
            self._announce()
        except LockstepError as exc:
            log.warning("cannot renew this writer's announcement", owner=self.owner, error=str(exc))

    def renew_in_background(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, name="writer-announcement", daemon=True)
        self._thread.start()

    def withdraw(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=WRITER_RENEW_S * 2)
        try:
            self.registry.withdraw(self.owner)
        except LockstepError as exc:  # the row expires after WRITER_TTL_S
            log.warning("cannot withdraw this writer's announcement", owner=self.owner, error=str(exc))

    def _announce(self) -> None:
        self._renewed_at = time.monotonic()
        self.registry.announce(self.owner, self.numbers, WRITER_TTL_S)

    def _renew_loop(self) -> None:
        while not self._stop.wait(WRITER_RENEW_S):
            self.renew()


def writer_owner(kind: str) -> str:
    """A name unique to this process and use: host, pid and a random suffix."""
    return f"{os.uname().nodename}#{os.getpid()}-{kind}-{uuid.uuid4().hex[:6]}"


def keyword_alias(settings: Settings) -> str:
    return settings.keyword.live_alias


def vector_alias(settings: Settings) -> str:
    return settings.vector.alias or f"{settings.vector.collection}_live"


def generation_spec(embedder: EmbedderSettings, inner: Embedder, chunking: ChunkingSettings) -> GenerationSpec:
    """What a generation built with these embedder settings (``inner`` is their embedder) and
    this chunking records."""
    return GenerationSpec(embedder_record(embedder), inner.model_id, inner.dim, chunking)


def generation_names(settings: Settings, number: int) -> tuple[str, str]:
    return physical_names(settings.keyword.physical_base, settings.vector.collection, number)


def new_generation(
    settings: Settings, number: int, embedder: EmbedderSettings, inner: Embedder, chunking: ChunkingSettings,
    now: float,
) -> Generation:
    return generation_spec(embedder, inner, chunking).generation(number, generation_names(settings, number), now)


def drop_generation_ledger(settings: Settings, number: int) -> None:
    """Remove a dropped generation's ledger namespace (never generation 1's: it is home)."""
    if number == 1:
        return
    ledger = build_ledger(settings, generation=number)
    try:
        ledger.drop_namespace()
    finally:
        ledger.close()


def load_generations(
    settings: Settings,
    home: AnyLedger,
    inner: Embedder | Callable[[], Embedder],
    registry: GenerationRegistry | None = None,
) -> tuple[GenerationRegistry, list[Generation]]:
    """The registry and its records; the first start of a deployment records generation 1 from
    the config (its indexes keep their configured names). ``inner`` (the configured embedder,
    or a function that builds it) is needed only for that first record. ``registry``: one the
    caller already opened on ``home``."""
    registry = registry or registry_for(home)
    gens = registry.all()
    if not gens:
        embedder: Embedder = inner() if callable(inner) and not hasattr(inner, "model_id") else inner  # type: ignore[assignment]  # hasattr does not narrow the union
        first = new_generation(settings, 1, settings.embedder, embedder, settings.chunking.to_domain(), time.time())
        first = Generation.from_json({**first.to_json(), "state": GenState.ACTIVE.value, "activated_at": first.created_at,
                                      "backfill_done": True})
        if registry.put_if_empty(first):
            log.info("generation 1 recorded", model=first.model_id, chunking=first.chunking.fingerprint)
        gens = registry.all()
    return registry, gens


def config_matches(settings: Settings, gen: Generation, inner_model_id: str) -> bool:
    return inner_model_id == gen.model_id and settings.chunking.to_domain() == gen.chunking


# --- aliases -------------------------------------------------------------------------------------


def alias_targets(
    settings: Settings, keyword: AliasedIndex, vector: AliasedIndex
) -> tuple[str | None, str | None]:
    """Where the readers' aliases point now (physical names: see ``AliasedIndex``)."""
    return keyword.alias_target(keyword_alias(settings)), vector.alias_target(vector_alias(settings))


def point_aliases(settings: Settings, parts: OpenedGeneration) -> dict[str, Any]:
    """Point both readers' aliases at the indexes of ``parts``: one ``_aliases`` request (or
    alias file), one ``alter_alias``.

    Returns when each engine switched (Unix seconds), for the swap report."""
    kw_alias, vec_alias = keyword_alias(settings), vector_alias(settings)
    parts.keyword.point_alias(kw_alias, parts.keyword.physical_name)
    keyword_at = time.time()
    parts.vector.point_alias(vec_alias, parts.vector.physical_name)
    vector_at = time.time()
    number = parts.generation.number
    log.info("aliases point at generation", generation=number, keyword_alias=kw_alias, vector_alias=vec_alias)
    return {
        "generation": number,
        "keyword_alias": kw_alias,
        "vector_alias": vec_alias,
        "keyword_switched_at": keyword_at,
        "vector_switched_at": vector_at,
    }


def heal_aliases(settings: Settings, parts: GenerationParts) -> None:
    """At start-up: readers' aliases that are missing get pointed at the active generation's
    ``parts`` (a first start, or an index dropped and re-created); a wrong target is only reported."""
    kw, vec = alias_targets(settings, parts.keyword, parts.vector)
    if kw is None or vec is None:
        point_aliases(settings, parts)
    elif (kw, vec) != (parts.keyword.physical_name, parts.vector.physical_name):
        log.warning("aliases do not point at the active generation", keyword=kw, vector=vec,
                    active=parts.generation.number)


def drop_generation_stores(settings: Settings, gen: Generation) -> None:
    """Drop a generation's keyword index and collection, then its ledger namespace
    (generation 1's tables stay in the home ledger, unused)."""
    keyword = build_keyword(keyword_settings(settings, gen))
    vector = build_vector(vector_settings(settings, gen), dim=gen.dim)
    try:
        keyword.drop()
        vector.drop()
    finally:
        keyword.close()
        vector.close()
    drop_generation_ledger(settings, gen.number)
