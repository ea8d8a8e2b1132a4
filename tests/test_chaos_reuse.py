"""A worker's reused stores (chaos.runner.WorkerStores) leak nothing from one schedule into the
next: a schedule gives the same result alone, after other schedules on the same milvus-lite
collection, and on fresh stores of its own, which is what keeps a replay exact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from chaos.catalogue import INPROC_KINDS
from chaos.rig import EMBED_DIM
from chaos.runner import EmbeddedStores, ScheduleResult, WorkerStores, plan_specs, run_schedule
from coordinator.model import IndexedChunk

# A few schedules of a plan: the first ones force a kind each (crashes, lost acks, store outages
# among them), so the later ones run on a collection that earlier faults wrote to and emptied.
PLAN_SEED = 20_251_126
BEFORE = 7
TARGETS = 2


def _outcome(result: ScheduleResult) -> dict[str, Any]:
    """Everything a schedule reports but its wall time."""
    reported = result.as_json()
    reported.pop("wall_s")
    return reported


def test_a_schedule_gives_the_same_result_alone_after_others_and_on_fresh_stores(tmp_path: Path) -> None:
    """Schedules run after seven others on one worker's reused collection report exactly what they
    report first on a new worker's stores and on fresh stores of their own: faults, events,
    steps, crash points, violations."""
    specs = plan_specs(PLAN_SEED, BEFORE + TARGETS, INPROC_KINDS)
    reused = WorkerStores()
    (tmp_path / "reused").mkdir()
    before = [run_schedule(spec, tmp_path / "reused", open_stores=reused) for spec in specs[:BEFORE]]
    assert [r.violations for r in before] == [[]] * BEFORE
    for i, spec in enumerate(specs[BEFORE:]):
        after = run_schedule(spec, tmp_path / "reused", open_stores=reused)
        (tmp_path / f"alone-{i}").mkdir()
        alone = run_schedule(spec, tmp_path / f"alone-{i}", open_stores=WorkerStores())
        (tmp_path / f"fresh-{i}").mkdir()
        fresh = run_schedule(spec, tmp_path / f"fresh-{i}", open_stores=EmbeddedStores.open)
        assert after.injected, "the schedule injected faults"
        assert _outcome(after) == _outcome(alone) == _outcome(fresh)


def test_a_schedule_leaves_only_its_worker_collection_behind(tmp_path: Path) -> None:
    """After a schedule its Tantivy directory and ledger files are gone and the worker's collection
    is empty, so a long run's worker directory does not grow with the schedules it ran."""
    stores = WorkerStores()
    [spec] = plan_specs(PLAN_SEED, 1, INPROC_KINDS)
    result = run_schedule(spec, tmp_path, open_stores=stores)
    assert result.ok, result.violations
    assert sorted(p.name for p in tmp_path.iterdir()) == ["milvus.db"]
    assert stores(tmp_path, "next").vector.count() == 0


def test_a_collection_left_full_is_replaced_by_an_empty_one(tmp_path: Path) -> None:
    """When a schedule's stores were not emptied (its emptying failed), the next schedule still
    starts on an empty collection."""
    stores = WorkerStores()
    first = stores(tmp_path, "first")
    chunk = IndexedChunk("first:d:0", "first:d", 0, "text", "0" * 64, 1, {}, [1.0] * EMBED_DIM)
    first.vector.upsert([chunk])
    first.keyword.drop()
    assert first.vector.count() == 1
    second = stores(tmp_path, "second")
    assert second.vector.count() == 0 and second.vector.get([chunk.chunk_id]) == {}
    second.close()


def test_the_worker_collection_is_created_anew_after_its_uses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """milvus-lite keeps the deletes that empty a collection, so a long-lived one grows slow: a
    worker serves WORKER_COLLECTION_USES_MAX schedules from one collection, then creates it anew."""
    import chaos.runner

    monkeypatch.setattr(chaos.runner, "WORKER_COLLECTION_USES_MAX", 2)
    stores = WorkerStores()
    opened = []
    for n in range(5):
        reused = stores(tmp_path, f"s{n}")
        opened.append(reused.vector)
        assert reused.vector.count() == 0
        reused.close()
    assert opened[0] is opened[1] and opened[2] is opened[3]
    assert opened[1] is not opened[2] and opened[3] is not opened[4]
