"""Real Milvus servers for the tests: the Milvus 2.3.5 standalone server and a milvus-lite server.

Both are session-scoped and started on first use; a server that cannot start fails the tests that
need it (never a skip), with the tail of its log in the message. ``RealMilvus.kill9_and_restart``
crashes the 2.3.5 server and brings it back on the same ports and data, for the fault tests.

Two quirks of the ``milvus`` PyPI package are worked around here:

- its embedded etcd always listens for peers on port 2380, so a second server on the machine (a
  developer's, another test run's) fails with "bind: address already in use". The config template
  is extended with ``etcd.config.path`` pointing at an embed-etcd file with a free peer port.
- it probes ports by binding them without SO_REUSEADDR, so right after a ``kill -9`` the old ports
  (in TIME_WAIT) look taken and a restart on the same ports would fail; the probe here reuses them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import milvus
import pytest
from milvus import MilvusServer, MilvusServerConfig
from pymilvus import MilvusClient

# The 2.3.5 server takes ~10 s to start on these machines; two minutes means it is not coming.
REAL_START_TIMEOUT_S = 120.0
# milvus-lite starts in about a second; it is pure Python.
LITE_START_TIMEOUT_S = 30.0
# How long a readiness probe (one gRPC call) may take before the next attempt.
PROBE_TIMEOUT_S = 2.0
PROBE_INTERVAL_S = 0.2
# After SIGTERM, how long a server gets to exit before SIGKILL.
STOP_GRACE_S = 10.0
LOG_TAIL_LINES_MAX = 40
# Milvus 2.3.5 serves a collection again after a crash only once the dead process's etcd session
# has expired (default 30 s). A single local server loses nothing by noticing sooner, and the
# fault tests wait a third as long.
SESSION_TTL_S = 10


def free_port() -> int:
    """A TCP port nobody listens on right now (the usual small race with other processes applies)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path) -> str:
    if not path.exists():
        return f"(no log at {path})"
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join(lines[-LOG_TAIL_LINES_MAX:])


def wait_until_serving(
    uri: str, timeout_s: float, describe: str, process: subprocess.Popen[bytes] | None
) -> None:
    """Poll ``uri`` with a cheap gRPC call until it answers, or fail with ``describe``.

    Fails at once if ``process`` exits meanwhile: a server that died will not start serving.
    """
    deadline = time.monotonic() + timeout_s
    last_error = ""
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            pytest.fail(f"{describe} exited with status {process.returncode} before serving {uri}")
        try:
            client = MilvusClient(uri=uri, timeout=PROBE_TIMEOUT_S, dedicated=True)
            try:
                client.list_collections(timeout=PROBE_TIMEOUT_S)
                return
            finally:
                client.close()
        except Exception as exc:
            last_error = repr(exc)
        time.sleep(PROBE_INTERVAL_S)
    pytest.fail(f"{describe} did not serve {uri} within {timeout_s} s; last error: {last_error}")


class _ReusingConfig(MilvusServerConfig):  # type: ignore[misc]  # the milvus package has no type hints
    """The package's config, whose port probe tolerates sockets left in TIME_WAIT by a crash."""

    def try_bind_port(self, port: int) -> socket.socket | None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
            return sock
        except OSError:
            sock.close()
            return None


def _template_with_etcd_config(base_dir: Path) -> Path:
    """The package's config template plus ``etcd.config.path`` (see the module docstring)."""
    text = (Path(milvus.__file__).parent / "data" / "config.yaml.template").read_text(encoding="utf-8")
    anchor = "  use:\n    embed: true"
    assert anchor in text, "the milvus package's config template changed; update this fixture"
    text = text.replace(anchor, "  config:\n    path: {{ etcd_config_path }}\n" + anchor, 1)
    path = base_dir / "milvus.yaml.template"
    path.write_text(text, encoding="utf-8")
    return path


