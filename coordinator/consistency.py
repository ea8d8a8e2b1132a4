"""Read-your-writes: consistency tokens, and what a search must wait for before it answers.

A *consistency token* names the changes a write made, as ``(doc_id, version)`` pairs: every
write path returns one (the webhook's 202, ``lockstep sync``'s summary, the library's write).
A search given a token answers only once every change it covers is

1. **committed**: the ledger's committed version of the document is at least the token's (a
   newer committed version counts: read-your-writes means "this write or a later one"); and
2. **visible** to the keyword index's searches: each chunk the ledger committed for a live
   document is seen by the keyword engine's *search* path (not its real-time GET) at its
   committed version or later. Nothing is refreshed to get there; the wait polls.

The vector leg of such a search reads at the store's strongest consistency (Milvus ``Strong``),
which sees every write acknowledged before it, so a committed change is visible there by
construction. A deleted document needs no visibility: the fence drops whatever an index still
holds of it.

The token is self-contained (no server-side state): ``lsc1.`` + base64url of the zlib-compressed
canonical JSON ``[[doc_id, version], ...]``, sorted, one pair per document (its highest
version). Merging two tokens keeps the higher version per document.
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from coordinator.errors import InvalidSearch
from coordinator.events import ChangeEvent, canonical_json
from coordinator.limits import VERSION_MAX
from coordinator.model import DocState
from coordinator.ports import SearchVisibility

TOKEN_PREFIX = "lsc1."
# Documents one token may cover: the largest webhook request (batch_events_max's ceiling) fits.
TOKEN_DOCS_MAX = 100_000
# A token's decoded JSON may not exceed this (100,000 documents of typical IDs fit well within):
# decompression stops there, so a crafted token cannot expand without bound.
TOKEN_JSON_BYTES_MAX = 16 * 1024 * 1024
# Its encoded length (what a client sends), bounded before anything is decoded.
TOKEN_CHARS_MAX = 8 * 1024 * 1024
# Chunk IDs per visibility probe of the keyword index.
VISIBILITY_IDS_MAX = 1000


@dataclass(frozen=True)
class ConsistencyToken:
    """The changes a write made: ``(doc_id, version)``, one per document, sorted by doc_id."""

    docs: tuple[tuple[str, int], ...]

    @classmethod
    def of(cls, changes: Iterable[tuple[str, int]]) -> ConsistencyToken:
        """A token covering ``changes``; a document named twice keeps its highest version."""
        highest: dict[str, int] = {}
        for doc_id, version in changes:
            highest[doc_id] = max(version, highest.get(doc_id, version))
        if len(highest) > TOKEN_DOCS_MAX:
            raise ValueError(f"a token covers at most {TOKEN_DOCS_MAX} documents, not {len(highest)}")
        return cls(tuple(sorted(highest.items())))

    def merge(self, other: ConsistencyToken) -> ConsistencyToken:
        return ConsistencyToken.of([*self.docs, *other.docs])

    def encode(self) -> str:
        raw = canonical_json([[doc_id, version] for doc_id, version in self.docs]).encode("utf-8")
        return TOKEN_PREFIX + base64.urlsafe_b64encode(zlib.compress(raw, 6)).decode("ascii").rstrip("=")

    @classmethod
    def decode(cls, text: str) -> ConsistencyToken:
        """The token spelled by ``text``; InvalidSearch (naming what is wrong) if it is not one."""
        if len(text) > TOKEN_CHARS_MAX:
            raise InvalidSearch(f"consistency token longer than {TOKEN_CHARS_MAX} characters")
        if not text.startswith(TOKEN_PREFIX):
            raise InvalidSearch(f"not a consistency token (they start with {TOKEN_PREFIX!r})")
        pairs = _pairs(_inflate(text.removeprefix(TOKEN_PREFIX)))
        return cls.of(pairs)


def _inflate(body: str) -> bytes:
    try:
        packed = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        inflater = zlib.decompressobj()
        raw = inflater.decompress(packed, TOKEN_JSON_BYTES_MAX)
    except (binascii.Error, ValueError, zlib.error) as exc:
        raise InvalidSearch(f"consistency token is damaged: {exc}") from exc
    if inflater.unconsumed_tail or not inflater.eof:
        raise InvalidSearch("consistency token is damaged or larger than allowed")
    return raw


def _pairs(raw: bytes) -> list[tuple[str, int]]:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidSearch("consistency token is damaged: not JSON inside") from exc
    if not isinstance(value, list) or len(value) > TOKEN_DOCS_MAX:
        raise InvalidSearch(f"consistency token is damaged: not a list of at most {TOKEN_DOCS_MAX} changes")
    pairs = []
    for item in value:
        if not _is_change(item):
            raise InvalidSearch("consistency token is damaged: an entry is not [doc_id, version]")
        pairs.append((str(item[0]), int(item[1])))
    return pairs


def _is_change(item: object) -> bool:
    return (
        isinstance(item, list)
        and len(item) == 2
        and isinstance(item[0], str)
        and isinstance(item[1], int)
        and not isinstance(item[1], bool)
        and 0 <= item[1] <= VERSION_MAX
    )


# --- what is still pending ---------------------------------------------------------------------


@dataclass(frozen=True)
class Pending:
    """A change of a token that a search still waits for, and why."""

    doc_id: str
    version: int
    why: str


NOT_COMMITTED = "not committed yet"
NOT_VISIBLE = "committed, not yet visible to keyword searches"


def not_committed(token: ConsistencyToken, committed: Mapping[str, DocState]) -> list[Pending]:
    """The token's changes the ledger has not committed (nor a later version of), given the
    ledger's committed state of the token's documents."""
    return [Pending(d, v, NOT_COMMITTED) for d, v in token.docs if not _committed(committed.get(d), v)]


def not_visible(
    token: ConsistencyToken, committed: Mapping[str, DocState], keyword: SearchVisibility
) -> list[Pending]:
    """The token's committed live documents that the keyword index's searches do not see yet."""
    live = [committed[d] for d, _ in token.docs if d in committed and not committed[d].deleted]
    return [Pending(s.doc_id, s.version, NOT_VISIBLE) for s in invisible(live, keyword)]


def _committed(state: DocState | None, version: int) -> bool:
    return state is not None and state.version >= version


def invisible(states: Sequence[DocState], keyword: SearchVisibility) -> list[DocState]:
    """The documents some committed chunk of which a keyword search does not see yet."""
    wanted = {c.chunk_id: (s.doc_id, c.version) for s in states for c in s.chunks}
    ids = list(wanted)
    seen: dict[str, int] = {}
    for start in range(0, len(ids), VISIBILITY_IDS_MAX):
        seen.update(keyword.visible(ids[start : start + VISIBILITY_IDS_MAX]))
    late = {doc for cid, (doc, version) in wanted.items() if seen.get(cid, -1) < version}
    return [s for s in states if s.doc_id in late]



class WrittenChanges:
    """The changes one write path made, for the token it returns: the ``(doc_id, version)`` of
    each event it applied, at most ``docs_max`` documents (the most recently written kept; a
    bigger write's token covers its last ``docs_max`` documents and says so with ``complete``)."""

    def __init__(self, docs_max: int = TOKEN_DOCS_MAX) -> None:
        self.docs_max = docs_max
        self._versions: OrderedDict[str, int] = OrderedDict()
        self.dropped = 0

    def add(self, records: Iterable[object]) -> None:
        """Note the change events among ``records`` (bad records carry no change)."""
        for record in records:
            if isinstance(record, ChangeEvent):
                self._note(record.doc_id, record.version)

    def _note(self, doc_id: str, version: int) -> None:
        self._versions[doc_id] = max(version, self._versions.get(doc_id, version))
        self._versions.move_to_end(doc_id)
        if len(self._versions) > self.docs_max:
            self._versions.popitem(last=False)
            self.dropped += 1

    @property
    def complete(self) -> bool:
        return self.dropped == 0

    @property
    def doc_ids(self) -> list[str]:
        return list(self._versions)

    def token(self, committed: Mapping[str, DocState]) -> ConsistencyToken:
        """A token of the changes the ledger committed (or superseded): an event that went to
        the dead-letter queue instead is left out, since no search could ever see it."""
        return ConsistencyToken.of(
            (d, v) for d, v in self._versions.items() if _committed(committed.get(d), v)
        )
