"""Index generations: what each one is, which ones receive writes, and which one readers see.

A *generation* is one complete copy of the derived data: a keyword index, a vector collection
and a ledger namespace, built with one embedding model and one chunking. Readers never name a
generation; they query an alias that points at the *active* one. A rebuild builds generation
N+1 next to it (``building``), validates it and swaps the aliases; the previous generation is
kept in step as ``standby`` (so a rollback shows current data) until ``gc`` drops it after the
retention period.

Pure rules only: the registry is stored by an adapter, the stores are touched by lockstep.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from coordinator.chunking import ChunkingSettings
from coordinator.errors import ConfigError


class GenState(enum.StrEnum):
    BUILDING = "building"
    ACTIVE = "active"
    STANDBY = "standby"
    DROPPED = "dropped"
    # No longer written, stores not dropped yet: a generation being built that was given up
    # (``aborted``), or a standby one that ``gc`` let go (``retired``). Its stores are dropped
    # once no live writer writes it any more; a ``gc`` run finishes what an interrupted one left.
    ABORTED = "aborted"
    RETIRED = "retired"


# Generations that receive every live write: the one readers see, the one being built, and the
# ones a rollback may return to.
LIVE_STATES = frozenset({GenState.BUILDING, GenState.ACTIVE, GenState.STANDBY})
# Generations let go whose stores are still to drop.
LET_GO_STATES = frozenset({GenState.ABORTED, GenState.RETIRED})


@dataclass(frozen=True)
class Generation:
    """One generation as the registry records it.

    ``keyword_index`` is the physical index name (for Tantivy, its directory); ``embedder`` is
    the embedder's settings without secrets, so the generation can be rebuilt from the record
    alone and never with another model.
    """

    number: int
    state: GenState
    keyword_index: str
    vector_collection: str
    embedder: Mapping[str, Any]
    model_id: str
    dim: int
    chunking: ChunkingSettings
    created_at: float
    activated_at: float | None = None
    retired_at: float | None = None
    backfill_position: str | None = None
    backfill_done: bool = False
    backfilled_docs: int = 0
    swaps: tuple[Mapping[str, Any], ...] = field(default_factory=tuple)

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    def to_json(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "state": self.state.value,
            "keyword_index": self.keyword_index,
            "vector_collection": self.vector_collection,
            "embedder": dict(self.embedder),
            "model_id": self.model_id,
            "dim": self.dim,
            "chunking": {"max_chars": self.chunking.max_chars, "overlap_chars": self.chunking.overlap_chars},
            "created_at": self.created_at,
            "activated_at": self.activated_at,
            "retired_at": self.retired_at,
            "backfill_position": self.backfill_position,
            "backfill_done": self.backfill_done,
            "backfilled_docs": self.backfilled_docs,
            "swaps": [dict(s) for s in self.swaps],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Generation:
        return cls(
            number=int(data["number"]),
            state=GenState(data["state"]),
            keyword_index=str(data["keyword_index"]),
            vector_collection=str(data["vector_collection"]),
            embedder=dict(data["embedder"]),
            model_id=str(data["model_id"]),
            dim=int(data["dim"]),
            chunking=ChunkingSettings(**data["chunking"]),
            created_at=float(data["created_at"]),
            activated_at=data.get("activated_at"),
            retired_at=data.get("retired_at"),
            backfill_position=data.get("backfill_position"),
            backfill_done=bool(data.get("backfill_done", False)),
            backfilled_docs=int(data.get("backfilled_docs", 0)),
            swaps=tuple(data.get("swaps", ())),
        )


@dataclass(frozen=True)
class GenerationSpec:
    """What a generation is built with: its embedder (the settings it records, without secrets;
    the model and dimension they give) and its chunking."""

    embedder: Mapping[str, Any]
    model_id: str
    dim: int
    chunking: ChunkingSettings

    def built(self, gen: Generation) -> bool:
        """Whether ``gen`` was built with this model, dimension and chunking."""
        return (gen.model_id, gen.dim, gen.chunking) == (self.model_id, self.dim, self.chunking)

    def generation(self, number: int, names: tuple[str, str], created_at: float) -> Generation:
        """Generation ``number``, being built with this spec, in the stores ``names`` names."""
        return Generation(
            number=number,
            state=GenState.BUILDING,
            keyword_index=names[0],
            vector_collection=names[1],
            embedder=dict(self.embedder),
            model_id=self.model_id,
            dim=self.dim,
            chunking=self.chunking,
            created_at=created_at,
        )


def physical_names(keyword_base: str, vector_base: str, number: int) -> tuple[str, str]:
    """The keyword index (or Tantivy directory) and collection of generation ``number``.

    Generation 1 keeps the configured names, so a deployment that predates generations keeps
    its data: ``<name>-g<N>`` and ``<name>_g<N>`` start at generation 2.
    """
    if number == 1:
        return keyword_base, vector_base
    return f"{keyword_base}-g{number}", f"{vector_base}_g{number}"


def active(generations: Iterable[Generation]) -> Generation:
    found = [g for g in generations if g.state is GenState.ACTIVE]
    if len(found) != 1:
        raise ConfigError(f"the registry must hold exactly one active generation, found {len(found)}")
    return found[0]


def building(generations: Iterable[Generation]) -> Generation | None:
    found = [g for g in generations if g.state is GenState.BUILDING]
    if len(found) > 1:
        raise ConfigError("the registry holds more than one generation being built")
    return found[0] if found else None


def live(generations: Iterable[Generation]) -> list[Generation]:
    """Every generation that receives live writes, the active one first."""
    gens = [g for g in generations if g.live]
    return sorted(gens, key=lambda g: (g.state is not GenState.ACTIVE, -g.number))


def lagging_writers(writers: Mapping[str, Sequence[int] | None], number: int) -> list[str]:
    """The live writers whose changes do not reach generation ``number`` yet; a writer still
    starting (its set not known) is one of them."""
    return sorted(owner for owner, numbers in writers.items() if numbers is None or number not in numbers)


def next_number(generations: Iterable[Generation]) -> int:
    return max((g.number for g in generations), default=0) + 1


def start_building(
    generations: Sequence[Generation], candidate: Generation
) -> Generation:
    """The new generation to record, or ConfigError if one is already being built."""
    current = building(generations)
    if current is not None:
        raise ConfigError(
            f"generation {current.number} is already being built; resume it with `lockstep rebuild` "
            "(same options) or drop it with `lockstep rebuild --abort`"
        )
    return replace(candidate, state=GenState.BUILDING, number=next_number(generations))


def swapped(generations: Sequence[Generation], to: int, at: float, switch: Mapping[str, Any]) -> list[Generation]:
    """The records after readers moved to generation ``to``: the old active one becomes standby."""
    by_number = {g.number: g for g in generations}
    target = by_number.get(to)
    if target is None or target.state not in (GenState.BUILDING, GenState.STANDBY):
        raise ConfigError(f"generation {to} cannot become active (it is {target.state if target else 'unknown'})")
    old = active(generations)
    return [
        replace(old, state=GenState.STANDBY, retired_at=at),
        replace(target, state=GenState.ACTIVE, activated_at=at, retired_at=None, swaps=(*target.swaps, dict(switch))),
    ]


def rollback_target(generations: Sequence[Generation]) -> Generation:
    """The standby generation that was active most recently."""
    standby = [g for g in generations if g.state is GenState.STANDBY]
    if not standby:
        raise ConfigError("there is no standby generation to roll back to")
    return max(standby, key=lambda g: (g.retired_at or 0.0, g.number))


def expired(generations: Iterable[Generation], now: float, retention_s: float) -> list[Generation]:
    """Standby generations whose retention is over, and aborted or retired ones whose stores are
    still to drop (never the active or building one)."""
    out = []
    for g in generations:
        if (g.state is GenState.STANDBY and (g.retired_at or 0.0) + retention_s <= now) or g.state in LET_GO_STATES:
            out.append(g)
    return out


def still_writing(writers: Mapping[str, Sequence[int] | None], number: int) -> list[str]:
    """The live writers that may still write generation ``number``: those whose set holds it, and
    those still starting (their set is not known yet)."""
    return sorted(owner for owner, numbers in writers.items() if numbers is None or number in numbers)


def check_embedder(generation: Generation, model_id: str, dim: int) -> None:
    """Refuse to write vectors of one model into a generation built with another."""
    if (model_id, dim) != (generation.model_id, generation.dim):
        raise ConfigError(
            f"generation {generation.number} holds vectors of {generation.model_id} ({generation.dim}-d); "
            f"refusing to write vectors of {model_id} ({dim}-d) into it. A model change is a rebuild: "
            "`lockstep rebuild --embedder ...`"
        )


def reassemble(chunks: Sequence[str], chunking: ChunkingSettings) -> str:
    """The document text back from its chunks (the chunker is lossless; overlap is removed)."""
    if not chunks:
        return ""
    overlap = chunking.overlap_chars
    raw = [chunks[0]]
    for chunk in chunks[1:]:
        carried = len(raw[-1][-overlap:]) if overlap else 0
        raw.append(chunk[carried:])
    return "".join(raw)
