"""PaddleOCR's trained PP-OCRv3 text detector end to end (issue 15): fp32 + int8 ONNX, TFLite and Core ML through
``mdeploy.pipeline.convert``, judged on held-out renders of words (mdeploy.zoo.text_images) against fp32 PyTorch.

Prints per artifact: SNR and max |error| of the probability map, the agreement of the map thresholded at 0.3 (as
PaddleOCR's DB post-processing does), and TFLite fp32 vs int8 latency on XNNPACK timed in interleaved rounds.

    .venv/bin/python bench/ppocr_det.py [--size 320] [--calib-count 64] [--eval-count 48] [--target-snr DB]
        [--keep DIR]

``--target-snr``: mixed precision (``mdeploy convert --target-snr``), the fewest layers kept in float to reach it,
with float TFLite I/O (``--tflite-io float``) so that the input itself may stay float.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
os.environ.setdefault("XDG_CACHE_HOME", str(ROOT / ".cache" / "library-home" / "cache"))

from families import cpu_line  # noqa: E402
from mdeploy.calibration.config import QuantRecipe  # noqa: E402
from mdeploy.calibration.preprocess import ChannelOrder, Preprocess  # noqa: E402
from mdeploy.converters import REGISTRY  # noqa: E402
from mdeploy.demo_assets import prepare_demo_assets  # noqa: E402
from mdeploy.parity import run_batches_outputs  # noqa: E402
from mdeploy.pipeline import convert  # noqa: E402
from mdeploy.records import ConvertOptions, DataOptions, ModelSource  # noqa: E402
from mdeploy.reports import mixed_precision_summary  # noqa: E402
from mdeploy.types import Precision, Target  # noqa: E402
from mdeploy.zoo.ppocr_det import DET_THRESH  # noqa: E402
from mdeploy.zoo.ppocr_weights import load_ppocr_det, ppocr_det_onnx  # noqa: E402
from mdeploy.zoo.text_images import render_text_images  # noqa: E402
from tflite_latency import time_interleaved  # noqa: E402

# RapidOCR's det config: BGR as cv2 reads it, /255, ImageNet mean and std.
PREPROCESS = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), channel_order=ChannelOrder.BGR)


def write_renders(folder: Path, count: int, size: int, seed: int, photos: list[Path]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index, item in enumerate(render_text_images(count, (size, size), seed=seed, photos=photos)):
        item.image.save(folder / f"{index:03d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=320, help="square input side (a multiple of 32)")
    parser.add_argument("--calib-count", type=int, default=64)
    parser.add_argument("--eval-count", type=int, default=48)
    parser.add_argument("--runs", type=int, default=60, help="timed invoke() runs per TFLite model")
    parser.add_argument("--target-snr", type=float, default=None, help="mixed precision target, dB (default: none)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the renders, the .pt2 and the output here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cache = ROOT / ".cache" / "mdeploy-demo"
    assets = prepare_demo_assets(cache)
    print(f"CPU: {cpu_line()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        # calibration words on the calibration photos, held-out words on the evaluation photos (other seed)
        write_renders(work / "calib", args.calib_count, args.size, 0, [assets.photos_dir / n for n in assets.photos_calib])
        write_renders(work / "eval", args.eval_count, args.size, 1, [assets.photos_dir / n for n in assets.photos_eval])
        model = load_ppocr_det(ppocr_det_onnx(cache)).eval()
        torch.export.save(torch.export.export(model, (torch.zeros(1, 3, args.size, args.size),)), work / "ppocr_det.pt2")
        options = ConvertOptions(
            model=ModelSource(work / "ppocr_det.pt2"), out=work / "out",
            targets=(Target.onnx, Target.tflite, Target.coreml), int8=True,
            data=DataOptions(calib=work / "calib", eval=work / "eval", calib_size=args.calib_count,
                             eval_size=args.eval_count),
            preprocess=Preprocess(resize=None, crop=args.size, **PREPROCESS), overwrite=True, overwrite_any=True,
            latency_runs=0, recipe=dataclasses.replace(QuantRecipe.default(), target_snr_db=args.target_snr),
            # mixed precision: float I/O lets the first layers compute in float on the image (no int8 input grid)
            converters=(REGISTRY[Target.tflite].configured({"tflite_io": "float"}, True),) if args.target_snr else ())
        start = time.perf_counter()
        result = convert(options)
        seconds = time.perf_counter() - start
        reference = result.evaluation.references[0]
        print(f"\n{args.size}x{args.size} px, {args.calib_count} calibration renders, {args.eval_count} held-out "
              f"renders; conversion (6 artifacts with parity) {seconds:.0f} s\n")
        mixed = result.manifest.quantization.mixed_precision if result.manifest.quantization else None
        if mixed is not None:
            print(f"{mixed_precision_summary(mixed)}\n")
        print(f"| artifact | runtime | SNR dB | max abs err | map > {DET_THRESH} agreement | parity (default limits) |")
        print("|---|---|---|---|---|---|")
        for artifact in result.artifacts:
            run = REGISTRY[artifact.target].outputs_runner(result.out / artifact.path)
            (output,) = run_batches_outputs(lambda batch: tuple(run(batch).values()), result.evaluation.inputs)
            agreement = float(np.mean((output > DET_THRESH) == (reference > DET_THRESH)))
            m = artifact.parity.metrics
            verdict = "pass" if artifact.parity.passed else "; ".join(artifact.parity.failures)
            print(f"| {artifact.path} | {artifact.runtime} | {m.snr_db:.1f} | {m.max_abs_error:.3g} | "
                  f"{agreement:.2%} | {verdict} |")
        tflite = {a.precision.value: result.out / a.path for a in result.artifacts if a.target == Target.tflite}
        if Precision.fp32.value in tflite and Precision.int8.value in tflite:
            times = time_interleaved(tflite, threads=1, runs=args.runs, warmup=5)
            print(f"\nTFLite on XNNPACK, 1 thread, median of {args.runs} invoke() runs in interleaved rounds: fp32 "
                  f"{times['fp32']:.2f} ms, int8 {times['int8']:.2f} ms ({times['fp32'] / times['int8']:.2f}x)")


if __name__ == "__main__":
    main()