def _write_embed_etcd_config(path: Path, client_port: int, peer_port: int) -> None:
    path.write_text(
        f"listen-client-urls: http://localhost:{client_port}\n"
        f"advertise-client-urls: http://localhost:{client_port}\n"
        f"listen-peer-urls: http://localhost:{peer_port}\n"
        f"initial-advertise-peer-urls: http://localhost:{peer_port}\n"
        f"initial-cluster: default=http://localhost:{peer_port}\n",
        encoding="utf-8",
    )


@dataclass
class RealMilvus:
    """The Milvus 2.3.5 standalone server, in its own base directory, on ports of its own."""

    base_dir: Path
    server: MilvusServer = field(init=False)

    def __post_init__(self) -> None:
        config = _ReusingConfig(template=str(_template_with_etcd_config(self.base_dir)))
        # The package forgets this attribute when a template is given.
        config.glog_conf_file = str(Path(milvus.__file__).parent / "data" / "glog.conf")
        ports = {key: free_port() for key in config.config_key_maps.values() if key.endswith("_port")}
        config.update(**ports)
        etcd_file = self.base_dir / "embed-etcd.yaml"
        _write_embed_etcd_config(etcd_file, ports["etcd_port"], free_port())
        config.set("etcd_config_path", str(etcd_file))
        config.set("common.session.ttl", SESSION_TTL_S)
        self.server = MilvusServer(config)
        self.server.webservice_port = free_port()
        self.server.set_base_dir(str(self.base_dir))

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.server.listen_port}"

    @property
    def pid(self) -> int | None:
        proc = self.server.server_proc
        return None if proc is None else int(proc.pid)

    def start(self) -> None:
        try:
            self.server.start()
        except (TimeoutError, RuntimeError) as exc:
            self.server.stop()
            pytest.fail(f"Milvus 2.3.5 did not start: {exc}\n{log_tail(self._log)}")
        wait_until_serving(
            self.uri, REAL_START_TIMEOUT_S, f"Milvus 2.3.5 (log {self._log})", self.server.server_proc
        )

    def stop(self) -> None:
        self.server.stop()

    def kill9(self) -> None:
        """SIGKILL the server process: no flush, no goodbye, as in a power cut."""
        proc = self.server.server_proc
        assert proc is not None, "the server is not running"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_GRACE_S)
        self.server.stop()  # closes the log files; the process is already gone
        self._keep_logs_of(proc.pid)

    def kill9_and_restart(self) -> None:
        """Crash the server with SIGKILL and start it again on the same ports and data directory."""
        self.kill9()
        self.start()

    @property
    def _log(self) -> Path:
        return self.base_dir / "logs" / "milvus-stdout.log"

    def _keep_logs_of(self, pid: int) -> None:
        """Rename the crashed run's output logs: a restart opens them afresh (mode "w")."""
        for name in ("milvus-stdout.log", "milvus-stderr.log"):
            log = self.base_dir / "logs" / name
            if log.exists():
                log.rename(log.with_name(f"{name}.killed-{pid}"))


@dataclass
class LiteServer:
    """A ``milvus-lite server`` process serving one data directory on one port."""

    data_dir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def _log(self) -> Path:
        return self.data_dir.with_name(self.data_dir.name + ".log")

    def start(self) -> None:
        cli = Path(sys.executable).with_name("milvus-lite")
        with self._log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    str(cli),
                    "server",
                    "--data-dir",
                    str(self.data_dir),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_until_serving(
                self.uri, LITE_START_TIMEOUT_S, f"milvus-lite server (log {self._log})", self.process
            )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=STOP_GRACE_S)
        self.process = None


@pytest.fixture(scope="session")
def real_milvus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealMilvus]:
    """The Milvus 2.3.5 standalone server, started once per session (~10 s)."""
    server = RealMilvus(tmp_path_factory.mktemp("milvus-2.3.5"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def lite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiteServer]:
    """A milvus-lite gRPC server on a free port, started once per session."""
    server = LiteServer(tmp_path_factory.mktemp("milvus-lite") / "data")
    server.start()
    yield server
    server.stop()
