"""``mdeploy convert``."""

from __future__ import annotations

import copy
import functools
import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from mdeploy.calibration.config import QuantRecipe, RangeMethod
from mdeploy.calibration.preprocess import Preprocess
from mdeploy.converters import REGISTRY, Converter
from mdeploy.converters.base import CliOption
from mdeploy.detection import read_spec
from mdeploy.families import help_epilog
from mdeploy.types import Target
from mdeploy.cli.app import app, print_error, run_guarded, stdout
from mdeploy.cli.options import (
    ArchOpt, ConfigOpt, DebugOpt, EvalOpt, EvalSizeOpt, InputSizeOpt, JsonOpt, MaxAbsOpt, MeanOpt, MinSnrOpt, MinTop1Opt,
    ModelArg, StdOpt, ThreadsOpt, TrustPickleOpt, build_preprocess, gate_config, parse_targets,
)
from mdeploy.errors import BadInputError, ExitCode
from mdeploy.cli.output import dump_json
from mdeploy.records import ConvertOptions, DataOptions, Limits, ModelSource, Provenance
from mdeploy.reports import console_table, detection_table
from mdeploy.ui import ConsoleReporter


def convert(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", help="output folder (written atomically)")],
    to: Annotated[str, typer.Option("--to", help="targets, comma-separated: {targets}")] = "onnx",
    arch: ArchOpt = None,
    int8: Annotated[bool, typer.Option("--int8", help="also write int8 artifacts (needs --calib)")] = False,
    calib: Annotated[Path | None, typer.Option("--calib", help="calibration images or .npy/.npz")] = None,
    eval_dir: EvalOpt = None,
    labels: Annotated[Path | None, typer.Option("--labels", help="class names, one per line")] = None,
    detector: Annotated[Path | None, typer.Option(
        "--detector", help="a detector spec (TOML): which outputs are box regression and class logits, the anchors "
        "(.npy), box coder scales, score function; adds detection parity and ships the anchors (see README)")] = None,
    input_size: InputSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    calib_size: Annotated[int, typer.Option("--calib-size", min=1, help="calibration samples to use")] = 200,
    eval_size: EvalSizeOpt = 500,
    calib_method: Annotated[RangeMethod | None, typer.Option("--calib-method", help="activation range method")] = None,
    target_snr: Annotated[float | None, typer.Option(
        "--target-snr", min=1.0, max=80.0, help="mixed precision: keep the fewest layers in float so that the int8 "
        "model's SNR reaches this many dB on a quarter of the calibration samples held back from the quantiser "
        "(needs --int8; float layers cost latency: SUMMARY.md and manifest.json say which and how many)")] = None,
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
    author: Annotated[str, typer.Option("--author", help="written into each artifact's metadata")] = "",
    license_: Annotated[str, typer.Option("--license", help="licence of the model, into each artifact's metadata")] = "",
    description: Annotated[str, typer.Option("--description", help="one line on what the model does")] = "",
    model_version: Annotated[str, typer.Option("--model-version", help="the model's own version string")] = "",
    trust_pickle: TrustPickleOpt = False,
    json_output: JsonOpt = False,
    debug: DebugOpt = False,
    *,
    target_values: Mapping[str, Any] | None = None,  # the registered targets' own options (see WithTargetOptions)
) -> None:
    """Convert MODEL to the chosen targets, check parity against PyTorch, and write the output folder."""
    from mdeploy.pipeline import convert as run_convert

    def action() -> Any:
        targets = parse_targets(to)
        converters = configured_converters(targets, target_values or {}, int8)
        recipe = QuantRecipe.default()
        if calib_method is not None:
            recipe = replace(recipe, range_method=calib_method)
        if target_snr is not None:
            if not int8:
                raise BadInputError(f"--target-snr {target_snr:g} chooses layers of the int8 model: add --int8 "
                                    "--calib DIR, or leave --target-snr out")
            recipe = replace(recipe, target_snr_db=target_snr)
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
            converters=converters,
            detector=read_spec(detector) if detector is not None else None,
        )
        return run_convert(options, ConsoleReporter(quiet=json_output))

    result = run_guarded(debug, action)
    if json_output:
        print(dump_json(result.manifest.to_dict()))
    else:
        stdout.print(console_table(result.manifest))
        if (detections := detection_table(result.manifest)) is not None:
            stdout.print(detections)
        stdout.print(f"wrote {result.out}/ (manifest.json, SUMMARY.md)", highlight=False)
    for failure in result.failures:
        print_error(f"{failure.target} {failure.precision}: {failure.error}")
    if result.failures:
        raise typer.Exit(int(ExitCode.CONVERSION_FAILED))
    if not result.passed:
        failed = "; ".join(f"{a.path}: {', '.join(a.parity.failures)}" for a in result.artifacts if not a.parity.passed)
        print_error(f"parity failed: {failed} (artifacts written, marked failed in manifest.json)")
        raise typer.Exit(int(ExitCode.PARITY_FAILED))


