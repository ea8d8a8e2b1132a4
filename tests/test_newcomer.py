"""README command 1 on a fresh machine: a new venv, the base install, the demo.

Everything here runs with the base install (``pip install -e .``, no extras) in a fresh venv,
made once for the module from a copy of the working tree: the files git tracks or would add, as a
fresh clone has them (CI's ``.ci/run`` runs in a clean clone, where the two are the same). The
install takes about 40 s: pip uses the machine's configured index and cache.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# The fresh venv's install plus the demo; the install alone takes about 40 s here.
README_COMMAND_TIMEOUT_S = 900
# One command of the base install (a help text, an error line, a short sync).
COMMAND_TIMEOUT_S = 120
DEMO_PROOF = "both indexes equal the source"


@dataclass(frozen=True)
class Newcomer:
    """A copy of the repository after README command 1 ran in it."""

    root: Path
    result: subprocess.CompletedProcess[str]

    @property
    def lockstep(self) -> Path:
        return self.root / ".venv" / "bin" / "lockstep"

    @property
    def python(self) -> Path:
        return self.root / ".venv" / "bin" / "python"


def readme_command_1() -> str:
    """The first ```bash block of the README, exactly as a newcomer copies it."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```bash\n(.+?)\n```", text)[0]


def copy_of_the_working_tree(dest: Path) -> Path:
    """The files a fresh clone would hold (tracked or not ignored), as they are on disk."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True, timeout=COMMAND_TIMEOUT_S,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def clean_env() -> dict[str, str]:
    """This environment without what points Python at the test run's own venv or sources."""
    drop = {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}
    return {k: v for k, v in os.environ.items() if k not in drop}


@pytest.fixture(scope="module")
def newcomer(tmp_path_factory: pytest.TempPathFactory) -> Newcomer:
    """README command 1, run once for the module in a copy of the working tree."""
    root = copy_of_the_working_tree(tmp_path_factory.mktemp("newcomer"))
    result = subprocess.run(
        ["bash", "-c", readme_command_1()],
        cwd=root, capture_output=True, text=True, timeout=README_COMMAND_TIMEOUT_S,
        env=clean_env(), stdin=subprocess.DEVNULL, check=False,
    )
    return Newcomer(root, result)


def run(newcomer: Newcomer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(newcomer.lockstep), *args],
        cwd=newcomer.root, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
        env=clean_env(), stdin=subprocess.DEVNULL, check=False,
    )


def tail(result: subprocess.CompletedProcess[str]) -> str:
    """The end of a command's output for a failure message, without pip's index notices."""
    lines = (result.stdout + result.stderr).splitlines()
    return "\n".join(x for x in lines if not x.startswith("WARNING: Location "))[-4000:]


def norm(text: str) -> str:
    """Text with Rich's box lines and every run of whitespace made one space."""
    return " ".join(text.replace("│", " ").split())


def test_readme_command_1_installs_and_runs_the_demo(newcomer: Newcomer) -> None:
    """The README's first command, as written, exits 0 with the demo's proof and no traceback."""
    assert newcomer.result.returncode == 0, tail(newcomer.result)
    assert DEMO_PROOF in newcomer.result.stdout
    assert "Traceback" not in newcomer.result.stdout + newcomer.result.stderr
    # The base install has no local model, so `auto` chose the hashing embedder (no torch).
    assert "embedder hashing" in newcomer.result.stdout


def test_every_command_has_its_full_help_on_the_base_install(newcomer: Newcomer) -> None:
    """`lockstep --help` and every command's `--help` (Typer's whole tree) exit 0 and show every
    sentence of the docstring and of each option's help."""
    assert newcomer.lockstep.exists(), tail(newcomer.result)
    top = run(newcomer, "--help")
    assert top.returncode == 0, tail(top)
    walked = subprocess.run(
        [str(newcomer.python), "-m", "tests.support.cli_help"],
        cwd=newcomer.root, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
        env=clean_env(), stdin=subprocess.DEVNULL, check=False,
    )
    assert walked.returncode == 0, tail(walked)
    helps = json.loads(walked.stdout)
    names = {h["command"] for h in helps}
    assert {"demo", "sync", "status", "audit", "reconcile", "dlq list", "generations", "chaos run"} <= names
    for command in (h["command"] for h in helps if " " not in h["command"] and h["command"]):
        assert re.search(rf"\b{command}\b", top.stdout), f"`lockstep --help` does not list {command}"
    for h in helps:
        assert h["exit_code"] == 0, f"lockstep {h['command']} --help: {h['output'][-2000:]}"
        shown = norm(h["output"])
        cut = [text for text in h["expected"] if norm(text) not in shown]
        assert cut == [], f"lockstep {h['command']} --help does not show in full: {cut}"


def test_a_command_that_needs_an_extra_says_which_in_one_line(newcomer: Newcomer, tmp_path: Path) -> None:
    """On the base install, `run`, a Postgres source and server chaos exit 2 with one line naming
    the extra to install, never a traceback; in-process chaos schedules run."""
    assert newcomer.lockstep.exists(), tail(newcomer.result)
    stores = {
        "keyword": {"path": str(tmp_path / "tantivy")},
        "vector": {"uri": str(tmp_path / "milvus.db")},
        "ledger": {"path": str(tmp_path / "ledger.db")},
        "embedder": {"kind": "hashing"},
    }
    jsonl = tmp_path / "jsonl.yaml"
    jsonl_source = {"kind": "jsonl", "path": str(tmp_path / "e.jsonl")}
    jsonl.write_text(yaml.safe_dump({"source": jsonl_source, **stores}))
    pg = tmp_path / "pg.yaml"
    pg_source = {"kind": "postgres_logical", "dsn": "postgresql://lockstep@127.0.0.1:1/kb", "tables": ["kb"]}
    pg.write_text(yaml.safe_dump({"source": pg_source, **stores}))
    cases = [
        (["run", "-c", str(jsonl)], "run", "ray", "streaming"),
        (["sync", "-c", str(pg)], "sync", "psycopg", "streaming"),
        (["chaos", "run", "--servers", "managed"], "chaos run", "milvus", "servers"),
    ]
    for args, command, module, extra in cases:
        result = run(newcomer, *args)
        expected = (
            f"lockstep {command} needs the '{extra}' extra ({module} is not installed): "
            f"pip install 'lockstep[{extra}]'"
        )
        assert result.returncode == 2, f"{args}: {result.stderr[-3000:]}"
        assert result.stderr.splitlines() == [expected], f"{args}: {result.stderr[-3000:]}"
    inproc = run(newcomer, "chaos", "run", "--schedules", "1", "--workers", "1")
    assert inproc.returncode == 0 and "violations 0" in inproc.stdout, tail(inproc)
