"""``mdeploy bench``: latency, size and peak memory of every artifact in an output folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from mdeploy.cli.app import app, print_error, run_guarded, stdout
from mdeploy.cli.output import finish
from mdeploy.cli.options import BaselineOpt, ConfigOpt, DebugOpt, JsonOpt, PrecisionOpt, ReportOpt, gate_config
from mdeploy.errors import BadInputError
from mdeploy.ui import ConsoleReporter


def parse_threads(value: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise BadInputError(f"--threads {value!r}: give thread counts >= 1, comma-separated, e.g. --threads 1,2,4")
    return tuple(dict.fromkeys(counts))


def bench_table(report: dict[str, Any]) -> Table:
    table = Table(title=f"latency on {report['machine']['cpu']} ({report['machine']['note']}), batch 1")
    for header in ("artifact", "runtime", "threads", "p50 ms", "p90 ms", "p99 ms", "size", "peak memory", "status"):
        table.add_column(header, justify="left" if header in ("artifact", "runtime", "status") else "right")
    for row in report["rows"]:
        def ms(key: str, row: dict[str, Any] = row) -> str:
            return f"{row[key]:.2f}" if row[key] is not None else "-"

        size = f"{row['size_bytes'] / 1e6:.1f} MB" if row["size_bytes"] is not None else "-"
        memory = f"{row['peak_memory_mb']:.0f} MB" if row["peak_memory_mb"] is not None else "-"
        status = row["status"] + (f": {row['reason']}" if row["reason"] else "")
        table.add_row(row["file"], row["runtime"] or "-", str(row["threads"]), ms("p50_ms"), ms("p90_ms"),
                      ms("p99_ms"), size, memory, status, style=None if row["status"] == "passed" else "yellow")
    return table


@app.command()
def bench(
    folder: Annotated[Path, typer.Argument(help="an mdeploy output folder (from mdeploy convert --out)")],
    threads: Annotated[str, typer.Option("--threads", help="thread counts to sweep, comma-separated")] = "1,2",
    runs: Annotated[int, typer.Option("--runs", min=5, help="timed runs per artifact and thread count")] = 50,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="untimed runs first")] = 10,
    precision: PrecisionOpt = None,
    baseline: BaselineOpt = None,
    config: ConfigOpt = None,
    report_dir: ReportOpt = None,
    json_output: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Time every artifact of FOLDER on its runtime: p50/p90/p99 per thread count, size, peak memory, status.

    Emulated or reference runtimes are never timed (their rows say why). Exit code 1 when --baseline finds a
    latency regression beyond the tolerance. Exit code 2 when an artifact is not what was converted (status
    "checksum mismatch": it differs from SHA256SUMS) or cannot be loaded or run (status "failed"), after the others
    are timed.
    """
    from mdeploy.baseline import compare_with_baseline
    from mdeploy.bench import BenchOptions, bench_folder, bench_problems
    from mdeploy.reporting.folder import write_report_folder

    def action() -> dict[str, Any]:
        options = BenchOptions(folder, parse_threads(threads), runs, warmup, precision)
        tolerances = gate_config(config).tolerances
        report = bench_folder(options, ConsoleReporter(quiet=json_output))
        report["baseline"] = compare_with_baseline(report, baseline, tolerances) if baseline else None
        report["passed"] = (report["baseline"] is None or report["baseline"]["passed"]) and not bench_problems(report)
        if report_dir is not None:
            inputs = (folder, *(p for p in (baseline, config) if p is not None))
            write_report_folder(report, report_dir, inputs)
        return report

    report = run_guarded(debug, action)
    problems = bench_problems(report)
    try:
        finish(report, json_output, report_dir, lambda report: stdout.print(bench_table(report)))
    except typer.Exit:
        if problems is None:
            raise
    if problems is not None:  # the table (or JSON) is out, with every other artifact timed: now the verdict
        code, message = problems
        print_error(message)
        raise typer.Exit(int(code))
