"""The fault catalogue: every fault kind the chaos suite injects, its family and its tier.

``inproc`` kinds run in every schedule's fast path (embedded stores, in-process wrappers and
stream transforms); ``server`` kinds need real server processes and network proxies
(``chaos/servertier.py``): network kinds run against a config's servers or managed ones, process
kinds only against servers the suite starts itself. Each kind's name is also the key its
injector reports under (``injected[kind] > 0`` means it really happened).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FaultKind:
    name: str
    family: str
    tier: str
    what: str


CATALOGUE: tuple[FaultKind, ...] = (
    # --- event stream ---
    FaultKind("reorder", "stream", "inproc", "events shuffled within a window of 6"),
    FaultKind("duplicate", "stream", "inproc", "an event delivered 1-3 extra times"),
    FaultKind("delay", "stream", "inproc", "an event held back behind up to 12 later ones"),
    FaultKind("drop_redeliver", "stream", "inproc", "events lost on the first pass, redelivered at the end"),
    FaultKind("replay_checkpoint", "stream", "inproc", "a suffix replayed from an older checkpoint"),
    FaultKind("delete_before_create", "stream", "inproc", "a delete overtakes the document's create"),
    FaultKind("late_upsert_after_delete", "stream", "inproc", "an older upsert arrives after the delete"),
    FaultKind("pk_change", "stream", "inproc", "primary-key change as delete(old) + create(new)"),
    FaultKind("truncate", "stream", "inproc", "every live document of a table deleted"),
    FaultKind(
        "late_upsert_after_tombstone_gc",
        "stream",
        "server",
        "an older upsert after the delete, once OpenSearch forgot the tombstone (index.gc_deletes=0s)",
    ),
    # --- embedder ---
    FaultKind("embed_timeout", "embedder", "inproc", "the model times out"),
    FaultKind("embed_5xx", "embedder", "inproc", "the model answers HTTP 503"),
    FaultKind("malformed_vector", "embedder", "inproc", "a vector of the wrong dimension"),
    FaultKind("poison_document", "embedder", "inproc", "a text the model always fails on"),
    # --- stores, in process ---
    FaultKind("keyword_down", "store", "inproc", "a keyword write refused before it is applied"),
    FaultKind("vector_down", "store", "inproc", "a vector write refused before it is applied"),
    FaultKind("keyword_lost_ack", "store", "inproc", "a keyword write applied, its answer lost"),
    FaultKind("vector_lost_ack", "store", "inproc", "a vector write applied, its answer lost"),
    FaultKind(
        "store_refuses_document",
        "store",
        "inproc",
        "one store refuses a document's new version for good at write time, the other takes it",
    ),
    # --- lockstep process ---
    FaultKind("lockstep_crash", "process", "inproc", "lockstep dies at a named crash point and restarts"),
    FaultKind(
        "zombie_owner",
        "process",
        "inproc",
        "the shard's owner stalls, a new owner takes over (new epoch), then the old one wakes",
    ),
    # --- network (TCP proxy in front of each store; HTTP proxy in front of OpenSearch) ---
    FaultKind("net_latency", "network", "server", "latency plus jitter on every forwarded block"),
    FaultKind(
        "net_reset_before_send", "network", "server", "connection reset before the request is forwarded"
    ),
    FaultKind(
        "net_reset_after_send",
        "network",
        "server",
        "request forwarded and applied, answer replaced by a reset",
    ),
    FaultKind("net_blackhole", "network", "server", "bytes swallowed, nothing answered: client timeouts"),
    FaultKind("net_bandwidth", "network", "server", "throughput capped in both directions"),
    FaultKind("http_429", "network", "server", "whole OpenSearch request answered 429"),
    FaultKind("http_503", "network", "server", "whole OpenSearch request answered 503"),
    FaultKind("bulk_item_429", "network", "server", "some _bulk items answered 429, the rest applied"),
    # --- store processes ---
    FaultKind("vector_server_kill9", "process", "server", "kill -9 of the Milvus server, then restart"),
    FaultKind(
        "keyword_server_data_loss",
        "process",
        "server",
        "OpenSearch-API server killed: index gone, reconciler rebuilds",
    ),
    FaultKind("store_pause", "process", "server", "SIGSTOP a store, then SIGCONT"),
)

KINDS: dict[str, FaultKind] = {k.name: k for k in CATALOGUE}
INPROC_KINDS = tuple(k.name for k in CATALOGUE if k.tier == "inproc")
SERVER_KINDS = tuple(k.name for k in CATALOGUE if k.tier == "server")


TIERS: dict[str, tuple[str, ...]] = {"all": tuple(KINDS), "inproc": INPROC_KINDS, "server": SERVER_KINDS}


def parse_kinds(spec: str) -> tuple[str, ...]:
    """A comma-separated list of kind names and tiers (``all``, ``inproc``, ``server``), in order,
    without repeats; an empty spec is ``all``."""
    items = [n.strip() for n in spec.split(",") if n.strip()] or ["all"]
    unknown = [n for n in items if n not in KINDS and n not in TIERS]
    if unknown:
        raise ValueError(f"unknown fault kinds: {', '.join(unknown)}")
    names = [name for item in items for name in TIERS.get(item, (item,))]
    return tuple(dict.fromkeys(names))
