"""The keyword store alone, fed as the freshness run fed it: how long each raw request takes."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from bench.streaming.freshness import percentile
from bench.streaming.progress import say, settle
from bench.streaming.raw_writes import (
    KEYWORD_RAW,
    ChunkRow,
    bulk_ok,
    fresh_stores,
    keyword_raw_requests,
    raw_keyword_client,
)


@dataclass(frozen=True)
class StoreLatency:
    """The raw client's requests to one store alone, paced as lockstep's writes were."""

    store: str
    rows_per_request: int
    requests_per_s: float
    seconds: list[float]  # each request's duration, in the order sent

    def percentile_s(self, q: float) -> float:
        return percentile(sorted(self.seconds), q)

    def slow(self, over_s: float) -> list[tuple[int, float]]:
        """(request number, seconds) of the requests that took longer than ``over_s``."""
        return [(i, t) for i, t in enumerate(self.seconds) if t > over_s]


def keyword_latency_raw(url: str, uri: str, rows: Sequence[ChunkRow], rows_per_request: int, requests: int,
                        requests_per_s: float) -> StoreLatency:  # fmt: skip
    """The keyword store alone, on a fresh index, fed the requests lockstep's freshness run sent
    (as many, as large, as often): how long each takes. A store that stalls its writes now and
    then (osmem-server merges small runs inside the write request that triggers it) delays
    every event behind the stall, whoever writes."""
    take = rows[: rows_per_request * requests]
    say(f"raw keyword latency: {requests} requests of {rows_per_request} rows at {requests_per_s:.1f}/s")
    with fresh_stores(url, uri, "lat") as (index, _):
        bodies = keyword_raw_requests(index, take, rows_per_request)
        client = raw_keyword_client(url)
        seconds: list[float] = []
        started = time.monotonic()
        for i, body in enumerate(bodies):
            time.sleep(max(0.0, started + i / requests_per_s - time.monotonic()))
            sent = time.monotonic()
            bulk_ok(client, body)
            seconds.append(time.monotonic() - sent)
        client.close()
    settle()
    return StoreLatency(KEYWORD_RAW, rows_per_request, requests_per_s, seconds)
