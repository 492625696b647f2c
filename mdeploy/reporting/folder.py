"""``--report DIR``: every format of one report, written together and atomically.

The folder is replaced as a whole (a CI job rerun must not mix files of two runs), but only when it is empty or
holds an earlier mdeploy report: a mistyped path must never wipe someone's folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mdeploy.outputs import OutputRules, staged_output
from mdeploy.reporting.html import html_report
from mdeploy.reporting.junit import junit_xml
from mdeploy.reporting.markdown import markdown_summary

REPORT_FILES = ("report.json", "junit.xml", "summary.md", "report.html")


def is_report_folder(folder: Path) -> bool:
    """Whether ``folder`` holds an earlier mdeploy report (its report.json), which ``--report`` may replace."""
    return (folder / "report.json").is_file()


def write_report_folder(report: dict[str, Any], folder: Path, inputs: tuple[Path, ...] = ()) -> None:
    """Write every format of ``report`` into ``folder``; ``inputs`` (the run's model, data and artifacts) must
    lie outside it."""
    rules = OutputRules(inputs, is_report_folder, "report (report.json)", flag="--report")
    with staged_output(folder, overwrite=True, rules=rules) as stage:
        (stage / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        (stage / "junit.xml").write_text(junit_xml(report), encoding="utf-8")
        (stage / "summary.md").write_text(markdown_summary(report), encoding="utf-8")
        (stage / "report.html").write_text(html_report(report), encoding="utf-8")
