"""The parts of the machine the CPU table names, which process belongs to which, and their cores
over a run's steady window (from ``bench/cpu.py``'s snapshots of ``/proc``)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from bench import cpu

# The parts of the machine the CPU table names, in its column order.
KEYWORD_STORE = "keyword store"
VECTOR_STORE = "vector store"
SHARD_ACTORS = "shard actors"
WRITER_ACTORS = "index writer actors"
DRIVER = "service driver"
RAY_SYSTEM = "Ray system"
HARNESS = "benchmark harness"
CPU_PARTS = (KEYWORD_STORE, VECTOR_STORE, SHARD_ACTORS, WRITER_ACTORS, DRIVER, RAY_SYSTEM, HARNESS,
             cpu.OTHER, cpu.IDLE)  # fmt: skip


def classifier(stores: dict[int, str], service_pid: int) -> cpu.Classifier:
    """Group processes: the store servers (and their children), the service's session (its
    driver, Ray's processes, the actors), this harness; the rest of the machine is left out."""
    harness = os.getpid()

    def classify(info: cpu.ProcInfo, table: Mapping[int, cpu.ProcInfo]) -> str | None:
        for pid, part in stores.items():
            if cpu.descends_from(info, pid, table):
                return part
        if info.session == service_pid or cpu.descends_from(info, service_pid, table):
            if info.pid == service_pid:
                return DRIVER
            if "ray::ShardActor" in info.cmdline:
                return SHARD_ACTORS
            if "ray::IndexWriterActor" in info.cmdline:
                return WRITER_ACTORS
            return RAY_SYSTEM
        return HARNESS if info.pid == harness else None

    return classify


def window_cores(snapshots: Sequence[tuple[float, cpu.CpuSnapshot]], start: float, end: float) -> dict[str, float]:
    """Cores per part between the first snapshot at or after ``start`` and the last at or before
    ``end`` (times since the service started)."""
    inside = [snap for t, snap in snapshots if start <= t <= end]
    return cpu.cores(inside[0], inside[-1]) if len(inside) >= 2 else {}
