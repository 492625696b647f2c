"""``--baseline previous.json``: fail when accuracy or latency regresses beyond a tolerance.

Both reports are the JSON that ``mdeploy check --json`` / ``mdeploy bench --json`` print (or ``report.json`` in a
``--report`` folder). Artifacts are matched by file name, latency rows by file name and thread count. An artifact
the baseline had and the new report lacks is a regression too: a gate must not pass by dropping a target.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mdeploy.config import Tolerances
from mdeploy.errors import BadInputError


@dataclass(frozen=True)
class Regression:
    artifact: str
    metric: str
    baseline: float | None
    current: float | None
    tolerance: float
    message: str


def read_report(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise BadInputError(f"baseline {path} does not exist: pass the report.json (or --json output) of an earlier run")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadInputError(f"baseline {path} is not JSON ({err}): pass an mdeploy report") from None
    if not isinstance(report, dict) or report.get("kind") not in ("check", "bench"):
        raise BadInputError(f"baseline {path} is not an mdeploy check or bench report (no \"kind\")")
    return report


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if not math.isnan(number) else None


def _parity(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {a["file"]: a["parity"]["metrics"] for a in report.get("artifacts", [])}


def _latency(report: dict[str, Any]) -> dict[tuple[str, int], float]:
    bench = report if report.get("kind") == "bench" else (report.get("bench") or {})
    return {(row["file"], int(row["threads"])): row["p50_ms"] for row in bench.get("rows", [])
            if row.get("p50_ms") is not None}


def accuracy_regressions(current: dict[str, Any], baseline: dict[str, Any], tolerances: Tolerances) -> list[Regression]:
    found = []
    now = _parity(current)
    for file, before in _parity(baseline).items():
        if file not in now:
            found.append(Regression(file, "present", None, None, 0.0,
                                    f"{file} was checked in the baseline but is missing now"))
            continue
        top1_before, top1_now = _number(before.get("top1_agreement")), _number(now[file].get("top1_agreement"))
        if top1_before is not None and (top1_now is None or top1_now < top1_before - tolerances.max_top1_drop):
            found.append(Regression(file, "top1_agreement", top1_before, top1_now, tolerances.max_top1_drop,
                                    f"{file}: top-1 agreement fell from {top1_before:.1%} to "
                                    f"{_percent(top1_now)} (tolerance {tolerances.max_top1_drop * 100:.1f} pt)"))
        snr_before, snr_now = _number(before.get("snr_db")), _number(now[file].get("snr_db"))
        if snr_before is not None and math.isfinite(snr_before) and (
                snr_now is None or snr_now < snr_before - tolerances.max_snr_drop_db):
            found.append(Regression(file, "snr_db", snr_before, snr_now, tolerances.max_snr_drop_db,
                                    f"{file}: SNR fell from {snr_before:.1f} dB to {_db(snr_now)} "
                                    f"(tolerance {tolerances.max_snr_drop_db:.1f} dB)"))
    return found


def latency_regressions(current: dict[str, Any], baseline: dict[str, Any], tolerances: Tolerances) -> list[Regression]:
    found = []
    now = _latency(current)
    for (file, threads), before in _latency(baseline).items():
        after = now.get((file, threads))
        if after is not None and after > before * (1 + tolerances.max_latency_increase):
            found.append(Regression(file, f"p50_ms@{threads}t", before, after, tolerances.max_latency_increase,
                                    f"{file}: p50 latency at {threads} thread(s) rose from {before:.2f} ms to "
                                    f"{after:.2f} ms (tolerance +{tolerances.max_latency_increase:.0%})"))
    return found


def compare_with_baseline(current: dict[str, Any], baseline_path: Path, tolerances: Tolerances) -> dict[str, Any]:
    baseline = read_report(baseline_path)
    regressions = accuracy_regressions(current, baseline, tolerances) + latency_regressions(current, baseline,
                                                                                            tolerances)
    return {"file": str(baseline_path), "passed": not regressions, "tolerances": asdict(tolerances),
            "regressions": [asdict(r) for r in regressions]}


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _db(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} dB"
