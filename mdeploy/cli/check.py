"""``mdeploy check``: the CI gate."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from mdeploy.cli.app import app, run_guarded, stdout
from mdeploy.cli.output import finish
from mdeploy.cli.options import (
    ArchOpt, BaselineOpt, ConfigOpt, DebugOpt, EvalOpt, EvalSizeOpt, InputSizeOpt, JsonOpt, MaxAbsOpt, MeanOpt,
    MinSnrOpt, MinTop1Opt, PrecisionOpt, ReportOpt, StdOpt, ThreadsOpt, TrustPickleOpt, build_preprocess, gate_config,
)
from mdeploy.errors import BadInputError
from mdeploy.records import DataOptions, Limits, ModelSource
from mdeploy.reporting.common import limit_notes
from mdeploy.reports import fmt
from mdeploy.ui import ConsoleReporter


def parity_table(report: dict[str, Any]) -> Table:
    notes = limit_notes(report["artifacts"])
    table = Table(title=f"parity vs PyTorch on {report['inputs']}",
                  caption="limits: " + "; ".join(notes) if notes else None, caption_justify="left")
    for header in ("artifact", "runtime", "max abs err", "SNR dB", "top-1", "top-5", "parity"):
        table.add_column(header)
    for artifact in report["artifacts"]:
        parity, m = artifact["parity"], artifact["parity"]["metrics"]
        verdict = "pass" if parity["passed"] else "FAIL: " + "; ".join(parity["failures"])
        table.add_row(artifact["file"], artifact["runtime"], fmt(m["max_abs_error"], ".2e"), fmt(m["snr_db"], ".1f"),
                      fmt(m.get("top1_agreement", "-"), ".1%"), fmt(m.get("top5_agreement", "-"), ".1%"), verdict,
                      style=None if parity["passed"] else "red")
    return table


def agreement_table(matrix: dict[str, Any]) -> Table:
    table = Table(title="cross-runtime top-1 agreement (row vs column, same inputs)")
    table.add_column("")
    for name in matrix["artifacts"]:
        table.add_column(name, justify="right")
    for name, row in zip(matrix["artifacts"], matrix["top1"], strict=True):
        table.add_row(name, *(f"{value:.1%}" for value in row))
    return table


class Platform(str, Enum):
    host = "host"
    linux_arm64 = "linux-arm64"


def arm_cpus(platform: Platform, cpu: str | None) -> tuple[str, ...]:
    from mdeploy.arm import DEFAULT_CPUS, parse_cpu_list

    if platform is Platform.host:
        if cpu is not None:
            raise BadInputError("--cpu chooses emulated ARM CPUs: add --platform linux-arm64")
        return ()
    return tuple(parse_cpu_list(cpu)) if cpu else tuple(DEFAULT_CPUS)


def arm_table(arm: dict[str, Any]) -> Table:
    table = Table(title=f"emulated ARM ({arm['emulator']}, {arm['samples']} samples; parity only, no latency)")
    for header in ("artifact", "cpu", "SNR dB", "top-1", "int8 codes vs x86", "parity"):
        table.add_column(header)
    for row in arm["results"]:
        m, parity = row["parity"]["metrics"], row["parity"]
        table.add_row(row["artifact"], row["cpu"], fmt(m["snr_db"], ".1f"), fmt(m.get("top1_agreement", "-"), ".1%"),
                      row["summary"].split(": ", 1)[1],
                      "pass" if parity["passed"] else "FAIL: " + "; ".join(parity["failures"]),
                      style=None if parity["passed"] else "red")
    return table


def print_report(report: dict[str, Any]) -> None:
    stdout.print(parity_table(report))
    if report["agreement"]:
        stdout.print(agreement_table(report["agreement"]))
    for artifact in report["artifacts"]:
        diagnosis = artifact["diagnosis"]
        if diagnosis is None:
            continue
        if "unavailable_reason" in diagnosis:
            stdout.print(f"diagnosis of {artifact['file']}: {diagnosis['unavailable_reason']}", highlight=False)
            continue
        jump = diagnosis["first_jump"]
        worst = ", ".join(layer['source'] for layer in diagnosis['worst'])
        stdout.print(f"diagnosis of {artifact['file']}: first jump at "
                     f"{jump['source'] if jump else 'no layer (the error grows smoothly)'}; "
                     f"worst layers: {worst}", highlight=False, soft_wrap=True)
    if report["arm"]:
        stdout.print(arm_table(report["arm"]))
        for item in report["arm"]["skipped"]:
            stdout.print(f"not run on emulated ARM: {item['artifact']} ({item['reason']})", highlight=False,
                         soft_wrap=True)
    if report["bench"]:
        from mdeploy.cli.bench import bench_table

        stdout.print(bench_table(report["bench"]))
    baseline = report["baseline"]
    if baseline is not None and baseline["passed"]:
        stdout.print(f"no regression against {baseline['file']}", highlight=False)


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
    config: ConfigOpt = None,
    explain: Annotated[bool, typer.Option(
        "--explain", help="per-layer diagnosis of every artifact (failing ones always get one)")] = False,
    baseline: BaselineOpt = None,
    bench: Annotated[bool, typer.Option(
        "--bench", help="also time each artifact of the folder (at --threads) into the same report")] = False,
    report_dir: ReportOpt = None,
    platform: Annotated[Platform, typer.Option(
        "--platform", help="also run the ONNX/TFLite artifacts on emulated ARM CPUs (needs `mdeploy arm setup`)")]
    = Platform.host,
    cpu: Annotated[str | None, typer.Option(
        "--cpu", help="emulated ARM CPU models, comma-separated [default: cortex-a53,neoverse-n1,neoverse-v1]")]
    = None,
    threads: ThreadsOpt = 1,
    precision: PrecisionOpt = None,
    trust_pickle: TrustPickleOpt = False,
    json_output: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Check parity of ARTIFACT (or every artifact of an output folder) against the PyTorch model.

    Exit code 1 when a limit is missed or --baseline finds a regression; 2 when an artifact no longer matches the
    folder's SHA256SUMS or a manifest path leads outside the folder; reports with --report and --json.
    """
    from mdeploy.bench import BenchOptions
    from mdeploy.check import CheckOptions
    from mdeploy.check import check as run_check
    from mdeploy.reporting.folder import write_report_folder

    def action() -> dict[str, Any]:
        gate = gate_config(config)
        options = CheckOptions(
            artifact=artifact,
            model=ModelSource(model, arch, trust_pickle),
            data=DataOptions(eval=eval_dir, eval_size=eval_size),
            preprocess=build_preprocess(input_size, mean, std),
            limits=Limits(max_abs_error, min_snr, min_top1, gate.thresholds),
            threads=threads,
            explain=explain,
            baseline=baseline,
            tolerances=gate.tolerances,
            bench=BenchOptions(artifact, (threads,), precision=precision) if bench else None,
            arm_cpus=arm_cpus(platform, cpu),
            precision=precision,
        )
        report = run_check(options, ConsoleReporter(quiet=json_output)).to_dict()
        if report_dir is not None:
            inputs = (artifact, model, *(p for p in (eval_dir, baseline, config) if p is not None))
            write_report_folder(report, report_dir, inputs)
        return report

    finish(run_guarded(debug, action), json_output, report_dir, print_report)
