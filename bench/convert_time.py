"""Wall time of a whole `mdeploy convert` (fp32 + int8) of the real MobileNetV2 with 200 calibration images.

    .venv/bin/python bench/convert_time.py [--to tflite] [--repeats 3]

Runs the CLI as a user does, in a fresh process each time (imports included): load, trace, read and preprocess the
calibration photos, quantise, write the fp32 and int8 artifacts, check their parity and time their latency. Prints
the process wall time and the stages recorded in each run's manifest.json (``seconds``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdeploy.demo_assets import default_cache_dir, prepare_demo_assets  # noqa: E402

CALIBRATION_IMAGES = 200
STAGES = ("load_and_trace", "data_and_reference", "quantize", "export_parity_latency")


def run_once(weights: Path, calib: Path, targets: str, out: Path) -> tuple[float, dict[str, float]]:
    command = [sys.executable, "-m", "mdeploy.cli", "convert", str(weights), "--arch", "mobilenet_v2",
               "--to", targets, "--int8", "--calib", str(calib), "--calib-size", str(CALIBRATION_IMAGES),
               "--out", str(out), "--overwrite"]
    start = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if finished.returncode != 0:
        raise SystemExit(f"convert failed ({finished.returncode}): {finished.stdout[-2000:]}{finished.stderr[-2000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"]["calibration_set"]["samples"] == CALIBRATION_IMAGES
    return wall, manifest["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--to", default="tflite", help="targets, comma separated")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    assets = prepare_demo_assets(default_cache_dir())
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for i in range(args.repeats):
            rows.append(run_once(assets.weights, assets.calib_dir, args.to, Path(work) / "out"))
            print(f"run {i + 1}: {rows[-1][0]:.1f} s", file=sys.stderr)
    print(f"| run | process wall s | {' | '.join(STAGES)} |")
    print("|---|---|" + "---|" * len(STAGES))
    for i, (wall, seconds) in enumerate(rows, 1):
        print(f"| {i} | {wall:.1f} | " + " | ".join(f"{seconds.get(s, 0):.1f}" for s in STAGES) + " |")
    print(f"\nmedian process wall time: {statistics.median(w for w, _ in rows):.1f} s "
          f"(mdeploy convert --to {args.to} --int8, {CALIBRATION_IMAGES} calibration images)")


if __name__ == "__main__":
    main()
