"""A deterministic feature-hashing embedder: no model, no download, numpy only.

Each text is lower-cased and cut into word tokens (``\\w+``). Its features are the words and
the character n-grams of each word padded with one space on each side (fastText style, so
" co" and "ode " mark word boundaries). Every feature is hashed with a 64-bit polynomial hash
finished by the MurmurHash3 mixer — stable across processes and machines, unlike Python's
salted ``hash()`` — and adds ``±weight`` to one of ``dim`` buckets, the sign taken from the
hash's top bit so that collisions cancel on average. Rows are L2-normalized.

Texts sharing words and word fragments get a high cosine similarity; unrelated texts score
near zero. It is a stand-in for a real model in tests and benchmarks, not a semantic model.

All hashing is vectorized: a batch is encoded into one byte stream, prefix hashes give the
hash of any span in O(1), and one ``np.bincount`` builds the whole (n, dim) matrix.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import numpy as np
import numpy.typing as npt

U64 = npt.NDArray[np.uint64]

# Version of the feature scheme; bump it whenever a change would alter any vector, because the
# model id names the vector space and is part of the embedding-cache key.
SCHEME_VERSION = 1
# Character n-gram lengths (in UTF-8 bytes, word padding included): 3..5 is fastText's default
# range, long enough to carry morphology, short enough to match across inflections.
NGRAM_SIZES = (3, 4, 5)
# Whole words count more than any one fragment: a shared word is stronger evidence of similarity.
WORD_WEIGHT = 1.0
NGRAM_WEIGHT = 0.5
# One sub-batch's byte stream is at most this large: working memory is about 60 bytes per byte
# of text, so 2 MiB keeps it near 120 MiB however many texts one call passes.
SUB_BATCH_BYTES_MAX = 2 * 1024 * 1024
# Bytes of one normalized text beyond this are ignored, as a model truncates at its sequence
# length; it bounds the memory one pathological text can take. Chunks are far below it.
TEXT_BYTES_MAX = 1024 * 1024

_WORD = re.compile(r"\w+")
_SPACE = 0x20
# 64-bit FNV prime: odd, hence invertible modulo 2**64, which the prefix-hash trick relies on.
_BASE = 0x100000001B3
_BASE_INV = pow(_BASE, -1, 1 << 64)
# Distinct salts keep the word "the" and the 3-gram "the" (inside "other") in different buckets.
_WORD_SALT = 0x9E3779B97F4A7C15
_NGRAM_SALT = 0xC2B2AE3D27D4EB4F


class HashingEmbedder:
    """Feature-hashing embedder: the same text gives the same unit vector in any process."""

    def __init__(self, dim: int = 384, seed: int = 0) -> None:
        if dim < 2:
            raise ValueError("dim must be at least 2")
        if not 0 <= seed < 1 << 64:
            raise ValueError("seed must fit in 64 bits")
        self.dim = dim
        self.seed = seed
        suffix = "" if seed == 0 else f"-s{seed}"
        self.model_id = f"hashing-v{SCHEME_VERSION}-d{dim}{suffix}"
        self._seed_mix = np.uint64(_fmix64_int(seed ^ 0x5851F42D4C957F2D))

    def __repr__(self) -> str:
        return f"HashingEmbedder(dim={self.dim}, seed={self.seed})"

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One L2-normalized vector of length ``dim`` per text, in order."""
        vectors: list[list[float]] = self.embed_array(texts).tolist()
        return vectors

    def embed_array(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """The same vectors as ``embed``, as an (n, dim) float32 array."""
        encoded = [_normalize(text) for text in texts]
        out = np.empty((len(encoded), self.dim), dtype=np.float32)
        for start, stop in _sub_batches(encoded):
            out[start:stop] = self._embed_stream(encoded[start:stop])
        return out

    def _embed_stream(self, encoded: Sequence[bytes]) -> npt.NDArray[np.float32]:
        stream = _Stream(encoded, self.dim)
        counts = self._bucket_counts(stream, *stream.words()) * WORD_WEIGHT
        for n in NGRAM_SIZES:
            counts += self._bucket_counts(stream, *stream.ngrams(n)) * NGRAM_WEIGHT
        matrix = counts[:, : self.dim] - counts[:, self.dim :]
        _fill_empty_rows(matrix, self.dim, int(self._seed_mix))
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        unit: npt.NDArray[np.float32] = (matrix / norms).astype(np.float32)
        return unit

    def _bucket_counts(self, stream: _Stream, hashes: U64, offsets: U64) -> npt.NDArray[np.float64]:
        """Per text, how many features fell in each of 2*dim signed buckets.

        The top 32 bits of the mixed hash pick one of 2*dim slots by multiply-shift (Lemire's
        fast range, no division): slot s < dim adds +1 to bucket s, slot s >= dim adds -1 to
        bucket s - dim.
        """
        mixed = _fmix64(hashes ^ self._seed_mix)
        slots = ((mixed >> _S32) * np.uint64(2 * self.dim)) >> _S32
        index = (slots + offsets).view(np.int64)
        flat = np.bincount(index, minlength=stream.count * 2 * self.dim)
        return flat.reshape(stream.count, 2 * self.dim).astype(np.float64)


class _Stream:
    """One sub-batch's normalized texts as a single byte stream, with O(1) span hashes.

    Every text starts and ends with a space, so adjacent texts are separated by two spaces.

    Span hashes: with Q the inverse of the base modulo 2**64 and
    ``G[i] = sum(b[j] * Q**(j+1) for j < i)``, the hash of span [s, e) is
    ``(G[e] - G[s]) * BASE**e = sum(b[j] * BASE**(e-1-j))``, the usual polynomial hash,
    independent of where the span sits in the stream. uint64 arithmetic wraps modulo 2**64 by
    design here.
    """

    def __init__(self, encoded: Sequence[bytes], dim: int) -> None:
        self.count = len(encoded)
        raw = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.size = raw.shape[0]
        lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=self.count)
        # Each byte's text index, pre-multiplied into that text's row of the flat count array.
        self._row_offset = np.repeat(np.arange(self.count, dtype=np.uint64) * np.uint64(2 * dim), lengths)
        # Byte values shifted by one so that a NUL byte still changes the hash.
        values = raw.astype(np.uint64) + np.uint64(1)
        self._base_pow = _powers(_BASE, self.size + 1)
        self._prefix = np.zeros(self.size + 1, dtype=np.uint64)
        np.cumsum(values * _powers(_BASE_INV, self.size + 1)[1:], out=self._prefix[1:])
        self._space_at = np.flatnonzero(raw == _SPACE)
        self._run = _run_lengths(self._space_at, self.size)
        word_starts = self._space_at[:-1] + 1
        word_stops = self._space_at[1:]
        nonempty = word_stops > word_starts
        self._word_starts, self._word_stops = word_starts[nonempty], word_stops[nonempty]

    def words(self) -> tuple[U64, U64]:
        """(hash, row offset) of every word: the runs between two spaces."""
        starts, stops = self._word_starts, self._word_stops
        spans = (self._prefix[stops] - self._prefix[starts]) * self._base_pow[stops]
        return spans ^ np.uint64(_WORD_SALT), self._row_offset[starts]

    def ngrams(self, n: int) -> tuple[U64, U64]:
        """(hash, row offset) of every n-gram inside one padded word.

        Inside a word means no space except possibly the first and last byte; no such n-gram
        (n >= 3) crosses two texts, whose boundary is two adjacent spaces. Hashing every
        position and then selecting is faster than gathering only the selected spans.
        """
        starts = max(0, self.size - n + 1)
        inside = self._run[:starts] >= n - 1
        whole = (self._prefix[n:] - self._prefix[:-n]) * self._base_pow[n:]
        return whole[inside] ^ np.uint64(_NGRAM_SALT ^ n), self._row_offset[:starts][inside]


