"""Every ``lockstep`` command's ``--help``, as JSON on stdout: ``python -m tests.support.cli_help``.

Walks Typer's command tree (no list of commands to keep up to date) and, for each command, runs
``--help`` in this process, recording the exit code, the rendered text and the texts it must
show in full: the docstring, paragraph by paragraph, and each visible parameter's help. Run by
tests/test_newcomer.py with the interpreter of a base install, so it imports nothing beyond
lockstep, Typer and the standard library.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from typer.main import get_command
from typer.testing import CliRunner

from lockstep.cli import app

# Wide enough that no line of any help text wraps (Rich reads COLUMNS): the check compares whole
# sentences, and a wrapped option's help interleaves with the wrapped cells beside it.
HELP_COLUMNS = 1000


def commands(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(path, command) for the root and every command and group below it, asked of each group
    as the command line asks it (a group may plug a command in on first use: ``lockstep chaos``)."""
    yield path, command
    if not hasattr(command, "list_commands"):
        return
    ctx = command.context_class(command, info_name=path[-1] if path else "lockstep")
    for name in sorted(command.list_commands(ctx)):
        yield from commands(command.get_command(ctx, name), (*path, name))


def expected_texts(command: Any) -> list[str]:
    """What ``--help`` must show: each docstring paragraph and each visible parameter's help."""
    paragraphs = [p for p in re.split(r"\n\s*\n", command.help or "") if p.strip()]
    helps = [p.help for p in command.params if getattr(p, "help", None) and not p.hidden]
    return [*paragraphs, *helps]


def main() -> None:
    runner = CliRunner()
    report = []
    for path, command in commands(get_command(app)):
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": str(HELP_COLUMNS)})
        report.append(
            {
                "command": " ".join(path),
                "exit_code": result.exit_code,
                "output": result.output,
                "expected": expected_texts(command),
            }
        )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
