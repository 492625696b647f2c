"""``measure_latency`` without depending on the machine's speed: a fake clock that each run advances by a known
amount, so the percentiles it reports are exact."""

from __future__ import annotations

import numpy as np
import pytest

from mdeploy import latency


def test_warmup_runs_are_not_timed_and_percentiles_are_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    durations_ms = [1000.0] * 5 + [float(d) for d in range(1, 101)]  # 5 slow warm-up runs, then 1..100 ms
    clock = {"now": 0.0, "calls": 0}

    def run(batch: np.ndarray) -> np.ndarray:
        assert batch.shape == (1, 3, 8, 8) and batch.dtype == np.float32
        clock["now"] += durations_ms[clock["calls"]] / 1000.0
        clock["calls"] += 1
        return batch

    monkeypatch.setattr(latency.time, "perf_counter", lambda: clock["now"])
    result = latency.measure_latency(run, np.zeros((3, 8, 8), np.float64), threads=2, runs=100, warmup=5)
    assert clock["calls"] == 105
    assert (result.runs, result.threads) == (100, 2)
    expected = np.percentile(np.arange(1, 101, dtype=float), [50, 90, 99])
    assert (result.p50_ms, result.p90_ms, result.p99_ms) == pytest.approx(tuple(expected))
    assert result.mean_ms == pytest.approx(50.5)
