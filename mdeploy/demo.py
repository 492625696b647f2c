"""The built-in real example: torchvision's ImageNet MobileNetV2 to int8 with parity on real photos.

Run with ``./run demo`` (or ``python -m mdeploy.demo``). Weights and photos come from registry packages
(see mdeploy.demo_assets); nothing is downloaded from a model hub. ``./run demo --ocr`` runs the other example,
PaddleOCR's trained PP-OCRv3 text detector (mdeploy.demo_ocr).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mdeploy import demo_ocr
from mdeploy.converters import REGISTRY, Precision, Target
from mdeploy.cli import run_guarded
from mdeploy.demo_assets import default_cache_dir, prepare_demo_assets
from mdeploy.parity import run_batches, top_labels
from mdeploy.pipeline import ConvertResult, convert
from mdeploy.records import ConvertOptions, DataOptions, ModelSource
from mdeploy.reports import console_table
from mdeploy.ui import ConsoleReporter
from mdeploy.zoo import Arch

EXAMPLES = 8


def predictions_table(result: ConvertResult, labels: list[str]) -> Table:
    evaluation = result.evaluation
    picks = list(range(0, len(evaluation.inputs), max(1, len(evaluation.inputs) // EXAMPLES)))[:EXAMPLES]
    table = Table(title="predictions on held-out photo crops (PyTorch fp32 vs int8 artifacts)")
    table.add_column("photo crop")
    table.add_column("PyTorch fp32")
    columns = []
    for artifact in result.artifacts:
        if artifact.precision is Precision.int8:
            run = REGISTRY[artifact.target].runner(result.out / artifact.path)
            outputs = run_batches(run, evaluation.inputs[picks])
            columns.append(top_labels(outputs, labels))
            table.add_column(f"{artifact.target.value} int8")
    reference = top_labels(evaluation.reference[picks], labels)
    for row, index in enumerate(picks):
        cells = [Path(evaluation.paths[index]).name, reference[row][0]]
        for column in columns:
            label = column[row][0]
            cells.append(label if label == reference[row][0] else f"[yellow]{label}[/yellow]")
        table.add_row(*cells)
    return table


def main(out: Path = Path("out/demo"), targets: str = "onnx,tflite") -> int:
    console = Console(width=None if sys.stdout.isatty() else 160)
    reporter = ConsoleReporter()
    out.parent.mkdir(parents=True, exist_ok=True)
    assets = run_guarded(False, lambda: prepare_demo_assets(default_cache_dir()))
    options = ConvertOptions(
        model=ModelSource(assets.weights, Arch.mobilenet_v2),
        out=out,
        targets=tuple(Target(t) for t in targets.split(",")),
        int8=True,
        data=DataOptions(calib=assets.calib_dir, eval=assets.eval_dir, calib_size=200, eval_size=320),
        labels=assets.labels,
        overwrite=True,
    )
    result = run_guarded(False, lambda: convert(options, reporter))
    console.print(console_table(result.manifest))
    labels = assets.labels.read_text(encoding="utf-8").splitlines()
    console.print(predictions_table(result, labels))
    console.print(f"hand-off bundle in {out}/: artifacts, manifest.json, golden/, README_android.md, SHA256SUMS; "
                  f"check it with the runtimes alone: .venv/bin/python {out}/verify_bundle.py")
    return 0 if result.passed else 1


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def demo(
    ocr: Annotated[bool, typer.Option(
        "--ocr", help="the text detector instead: PaddleOCR's trained PP-OCRv3 det to fp32 + int8 ONNX, TFLite and "
                      "Core ML, calibrated and checked on rendered words, with its text boxes")] = False,
    out: Annotated[Path | None, typer.Option(
        "--out", help="output folder \\[default: out/demo, with --ocr out/demo-ocr]")] = None,
    targets: Annotated[str | None, typer.Option(
        "--targets", help="comma-separated \\[default: onnx,tflite, with --ocr onnx,tflite,coreml]")] = None,
    size: Annotated[int | None, typer.Option(
        "--size", help="--ocr: square input side, a multiple of 32 \\[default: 256]")] = None,
    calib_count: Annotated[int | None, typer.Option(
        "--calib-count", min=16, help="--ocr: calibration renders \\[default: 48]")] = None,
    eval_count: Annotated[int | None, typer.Option(
        "--eval-count", min=1, help="--ocr: held-out renders \\[default: 24]")] = None,
) -> None:
    """Convert a real trained model end to end and print what its int8 artifacts get right (default: torchvision's
    ImageNet MobileNetV2 on real photos). Exit code 1 when the demo's parity gate fails."""
    if not ocr:
        given = [flag for flag, value in (("--size", size), ("--calib-count", calib_count),
                                          ("--eval-count", eval_count)) if value is not None]
        if given:
            verb = "apply" if len(given) > 1 else "applies"
            raise typer.BadParameter(f"{', '.join(given)} {verb} only to the text detector: add --ocr")
        if targets is not None:
            run_guarded(False, lambda: demo_ocr.parse_targets(targets))
        raise typer.Exit(main(out or Path("out/demo"), targets or "onnx,tflite"))
    raise typer.Exit(demo_ocr.main(out or demo_ocr.OUT, targets or demo_ocr.TARGETS, size or demo_ocr.SIZE,
                                   calib_count or demo_ocr.CALIB_RENDERS, eval_count or demo_ocr.EVAL_RENDERS))


def run() -> int:
    """``python -m mdeploy.demo [--ocr ...]``: the exit code (run_guarded prints a failure's one-line error; a bad
    option gets typer's usage message and 2)."""
    try:
        app()
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
    return 0


if __name__ == "__main__":
    sys.exit(run())
