"""The container image, built from the repository's Dockerfile and run the way the Helm chart runs it.

No Docker engine: buildah builds the Dockerfile from a Debian bookworm rootfs (its ``BASE`` build
argument) and podman runs the image on runc (tests/support/container_image.py, docs/image.md).
The containers get what the chart's pods get: the chart's non-root UID/GID, a read-only root
filesystem without capabilities, emptyDirs at /tmp and /dev/shm, the config mounted read-only at
/etc/lockstep and the data volume at /var/lib/lockstep. The identity, sizes and grace period are
read from the chart's values.yaml; the paths and environment are those of its _helpers.tpl.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support.container_image import (
    APT_TIMEOUT_S,
    BUILD_TIMEOUT_S,
    IMPORT_TIMEOUT_S,
    MMDEBSTRAP_TIMEOUT_S,
    PODMAN,
    PODMAN_CALL_TIMEOUT_S,
    ULIMITS,
    BuildReport,
    base_tarball,
    build_image,
    check,
    ensure_tools,
    image_size_bytes,
    image_user,
    import_base,
    record_figure,
    remove_image,
)
from tests.support.service_process import PROBE_TIMEOUT_S, free_port

REPO = Path(__file__).resolve().parents[1]
CHART_VALUES = REPO / "helm" / "lockstep" / "values.yaml"
# `lockstep run` imports Ray, which comes with the `streaming` extra; `lockstep demo` and `run` on
# the embedded default need nothing more. Without `local-model` the `auto` embedder is the hashing
# one, which keeps torch (~1 GB) out of a build CI repeats.
EXTRAS = "streaming"
# Empty: PyPI alone, which is all these machines reach (the Dockerfile's default adds PyTorch's
# CPU index for `local-model`).
TORCH_INDEX_URL = ""
# The image with EXTRAS measured 0.98 GB; a bound well above it still catches a stray CUDA torch
# (+2 GB) or a build toolchain shipped by mistake.
IMAGE_BYTES_MAX = 1_500_000_000
# Where the chart mounts things (helm/lockstep/templates/_helpers.tpl) and the environment it sets.
CONFIG_DIR = "/etc/lockstep"
DATA_DIR = "/var/lib/lockstep"
CHART_ENV = {"HOME": "/tmp", "HF_HOME": "/tmp/huggingface"}
# The demo on its default corpus took 13-18 s in the image on a busy machine.
DEMO_TIMEOUT_S = 300
DEMO_PROOF = "both indexes equal the source (I1-I4 hold on every chunk)"
# `lockstep run` answered /healthz 6-10 s after `podman run` on a busy machine.
HEALTHZ_DEADLINE_S = 180.0
POLL_INTERVAL_S = 0.5
# A clean stop logs one of these: the first if SIGTERM came while Ray was still starting.
STOPPED_EVENTS = {"stopped before serving", "stopped"}
# Beyond the chart's grace period, for podman itself to tear the container down.
STOP_SLACK_S = 60
# Every phase's own timeout, plus the containers' runs: a hang fails, a slow machine does not.
MODULE_TIMEOUT_S = APT_TIMEOUT_S * 2 + MMDEBSTRAP_TIMEOUT_S + IMPORT_TIMEOUT_S + BUILD_TIMEOUT_S + 900

pytestmark = pytest.mark.timeout(MODULE_TIMEOUT_S)


@dataclass(frozen=True)
class Chart:
    """What the chart's values say about how a lockstep container runs."""

    uid: int
    gid: int
    fs_group: int
    tmp_size: str
    shm_size: str
    grace_s: int
    log_level: str
    run: dict[str, Any]


@dataclass(frozen=True)
class Built:
    """The image this module's tests run: its tag, how its build went, the chart it must suit."""

    tag: str
    report: BuildReport
    chart: Chart


def _podman_size(quantity: str) -> str:
    """A Kubernetes binary quantity (``2Gi``, ``512Mi``) as podman writes it (``2g``, ``512m``)."""
    for suffix, unit in (("Gi", "g"), ("Mi", "m"), ("Ki", "k")):
        if quantity.endswith(suffix):
            return f"{int(quantity[: -len(suffix)])}{unit}"
    raise ValueError(f"not a binary quantity: {quantity!r}")


def _chart() -> Chart:
    values = yaml.safe_load(CHART_VALUES.read_text())
    security = values["securityContext"]
    return Chart(
        uid=security["runAsUser"], gid=security["runAsGroup"], fs_group=security["fsGroup"],
        tmp_size=_podman_size(values["tmpSizeLimit"]), shm_size=_podman_size(values["ray"]["shmSizeLimit"]),
        grace_s=values["terminationGracePeriodSeconds"], log_level=values["logLevel"], run=values["config"]["run"],
    )


