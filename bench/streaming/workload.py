"""The workload: new documents of exactly ``CHUNKS_PER_DOC`` chunks, one upsert event each, as JSONL."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path

from lockstep.corpus import Doc, make_doc

# Title + two body paragraphs of at most PARA_CHARS: the title joins the first paragraph and two
# paragraphs never share a 1000-character chunk, so every document is exactly two chunks.
CHUNKS_PER_DOC = 2
PARA_CHARS = 800
# The hashing embedder's vector size, in the service and in the raw rows alike.
DIM = 384


def make_docs(n: int, seed: int) -> list[Doc]:
    """``n`` new documents of exactly CHUNKS_PER_DOC chunks each, deterministic in ``seed``."""
    rng = random.Random(seed)
    return [make_doc(rng, i, paragraphs=CHUNKS_PER_DOC, para_chars=PARA_CHARS) for i in range(n)]


def event_line(doc: Doc) -> str:
    """The JSONL line of the upsert event creating ``doc``."""
    event = {"op": "upsert", "doc_id": doc.doc_id, "version": doc.version, "text": doc.text,
             "metadata": doc.metadata}  # fmt: skip
    return json.dumps(event) + "\n"


def write_events(path: Path, docs: Iterable[Doc]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        out.writelines(event_line(d) for d in docs)
