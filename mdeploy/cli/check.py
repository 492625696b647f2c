"""``mdeploy check``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mdeploy.cli.app import app, run_guarded, stdout
from mdeploy.cli.options import (
    ArchOpt, DebugOpt, EvalOpt, EvalSizeOpt, InputSizeOpt, JsonOpt, MaxAbsOpt, MeanOpt, MinSnrOpt, MinTop1Opt,
    StdOpt, ThreadsOpt, TrustPickleOpt, build_preprocess,
)
from mdeploy.errors import ExitCode
from mdeploy.pipeline import DataOptions, Limits, ModelSource, dump_json
from mdeploy.ui import ConsoleReporter


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
