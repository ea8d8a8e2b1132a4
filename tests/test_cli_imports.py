"""What ``lockstep --help`` imports: the command line, never the store clients behind it.

Store clients, Ray, the embedding model and the settings machinery are imported by the commands
that use them (``lockstep/cli.py``), so that asking for help does not wait a second or two for
them. Each check runs a fresh interpreter (this process has imported them long ago) and lists
which of those packages it loaded; it counts modules, not seconds, so a loaded machine cannot
make it pass or fail. ``python -m bench.startup`` measures the time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Top-level packages that no help may import: store and broker clients, Ray, the local
# embedding model, and what they pull in (pandas, pyarrow and gRPC come with pymilvus).
HEAVY = frozenset(
    {
        "pymilvus",
        "milvus_lite",
        "ray",
        "tantivy",
        "psycopg",
        "sqlalchemy",
        "aiokafka",
        "torch",
        "sentence_transformers",
        "pandas",
        "pyarrow",
        "grpc",
        "numpy",
        "opensearchpy",
        "elasticsearch",
        "httpx",
        "pydantic_settings",
    }
)
# A fresh interpreter with the package under test first on its path; generous, for a loaded CI box.
PROBE_TIMEOUT_S = 120
# Runs after the probed code: the loaded top-level packages, as JSON on the last line.
LOADED = "\nimport json, sys\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
# Every command's --help, asked as the command line asks it (the walk is tests/support/cli_help.py's).
EVERY_HELP = """
from typer.main import get_command
from typer.testing import CliRunner
from lockstep.cli import app
from tests.support.cli_help import commands
runner = CliRunner()
for path, _ in commands(get_command(app)):
    result = runner.invoke(app, [*path, "--help"])
    assert result.exit_code == 0, (path, result.output)
"""


def _python(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S
    )
    assert done.returncode == 0, f"python {' '.join(args)[:200]} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done


def loaded_by(code: str) -> set[str]:
    """The top-level packages a fresh interpreter has loaded after running ``code``."""
    return set(json.loads(_python("-c", code + LOADED).stdout.splitlines()[-1]))


def loaded_by_help() -> set[str]:
    """The top-level packages ``python -m lockstep --help`` imports, read from ``-X importtime``."""
    done = _python("-X", "importtime", "-m", "lockstep", "--help")
    lines = [
        line.rpartition("|")[2].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:")
    ]
    return {name.split(".")[0] for name in lines}


def test_the_probe_sees_what_the_code_imports() -> None:
    """A package the probed code imports is listed, one it does not import is not."""
    loaded = loaded_by("import sqlite3")
    assert "sqlite3" in loaded
    assert "lockstep" not in loaded


def test_importing_the_command_line_loads_no_heavy_package() -> None:
    """``import lockstep.cli`` defines every command without importing a store client or Ray."""
    loaded = loaded_by("import lockstep.cli")
    assert "typer" in loaded, "the probe ran the import"
    assert sorted(loaded & HEAVY) == []


def test_lockstep_help_loads_no_heavy_package() -> None:
    """``lockstep --help`` (which also lists the chaos group) imports no store client or Ray."""
    loaded = loaded_by_help()
    assert {"typer", "lockstep", "chaos"} <= loaded, "the -X importtime report was read"
    assert sorted(loaded & HEAVY) == []


def test_every_command_help_loads_no_heavy_package() -> None:
    """No command's or group's ``--help`` imports a store client or Ray either."""
    loaded = loaded_by(EVERY_HELP)
    assert "chaos" in loaded, "the walk reached the chaos group"
    assert sorted(loaded & HEAVY) == []
