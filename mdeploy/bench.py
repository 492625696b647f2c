"""``mdeploy bench``: every artifact of an output folder at each thread count (``mdeploy.latency``), with size, peak
memory and a status."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mdeploy.converters.base import Converter, Precision, artifact_size, missing_modules
from mdeploy.artifacts import precision_of, read_manifest
from mdeploy.errors import BadInputError, ExitCode, MdeployError, first_line
from mdeploy.latency import measure_latency
from mdeploy.manifest import ArtifactRecord, Failure
from mdeploy.ui import Reporter, SilentReporter


# -- mdeploy bench: every artifact of an output folder, at each thread count ------------------------------------


@dataclass(frozen=True)
class BenchOptions:
    folder: Path  # an mdeploy output folder (manifest.json and its artifacts)
    threads: tuple[int, ...] = (1, 2)
    runs: int = 50
    warmup: int = 10
    precision: Precision | None = None  # --precision: overrides the manifest's, the file name's and the file's

# Row statuses that make ``mdeploy bench`` exit 2 once every other artifact is timed: the file is not what was
# converted (SHA256SUMS), or it cannot be loaded or run.
CHECKSUM_MISMATCH = "checksum mismatch"
FAILED = "failed"


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


def _status(entry: ArtifactRecord | Failure, converter: Converter | None) -> tuple[str, str]:
    if isinstance(entry, Failure):
        return "conversion failed", entry.error
    if converter is None:
        return "skipped", f"target {entry.target} is not available in this version"
    missing = missing_modules(converter)
    if missing:
        return "skipped", f"needs {', '.join(missing)} (pip install 'mdeploy[{converter.target.value}]')"
    if not converter.times_latency:
        return "skipped", f"runs on the {converter.runtime_name}, whose timings say nothing about a device"
    if not entry.parity.passed:
        return "parity failed", "; ".join(entry.parity.failures) or "parity failed at conversion"
    return "passed", ""


def _precision(entry: ArtifactRecord | Failure, path: Path | None, override: Precision | None) -> str | None:
    if override is not None:
        return override.value
    if entry.precision in {p.value for p in Precision}:
        return entry.precision
    if path is None or not path.exists():
        return entry.precision

    try:
        return precision_of(path).value
    except MdeployError:  # unreadable: its row says why (failed)
        return entry.precision


def _time(converter: Converter, path: Path, sample: np.ndarray, threads: int, options: BenchOptions) -> dict[str, Any]:
    """Latency and peak memory of one artifact at one thread count; an artifact that cannot be loaded or run raises
    MdeployError saying so (in one line)."""
    with PeakMemory() as memory:
        try:
            run = converter.runner(path, threads=threads)
        except MdeployError:
            raise
        except Exception as err:  # the runtime's own error types
            raise BadInputError(f"cannot be loaded by {converter.runtime_name}: {first_line(err)}") from err
        try:
            latency = measure_latency(run, sample, threads, options.runs, options.warmup)
        except MemoryError:
            raise
        except Exception as err:
            raise BadInputError(f"failed while running on {converter.runtime_name}: {first_line(err)}") from err
        del run
    return {**latency.to_dict(), "warmup": options.warmup, "peak_memory_mb": memory.added_mb}


def bench_folder(options: BenchOptions, reporter: Reporter | None = None) -> dict[str, Any]:
    """Latency, size and peak memory of every artifact in ``options.folder``: a bench report (JSON-ready).

    An artifact that is not what was converted (``SHA256SUMS``) is not timed (status "checksum mismatch"), one that
    cannot be loaded or run gets status "failed" with the first line of the error; the others are still timed and
    ``bench_problems`` turns such rows into exit code 2. A path in the manifest that leads outside the folder stops
    the bench (BadInputError) before anything runs."""
    from mdeploy.converters import REGISTRY
    from mdeploy.paths import checksum_mismatches, manifest_paths

    reporter = reporter or SilentReporter()
    manifest_path = options.folder / "manifest.json"
    if not manifest_path.is_file():
        raise BadInputError(f"{options.folder} has no manifest.json: pass an mdeploy output folder (mdeploy convert --out)")
    manifest = read_manifest(manifest_path)
    paths = manifest_paths(options.folder, manifest)
    mismatches = checksum_mismatches(options.folder, [name for name, p in paths.items() if p.exists()])
    shape = tuple(manifest.input.shape)
    sample = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    rows = []
    entries: list[ArtifactRecord | Failure] = [*manifest.artifacts, *manifest.failures]
    for entry in entries:
        converter = next((c for t, c in REGISTRY.items() if t.value == entry.target), None)
        status, reason = _status(entry, converter)
        file = entry.file if isinstance(entry, ArtifactRecord) else None
        path = paths[file] if file is not None else None
        if file is not None and file in mismatches:
            status, reason = CHECKSUM_MISMATCH, mismatches[file]
        elif path is not None and not path.exists() and status in ("passed", "parity failed"):
            status, reason = FAILED, "listed in manifest.json but missing from the folder"
        precision = _precision(entry, path, options.precision)
        for threads in options.threads:
            row: dict[str, Any] = {
                "file": file or f"{entry.target} {entry.precision}".strip(),
                "target": entry.target, "precision": precision,
                "runtime": converter.runtime_name if converter else None, "status": status, "reason": reason,
                "threads": threads, "runs": 0, "warmup": 0, "p50_ms": None, "p90_ms": None, "p99_ms": None,
                "mean_ms": None, "size_bytes": artifact_size(path) if path and path.exists() else None,
                "peak_memory_mb": None,
            }
            if status in ("passed", "parity failed") and converter is not None and path is not None:
                reporter.step(f"timing {row['file']} on {converter.runtime_name}, {threads} thread(s)")
                try:
                    row.update(_time(converter, path, sample, threads, options))
                except MdeployError as err:  # this artifact only (not retried at other thread counts); the others
                    status, reason = FAILED, first_line(err)  # are still timed
                    row.update(status=status, reason=reason)
                    reporter.step(f"{row['file']} failed: {reason}")
            rows.append(row)
    return {"report_version": "1.0", "kind": "bench", "folder": str(options.folder), "machine": machine(),
            "rows": rows}


def bench_problems(report: dict[str, Any]) -> tuple[ExitCode, str] | None:
    """The exit code and one ``error:`` line for a bench whose rows include artifacts that are not what was
    converted or that could not be loaded or run (None when every artifact could be timed or was skipped)."""
    bad: dict[str, str] = {}
    for row in report.get("rows") or []:
        if row["status"] in (CHECKSUM_MISMATCH, FAILED):
            bad.setdefault(row["file"], f"{row['status']}: {row['reason']}")
    if not bad:
        return None
    listed = "; ".join(f"{name} ({why})" for name, why in bad.items())
    return ExitCode.BAD_INPUT, (f"{report['folder']}: {len(bad)} artifact{'s' if len(bad) > 1 else ''} not timed, "
                                f"{listed}; the others were timed: convert again, or restore the files")