def _run_lengths(space_at: npt.NDArray[np.intp], size: int) -> npt.NDArray[np.int64]:
    """For each byte i, the distance to the first space strictly after it (to ``size`` if none)."""
    next_space = np.append(space_at[1:], size)
    gaps = np.diff(np.append(space_at, size))
    run: npt.NDArray[np.int64] = np.repeat(next_space, gaps) - np.arange(space_at[0], size)
    return run


def _normalize(text: str) -> bytes:
    """Lower-cased words joined by single spaces, padded with one space each side, as UTF-8."""
    body = " ".join(_WORD.findall(text.lower())).encode("utf-8")
    if len(body) > TEXT_BYTES_MAX:
        body = body[:TEXT_BYTES_MAX]
    return b" " + body + b" "


def _sub_batches(encoded: Sequence[bytes]) -> Iterator[tuple[int, int]]:
    """[start, stop) ranges of texts whose bytes add up to at most SUB_BATCH_BYTES_MAX each."""
    start, size = 0, 0
    for i, text in enumerate(encoded):
        if i > start and size + len(text) > SUB_BATCH_BYTES_MAX:
            yield start, i
            start, size = i, 0
        size += len(text)
    if start < len(encoded):
        yield start, len(encoded)


def _fill_empty_rows(matrix: npt.NDArray[np.float64], dim: int, seed_mix: int) -> None:
    """A text without words (empty, punctuation only) gets one fixed unit vector, not zeros,
    so that it stays a valid cosine-metric vector."""
    empty = ~matrix.any(axis=1)
    if empty.any():
        matrix[empty, seed_mix % dim] = 1.0


def _powers(base: int, count: int) -> U64:
    """base**0 .. base**(count-1) modulo 2**64."""
    out = np.full(count, base, dtype=np.uint64)
    out[0] = 1
    return np.cumprod(out, out=out)


_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB93FE1A85B53)
_S33 = np.uint64(33)
_S32 = np.uint64(32)


def _fmix64(h: U64) -> U64:
    """MurmurHash3's 64-bit finalizer: spreads every input bit over every output bit."""
    h = h ^ (h >> _S33)
    h = h * _M1
    h = h ^ (h >> _S33)
    h = h * _M2
    return h ^ (h >> _S33)


def _fmix64_int(value: int) -> int:
    """``_fmix64`` on one Python int (used once per embedder, for the seed)."""
    return int(_fmix64(np.array([value], dtype=np.uint64))[0])
