"""JUnit XML for CI test-report pages (Jenkins, GitLab, GitHub Actions reporters): one test case per artifact and
parity threshold, one per baseline regression, one per bench row.

The output keeps to both the Jenkins xUnit plugin's junit-10.xsd and the stricter Ant schema (windyroad JUnit.xsd).
That is why every <testsuite> carries properties, system-out, system-err, time, timestamp, hostname, package and id,
why a test case holds at most one failure/error/skipped and no output of its own, and why <testsuites> has no
attributes (the Ant schema allows none; consumers add up the suites' counts themselves)."""

from __future__ import annotations

import math
import socket
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from mdeploy.reporting.common import (
    Report, artifact_failures, as_float, bench_section, diagnosis_lines, format_number, printable, row_label,
    threshold_outcomes,
)

FAILURE, ERROR, SKIPPED = "failure", "error", "skipped"


@dataclass
class Case:
    classname: str
    name: str
    outcome: str | None = None  # None when it passed, else FAILURE, ERROR or SKIPPED
    message: str = ""
    type: str = ""  # of a failure or error, e.g. "ParityFailure"
    details: str = ""
    seconds: float = 0.0


@dataclass
class Suite:
    name: str
    package: str
    cases: list[Case] = field(default_factory=list)
    properties: dict[str, str] = field(default_factory=dict)
    output: str = ""  # the suite's <system-out>

    def count(self, outcome: str) -> int:
        return sum(1 for case in self.cases if case.outcome == outcome)


def junit_xml(report: Report, *, timestamp: datetime | None = None, hostname: str | None = None) -> str:
    """The report as a JUnit XML document; `timestamp` (default: now, UTC) and `hostname` (default: this machine)
    fill the suites' required attributes, since the report itself carries neither."""
    when = (timestamp or datetime.now(timezone.utc)).strftime("%Y-%m-%dT%H:%M:%S")  # the Ant schema: no zone
    host = hostname or socket.gethostname() or "localhost"
    root = ET.Element("testsuites")
    for index, suite in enumerate(report_suites(report)):
        root.append(suite_element(suite, index, when, host))
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(report: Report, path: str | Path, *, timestamp: datetime | None = None,
                hostname: str | None = None) -> Path:
    path = Path(path)
    path.write_text(junit_xml(report, timestamp=timestamp, hostname=hostname), encoding="utf-8")
    return path


def report_suites(report: Report) -> list[Suite]:
    suites = parity_suites(report) if report.get("kind") != "bench" else []
    if report.get("baseline"):
        suites.append(baseline_suite(report))
    bench = bench_section(report)
    if bench is not None:
        suites.append(bench_suite(bench))
    shared = report_properties(report)
    for suite in suites:
        suite.properties = {**shared, **suite.properties}
    return suites


def report_properties(report: Report) -> dict[str, str]:
    model = report.get("model") or {}
    machine = (bench_section(report) or {}).get("machine") or {}
    found = {"mdeploy.report_kind": report.get("kind"), "mdeploy.report_version": report.get("report_version"),
             "model.file": model.get("file"), "model.sha256": model.get("sha256"), "inputs": report.get("inputs"),
             **{f"machine.{key}": value for key, value in machine.items()}}
    return {name: str(value) for name, value in found.items() if value is not None}


def parity_suites(report: Report) -> list[Suite]:
    suites: dict[str, Suite] = {}  # one per target, in the order the report first names it
    for artifact in report.get("artifacts") or []:
        target = str(artifact.get("target") or "unknown")
        suite = suites.setdefault(target, Suite(f"mdeploy.parity.{target}", "mdeploy.parity"))
        suite.cases.extend(artifact_cases(artifact))
    for suite in suites.values():
        suite.output = "\n".join(f"{c.name}: {'passed' if c.outcome is None else c.message}" for c in suite.cases)
    return list(suites.values())


def artifact_cases(artifact: Report) -> list[Case]:
    parity = artifact.get("parity") or {}
    classname = f"mdeploy.parity.{artifact.get('target', 'unknown')}.{artifact.get('precision', 'unknown')}"
    file = str(artifact.get("file", "?"))
    details = failure_details(artifact)
    outcomes, unexplained = threshold_outcomes(parity)
    cases = [Case(classname, f"{file}: {o.label}") if o.passed else
             Case(classname, f"{file}: {o.label}", FAILURE, o.failure or "", "ParityFailure", details)
             for o in outcomes]
    # Failures no threshold claims, or an artifact checked against no threshold, still need a test case to show.
    if unexplained:
        cases.append(Case(classname, f"{file}: parity", FAILURE, "; ".join(unexplained), "ParityFailure", details))
    elif not cases:
        cases.append(Case(classname, f"{file}: parity"))
    return cases


