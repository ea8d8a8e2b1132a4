"""Reciprocal rank fusion (RRF): one ranking out of several, by rank alone.

A chunk's fused score is the sum, over the lists (*legs*) that hold it, of
``weight[leg] / (k + rank)``, ranks counted from 1 within each leg. A chunk missing from a leg
gets nothing from it. Scores of the engines themselves (BM25, cosine) are never compared: they
live on different scales, which is why ranks are fused and not scores (Cormack, Clarke and
Büttcher, SIGIR 2009; the same formula as Elasticsearch's and OpenSearch's RRF retrievers).

Pure functions only; ties are broken by chunk ID, so the result is a total order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# The constant of the formula: 60 in the paper and in both engines' RRF retrievers.
RRF_K_DEFAULT = 60


@dataclass(frozen=True)
class Fused:
    """One chunk of a fused ranking: its score and its rank in each leg that holds it."""

    chunk_id: str
    score: float
    ranks: Mapping[str, int]


def rrf(
    legs: Mapping[str, Sequence[str]],
    *,
    k: int = RRF_K_DEFAULT,
    weights: Mapping[str, float] | None = None,
) -> list[Fused]:
    """Fuse each leg's chunk IDs (best first) into one ranking, best first.

    A leg naming a chunk twice counts its first (best) rank only. ``weights`` default to 1 per
    leg; a leg of weight 0 still reports its ranks but adds nothing to the score.
    """
    if k < 1:
        raise ValueError(f"the RRF constant k must be at least 1, got {k}")
    ranks: dict[str, dict[str, int]] = {}
    for leg, ids in legs.items():
        for rank, chunk_id in enumerate(ids, start=1):
            ranks.setdefault(chunk_id, {}).setdefault(leg, rank)
    fused = [Fused(chunk_id, _score(held, k, weights), held) for chunk_id, held in ranks.items()]
    return sorted(fused, key=lambda f: (-f.score, f.chunk_id))


def _score(ranks: Mapping[str, int], k: int, weights: Mapping[str, float] | None) -> float:
    # Summed in a fixed (leg name) order, so equal inputs give bit-equal scores.
    return sum((1.0 if weights is None else weights.get(leg, 1.0)) / (k + ranks[leg]) for leg in sorted(ranks))
