"""The ``mdeploy`` command line: convert, check, inspect. Exit codes: see :class:`mdeploy.errors.ExitCode`."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from typer.core import TyperGroup
from rich.console import Console

from calibration.config import QuantRecipe, RangeMethod
from calibration.preprocess import Preprocess
from converters import REGISTRY, Target
from converters.coreml import ComputePrecision, CoremlConverter, DeploymentTarget, InputKind
from converters.tflite import IOType, TfliteConverter
from mdeploy.errors import BadInputError, ExitCode, MdeployError
from mdeploy.pipeline import ConvertOptions, DataOptions, Limits, ModelSource, Provenance, dump_json
from mdeploy.reports import console_table
from mdeploy.ui import ConsoleReporter
from mdeploy.zoo import Arch

class OneLineErrors(TyperGroup):
    """Usage errors (unknown option, invalid choice, missing argument) as one ``error:`` line with exit code 2,
    like every other error of the tool, instead of a usage block (or a boxed panel with rich installed)."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except typer.TyperException as err:  # click's ClickException and its usage errors derive from it
            if not standalone_mode:
                raise
            context = getattr(err, "ctx", None)
            if type(err).__name__ == "NoArgsIsHelpError":  # `mdeploy` alone: the help, as asked for
                print(err.format_message(), file=sys.stderr)
                sys.exit(int(ExitCode.BAD_INPUT))
            hint = f" (see {context.command_path} --help)" if context is not None else ""
            stderr.print(f"[red]error:[/red] {err.format_message()}{hint}", highlight=False, soft_wrap=True)
            sys.exit(int(getattr(err, "exit_code", ExitCode.BAD_INPUT)))
        except typer.Abort:
            if not standalone_mode:
                raise
            stderr.print("[red]interrupted[/red]")
            sys.exit(int(ExitCode.INTERRUPTED))
        if not standalone_mode:
            return result
        sys.exit(result if isinstance(result, int) else 0)