def configured_converters(targets: tuple[Target, ...], values: Mapping[str, Any], int8: bool
                          ) -> tuple[Converter, ...]:
    """Each chosen target's converter with the user's values of its options (an option left out keeps its default)."""
    chosen = []
    for target in targets:
        converter = REGISTRY[target]
        own = {option.name: values.get(option.name, option.default) for option in converter.cli_options()}
        chosen.append(converter.configured(own, int8))
    return tuple(chosen)


def target_options() -> list[CliOption]:
    return [option for converter in REGISTRY.values() for option in converter.cli_options()]


def _with_target_names(annotation: Any) -> Any:
    """An option whose help says ``{targets}`` lists the registered targets there."""
    extras = getattr(annotation, "__metadata__", ())
    info = next((e for e in extras if isinstance(getattr(e, "help", None), str) and "{targets}" in e.help), None)
    if info is None:
        return annotation
    named = copy.copy(info)
    named.help = info.help.replace("{targets}", ",".join(REGISTRY))
    return Annotated[(annotation.__origin__, *(named if e is info else e for e in extras))]


class WithTargetOptions:
    """A command whose signature is its own parameters followed by every registered target's ``cli_options()``.

    typer reads a command's signature each time it builds the CLI, so the options come from ``REGISTRY`` as it is
    then (a target registered later, e.g. by a test, gets its flags) and no target's option is written here. The
    targets' values reach the command as one ``target_values`` mapping."""

    def __init__(self, command: Callable[..., Any]) -> None:
        functools.update_wrapper(self, command, assigned=("__module__", "__name__", "__qualname__", "__doc__"),
                                 updated=())
        self.command = command

    def _own(self) -> list[inspect.Parameter]:
        signature = inspect.signature(self.command, eval_str=True)
        hints = typing.get_type_hints(self.command, include_extras=True)
        return [p.replace(annotation=_with_target_names(hints[p.name])) for p in signature.parameters.values()
                if p.kind is not inspect.Parameter.KEYWORD_ONLY]

    @staticmethod
    def _parameter(option: CliOption) -> inspect.Parameter:
        annotation = Annotated[option.annotation, typer.Option(option.flag, help=option.help)]
        return inspect.Parameter(option.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=option.default,
                                 annotation=annotation)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.Signature(self._own() + [self._parameter(option) for option in target_options()])

    @property
    def __annotations__(self) -> dict[str, Any]:  # type: ignore[override]  # read by typing.get_type_hints
        return {p.name: p.annotation for p in self.__signature__.parameters.values()}

    def __call__(self, **values: Any) -> Any:
        names = {option.name for option in target_options()}
        mine = {name: value for name, value in values.items() if name in names}
        return self.command(**{k: v for k, v in values.items() if k not in names}, target_values=mine)


app.command(name="convert", epilog=help_epilog())(WithTargetOptions(convert))
