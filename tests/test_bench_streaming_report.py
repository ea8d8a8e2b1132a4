"""bench/streaming/report.py's freshness report: lags grouped by when their events were appended."""

from __future__ import annotations

from bench.streaming import FreshnessRun, LagLog, StoreLatency, _lag_windows, _store_latency


def run_of(timeline: list[tuple[float, float]]) -> FreshnessRun:
    lags = sorted(lag for _, lag in timeline)
    return FreshnessRun(1, 100.0, len(lags), 12.0, lags, 0.25, 0.5, [], timeline)


def test_the_lag_log_timeline_counts_from_the_first_append_and_leaves_out_uncommitted() -> None:
    log = LagLog()
    log.appended.update({"a": 100.0, "b": 100.5, "c": 107.0})
    log.committed.update({"a": 100.2, "c": 109.5})
    timeline = log.timeline()
    assert [at for at, _ in timeline] == [0.0, 7.0]
    assert [round(lag, 6) for _, lag in timeline] == [0.2, 2.5]


def test_windows_group_lags_by_append_time_and_the_report_names_the_slow_window() -> None:
    timeline = [(0.1, 2.9), (1.0, 2.4), (4.9, 0.3), (5.0, 0.2), (9.9, 0.4), (10.2, 0.1)]
    run = run_of(timeline)
    assert run.windows(5.0) == [(0.0, [0.3, 2.4, 2.9]), (5.0, [0.2, 0.4]), (10.0, [0.1])]
    lines = _lag_windows(run)
    rows = [line for line in lines if line.startswith("| ") and " s |" in line and "appended" not in line]
    assert rows[0] == "| 0 s | 3 | 2.400 s | 2.900 s | 2.900 s |"
    assert rows[1] == "| 5 s | 2 | 0.400 s | 0.400 s | 0.400 s |"
    assert len(rows) == 3
    assert _lag_windows(run_of([(0.0, 0.1), (1.0, 0.2)])) == [], "one window says nothing more"


def test_the_raw_keyword_latency_names_its_stalls() -> None:
    latency = StoreLatency("keyword (OpenSearch-API)", 76, 7.3, [0.03, 0.04, 2.6, 0.03, 0.7, 0.02])
    assert latency.slow(0.5) == [(2, 2.6), (4, 0.7)]
    assert latency.percentile_s(0.5) == 0.04, "the upper median, as the lag percentiles take it"
    lines = _store_latency(latency)
    assert "6 raw `_bulk` requests of 76 rows at 7.3/s" in lines[0]
    assert lines[4] == "| keyword (OpenSearch-API) | 0.040 s | 2.600 s | 2.600 s | 2: #2 2.60 s, #4 0.70 s |"
    assert _store_latency(None) == []
