"""How check and bench end: the report as JSON or for people, where the report folder went, and the exit code."""

from __future__ import annotations

import json

from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from mdeploy.cli.app import stdout
from mdeploy.errors import ExitCode
from mdeploy.reporting.folder import REPORT_FILES


def finish(report: dict[str, Any], json_output: bool, report_dir: Path | None,
           show: Callable[[dict[str, Any]], None]) -> None:
    if json_output:
        print(dump_json(report))
    else:
        show(report)
        for regression in (report.get("baseline") or {}).get("regressions", []):
            stdout.print(f"[red]regression[/red]: {regression['message']}", highlight=False, soft_wrap=True)
        if report_dir is not None:
            stdout.print(f"wrote {report_dir}/ ({', '.join(REPORT_FILES)})", highlight=False)
    if not report["passed"]:
        raise typer.Exit(int(ExitCode.PARITY_FAILED))


def dump_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=False, default=str)
