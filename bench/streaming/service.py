"""One lockstep installation (config, JSONL source, ledger) and its ``lockstep run`` subprocess.

Every installation gets its own index, collection and ledger, and ``verify`` checks both
indexes against the source with ``coordinator.invariants.check_index`` (I1-I4) when its run ends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from bench.incremental import expected_chunks
from bench.streaming.metrics import samples
from bench.streaming.workload import DIM
from chaos.servers import free_port
from coordinator.invariants import Violation, check_index
from lockstep.corpus import Doc
from lockstep.runtime import runtime
from lockstep.settings import RunSettings, load_settings

# /metrics is scraped this often during a throughput run.
METRICS_POLL_S = 0.25
# Bounds on waiting for the service, so a stuck run fails instead of hanging the benchmark.
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 90.0
HTTP_TIMEOUT_S = 2.0
LOCKSTEP = [sys.executable, "-m", "lockstep", "--log-level", "warning", "run"]


@dataclass(frozen=True)
class Tuning:
    """The ``run.*`` settings the benchmark passes to every service it starts."""

    batch_docs_max: int
    offer_batch_max: int
    mailbox_docs_max: int
    audit_interval_s: float
    prepare_ahead: int = RunSettings().prepare_ahead

    def describe(self) -> str:
        return ", ".join(f"run.{k}={v}" for k, v in self.__dict__.items())


@dataclass(frozen=True)
class Installation:
    """A config file naming a fresh index, collection, ledger and JSONL source."""

    name: str
    base: Path
    port: int

    @property
    def config(self) -> Path:
        return self.base / "lockstep.yaml"

    @property
    def events(self) -> Path:
        return self.base / "events.jsonl"

    @property
    def ledger(self) -> Path:
        return self.base / "ledger.db"

    @property
    def log(self) -> Path:
        return self.base / "service.log"


def install(work: Path, name: str, url: str, uri: str, shards: int, tuning: Tuning) -> Installation:
    """Write the config of a new installation (its own index, collection, ledger, source)."""
    inst = Installation(name, work / name, free_port())
    inst.base.mkdir(parents=True)
    config = {
        "source": {"kind": "jsonl", "path": str(inst.events), "name": "bench"},
        "keyword": {"kind": "opensearch", "url": url, "index": f"stream-{name}"},
        "vector": {"uri": uri, "collection": f"stream_{name}"},
        "ledger": {"kind": "sqlite", "path": str(inst.ledger)},
        "embedder": {"kind": "hashing", "dim": DIM},
        "run": {"shards": shards, "http_port": inst.port, **tuning.__dict__},
    }
    inst.config.write_text(yaml.safe_dump(config), encoding="utf-8")
    return inst


class Service:
    """One ``lockstep run`` subprocess in its own process group, logging to its installation."""

    def __init__(self, inst: Installation, *, exit_when_idle: bool) -> None:
        args = [*LOCKSTEP, "-c", str(inst.config), *(["--exit-when-idle"] if exit_when_idle else [])]
        self.inst = inst
        self.started = time.monotonic()
        with inst.log.open("ab") as log:
            self.process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{inst.port}", timeout=HTTP_TIMEOUT_S)

    def metrics(self) -> dict[str, float] | None:
        """Every sample of /metrics by name and labels, or None while the port is not up."""
        try:
            text = self.http.get("/metrics").text
        except httpx.HTTPError:
            return None
        return samples(text)

    def wait_ready(self) -> float:
        """Wait for /readyz to answer 200 (shards up); returns the seconds since start."""
        deadline = self.started + READY_TIMEOUT_S
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if self.http.get("/readyz").status_code == 200:
                    return time.monotonic() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(METRICS_POLL_S)
        raise RuntimeError(f"the service was not ready within {READY_TIMEOUT_S} s; see {self.inst.log}")

    def wait_exit(self, timeout_s: float) -> int:
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(
                f"the service did not exit within {timeout_s} s; see {self.inst.log}"
            ) from None

    def terminate(self) -> int:
        """SIGTERM (graceful drain), then wait for the exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self.wait_exit(STOP_TIMEOUT_S)

    def kill(self) -> None:
        """SIGKILL this service's own process group (the driver and the Ray processes it started)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def close(self) -> None:
        self.http.close()
        if self.process.poll() is None:
            self.kill()


@contextmanager
def running(inst: Installation, *, exit_when_idle: bool) -> Iterator[Service]:
    service = Service(inst, exit_when_idle=exit_when_idle)
    try:
        yield service
    finally:
        service.close()


def verify(inst: Installation, docs: Sequence[Doc]) -> list[Violation]:
    """I1-I4 of both indexes of an installation against ``docs``; then drop them (see progress.SETTLE_S)."""
    settings = load_settings(inst.config)
    expected = expected_chunks(docs, settings.chunking.to_domain())
    with runtime(settings) as rt:
        violations = [
            *check_index("keyword", expected, set(), list(rt.keyword.scan())),
            *check_index("vector", expected, set(), list(rt.vector.scan())),
        ]
        rt.keyword.drop()
        rt.vector.drop()
    return violations