def failure_details(artifact: Report) -> str:
    parity = artifact.get("parity") or {}
    lines = [f"artifact: {artifact.get('file', '?')} on {artifact.get('runtime', '?')}",
             f"inputs: {parity.get('inputs', '?')}"]
    lines += [f"{name}: {format_number(value, '.6g')}" for name, value in (parity.get("metrics") or {}).items()]
    lines += [f"failed: {sentence}" for sentence in artifact_failures(artifact)]
    if artifact.get("diagnosis"):
        lines += diagnosis_lines(artifact["diagnosis"])
    return "\n".join(lines)


def baseline_suite(report: Report) -> Suite:
    baseline = report["baseline"]
    suite = Suite("mdeploy.baseline", "mdeploy.baseline", properties={"baseline.file": str(baseline.get("file"))})
    for regression in baseline.get("regressions") or []:
        name = f"{regression.get('artifact', '?')}: {regression.get('metric', '?')} vs baseline"
        details = "\n".join(f"{key}: {regression.get(key)}" for key in ("baseline", "current", "tolerance"))
        suite.cases.append(Case("mdeploy.baseline", name, FAILURE, str(regression.get("message", "regression")),
                                "BaselineRegression", details))
    if not suite.cases:  # so the page shows the comparison ran and found nothing
        suite.cases.append(Case("mdeploy.baseline", f"no regressions against {baseline.get('file', 'the baseline')}"))
    suite.output = "\n".join(case.message or f"{case.name}: passed" for case in suite.cases)
    return suite


def bench_suite(bench: Report) -> Suite:
    suite = Suite("mdeploy.bench", "mdeploy.bench")
    for row in bench.get("rows") or []:
        suite.cases.append(bench_case(row))
        suite.output += bench_line(row) + "\n"
    return suite


def bench_case(row: Report) -> Case:
    case = Case(f"mdeploy.bench.{row.get('target', 'unknown')}.{row.get('precision', 'unknown')}",
                f"{row.get('file', '?')}: latency, {row.get('threads', '?')} thread(s)")
    status, reason = str(row.get("status")), str(row.get("reason") or "")
    mean_ms, runs = as_float(row.get("mean_ms")), as_float(row.get("runs"))
    if mean_ms is not None and runs is not None:
        case.seconds = mean_ms * runs / 1000.0  # the time spent in the timed runs
    if status == "skipped":
        case.outcome, case.message = SKIPPED, reason or "skipped"
    elif status == "conversion failed":
        case.outcome, case.message, case.type = ERROR, reason or status, "ConversionError"
    elif status == "parity failed":
        case.outcome, case.message, case.type = FAILURE, reason or status, "ParityFailure"
    elif status == "failed":  # the runtime could not load or run the artifact
        case.outcome, case.message, case.type = ERROR, reason or status, "RuntimeError"
    elif status == "checksum mismatch":
        case.outcome, case.message, case.type = ERROR, reason or status, "ChecksumMismatch"
    elif status != "passed":
        case.outcome, case.message, case.type = ERROR, f"unknown bench status {status!r}", "ReportError"
    case.details = bench_line(row) if case.outcome in (FAILURE, ERROR) else ""
    return case


def bench_line(row: Report) -> str:
    timings = ", ".join(f"{key} {format_number(row.get(key + '_ms'), '.3f')} ms" for key in ("p50", "p90", "p99"))
    return f"{row_label(row)}: {row.get('status')}; {timings}"


def suite_element(suite: Suite, index: int, timestamp: str, hostname: str) -> ET.Element:
    element = ET.Element("testsuite", {
        "name": xml_text(suite.name), "package": xml_text(suite.package), "id": str(index),
        "tests": str(len(suite.cases)), "failures": str(suite.count(FAILURE)), "errors": str(suite.count(ERROR)),
        "skipped": str(suite.count(SKIPPED)), "time": seconds_text(sum(c.seconds for c in suite.cases)),
        "timestamp": timestamp, "hostname": xml_text(hostname)})
    properties = ET.SubElement(element, "properties")
    for name, value in suite.properties.items():
        ET.SubElement(properties, "property", {"name": xml_text(name), "value": xml_text(value)})
    element.extend(case_element(case) for case in suite.cases)
    ET.SubElement(element, "system-out").text = xml_text(suite.output)
    ET.SubElement(element, "system-err")
    return element


def case_element(case: Case) -> ET.Element:
    element = ET.Element("testcase", {"classname": xml_text(case.classname), "name": xml_text(case.name),
                                      "time": seconds_text(case.seconds)})
    if case.outcome is not None:
        attributes = {"message": xml_text(case.message)}
        if case.type:
            attributes["type"] = xml_text(case.type)
        ET.SubElement(element, case.outcome, attributes).text = xml_text(case.details) or None
    return element


def seconds_text(seconds: float) -> str:
    seconds = seconds if math.isfinite(seconds) and seconds > 0 else 0.0
    return f"{seconds:.3f}"  # both schemas: a plain decimal, at most three places


def xml_text(value: object) -> str:
    """ElementTree escapes markup but writes control characters as they are, which would make the file unreadable to
    every XML parser, so those are spelled out first."""
    return printable(value)
