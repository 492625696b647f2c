"""Options shared by several commands, and the parsers of their values."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mdeploy.calibration.preprocess import Preprocess
from mdeploy.types import Precision, Target
from mdeploy.config import GateConfig, find_config, load_config
from mdeploy.errors import BadInputError
from mdeploy.zoo import Arch


def parse_targets(value: str) -> tuple[Target, ...]:
    from mdeploy.converters import REGISTRY

    targets = []
    for name in (part.strip() for part in value.split(",") if part.strip()):
        if name not in REGISTRY:
            raise BadInputError(f"unknown target {name!r} in --to: choose from {', '.join(REGISTRY)}")
        targets.append(Target(name))
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
        if not all(value > 0 for value in parsed):
            raise BadInputError(f"--std {std} must be three positive numbers (they divide the pixels), "
                                "e.g. --std 0.229,0.224,0.225")
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
MaxAbsOpt = Annotated[float | None, typer.Option(
    "--max-abs-error", help="absolute fp32 limit [default: max(1e-4, 7.5e-5 * peak |PyTorch output|)]")]
MinSnrOpt = Annotated[float | None, typer.Option("--min-snr", help="int8 limit in dB [default: 15]")]
MinTop1Opt = Annotated[float | None, typer.Option("--min-top1", help="int8 top-1 agreement limit [default: 0.85]")]
ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", help="thresholds and tolerances: an mdeploy.toml or a pyproject.toml with [tool.mdeploy] "
    "[default: the one in the current folder, if any]")]
ReportOpt = Annotated[Path | None, typer.Option(
    "--report", help="folder for report.json, junit.xml, summary.md and report.html (replaced as a whole)")]
BaselineOpt = Annotated[Path | None, typer.Option(
    "--baseline", help="an earlier report.json: fail on accuracy or latency regressions beyond the tolerances")]
PrecisionOpt = Annotated[Precision | None, typer.Option(
    "--precision", help="the artifacts' precision (which limits apply), overriding what the file names say "
    "(NAME.fp32.*, NAME.int8.*) and what the files hold (Q/DQ nodes, int8 tensors, quantize ops) "
    "[default: from the name, else from the file]")]


def gate_config(path: Path | None) -> GateConfig:
    """The --config file, else mdeploy.toml / pyproject.toml [tool.mdeploy] in the current folder, else defaults."""
    return load_config(path if path is not None else find_config(Path.cwd()))
