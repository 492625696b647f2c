"""The built-in real example: torchvision's ImageNet MobileNetV2 to int8 with parity on real photos.

Run with ``./run demo`` (or ``python -m mdeploy.demo``). Weights and photos come from registry packages
(see mdeploy.demo_assets); nothing is downloaded from a model hub.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

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


def run() -> int:
    try:
        return main()
    except typer.Exit as stop:  # run_guarded already printed the one-line error
        return stop.exit_code


if __name__ == "__main__":
    sys.exit(run())
