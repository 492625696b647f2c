"""Latency of a runner on one input (warm-up, then timed runs, as percentiles in milliseconds), and
``mdeploy bench``: every artifact of an output folder at each thread count, with size, peak memory and a status."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from converters.base import Converter, Runner, artifact_size, missing_modules
from mdeploy.errors import BadInputError
from mdeploy.ui import Reporter, SilentReporter


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


# -- mdeploy bench: every artifact of an output folder, at each thread count ------------------------------------


@dataclass(frozen=True)
class BenchOptions:
    folder: Path  # an mdeploy output folder (manifest.json and its artifacts)
    threads: tuple[int, ...] = (1, 2)
    runs: int = 50
    warmup: int = 10


class PeakMemory:
    """Peak resident memory added while a block runs, from Linux's VmHWM after resetting it (``clear_refs`` 5).
    Elsewhere (or where the reset is not allowed) the figure is None rather than a wrong number."""

    def __init__(self) -> None:
        self.added_mb: float | None = None

    def __enter__(self) -> PeakMemory:
        self.start_kb = _status_kb("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset = True
        except OSError:
            self.reset = False
        return self

    def __exit__(self, *exc: object) -> None:
        peak = _status_kb("VmHWM")
        if self.reset and peak is not None and self.start_kb is not None:
            self.added_mb = round(max(0, peak - self.start_kb) / 1024, 1)


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def machine() -> dict[str, Any]:
    return {"cpu": platform.machine(), "cores": os.cpu_count(), "platform": platform.platform(),
            "emulated": False, "note": "latency of this machine's CPU, not of a phone"}


def _status(entry: dict[str, Any], converter: Converter | None) -> tuple[str, str]:
    if entry.get("error"):
        return "conversion failed", entry["error"]
    if converter is None:
        return "skipped", f"target {entry['target']} is not available in this version"
    missing = missing_modules(converter)
    if missing:
        return "skipped", f"needs {', '.join(missing)} (pip install 'mdeploy[{converter.target.value}]')"
    if not converter.times_latency:
        return "skipped", f"runs on the {converter.runtime_name}, whose timings say nothing about a device"
    parity = entry.get("parity") or {}
    if not parity.get("passed", False):
        return "parity failed", "; ".join(parity.get("failures", [])) or "parity failed at conversion"
    return "passed", ""


def bench_folder(options: BenchOptions, reporter: Reporter | None = None) -> dict[str, Any]:
    """Latency, size and peak memory of every artifact in ``options.folder``: a bench report (JSON-ready)."""
    from converters import REGISTRY
    from mdeploy.check import read_manifest

    reporter = reporter or SilentReporter()
    manifest_path = options.folder / "manifest.json"
    if not manifest_path.is_file():
        raise BadInputError(f"{options.folder} has no manifest.json: pass an mdeploy output folder (mdeploy convert --out)")
    manifest = read_manifest(manifest_path)
    shape = tuple(manifest.get("input", {}).get("shape", (1, 3, 224, 224)))
    sample = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    rows = []
    for entry in manifest["artifacts"] + manifest.get("failures", []):
        converter = next((c for t, c in REGISTRY.items() if t.value == entry["target"]), None)
        status, reason = _status(entry, converter)
        path = options.folder / entry["file"] if entry.get("file") else None
        for threads in options.threads:
            row: dict[str, Any] = {
                "file": entry.get("file") or f"{entry['target']} {entry.get('precision', '')}".strip(),
                "target": entry["target"], "precision": entry.get("precision"),
                "runtime": converter.runtime_name if converter else None, "status": status, "reason": reason,
                "threads": threads, "runs": 0, "warmup": 0, "p50_ms": None, "p90_ms": None, "p99_ms": None,
                "mean_ms": None, "size_bytes": artifact_size(path) if path and path.exists() else None,
                "peak_memory_mb": None,
            }
            timeable = status in ("passed", "parity failed") and converter is not None and path is not None
            if timeable:
                reporter.step(f"timing {row['file']} on {converter.runtime_name}, {threads} thread(s)")
                with PeakMemory() as memory:
                    run = converter.runner(path, threads=threads)
                    latency = measure_latency(run, sample, threads, options.runs, options.warmup)
                    del run
                row.update(latency.to_dict(), warmup=options.warmup, peak_memory_mb=memory.added_mb)
            rows.append(row)
    return {"report_version": "1.0", "kind": "bench", "folder": str(options.folder), "machine": machine(),
            "rows": rows}