@contextlib.contextmanager
def _timed(config: pytest.Config, label: str) -> Iterator[None]:
    """Record how long the block took in the session's "container image" summary."""
    started = time.monotonic()
    yield
    record_figure(config, f"{label}: {time.monotonic() - started:.0f} s")


@pytest.fixture(scope="module")
def built(request: pytest.FixtureRequest) -> Iterator[Built]:
    """Tools installed if missing, the base rootfs (cached), the image built from the Dockerfile."""
    config, session = request.config, uuid.uuid4().hex[:12]
    base_tag, tag = f"localhost/lockstep-test-base:{session}", f"localhost/lockstep-test:{session}"
    with _timed(config, "buildah, podman, runc, mmdebstrap present or installed"):
        ensure_tools()
    with _timed(config, "base rootfs tarball"):
        tarball, cached = base_tarball()
    record_figure(config, f"  {'from the cache' if cached else 'made by mmdebstrap'}: {tarball}")
    try:
        with _timed(config, "podman import of the base"):
            import_base(tarball, base_tag)
        report = build_image(REPO, tag, {"BASE": base_tag, "EXTRAS": EXTRAS, "TORCH_INDEX_URL": TORCH_INDEX_URL})
        _record_build(config, report)
        yield Built(tag, report, _chart())
    finally:
        remove_image(tag)
        remove_image(base_tag)


def _record_build(config: pytest.Config, report: BuildReport) -> None:
    record_figure(config, f"buildah bud (EXTRAS={EXTRAS}): {report.wall_s:.0f} s")
    for label, seconds in report.steps:
        if seconds >= 1:
            record_figure(config, f"  {seconds:6.0f} s  {label}")


def _data_volume(tmp_path: Path, chart: Chart) -> Path:
    """A host directory for /var/lib/lockstep, owned as the chart's fsGroup makes a volume."""
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, chart.uid, chart.fs_group)
    return data


def _chart_like(chart: Chart, data: Path, config_dir: Path | None = None) -> list[str]:
    """``podman run`` options giving a container what the chart's pod spec gives lockstep's."""
    options = [
        *ULIMITS, "--pull=never",
        "--user", f"{chart.uid}:{chart.gid}", "--group-add", str(chart.fs_group),
        "--read-only", "--read-only-tmpfs=false", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        "--tmpfs", f"/tmp:rw,size={chart.tmp_size},mode=1777", "--shm-size", chart.shm_size,
        "--volume", f"{data}:{DATA_DIR}",
    ]
    if config_dir is not None:
        options += ["--volume", f"{config_dir}:{CONFIG_DIR}:ro"]
    for name, value in CHART_ENV.items():
        options += ["--env", f"{name}={value}"]
    return options


def test_image_user_is_the_charts_non_root_uid(built: Built) -> None:
    """The image's default user is the UID:GID the chart's pods run as, and it is not root."""
    assert built.chart.uid != 0
    assert image_user(built.tag) == f"{built.chart.uid}:{built.chart.gid}"


def test_demo_passes_as_the_chart_runs_it(built: Built, tmp_path: Path, pytestconfig: pytest.Config) -> None:
    """`lockstep demo` as the chart's non-root user on a read-only root, offline, proves both
    indexes equal the source, with its stores written to the data volume as that user."""
    data = _data_volume(tmp_path, built.chart)
    argv = [
        *PODMAN, "run", "--rm", "--network", "none", *_chart_like(built.chart, data),
        built.tag, "demo", "--data-dir", f"{DATA_DIR}/demo",
    ]
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=DEMO_TIMEOUT_S, stdin=subprocess.DEVNULL, check=False)
    record_figure(pytestconfig, f"lockstep demo in the image: {time.monotonic() - started:.0f} s")
    assert done.returncode == 0, done.stdout + done.stderr
    assert DEMO_PROOF in done.stdout, done.stdout
    assert "embedder hashing" in done.stdout, done.stdout
    stores = {p.name: p.stat().st_uid for p in (data / "demo").iterdir()}
    assert {"ledger.db", "milvus.db", "tantivy"} <= stores.keys(), stores
    assert set(stores.values()) == {built.chart.uid}, stores


def _run_config(directory: Path, chart: Chart) -> Path:
    """The embedded default under the data volume, with the chart's `run` section (0.0.0.0:9464)."""
    directory.mkdir()
    config = {
        "source": {"kind": "jsonl", "name": "events", "path": f"{DATA_DIR}/events.jsonl"},
        "keyword": {"kind": "tantivy", "path": f"{DATA_DIR}/tantivy"},
        "vector": {"uri": f"{DATA_DIR}/milvus.db"},
        "ledger": {"kind": "sqlite", "path": f"{DATA_DIR}/ledger.db"},
        "run": chart.run,
    }
    (directory / "lockstep.yaml").write_text(yaml.safe_dump(config))
    return directory