app = typer.Typer(
    name="mdeploy",
    cls=OneLineErrors,
    help="Take trained MobileNets to phones: ONNX, TFLite and CoreML, int8 with proven parity.\n\n"
    "Exit codes: 0 ok, 1 parity failed, 2 bad usage or input, 3 conversion or runtime failure, 130 interrupted.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Tables are read in CI logs too: do not squeeze them to 80 columns when stdout is not a terminal.
stdout = Console(width=None if sys.stdout.isatty() else 160)
stderr = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
T = TypeVar("T")


def run_guarded(debug: bool, action: Callable[[], T]) -> T:
    """Turns every failure into one line on stderr and its exit code (the traceback only with --debug)."""
    try:
        return action()
    except MdeployError as err:
        if debug:
            traceback.print_exc()
        stderr.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(int(err.exit_code)) from None
    except KeyboardInterrupt:
        stderr.print("[red]interrupted[/red]: nothing was written to the output folder")
        raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
    except typer.Exit:
        raise
    except Exception as err:  # a bug or a library failure: still one line, and a way to see more
        if debug:
            traceback.print_exc()
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        stderr.print(f"[red]error:[/red] {type(err).__name__}: {first_line} (run with --debug for the traceback)",
                     highlight=False, soft_wrap=True)
        raise typer.Exit(int(ExitCode.CONVERSION_FAILED)) from None


def parse_targets(value: str) -> tuple[Target, ...]:
    targets = []
    for name in (part.strip() for part in value.split(",") if part.strip()):
        try:
            targets.append(Target(name))
        except ValueError:
            valid = ", ".join(t.value for t in Target)
            raise BadInputError(f"unknown target {name!r} in --to: choose from {valid}") from None
    if not targets:
        raise BadInputError("--to names no target: for example --to onnx,tflite")
    return tuple(dict.fromkeys(targets))


def parse_triple(value: str | None, flag: str) -> tuple[float, float, float] | None:
    if value is None:
        return None
    try:
        numbers = tuple(float(part) for part in value.split(","))
    except ValueError:
        numbers = ()
    if len(numbers) != 3:
        raise BadInputError(f"{flag} takes three comma-separated numbers, e.g. {flag} 0.485,0.456,0.406")
    return numbers  # type: ignore[return-value]


def build_preprocess(input_size: int | None, mean: str | None, std: str | None) -> Preprocess | None:
    if input_size is None and mean is None and std is None:
        return None
    if input_size is not None and not 16 <= input_size <= 4096:
        raise BadInputError(f"--input-size {input_size} is out of range: use 16..4096 (MobileNets use 96..512)")
    preprocess = Preprocess.imagenet(input_size or 224)
    changes: dict[str, Any] = {}
    if (parsed := parse_triple(mean, "--mean")) is not None:
        changes["mean"] = parsed
    if (parsed := parse_triple(std, "--std")) is not None:
        changes["std"] = parsed
    return Preprocess(**{**preprocess.__dict__, **changes}) if changes else preprocess


ModelArg = Annotated[Path, typer.Argument(help="model.pt: a state dict (with --arch), TorchScript or ExportedProgram")]
ArchOpt = Annotated[Arch | None, typer.Option("--arch", help="architecture of a state dict")]
TrustPickleOpt = Annotated[bool, typer.Option("--trust-pickle", help="allow a pickled nn.Module (runs its code)")]
EvalOpt = Annotated[Path | None, typer.Option("--eval", help="parity inputs, disjoint from --calib")]
InputSizeOpt = Annotated[int | None, typer.Option("--input-size", help="square input size [default: 224]")]
MeanOpt = Annotated[str | None, typer.Option("--mean", help="R,G,B mean after /255 [default: ImageNet]")]
StdOpt = Annotated[str | None, typer.Option("--std", help="R,G,B std after /255 [default: ImageNet]")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the result as JSON on stdout")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="show tracebacks")]
ThreadsOpt = Annotated[int, typer.Option("--threads", min=1, help="runtime threads for parity and latency")]
EvalSizeOpt = Annotated[int, typer.Option("--eval-size", min=1, help="at most this many parity inputs")]
MaxAbsOpt = Annotated[float | None, typer.Option("--max-abs-error", help="fp32 limit [default: 1e-4]")]
MinSnrOpt = Annotated[float | None, typer.Option("--min-snr", help="int8 limit in dB [default: 15]")]
MinTop1Opt = Annotated[float | None, typer.Option("--min-top1", help="int8 top-1 agreement limit [default: 0.85]")]


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
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a non-empty --out folder")] = False,
    tflite_io: Annotated[IOType, typer.Option(
        "--tflite-io", help="type of the int8 TFLite model's input and output")] = IOType.int8,
    coreml_precision: Annotated[ComputePrecision | None, typer.Option(
        "--coreml-precision", help="Core ML compute precision [default: fp32 for fp32, fp16 for int8]")] = None,
    coreml_input: Annotated[InputKind, typer.Option(
        "--coreml-input", help="Core ML input: a preprocessed tensor, or an image (normalisation inside)")]
    = InputKind.tensor,
    coreml_target: Annotated[DeploymentTarget, typer.Option(
        "--coreml-target", help="Core ML minimum deployment target (W8A8 needs iOS17)")] = DeploymentTarget.iOS17,
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
            limits=Limits(max_abs_error, min_snr, min_top1),
            overwrite=overwrite,
            threads=threads,
            converters=(
                TfliteConverter(io=tflite_io),
                CoremlConverter(compute_precision=coreml_precision, minimum_target=coreml_target,
                                image_input=coreml_input is InputKind.image, activations=not coreml_weights_only),
            ),
        )
        return run_convert(options, ConsoleReporter(quiet=json_output))

    result = run_guarded(debug, action)
    if json_output:
        print(dump_json(result.manifest))
    else:
        stdout.print(console_table(result.manifest))
        stdout.print(f"wrote {result.out}/ (manifest.json, SUMMARY.md)", highlight=False)
    if not result.passed:
        raise typer.Exit(int(ExitCode.PARITY_FAILED))


@app.command()
def check(
    artifact: Annotated[Path, typer.Argument(help="an artifact file or an mdeploy output folder")],
    model: Annotated[Path, typer.Option("--model", help="the PyTorch model it was converted from")],
    eval_dir: EvalOpt = None,
    arch: ArchOpt = None,
    input_size: InputSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    eval_size: EvalSizeOpt = 500,
    max_abs_error: MaxAbsOpt = None,
    min_snr: MinSnrOpt = None,
    min_top1: MinTop1Opt = None,
    threads: ThreadsOpt = 1,
    trust_pickle: TrustPickleOpt = False,
    json_output: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Check parity of ARTIFACT (or every artifact of an output folder) against the PyTorch model."""
    from mdeploy.check import CheckOptions
    from mdeploy.check import check as run_check

    def action() -> Any:
        options = CheckOptions(
            artifact=artifact,
            model=ModelSource(model, arch, trust_pickle),
            data=DataOptions(eval=eval_dir, eval_size=eval_size),
            preprocess=build_preprocess(input_size, mean, std),
            limits=Limits(max_abs_error, min_snr, min_top1),
            threads=threads,
        )
        return run_check(options, ConsoleReporter(quiet=json_output))

    results = run_guarded(debug, action)
    passed = all(r.parity.passed for r in results)
    if json_output:
        print(dump_json({"passed": passed, "artifacts": [r.to_dict() for r in results]}))
    else:
        from rich.table import Table

        table = Table(title=f"parity vs PyTorch on {results[0].parity.inputs}")
        for header in ("artifact", "runtime", "max abs err", "SNR dB", "top-1", "top-5", "parity"):
            table.add_column(header)
        for r in results:
            m = r.parity.metrics
            verdict = "pass" if r.parity.passed else "FAIL: " + "; ".join(r.parity.failures)
            table.add_row(r.path.name, r.runtime, f"{m.max_abs_error:.2e}", f"{m.snr_db:.1f}",
                          f"{m.top1_agreement:.1%}", f"{m.top5_agreement:.1%}", verdict,
                          style=None if r.parity.passed else "red")
        stdout.print(table)
    if not passed:
        raise typer.Exit(int(ExitCode.PARITY_FAILED))


@app.command()
def inspect(
    artifact: Annotated[Path, typer.Argument(help="an artifact file (.onnx, ...)")],
    json_output: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Show an artifact's inputs, outputs, op histogram, size and quantisation parameters."""
    from mdeploy.check import target_of

    def action() -> dict[str, Any]:
        if not artifact.exists():
            raise BadInputError(f"{artifact} does not exist: pass an artifact file")
        converter = REGISTRY[target_of(artifact)]
        try:
            return converter.inspect(artifact)
        except Exception as err:  # the format library's own parse errors
            raise BadInputError(f"{artifact} cannot be read as {converter.target.value} ({err}): is it corrupt?") from err

    report = run_guarded(debug, action)
    if json_output:
        print(dump_json(report))
        return
    quant = report.pop("activation_quantization", [])
    metadata = report.pop("metadata", {})
    for key, value in report.items():
        stdout.print(f"[bold]{key}[/bold]: {json.dumps(value) if not isinstance(value, str) else value}",
                     highlight=False, soft_wrap=True)
    if quant:
        stdout.print(f"[bold]int8 activations[/bold]: {len(quant)} tensors, e.g. "
                     + ", ".join(f"{q['tensor']} (scale {q['scale']}, zp {q['zero_point']})" for q in quant[:3]),
                     highlight=False, soft_wrap=True)
    for key, value in metadata.items():
        shown = value if len(value) < 200 else value[:200] + "…"
        stdout.print(f"[bold]metadata {key}[/bold]: {shown}", highlight=False, soft_wrap=True)


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover - python -m mdeploy.cli
    main()
