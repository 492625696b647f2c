"""Mixed precision on the real MobileNetV2 (issue 16's error budget): ``mdeploy convert --int8`` and the same with
``--target-snr``, int8 ONNX and TFLite judged on the demo's 320 held-out crops (16 photos the calibration never
saw), and what the float layers cost: size, share of multiply-accumulates, and TFLite fp32 / full int8 / mixed
latency on XNNPACK timed in interleaved rounds (1 thread).

    .venv/bin/python bench/target_snr.py [--target-snr 25] [--runs 100] [--keep DIR]

The search judges its choice on calibration samples held back from the quantiser (``mixed.split_calibration``),
so the held-out SNR below is the honest check of its promise.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from families import cpu_line  # noqa: E402
from mdeploy.calibration.config import QuantRecipe  # noqa: E402
from mdeploy.demo_assets import prepare_demo_assets  # noqa: E402
from mdeploy.pipeline import convert  # noqa: E402
from mdeploy.records import ConvertOptions, DataOptions, ModelSource  # noqa: E402
from mdeploy.reports import mixed_precision_summary  # noqa: E402
from mdeploy.types import Precision, Target  # noqa: E402
from mdeploy.zoo import Arch  # noqa: E402
from tflite_latency import time_interleaved  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-snr", type=float, default=25.0, help="mixed precision target, dB")
    parser.add_argument("--runs", type=int, default=100, help="timed invoke() runs per TFLite model")
    parser.add_argument("--keep", type=Path, default=None, help="keep both output folders here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    assets = prepare_demo_assets(ROOT / ".cache" / "mdeploy-demo")
    print(f"CPU: {cpu_line()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        tflite: dict[str, Path] = {}
        summary = ""
        print("\n| run | artifact | runtime | SNR dB | top-1 agreement | size MB | quantise s |\n"
              "|---|---|---|---|---|---|---|")
        for run, target_snr in (("full int8", None), (f"--target-snr {args.target_snr:g}", args.target_snr)):
            options = ConvertOptions(
                model=ModelSource(assets.weights, Arch.mobilenet_v2), out=work / ("mixed" if target_snr else "full"),
                targets=(Target.onnx, Target.tflite), int8=True,
                data=DataOptions(calib=assets.calib_dir, eval=assets.eval_dir, calib_size=200, eval_size=320),
                labels=assets.labels, overwrite=True, overwrite_any=True, latency_runs=0,
                recipe=dataclasses.replace(QuantRecipe.default(), target_snr_db=target_snr))
            result = convert(options)
            quantise = result.manifest.seconds["quantize"]
            for artifact in result.artifacts:
                if artifact.precision == Precision.fp32 and target_snr is not None:
                    continue
                m = artifact.parity.metrics
                size = (result.out / artifact.path).stat().st_size / 1e6
                print(f"| {run} | {artifact.path} | {artifact.runtime} | {m.snr_db:.1f} | {m.top1_agreement:.1%} | "
                      f"{size:.1f} | {quantise:.0f} |")
                if artifact.target == Target.tflite:
                    key = artifact.precision.value if target_snr is None else "mixed"
                    tflite[key] = result.out / artifact.path
            mixed = result.manifest.quantization.mixed_precision if result.manifest.quantization else None
            if mixed is not None:
                summary = mixed_precision_summary(mixed)
        print(f"\n{summary}\n")
        times = time_interleaved(tflite, threads=1, runs=args.runs, warmup=5)
        print(f"TFLite on XNNPACK, 1 thread, median of {args.runs} invoke() runs in interleaved rounds (ms):\n")
        print("| fp32 | full int8 | mixed |\n|---|---|---|")
        print(f"| {times['fp32']:.2f} | {times['int8']:.2f} ({times['fp32'] / times['int8']:.2f}x) | "
              f"{times['mixed']:.2f} ({times['fp32'] / times['mixed']:.2f}x) |")


if __name__ == "__main__":
    main()
