"""Prometheus metrics of ``lockstep run``, in one registry per service instance."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from coordinator.shard import ShardStatus

# Freshness lag buckets, seconds: sub-second for a healthy service, minutes during an outage.
LAG_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)
# Search latency buckets, seconds: milliseconds when healthy, a leg's timeout when one is down.
SEARCH_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# ApplyStats counters exported as lockstep_events_total{outcome=...}.
_EVENT_OUTCOMES = {
    "events": "received",
    "applied_events": "applied",
    "stale_events": "stale",
    "coalesced_events": "coalesced",
    "dead_letters": "dead_lettered",
}
_CHUNK_OUTCOMES = {
    "upserted_chunks": "upserted",
    "rewritten_chunks": "metadata_only",
    "deleted_chunks": "deleted",
    "skipped_chunks": "skipped",
}


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.events = Counter("lockstep_events", "Change events by outcome.", ["outcome"], registry=r)
        self.chunks = Counter("lockstep_chunks", "Chunk operations by kind.", ["kind"], registry=r)
        self.embed_calls = Counter("lockstep_embed_calls", "Texts sent to the embedding model.", registry=r)
        self.cache_hits = Counter("lockstep_embed_cache_hits", "Vectors served by the cache.", registry=r)
        self.side_retries = Counter(
            "lockstep_index_retries", "Failed apply attempts per index.", ["index"], registry=r
        )
        self.apply_seconds = Counter(
            "lockstep_index_apply_seconds", "Time spent writing batches per index.", ["index"], registry=r
        )
        self.apply_writes = Counter("lockstep_index_apply_writes", "Batches written per index.", ["index"], registry=r)
        self.lag = Histogram(
            "lockstep_freshness_lag_seconds",
            "From event read to committed in both indexes.",
            buckets=LAG_BUCKETS_S,
            registry=r,
        )
        self.waiting = Gauge(
            "lockstep_shard_waiting_docs", "Documents waiting per shard.", ["shard"], registry=r
        )
        self.ahead = Gauge(
            "lockstep_shard_ahead_docs", "Documents in batches a shard prepared ahead, not yet written.", ["shard"],
            registry=r,
        )
        self.in_flight = Gauge(
            "lockstep_prepared_intents", "Prepared, uncommitted intents per shard.", ["shard"], registry=r
        )
        self.oldest_s = Gauge(
            "lockstep_oldest_unfinished_event_seconds", "Age of the oldest unfinished event.", registry=r
        )
        self.outstanding = Gauge(
            "lockstep_unfinished_events", "Events read but not yet finished.", registry=r
        )
        self.dlq = Gauge("lockstep_dead_letters", "Dead letters in the ledger.", registry=r)
        self.degraded = Gauge("lockstep_degraded", "1 while some index is failing.", registry=r)
        self.drift = Gauge(
            "lockstep_drift_chunks", "Chunks found drifted by the last continuous audit round.",
            ["category", "index"], registry=r,
        )
        self.shards_lost = Counter(
            "lockstep_shards_lost", "Shard actors lost with their process or Ray node.", registry=r
        )
        self.shards_recreated = Counter(
            "lockstep_shards_recreated", "Lost shard actors re-created and ready again.", registry=r
        )
        self.audits = Counter("lockstep_audit_rounds", "Continuous audit rounds completed.", registry=r)
        self.audit_docs = Gauge("lockstep_audit_documents", "Documents checked by the last audit round.", registry=r)
        self._seen: dict[tuple[int, str], int] = {}
        self._seen_f: dict[tuple[int, str], float] = {}

    def absorb_status(self, status: ShardStatus) -> None:
        """Turn a shard's cumulative figures into counter increments and gauges."""
        self.absorb(status.shard, status.stats, status.retries)
        for side, seconds in status.apply_seconds.items():
            self.apply_seconds.labels(side).inc(self._delta_f(status.shard, f"secs:{side}", seconds))
        for side, n in status.apply_writes.items():
            self.apply_writes.labels(side).inc(self._delta(status.shard, f"writes:{side}", n))
        self.waiting.labels(str(status.shard)).set(status.waiting_docs)
        self.in_flight.labels(str(status.shard)).set(status.in_flight_docs)
        self.ahead.labels(str(status.shard)).set(status.ahead_docs)

    def absorb(self, shard: int, stats: dict[str, int], retries: dict[str, int] | None = None) -> None:
        """Turn a shard's cumulative counters into counter increments."""
        for key, outcome in _EVENT_OUTCOMES.items():
            self.events.labels(outcome).inc(self._delta(shard, key, stats[key]))
        for key, kind in _CHUNK_OUTCOMES.items():
            self.chunks.labels(kind).inc(self._delta(shard, key, stats[key]))
        self.embed_calls.inc(self._delta(shard, "embed_calls", stats["embed_calls"]))
        self.cache_hits.inc(self._delta(shard, "cache_hits", stats["cache_hits"]))
        for side, n in (retries or {}).items():
            self.side_retries.labels(side).inc(self._delta(shard, f"retry:{side}", n))

    def forget_shard(self, shard: int) -> None:
        """The shard's actor was replaced: its successor's cumulative figures start from zero."""
        for seen in (self._seen, self._seen_f):
            for key in [k for k in seen if k[0] == shard]:
                del seen[key]

    def _delta_f(self, shard: int, key: str, value: float) -> float:
        before = self._seen_f.get((shard, key), 0.0)
        self._seen_f[(shard, key)] = value
        return max(0.0, value - before)

    def _delta(self, shard: int, key: str, value: int) -> int:
        before = self._seen.get((shard, key), 0)
        self._seen[(shard, key)] = value
        return max(0, value - before)


@dataclass
class SearchMetrics:
    """Prometheus metrics of the read path (``POST /search`` of ``lockstep run`` and ``serve``)."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "lockstep_search_requests", "Searches by mode and HTTP status.", ["mode", "status"], registry=r
        )
        self.fenced = Counter(
            "lockstep_search_fenced_hits", "Hits not served because the ledger did not commit them, by reason.",
            ["reason"], registry=r,
        )
        self.served = Counter("lockstep_search_served_hits", "Hits served (after the fence).", registry=r)
        self.degraded = Counter(
            "lockstep_search_degraded", "Hybrid searches answered by one leg, by the leg that failed.", ["leg"],
            registry=r,
        )
        self.seconds = Histogram(
            "lockstep_search_seconds", "Search latency, consistency wait included.", ["mode"],
            buckets=SEARCH_BUCKETS_S, registry=r,
        )
        self.waited = Histogram(
            "lockstep_search_consistency_wait_seconds", "Time searches with a token waited for its changes.",
            buckets=SEARCH_BUCKETS_S, registry=r,
        )
