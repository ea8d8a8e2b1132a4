"""The service's ``/metrics`` text, read as the benchmark needs it: one number per sample."""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> dict[str, float]:
    """Every sample of a ``/metrics`` page, keyed by name and labels (see ``sample_key``)."""
    return {
        sample_key(s.name, s.labels): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample_key(name: str, labels: dict[str, str]) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}" if inner else name


APPLIED = sample_key("lockstep_events_total", {"outcome": "applied"})


def writes_made(metrics: dict[str, float]) -> dict[str, int]:
    """Batch writes per index, as the shards count them."""
    return {
        side: int(metrics.get(sample_key("lockstep_index_apply_writes_total", {"index": side}), 0.0))
        for side in ("keyword", "vector")
    }


def write_s_mean(metrics: dict[str, float]) -> dict[str, float]:
    """Mean seconds per batch write per index, as the shards time it (queueing at the writer included)."""
    out = {}
    for side, writes in writes_made(metrics).items():
        seconds = metrics.get(sample_key("lockstep_index_apply_seconds_total", {"index": side}), 0.0)
        out[side] = seconds / writes if writes else 0.0
    return out


def histogram_quantile_le(metrics: dict[str, float], name: str, q: float) -> float:
    """The upper bound of the histogram bucket holding quantile ``q`` (inf if beyond the last)."""
    pattern = re.compile(rf'^{name}_bucket\{{le="([^"]+)"\}}$')
    buckets = sorted((float(m.group(1)), v) for k, v in metrics.items() if (m := pattern.match(k)))
    total = buckets[-1][1]
    return next(le for le, count in buckets if count >= q * total)
