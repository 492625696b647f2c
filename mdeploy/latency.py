"""Latency of a runner on one input: warm-up, then timed runs, as percentiles in milliseconds."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from mdeploy.types import Runner


@dataclass(frozen=True)
class Latency:
    runs: int
    threads: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def measure_latency(run: Runner, sample: np.ndarray, threads: int, runs: int = 50, warmup: int = 10) -> Latency:
    """Times ``run`` on a batch of one; the runner must already be built with ``threads`` threads."""
    batch = np.ascontiguousarray(sample[None] if sample.ndim == 3 else sample[:1], dtype=np.float32)
    for _ in range(warmup):
        run(batch)
    times = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        run(batch)
        times[i] = (time.perf_counter() - start) * 1000.0
    p50, p90, p99 = np.percentile(times, [50, 90, 99])
    return Latency(runs, threads, float(p50), float(p90), float(p99), float(times.mean()))
