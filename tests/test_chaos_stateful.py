"""A Hypothesis state machine over real stores: source mutations and fault injections as rules,
every invariant checked at each quiescence, reached through the streaming path (shard worker,
low watermark) or the batch path (``run_sync``); the model is SourceModel's plain dict."""

from __future__ import annotations

import random
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test

from chaos.drive import CRASH_POINTS, BatchDrive, ShardDrive
from chaos.faults import EMBED_ARMABLE
from chaos.rig import Rig, Stores
from chaos.runner import EmbeddedStores, ScheduleSpec, quiescent_checks
from chaos.servertier import ServerTier
from chaos.stream import DELIVERY_FAULTS, StreamFaults
from chaos.workload import TABLES, SourceModel

# Few, short runs: each step drives real stores; the CI smoke covers breadth.
MACHINE_SETTINGS = settings(
    max_examples=6, stateful_step_count=12, deadline=None, suppress_health_check=list(HealthCheck)
)
Opener = Callable[[Path, str], Stores]


def machine(open_stores: Opener) -> type[RuleBasedStateMachine]:
    """A state machine class whose schedules run over the stores ``open_stores`` gives."""

    class ChaosMachine(RuleBasedStateMachine):
        @initialize(seed=st.integers(0, 2**32))
        def start(self, seed: int) -> None:
            self.rng = random.Random(seed)
            self.workdir = Path(tempfile.mkdtemp(prefix="chaos-sm-"))
            self.model = SourceModel(namespace=f"sm{seed:x}")
            self.stores = open_stores(self.workdir, self.model.namespace)
            self.rig = Rig(self.model, self.stores, self.workdir)
            self.streams = StreamFaults(random.Random(seed))
            self.pending: list[Any] = []
            for _ in range(4):
                self.pending.append(self.model.create(self.rng))

        def _live(self) -> list[str]:
            return self.model.live_ids()

        @rule()
        def create(self) -> None:
            self.pending.append(self.model.create(self.rng))

        @rule(data=st.data())
        def update(self, data: st.DataObject) -> None:
            if self._live():
                self.pending.append(self.model.update(self.rng, data.draw(st.sampled_from(self._live()))))

        @rule(data=st.data())
        def delete(self, data: st.DataObject) -> None:
            if self._live():
                self.pending.append(self.model.delete(data.draw(st.sampled_from(self._live()))))

        @rule(data=st.data())
        def change_key(self, data: st.DataObject) -> None:
            if self._live():
                self.pending += self.model.change_key(data.draw(st.sampled_from(self._live())))

        @rule(table=st.sampled_from(TABLES))
        def truncate(self, table: str) -> None:
            self.pending += self.model.truncate(table)

        @rule(kind=st.sampled_from(sorted(DELIVERY_FAULTS)))
        def disturb_delivery(self, kind: str) -> None:
            if self.pending:
                self.pending = DELIVERY_FAULTS[kind](self.streams, self.pending)

        @rule(kind=st.sampled_from(EMBED_ARMABLE), calls=st.integers(1, 3))
        def break_embedder(self, kind: str, calls: int) -> None:
            self.rig.embedder.arm(kind, calls)

        @rule(
            side=st.sampled_from(["keyword", "vector"]),
            kind=st.sampled_from(["down", "lost_ack"]),
            writes=st.integers(1, 3),
        )
        def break_index(self, side: str, kind: str, writes: int) -> None:
            getattr(self.rig, side).arm(kind, writes)

        @rule(point=st.sampled_from(CRASH_POINTS))
        def arm_crash(self, point: str) -> None:
            self.rig.crash.point = point

        @rule()
        def quiesce(self) -> None:
            """Deliver everything through the shard, settle, and check every invariant."""
            self._quiesce(ShardDrive)

        @rule()
        def quiesce_in_batches(self) -> None:
            """Deliver everything through ``run_sync``, and check every invariant."""
            self._quiesce(BatchDrive)

        def _quiesce(self, path: type[ShardDrive] | type[BatchDrive]) -> None:
            drive = path(self.rig, self.pending, ScheduleSpec(0, ()), self.rng, None)
            self.pending = []
            drive.to_quiescence()
            violations = quiescent_checks(self.rig, drive)
            assert violations == [], "\n".join(map(str, violations[:20]))

        def teardown(self) -> None:
            if hasattr(self, "rig"):
                try:
                    self.quiesce()
                finally:
                    self.rig.close()
                    self.stores.close()

    return ChaosMachine


def test_embedded_stores_converge_under_random_mutations_and_faults() -> None:
    """Tantivy + milvus-lite file: any interleaving of mutations and faults converges at quiescence."""
    run_state_machine_as_test(machine(EmbeddedStores.open), settings=MACHINE_SETTINGS)


@pytest.fixture(scope="module")
def tier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerTier]:
    with ServerTier(tmp_path_factory.mktemp("chaos-sm-servers")) as running:
        yield running


def test_opensearch_through_the_fault_proxy_converges(tier: ServerTier) -> None:
    """OpenSearch behind the HTTP and TCP fault proxies (armed throughout) converges too."""
    for kind in ("http_429", "bulk_item_429"):
        tier.os_http.arm(kind, 2)
    tier.os_tcp.arm("net_reset_after_send", 2)
    run_state_machine_as_test(machine(tier.open), settings=settings(MACHINE_SETTINGS, max_examples=3))
    assert tier.os_http.injected["http_429"] + tier.os_http.injected["bulk_item_429"] > 0
