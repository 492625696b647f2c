"""Issue 15's table: torchvision's detection and segmentation layouts on MobileNetV3-Large, converted as a user
converts them, with ONNX Runtime's own quantiser as the int8 control.

    .venv/bin/python bench/heads.py [--layouts ssdlite320_mobilenet_v3_large,...] [--size 320]
        [--calib-count 64] [--eval-count 32] [--runs 40] [--warmup 5] [--keep DIR]

Per layout (``tests/model_library.py``: torchvision's own definition, random weights, BatchNorm statistics from real
photos; SSDLite as its raw head outputs, with torchvision's anchors in a ``--detector`` spec):
- save it as users do (``torch.export`` at batch 1) and run ``mdeploy convert MODEL.pt2 --to onnx,tflite,coreml
  --int8 --calib ... --eval ...`` in a fresh process at the default limits (exit 1 = a parity limit failed; the
  artifacts and their measurements are written all the same);
- from the manifest: the worst fp32 SNR, and per artifact the int8 SNR of each output, the segmenters' arg-max pixel
  agreement and mean IoU, the detector's top-k (anchor, class) agreement and box error in pixels;
- the control: ONNX Runtime's ``quantize_static`` (QDQ, per-channel, MinMax, int8) on the fp32 ONNX mdeploy wrote,
  calibrated on the same samples (hashes checked against the manifest's), measured the same way;
- fp32 vs int8 TFLite ``invoke()`` on XNNPACK, 1 thread, medians of interleaved rounds, and the int8 model's XNNPACK
  partition count.
With random weights, int8 SNR is low for any quantiser (the V3-Large backbone amplifies rounding, see the families
table in bench/RESULTS.md): compare mdeploy's with the control's, not with the default gate.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from families import (convert_command, cpu_line, load_set, number, ort_control, ort_session,  # noqa: E402
                      print_table, run_subprocess)
from mdeploy.converters.tflite_report import xnnpack_partitions  # noqa: E402
from mdeploy.demo_assets import prepare_demo_assets  # noqa: E402
from mdeploy.detection import anchors_from_torchvision, detection_metrics, read_spec  # noqa: E402
from mdeploy.manifest import Manifest  # noqa: E402
from mdeploy.metrics import compare  # noqa: E402
from mdeploy.parity import torch_outputs  # noqa: E402
from tests.model_library import HEAD_LAYOUTS, head_layout_model, save_exported, ssd_detector_spec  # noqa: E402
from tflite_latency import time_interleaved  # noqa: E402

TARGETS = ("onnx", "tflite", "coreml")


@dataclass
class Measured:
    """One int8 model's parity: the worst SNR over its outputs, and the task's own metric (None when it has none)."""

    snr: float
    pixels: float | None = None  # segmenters: arg-max agreement per pixel
    iou: float | None = None  # segmenters: mean IoU of the arg-max masks
    topk: float | None = None  # detector: top-k (anchor, class) agreement
    box_px: float | None = None  # detector: mean box error of those anchors, input pixels

    def cell(self) -> str:
        task = ""
        if self.pixels is not None:
            task = f"; pixels {self.pixels:.1%}, mIoU {self.iou:.2f}"
        if self.topk is not None:
            task = f"; top-k {self.topk:.0%}, box {self.box_px:.1f} px"
        return f"{self.snr:.1f}{task}"


@dataclass
class Row:
    layout: str
    params_m: float = 0.0
    exit_code: int = 0
    wall_s: float = 0.0
    fp32_snr: float = 0.0
    int8: dict[str, Measured] = field(default_factory=dict)  # target -> mdeploy's
    control: Measured | None = None
    fp32_ms: float = 0.0
    int8_ms: float = 0.0
    partitions: int = 0
    error: str = ""


def measured(references: tuple[np.ndarray, ...], outputs: tuple[np.ndarray, ...], names: tuple[str, ...],
             spec, size: int) -> Measured:  # type: ignore[no-untyped-def]
    metrics = [compare(want, got) for want, got in zip(references, outputs, strict=True)]
    result = Measured(min(m.snr_db for m in metrics))
    if metrics[0].pixel_agreement is not None:
        result.pixels, result.iou = metrics[0].pixel_agreement, metrics[0].mean_iou
    if spec is not None:
        decoded = detection_metrics(spec, dict(zip(names, references, strict=True)),
                                    dict(zip(names, outputs, strict=True)), (size, size))
        result.topk, result.box_px = decoded.topk_agreement, decoded.box_error_px_mean
    return result


def from_manifest(parity, names: tuple[str, ...]) -> Measured:  # type: ignore[no-untyped-def]
    """The same figures as :func:`measured`, as mdeploy recorded them."""
    records = [o.metrics for o in parity.outputs] if parity.outputs else [parity.metrics]
    result = Measured(min(number(m.snr_db) for m in records))
    if records[0].pixel_agreement is not None:
        result.pixels, result.iou = number(records[0].pixel_agreement), number(records[0].mean_iou)
    if parity.detection is not None:
        result.topk = number(parity.detection.topk_agreement)
        result.box_px = number(parity.detection.box_error_px_mean)
    return result


def run_onnx_outputs(path: Path, samples: np.ndarray) -> tuple[np.ndarray, ...]:
    session = ort_session(path)
    name = session.get_inputs()[0].name
    runs = [session.run(None, {name: samples[i:i + 1]}) for i in range(len(samples))]
    return tuple(np.concatenate(parts) for parts in zip(*runs, strict=True))


def bench_layout(layout: str, args: argparse.Namespace, assets, work: Path) -> Row:  # type: ignore[no-untyped-def]
    row = Row(layout)
    model = head_layout_model(layout, assets.calib_dir, args.size)
    row.params_m = sum(p.numel() for p in model.parameters()) / 1e6
    model_path = work / f"{layout}.pt2"
    save_exported(model, torch.randn(1, 3, args.size, args.size), model_path)
    extra, spec = [], None
    if hasattr(model, "anchor_generator"):
        np.save(work / "anchors.npy", anchors_from_torchvision(model, args.size))
        (work / "detector.toml").write_text(ssd_detector_spec())
        spec = read_spec(work / "detector.toml")
        extra = ["--detector", str(work / "detector.toml")]

    out = work / "out"
    command = convert_command(model_path, out, args, assets, ",".join(TARGETS), *extra)
    row.exit_code, row.wall_s, _, stderr = run_subprocess(command)
    if row.exit_code not in (0, 1):
        row.error = next((line for line in stderr.splitlines() if line.startswith("error:")), stderr[-300:])
        return row
    manifest = Manifest.read(out / "manifest.json")
    names = tuple(o["name"] for o in manifest.artifact("onnx", "fp32").io.outputs)  # type: ignore[union-attr]
    row.fp32_snr = min(from_manifest(a.parity, names).snr for t in TARGETS if (a := manifest.artifact(t, "fp32")))
    row.int8 = {t: from_manifest(a.parity, names) for t in TARGETS if (a := manifest.artifact(t, "int8"))}

    calib = load_set(assets.calib_dir, args, args.calib_count, manifest.quantization.calibration_set)
    evaluation = load_set(assets.eval_dir, args, args.eval_count, manifest.evaluation.set)
    reference_of = torch_outputs(model)
    batches = [reference_of(b) for b in np.array_split(evaluation, max(1, len(evaluation) // 4))]
    references = tuple(np.concatenate(parts) for parts in zip(*batches, strict=True))
    fp32_onnx = out / manifest.artifact("onnx", "fp32").file  # type: ignore[union-attr]
    row.control = measured(references, run_onnx_outputs(ort_control(fp32_onnx, calib, work), evaluation), names,
                           spec, args.size)
    ours = measured(references, run_onnx_outputs(out / manifest.artifact("onnx", "int8").file, evaluation),  # type: ignore[union-attr]
                    names, spec, args.size)
    if abs(ours.snr - row.int8["onnx"].snr) > 0.2:  # the same reference and samples as the manifest's?
        print(f"warning: {layout}: int8 ONNX SNR recomputed here {ours.snr:.2f} dB, manifest "
              f"{row.int8['onnx'].snr:.2f} dB", file=sys.stderr)

    tflite = {p: out / manifest.artifact("tflite", p).file for p in ("fp32", "int8")}  # type: ignore[union-attr]
    medians = time_interleaved(tflite, 1, args.runs, args.warmup)
    row.fp32_ms, row.int8_ms = medians["fp32"], medians["int8"]
    row.partitions = xnnpack_partitions(tflite["int8"].read_bytes())["partitions"]
    return row


HEADER = ("| layout | params M | convert s (wall) | fp32 SNR dB (worst target) | int8 ONNX | int8 TFLite "
          "| int8 Core ML (MIL reference) | ORT per-channel int8 (control) | TFLite fp32 ms | int8 ms | speed-up "
          "| int8 XNNPACK partitions |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def format_row(row: Row) -> str:
    if row.error:
        return f"| {row.layout} | convert exit {row.exit_code}: {row.error} |" + " |" * 10
    parity = "" if row.exit_code == 0 else " (int8 parity failed)"
    cells = " | ".join(row.int8[t].cell() if t in row.int8 else "-" for t in TARGETS)
    control = row.control.cell() if row.control else "-"
    return (f"| {row.layout} | {row.params_m:.1f} | {row.wall_s:.0f}{parity} | {row.fp32_snr:.0f} | {cells} "
            f"| {control} | {row.fp32_ms:.2f} | {row.int8_ms:.2f} | {row.fp32_ms / row.int8_ms:.2f}x "
            f"| {row.partitions} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", type=lambda s: s.split(","), default=list(HEAD_LAYOUTS),
                        help=f"comma-separated, of {', '.join(HEAD_LAYOUTS)}")
    parser.add_argument("--size", type=int, default=320, help="input size for every layout")
    parser.add_argument("--calib-count", type=int, default=64)
    parser.add_argument("--eval-count", type=int, default=32)
    parser.add_argument("--runs", type=int, default=40, help="timed invoke() runs per TFLite model")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--keep", type=Path, default=None, help="keep each layout's .pt2 and output folder here")
    args = parser.parse_args()
    unknown = [name for name in args.layouts if name not in HEAD_LAYOUTS]
    if unknown:
        parser.error(f"unknown layouts {unknown}; known: {', '.join(HEAD_LAYOUTS)}")
    torch.set_num_threads(1)
    assets = prepare_demo_assets(ROOT / ".cache" / "mdeploy-demo")

    print(f"CPU: {cpu_line()}")
    print(f"{args.size} px, random weights with BatchNorm statistics from real photos; {args.calib_count} calibration "
          f"crops, {args.eval_count} held-out crops of other photos; int8 cells: worst SNR dB over the outputs, then "
          f"the task's metric; TFLite latency on XNNPACK, 1 thread, median of {args.runs} invoke() runs in "
          "interleaved rounds\n", flush=True)
    print_table(args.layouts, str, lambda layout, work: bench_layout(layout, args, assets, work),
                lambda layout, error: Row(layout, exit_code=-1, error=error), format_row, HEADER, args.keep)

if __name__ == "__main__":
    main()
