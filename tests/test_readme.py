"""The README's promises stay true."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```bash\n(.+?)\n```", text)


def test_readme_opens_with_exactly_two_setup_commands() -> None:
    """The README starts with two one-line commands: the demo and the full test suite."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    first_blocks = re.findall(r"```bash\n(.+?)\n```", text.split("## ")[0], flags=re.S)
    assert len(first_blocks) == 2 and all("\n" not in b for b in first_blocks)
    assert first_blocks[0].endswith("lockstep demo")
    assert "pytest" in first_blocks[1]


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    """.ci/run executes exactly the README's test command, so CI tests what a newcomer runs."""
    test_command = _readme_commands()[1]
    ci_lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert test_command in ci_lines


def test_architecture_map_names_modules_that_exist() -> None:
    """Every module path in the README's architecture map exists in the repository."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Architecture map")[1].split("\n## ")[0]
    paths = re.findall(r"`((?:coordinator|adapters|lockstep|chaos|bench)/[\w/.]*)`", section)
    assert len(paths) > 10
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert missing == [], f"README names missing modules: {missing}"
