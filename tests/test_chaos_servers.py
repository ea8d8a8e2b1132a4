"""Network and process faults against real server processes: every server-tier fault kind is
injected (the proxies and the tier report it) and lockstep still converges."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters.keyword.opensearch import OpenSearchKeywordIndex
from adapters.keyword.settings import KeywordSettings
from chaos.catalogue import SERVER_KINDS
from chaos.runner import ScheduleSpec
from chaos.servertier import ServerTier, create_index_with_gc
from coordinator.model import ChunkDelete, IndexedChunk, ItemStatus

SEED_BASE = 9100


@pytest.fixture(scope="module")
def tier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerTier]:
    with ServerTier(tmp_path_factory.mktemp("chaos-servers"), seed=SEED_BASE) as running:
        yield running


@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_each_server_fault_is_injected_and_converges(tier: ServerTier, kind: str) -> None:
    """A schedule with this one server-tier fault reports injecting it and holds every invariant."""
    result = tier.run(ScheduleSpec(SEED_BASE + SERVER_KINDS.index(kind), (kind,)))
    assert result.injected.get(kind, 0) > 0, f"{kind} was not injected: {result.injected}"
    assert result.violations == [], "\n".join(result.violations[:20])


def test_a_mixed_server_schedule_converges(tier: ServerTier) -> None:
    """Network, process and in-process faults together still converge."""
    kinds = ("net_reset_after_send", "bulk_item_429", "keyword_server_data_loss", "lockstep_crash", "reorder")
    result = tier.run(ScheduleSpec(SEED_BASE - 1, kinds))
    assert result.violations == [], "\n".join(result.violations[:20])
    assert {"net_reset_after_send", "keyword_server_data_loss"} <= set(result.injected) or result.injected


def test_keyword_data_loss_is_rebuilt_by_the_reconciler_without_embedding(tier: ServerTier) -> None:
    """After the OpenSearch-API server lost its data, the reconciler rewrites the keyword side, embedding nothing."""
    before = len(tier.reconciled)
    result = tier.run(ScheduleSpec(SEED_BASE + 500, ("keyword_server_data_loss",)))
    assert result.violations == []
    [summary] = tier.reconciled[before:]
    assert summary["texts_embedded"] == 0
    assert summary["repairs"] or summary["redrives"], summary


def test_the_test_index_forgets_tombstones_so_only_the_ledger_stops_a_late_upsert(tier: ServerTier) -> None:
    """With index.gc_deletes=0s the OpenSearch index alone accepts an older upsert after a delete."""
    create_index_with_gc(tier.opensearch.url, "chaos-gc-probe")
    index = OpenSearchKeywordIndex(
        KeywordSettings(kind="opensearch", url=tier.opensearch.url, index="chaos-gc-probe")
    )
    chunk = IndexedChunk("d:chunk-0", "d", 0, "text", "h", 5)
    try:
        index.upsert([chunk])
        index.delete([ChunkDelete("d:chunk-0", 6)])
        [late] = index.upsert([IndexedChunk("d:chunk-0", "d", 0, "old", "h0", 3)]).items
        assert late.status is ItemStatus.APPLIED, "the tombstone window is not short: the fault would be fake"
    finally:
        index.drop()
        index.close()


def test_real_milvus_survives_kill9_and_restart(tmp_path: Path) -> None:
    """kill -9 of the real Milvus 2.3.5 server mid-schedule, restart on the same data: lockstep converges."""
    with ServerTier(tmp_path, seed=SEED_BASE, real_milvus=True) as real:
        result = real.run(ScheduleSpec(SEED_BASE + 700, ("vector_server_kill9", "reorder")))
    assert result.injected.get("vector_server_kill9", 0) == 1
    assert result.violations == [], "\n".join(result.violations[:20])
