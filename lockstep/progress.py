"""What a terminal shows while something takes more than a few seconds: a bar, a live count or a
spinner. Nothing is shown when the console is not a terminal (CI, a Kubernetes Job, a pipe)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

T = TypeVar("T")


@contextmanager
def record_progress(
    console: Console, label: str, total: int | None = None
) -> Iterator[Callable[[int], None]]:
    """A progress bar (or a spinner and a live count when the total is unknown); yields ``advance(n)``."""
    columns = [SpinnerColumn(), TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)


@contextmanager
def spinner(console: Console, label: str) -> Iterator[None]:
    """A spinner with ``label`` while the block runs (on a terminal)."""
    if not console.is_terminal:
        yield
        return
    with console.status(label):
        yield


@contextmanager
def opened(console: Console, label: str, resource: AbstractContextManager[T]) -> Iterator[T]:
    """Enter ``resource`` behind a spinner with ``label`` (opening stores, loading a model), then
    yield it without one: what runs inside shows its own progress."""
    with ExitStack() as stack:
        with spinner(console, label):
            entered = stack.enter_context(resource)
        yield entered
