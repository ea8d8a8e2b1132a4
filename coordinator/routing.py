"""Stable routing of documents to shards: the same doc_id always lands on the same shard."""

from __future__ import annotations

import hashlib


def shard_of(doc_id: str, shards: int) -> int:
    """The shard that owns ``doc_id``: blake2b of its UTF-8 bytes, modulo ``shards``.

    Python's ``hash()`` is salted per process, so it would route a document differently after a
    restart or on another replica; this does not.
    """
    assert shards >= 1, "at least one shard"
    digest = hashlib.blake2b(doc_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards
