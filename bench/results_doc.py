"""Writing a benchmark's printed results into its section of docs/benchmarks.md."""

from __future__ import annotations

from pathlib import Path


def write_results(path: Path, command: str, markdown: str, *, section: str, begin: str, end: str) -> None:
    """Put ``markdown`` between the ``begin``/``end`` markers in ``path`` (re-read right now).

    Only the text between the markers changes; ``section`` (with the markers) is appended if it
    is missing, so every other section and the prose around the results stay as they are.
    """
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n\nPrinted output of `{command}`:\n\n{markdown}\n\n{end}"
    if begin in text and end in text:
        before, rest = text.split(begin, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n{section}\n\n{block}\n"
    path.write_text(text, encoding="utf-8")
