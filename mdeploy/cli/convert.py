"""``mdeploy convert``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from mdeploy.calibration.config import QuantRecipe, RangeMethod
from mdeploy.calibration.preprocess import Preprocess
from mdeploy.types import Target
from mdeploy.converters.coreml import ComputePrecision, ComputeUnits, CoremlConverter, DeploymentTarget, InputKind
from mdeploy.converters.tflite import IOType, TfliteConverter
from mdeploy.cli.app import app, print_error, run_guarded, stdout
from mdeploy.cli.options import (
    ArchOpt, ConfigOpt, DebugOpt, EvalOpt, EvalSizeOpt, InputSizeOpt, JsonOpt, MaxAbsOpt, MeanOpt, MinSnrOpt, MinTop1Opt,
    ModelArg, StdOpt, ThreadsOpt, TrustPickleOpt, build_preprocess, gate_config, parse_targets,
)
from mdeploy.errors import BadInputError, ExitCode
from mdeploy.cli.output import dump_json
from mdeploy.records import ConvertOptions, DataOptions, Limits, ModelSource, Provenance
from mdeploy.reports import console_table
from mdeploy.ui import ConsoleReporter


@app.command()
def convert(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", help="output folder (written atomically)")],
    to: Annotated[str, typer.Option("--to", help="targets, comma-separated: onnx,tflite,coreml")] = "onnx",
    arch: ArchOpt = None,
    int8: Annotated[bool, typer.Option("--int8", help="also write int8 artifacts (needs --calib)")] = False,
    calib: Annotated[Path | None, typer.Option("--calib", help="calibration images or .npy/.npz")] = None,
    eval_dir: EvalOpt = None,
    labels: Annotated[Path | None, typer.Option("--labels", help="class names, one per line")] = None,
    input_size: InputSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    calib_size: Annotated[int, typer.Option("--calib-size", min=1, help="calibration samples to use")] = 200,
    eval_size: EvalSizeOpt = 500,
    calib_method: Annotated[RangeMethod | None, typer.Option("--calib-method", help="activation range method")] = None,
    max_abs_error: MaxAbsOpt = None,
    min_snr: MinSnrOpt = None,
    min_top1: MinTop1Opt = None,
    threads: ThreadsOpt = 1,
    seed: Annotated[int, typer.Option("--seed", help="sample order seed")] = 0,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="replace a non-empty --out folder that an earlier mdeploy run wrote")] = False,
    overwrite_any: Annotated[bool, typer.Option(
        "--overwrite-any", help="replace --out even if mdeploy did not write it (never if it holds an input)")]
    = False,
    keep_going: Annotated[bool, typer.Option(
        "--keep-going", help="when a target fails to convert, record it and still write the others (exit 3)")] = False,
    config: ConfigOpt = None,
    tflite_io: Annotated[IOType, typer.Option(
        "--tflite-io", help="type of the int8 TFLite model's input and output")] = IOType.int8,
    coreml_precision: Annotated[ComputePrecision | None, typer.Option(
        "--coreml-precision", help="Core ML compute precision [default: fp32 for fp32, fp16 for int8]")] = None,
    coreml_input: Annotated[InputKind, typer.Option(
        "--coreml-input", help="Core ML input: a preprocessed tensor, or an image (normalisation inside)")]
    = InputKind.tensor,
    coreml_target: Annotated[DeploymentTarget, typer.Option(
        "--coreml-target", help="Core ML minimum deployment target (W8A8 needs iOS17)")] = DeploymentTarget.iOS17,
    coreml_compute_units: Annotated[ComputeUnits, typer.Option(
        "--coreml-compute-units", help="Core ML compute units for parity runs on macOS (elsewhere the MIL reference "
        "runs)")] = ComputeUnits.ALL,
    coreml_weights_only: Annotated[bool, typer.Option(
        "--coreml-weights-only", help="int8 Core ML: int8 weights only (W8), activations stay float")] = False,
    author: Annotated[str, typer.Option("--author", help="written into each artifact's metadata")] = "",
    license_: Annotated[str, typer.Option("--license", help="licence of the model, into each artifact's metadata")] = "",
    description: Annotated[str, typer.Option("--description", help="one line on what the model does")] = "",
    model_version: Annotated[str, typer.Option("--model-version", help="the model's own version string")] = "",
    trust_pickle: TrustPickleOpt = False,
    json_output: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Convert MODEL to the chosen targets, check parity against PyTorch, and write the output folder."""
    from mdeploy.pipeline import convert as run_convert

    def action() -> Any:
        targets = parse_targets(to)
        w8a8 = int8 and Target.coreml in targets and not coreml_weights_only
        if w8a8 and list(DeploymentTarget).index(coreml_target) < list(DeploymentTarget).index(DeploymentTarget.iOS17):
            raise BadInputError(f"int8 Core ML (W8A8) needs --coreml-target iOS17 or later, not {coreml_target.value}: "
                                "raise the target or pass --coreml-weights-only")
        recipe = QuantRecipe.default()
        if calib_method is not None:
            recipe = replace(recipe, range_method=calib_method)
        options = ConvertOptions(
            model=ModelSource(model, arch, trust_pickle),
            out=out,
            targets=targets,
            int8=int8,
            data=DataOptions(calib, eval_dir, calib_size, eval_size, seed),
            preprocess=build_preprocess(input_size, mean, std) or Preprocess.imagenet(),
            labels=labels,
            provenance=Provenance(author, license_, description, model_version),
            recipe=recipe,
            limits=Limits(max_abs_error, min_snr, min_top1, gate_config(config).thresholds),
            overwrite=overwrite,
            overwrite_any=overwrite_any,
            keep_going=keep_going,
            threads=threads,
            converters=(
                TfliteConverter(io=tflite_io),
                CoremlConverter(compute_precision=coreml_precision, minimum_target=coreml_target,
                                image_input=coreml_input is InputKind.image, activations=not coreml_weights_only,
                                compute_units=coreml_compute_units),
            ),
        )
        return run_convert(options, ConsoleReporter(quiet=json_output))

    result = run_guarded(debug, action)
    if json_output:
        print(dump_json(result.manifest.to_dict()))
    else:
        stdout.print(console_table(result.manifest))
        stdout.print(f"wrote {result.out}/ (manifest.json, SUMMARY.md)", highlight=False)
    for failure in result.failures:
        print_error(f"{failure.target} {failure.precision}: {failure.error}")
    if result.failures:
        raise typer.Exit(int(ExitCode.CONVERSION_FAILED))
    if not result.passed:
        failed = "; ".join(f"{a.path}: {', '.join(a.parity.failures)}" for a in result.artifacts if not a.parity.passed)
        print_error(f"parity failed: {failed} (artifacts written, marked failed in manifest.json)")
        raise typer.Exit(int(ExitCode.PARITY_FAILED))
