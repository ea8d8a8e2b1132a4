"""The raw-client ceiling: each store alone, both at once, and the slower store alone again.

The same server's raw rate moves by a quarter from one measurement to the next, so the slower
store alone is measured again right before each lockstep run (``measure_slower_again``); the
ceiling is the median of those measurements, in events/s.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from bench.streaming.progress import say, settle
from bench.streaming.raw_writes import (
    ChunkRow,
    StoreRate,
    fresh_stores,
    keyword_raw_requests,
    vector_raw_requests,
    write_keyword_raw,
    write_vector_raw,
)
from bench.streaming.workload import CHUNKS_PER_DOC


@dataclass(frozen=True)
class Ceiling:
    """The raw clients' rates: each store alone, both at once, and the slower store alone again
    (``again``, one measurement before each lockstep run)."""

    keyword: StoreRate
    vector: StoreRate
    both_keyword: StoreRate
    both_vector: StoreRate
    rows_per_request: int
    again: tuple[StoreRate, ...] = ()

    @property
    def slower(self) -> StoreRate:
        return min(self.keyword, self.vector, key=lambda r: r.rows_per_s)

    @property
    def slower_is_keyword(self) -> bool:
        return self.slower is self.keyword

    @property
    def slower_rates(self) -> list[float]:
        """Rows/s of every measurement of the slower store alone."""
        return [self.slower.rows_per_s, *(r.rows_per_s for r in self.again)]

    @property
    def events_per_s(self) -> float:
        return statistics.median(self.slower_rates) / CHUNKS_PER_DOC

    @property
    def both_events_per_s(self) -> float:
        return min(self.both_keyword.rows_per_s, self.both_vector.rows_per_s) / CHUNKS_PER_DOC


def measure_ceiling(url: str, uri: str, rows: Sequence[ChunkRow], rows_per_request: int) -> Ceiling:
    """Each store alone, then both at once, on fresh indexes, in lockstep's request sizes."""
    vector_requests = vector_raw_requests(rows, rows_per_request)

    def keyword_requests(index: str) -> list[list[str]]:
        return keyword_raw_requests(index, rows, rows_per_request)

    say(f"raw ceiling: {len(rows)} rows, keyword alone")
    with fresh_stores(url, uri, "kw") as (index, _):
        keyword = write_keyword_raw(url, index, keyword_requests(index))
    settle()
    say("raw ceiling: vector alone")
    with fresh_stores(url, uri, "vec") as (_, collection):
        vector = write_vector_raw(uri, collection, vector_requests)
    settle()
    say("raw ceiling: both stores at once")
    with fresh_stores(url, uri, "both") as (index, collection), ThreadPoolExecutor(2) as pool:
        kw_future = pool.submit(write_keyword_raw, url, index, keyword_requests(index))
        vec_future = pool.submit(write_vector_raw, uri, collection, vector_requests)
        both = kw_future.result(), vec_future.result()
    settle()
    return Ceiling(keyword, vector, both[0], both[1], rows_per_request)


def measure_slower_again(url: str, uri: str, rows: Sequence[ChunkRow], ceiling: Ceiling) -> StoreRate:
    """The slower store alone once more, on a fresh index or collection, as in ``measure_ceiling``."""
    size = ceiling.rows_per_request
    say(f"raw ceiling again: {ceiling.slower.store} alone")
    with fresh_stores(url, uri, "again") as (index, collection):
        if ceiling.slower_is_keyword:
            rate = write_keyword_raw(url, index, keyword_raw_requests(index, rows, size))
        else:
            rate = write_vector_raw(uri, collection, vector_raw_requests(rows, size))
    settle()
    return rate