def _one_event(data: Path, chart: Chart) -> None:
    events = data / "events.jsonl"
    event = {"op": "upsert", "doc_id": "faq/refunds", "version": 1, "text": "Refunds take 5 days.", "metadata": {}}
    events.write_text(json.dumps(event) + "\n")
    os.chown(events, chart.uid, chart.fs_group)


def _start_service(built: Built, tmp_path: Path, name: str, port: int) -> None:
    data = _data_volume(tmp_path, built.chart)
    _one_event(data, built.chart)
    config_dir = _run_config(tmp_path / "config", built.chart)
    argv = [
        *PODMAN, "run", "--detach", "--name", name, *_chart_like(built.chart, data, config_dir),
        "--env", f"LOCKSTEP_RUN__REPLICA={name}", "--publish", f"127.0.0.1:{port}:{built.chart.run['http_port']}",
        built.tag, "--log-level", built.chart.log_level, "run", "-c", f"{CONFIG_DIR}/lockstep.yaml",
    ]
    check(argv, PODMAN_CALL_TIMEOUT_S, "podman run --detach")


def _state(name: str) -> dict[str, Any]:
    out = check([*PODMAN, "inspect", "--format", "{{json .State}}", name], PODMAN_CALL_TIMEOUT_S, "podman inspect")
    state: dict[str, Any] = json.loads(out)
    return state


def _logs(name: str) -> str:
    done = subprocess.run(
        [*PODMAN, "logs", name], capture_output=True, text=True, timeout=PODMAN_CALL_TIMEOUT_S,
        stdin=subprocess.DEVNULL, check=False,
    )
    return done.stdout + done.stderr


def _events(logs: str) -> list[str]:
    """The ``event`` of each of lockstep's JSON log lines (Ray's own lines are not JSON)."""
    events = []
    for line in logs.splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and "event" in record:
                events.append(str(record["event"]))
    return events


def _healthz(name: str, port: int) -> httpx.Response:
    """Poll /healthz until it answers, failing at once if the container stops first."""
    deadline = time.monotonic() + HEALTHZ_DEADLINE_S
    while time.monotonic() < deadline:
        if not _state(name)["Running"]:
            pytest.fail(f"the container stopped before answering /healthz:\n{_logs(name)}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=PROBE_TIMEOUT_S)
        except httpx.TransportError:
            time.sleep(POLL_INTERVAL_S)
    pytest.fail(f"no answer on /healthz within {HEALTHZ_DEADLINE_S:.0f} s:\n{_logs(name)}")


def test_run_answers_healthz_and_stops_cleanly(built: Built, tmp_path: Path, pytestconfig: pytest.Config) -> None:
    """`lockstep run` on the embedded default, as the chart runs it, answers /healthz through the
    published port, and a stop (SIGTERM, the chart's grace period) ends it with exit code 0."""
    name, port = f"lockstep-image-test-{uuid.uuid4().hex[:8]}", free_port()
    try:
        started = time.monotonic()
        _start_service(built, tmp_path, name, port)
        response = _healthz(name, port)
        record_figure(pytestconfig, f"lockstep run answered /healthz after {time.monotonic() - started:.0f} s")
        assert response.status_code == 200, response.text
        assert response.json() == {"alive": True}
        check([*PODMAN, "stop", "--time", str(built.chart.grace_s), name],
              built.chart.grace_s + STOP_SLACK_S, "podman stop")
        logs = _logs(name)
        assert _state(name)["ExitCode"] == 0, logs
        assert STOPPED_EVENTS & set(_events(logs)), logs
    finally:
        subprocess.run([*PODMAN, "rm", "--force", name], capture_output=True, timeout=PODMAN_CALL_TIMEOUT_S,
                       stdin=subprocess.DEVNULL, check=False)


def test_image_size_is_bounded(
    built: Built, record_testsuite_property: Callable[[str, object], None], pytestconfig: pytest.Config
) -> None:
    """The image with the extras `demo` and `run` need stays below a generous size bound."""
    size = image_size_bytes(built.tag)
    record_testsuite_property("image_bytes", size)
    record_testsuite_property("image_build_s", round(built.report.wall_s))
    record_figure(pytestconfig, f"image size (EXTRAS={EXTRAS}): {size / 1e9:.2f} GB ({size} bytes)")
    assert size < IMAGE_BYTES_MAX, f"{size} bytes"
