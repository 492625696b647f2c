"""``--report DIR``: every format of one report, written together and atomically.

The folder is replaced as a whole (a CI job rerun must not mix files of two runs), but only when it is empty or
holds an earlier mdeploy report: a mistyped path must never wipe someone's folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mdeploy.errors import BadInputError
from mdeploy.outputs import staged_output
from mdeploy.reporting.html import html_report
from mdeploy.reporting.junit import junit_xml
from mdeploy.reporting.markdown import markdown_summary

REPORT_FILES = ("report.json", "junit.xml", "summary.md", "report.html")


def write_report_folder(report: dict[str, Any], folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise BadInputError(f"--report {folder} is a file: pass a folder path")
    previous = folder.is_dir() and any(folder.iterdir())
    if previous and not (folder / "report.json").is_file():
        raise BadInputError(f"--report {folder} is not empty and holds no earlier mdeploy report: choose another folder")
    with staged_output(folder, overwrite=True) as stage:
        (stage / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        (stage / "junit.xml").write_text(junit_xml(report), encoding="utf-8")
        (stage / "summary.md").write_text(markdown_summary(report), encoding="utf-8")
        (stage / "report.html").write_text(html_report(report), encoding="utf-8")
