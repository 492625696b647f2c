"""Report writers (mdeploy.reporting): JUnit XML checked against real consumers' schemas, Markdown and HTML content,
and escaping of hostile text. The reports are hand-built dicts in the shape `mdeploy check/bench --json` print."""

from __future__ import annotations

import copy
import json
import re
import xml.etree.ElementTree as ET
from datetime import datetime
from html.parser import HTMLParser
from pathlib import Path

import pytest
import xmlschema

from mdeploy.reporting import (
    html_report, junit_xml, markdown_summary, write_html, write_junit,
)

DATA = Path(__file__).parent / "data"
# The Jenkins xUnit plugin's junit-10.xsd and the stricter Ant schema (windyroad); origins in their header comments.
SCHEMAS = ["junit-10.xsd", "junit-ant-windyroad.xsd"]
HOSTILE = "<script>alert(1)</script>"
SHA = "9f" * 32


def layer(name: str, source: str | None, snr: float | str, drop: float, op: str = "conv") -> dict:
    return {"name": name, "source": source, "op": op, "snr_db": snr, "drop_db": drop, "max_abs_error": 0.1 + drop / 10}


def diagnosis(file: str, worst_name: str = "conv_9") -> dict:
    layers = [layer("conv_0", "features.0.0", "inf", 0.0), layer("conv_1", "features.1.conv.0.0", 48.0, 0.0),
              layer("add_2", None, 46.5, 1.5, "add"), layer("conv_3", "features.2.conv.0.0", 44.0, 2.5),
              layer("conv_4", "features.2.conv.1.0", "nan", 0.0), layer("conv_5", "features.3.conv.0.0", 31.0, 13.0),
              layer("conv_6", "features.3.conv.1.0", 29.5, 1.5), layer("conv_7", "features.4.conv.0.0", 27.0, 2.5),
              layer("conv_8", "features.5.conv.0.0", 24.0, 3.0), layer(worst_name, "features.6.conv.0.0", 15.0, 9.0),
              layer("linear_10", "classifier.1", 12.4, 2.6, "gemm")]
    return {"artifact": file, "runtime": "LiteRT (CPU)", "samples": 8, "layers": layers, "first_jump": layers[5],
            "worst": [layers[5], layers[9], layers[10]], "unavailable": ["features.0.0's input quantizer"]}


def artifact(file: str, target: str, precision: str, metrics: dict, thresholds: dict, failures: list[str],
             diag: dict | None = None, runtime: str = "ONNX Runtime (CPU)") -> dict:
    base = {"samples": 320, "max_abs_error": 0.9, "mean_abs_error": 0.05, "cosine": 0.999, "snr_db": 25.0,
            "top1_agreement": 0.95, "top5_agreement": 1.0}
    return {"file": file, "target": target, "precision": precision, "runtime": runtime,
            "parity": {"passed": not failures, "inputs": "320 samples from eval/", "metrics": {**base, **metrics},
                       "thresholds": thresholds, "failures": failures}, "diagnosis": diag}


def bench_report() -> dict:
    def row(file: str, target: str, status: str, reason: str = "", threads: int = 1, p50: float | None = 4.4) -> dict:
        timed = p50 is not None
        return {"file": file, "target": target, "precision": "int8" if ".int8." in file else "fp32",
                "runtime": f"{target} runtime", "status": status, "reason": reason, "threads": threads, "runs": 50,
                "warmup": 10, "p50_ms": p50, "p90_ms": p50 * 1.1 if timed else None,
                "p99_ms": p50 * 1.3 if timed else None, "mean_ms": p50 * 1.02 if timed else None,
                "size_bytes": 14_000_000 if timed else None, "peak_memory_mb": 35.2 if timed else None}

    return {"report_version": "1.0", "kind": "bench",
            "machine": {"cpu": "x86_64", "cores": 2, "platform": "Linux-6.1-x86_64"},
            "rows": [row("mobilenet_v2.fp32.onnx", "onnx", "passed"),
                     row("mobilenet_v2.fp32.onnx", "onnx", "passed", threads=2, p50=2.6),
                     row("mobilenet_v2.int8.tflite", "tflite", "parity failed", "SNR 12.4 dB < 15.0 dB", p50=3.1),
                     row("mobilenet_v2.int8.mlpackage", "coreml", "conversion failed",
                         "coremltools cannot load the model", p50=None),
                     row("mobilenet_v2.int8.onnx", "onnx", "skipped", "onnxruntime is not installed", p50=None)]}


def failing_check() -> dict:
    """Four artifacts: two pass, one fails two limits (with a diagnosis), one fails on NaN metrics."""
    int8 = {"min_snr_db": 15.0, "min_top1": 0.85}
    artifacts = [
        artifact("mobilenet_v2.fp32.onnx", "onnx", "fp32", {"max_abs_error": 3e-5}, {"max_abs_error": 1e-4}, []),
        artifact("mobilenet_v2.int8.onnx", "onnx", "int8", {"snr_db": 22.3, "top1_agreement": 0.897}, int8, []),
        artifact("mobilenet_v2.int8.tflite", "tflite", "int8", {"snr_db": 12.4, "top1_agreement": 0.81}, int8,
                 ["SNR 12.4 dB < 15.0 dB", "top-1 agreement 81.0% < 85.0%"],
                 diagnosis("mobilenet_v2.int8.tflite"), "LiteRT (CPU)"),
        artifact("mobilenet_v2.int8.mlpackage", "coreml", "int8",
                 {"snr_db": "nan", "cosine": "nan", "top1_agreement": 0.9}, {**int8, "min_cosine": 0.99},
                 ["SNR nan dB < 15.0 dB", "cosine nan < 0.9900"], None, "Core ML"),
    ]
    names = [a["file"] for a in artifacts[1:]]
    return {"report_version": "1.0", "kind": "check", "passed": False, "model": {"file": "model.pt", "sha256": SHA},
            "inputs": "320 samples from eval/", "artifacts": artifacts,
            "agreement": {"artifacts": names, "top1": [[1.0, 0.84, 0.91], [0.84, 1.0, 0.83], [0.91, 0.83, 1.0]],
                          "snr_db": [[None, 13.0, 20.1], [13.0, None, "nan"], [20.1, "nan", None]]},
            "baseline": {"file": "previous.json", "passed": False, "regressions": [
                {"artifact": "mobilenet_v2.int8.tflite", "metric": "top1_agreement", "baseline": 0.9, "current": 0.81,
                 "tolerance": 0.01, "message": "top-1 agreement fell from 90.0% to 81.0% (tolerance 1.0 pt)"}]},
            "bench": bench_report()}


def passing_check() -> dict:
    report = failing_check()
    report.update(passed=True, artifacts=report["artifacts"][:2], agreement=None, bench=None,
                  baseline={"file": "previous.json", "passed": True, "regressions": []})
    return report


def hostile_check() -> dict:
    """Markup, quotes, pipes, control characters and a lone surrogate wherever the report carries free text."""
    report = failing_check()
    tflite = report["artifacts"][2]
    tflite["file"] = f'{HOSTILE} "q" & | `x` \x1b[31m.int8.tflite'
    tflite["runtime"] = "Lite\x00RT \ud800"
    tflite["parity"]["failures"][0] = f"SNR 12.4 dB < 15.0 dB {HOSTILE}"
    tflite["diagnosis"]["layers"][5]["name"] = HOSTILE
    report["agreement"]["artifacts"][1] = tflite["file"]
    report["baseline"]["regressions"][0]["message"] = HOSTILE
    report["bench"]["rows"][3]["reason"] = f"{HOSTILE}\nTraceback | line 2"
    return report


REPORTS = {"failing check": failing_check, "passing check": passing_check, "bench": bench_report,
           "hostile check": hostile_check}


@pytest.fixture(scope="module")
def schemas() -> dict[str, xmlschema.XMLSchema]:
    return {name: xmlschema.XMLSchema(str(DATA / name)) for name in SCHEMAS}


def suites(report: dict) -> dict[str, ET.Element]:
    root = ET.fromstring(junit_xml(report, hostname="ci-runner").encode("utf-8"))
    assert root.tag == "testsuites"
    return {suite.get("name"): suite for suite in root.findall("testsuite")}


def case(report: dict, name: str) -> ET.Element:
    found = [c for s in suites(report).values() for c in s.findall("testcase") if c.get("name") == name]
    assert len(found) == 1, (name, found)
    return found[0]


# JUnit XML


@pytest.mark.parametrize("schema_name", SCHEMAS)
@pytest.mark.parametrize("report_name", list(REPORTS))
def test_junit_validates_against_real_junit_schemas(schemas, schema_name, report_name):
    document = junit_xml(REPORTS[report_name](), timestamp=datetime(2026, 1, 2, 3, 4, 5))
    schemas[schema_name].validate(document)  # raises with the offending path if the document does not conform


def test_junit_has_a_suite_per_target_then_baseline_and_bench():
    assert list(suites(failing_check())) == ["mdeploy.parity.onnx", "mdeploy.parity.tflite", "mdeploy.parity.coreml",
                                             "mdeploy.baseline", "mdeploy.bench"]
    assert list(suites(bench_report())) == ["mdeploy.bench"]


@pytest.mark.parametrize("report_name", list(REPORTS))
def test_junit_suite_counts_match_their_test_cases(report_name):
    for suite in suites(REPORTS[report_name]()).values():
        cases = suite.findall("testcase")
        assert int(suite.get("tests")) == len(cases)
        for attribute, child in (("failures", "failure"), ("errors", "error"), ("skipped", "skipped")):
            assert int(suite.get(attribute)) == sum(1 for c in cases if c.find(child) is not None)


def test_junit_counts_of_the_failing_check():
    counts = {name: tuple(int(s.get(k)) for k in ("tests", "failures", "errors", "skipped"))
              for name, s in suites(failing_check()).items()}
    assert counts == {"mdeploy.parity.onnx": (3, 0, 0, 0), "mdeploy.parity.tflite": (2, 2, 0, 0),
                      "mdeploy.parity.coreml": (3, 2, 0, 0), "mdeploy.baseline": (1, 1, 0, 0),
                      "mdeploy.bench": (5, 1, 1, 1)}


def test_a_failed_threshold_is_a_failure_carrying_the_sentence_metrics_and_diagnosis():
    testcase = case(failing_check(), "mobilenet_v2.int8.tflite: snr_db >= 15")
    assert testcase.get("classname") == "mdeploy.parity.tflite.int8"
    failure = testcase.find("failure")
    assert failure.get("message") == "SNR 12.4 dB < 15.0 dB" and failure.get("type") == "ParityFailure"
    assert "snr_db: 12.4" in failure.text and "top1_agreement: 0.81" in failure.text
    assert "first jump: conv_5 (features.3.conv.0.0, conv)" in failure.text
    top1 = case(failing_check(), "mobilenet_v2.int8.tflite: top1_agreement >= 0.85").find("failure")
    assert top1.get("message") == "top-1 agreement 81.0% < 85.0%"


def test_a_met_threshold_has_no_failure():
    for name in ("mobilenet_v2.fp32.onnx: max_abs_error <= 0.0001", "mobilenet_v2.int8.onnx: snr_db >= 15",
                 "mobilenet_v2.int8.mlpackage: top1_agreement >= 0.85"):
        assert list(case(failing_check(), name)) == []


def test_nan_metrics_fail_their_thresholds():
    assert case(failing_check(), "mobilenet_v2.int8.mlpackage: snr_db >= 15").find("failure").get("message") == \
        "SNR nan dB < 15.0 dB"
    assert case(failing_check(), "mobilenet_v2.int8.mlpackage: cosine >= 0.99").find("failure") is not None


def test_failures_the_thresholds_do_not_explain_are_still_reported():
    report = passing_check()
    report["artifacts"][0]["parity"].update(passed=False, failures=["output shape changed"], thresholds={})
    report["artifacts"][1]["parity"]["metrics"]["snr_db"] = "-inf"  # failed, but the report gives no sentence
    assert case(report, "mobilenet_v2.fp32.onnx: parity").find("failure").get("message") == "output shape changed"
    assert case(report, "mobilenet_v2.int8.onnx: snr_db >= 15").find("failure").get("message") == \
        "snr_db −∞ is not >= 15"


def test_junit_properties_carry_model_hash_and_inputs():
    for suite in suites(failing_check()).values():
        properties = {p.get("name"): p.get("value") for p in suite.find("properties")}
        assert properties["model.sha256"] == SHA and properties["inputs"] == "320 samples from eval/"
    bench = suites(bench_report())["mdeploy.bench"]
    assert {p.get("name"): p.get("value") for p in bench.find("properties")}["machine.cores"] == "2"


def test_bench_statuses_become_skipped_error_and_failure():
    bench = {c.get("name"): c for c in suites(bench_report())["mdeploy.bench"].findall("testcase")}
    assert list(bench["mobilenet_v2.fp32.onnx: latency, 2 thread(s)"]) == []
    skipped = bench["mobilenet_v2.int8.onnx: latency, 1 thread(s)"].find("skipped")
    assert skipped.get("message") == "onnxruntime is not installed"
    error = bench["mobilenet_v2.int8.mlpackage: latency, 1 thread(s)"].find("error")
    assert (error.get("type"), error.get("message")) == ("ConversionError", "coremltools cannot load the model")
    failure = bench["mobilenet_v2.int8.tflite: latency, 1 thread(s)"].find("failure")
    assert failure.get("message") == "SNR 12.4 dB < 15.0 dB"


def test_baseline_regressions_are_failing_test_cases_and_none_is_one_passing_case():
    regression = case(failing_check(), "mobilenet_v2.int8.tflite: top1_agreement vs baseline").find("failure")
    assert regression.get("type") == "BaselineRegression"
    assert regression.get("message") == "top-1 agreement fell from 90.0% to 81.0% (tolerance 1.0 pt)"
    baseline = suites(passing_check())["mdeploy.baseline"]
    assert [c.get("name") for c in baseline.findall("testcase")] == ["no regressions against previous.json"]
    assert baseline.get("failures") == "0"


def test_hostile_text_is_escaped_and_the_xml_stays_valid_utf8():
    document = junit_xml(hostile_check())
    assert HOSTILE not in document and "&lt;script&gt;" in document
    document.encode("utf-8")  # a lone surrogate would make this raise
    names = [c.get("name") for c in ET.fromstring(document.encode("utf-8")).iter("testcase")]
    assert f'{HOSTILE} "q" & | `x` \\x1b[31m.int8.tflite: snr_db >= 15' in names


def test_write_junit_from_a_saved_json_report(tmp_path):
    saved = tmp_path / "check.json"
    saved.write_text(json.dumps(failing_check()), encoding="utf-8")
    path = write_junit(json.loads(saved.read_text(encoding="utf-8")), tmp_path / "junit.xml")
    assert path.read_bytes().startswith(b'<?xml version="1.0" encoding="UTF-8"?>')
    assert ET.parse(path).getroot().find("testsuite").get("name") == "mdeploy.parity.onnx"


def test_writers_do_not_change_the_report():
    report = failing_check()
    before = copy.deepcopy(report)
    junit_xml(report), markdown_summary(report), html_report(report)
    assert report == before


# Markdown


def unescaped_pipes(line: str) -> int:
    return len(re.findall(r"(?<!\\)\|", line))


def test_markdown_verdict_line_counts_what_failed():
    first = markdown_summary(failing_check()).splitlines()[0]
    assert first.startswith("### ❌ mdeploy check FAILED")
    assert "2 of 4 artifacts passed parity" in first and "1 baseline regression" in first
    passing = markdown_summary(passing_check())
    assert passing.startswith("### ✅ mdeploy check PASSED — 2 of 2 artifacts passed parity")
    assert markdown_summary(bench_report()).startswith("### ❌ mdeploy bench FAILED")


def test_markdown_has_a_row_per_artifact_with_metrics_and_reasons():
    text = markdown_summary(failing_check())
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| mobilenet")}
    assert "✅ pass" in rows["mobilenet_v2.fp32.onnx"] and "89.7%" in rows["mobilenet_v2.int8.onnx"]
    assert "❌ SNR 12.4 dB \\< 15.0 dB; top-1 agreement 81.0% \\< 85.0%" in rows["mobilenet_v2.int8.tflite"]
    assert "NaN" in rows["mobilenet_v2.int8.mlpackage"]


def test_markdown_shows_agreement_diagnosis_regressions_and_latency():
    text = markdown_summary(failing_check())
    assert "84.0% (13.0 dB)" in text and "83.0% (NaN dB)" in text
    assert "Where mobilenet_v2.int8.tflite loses accuracy" in text
    assert "First jump: **conv_5** (features.3.conv.0.0, conv)" in text
    for name, module in (("conv_5", "features.3.conv.0.0"), ("conv_9", "features.6.conv.0.0"),
                         ("linear_10", "classifier.1")):
        assert f"| {name} | {module} |" in text
    assert "top-1 agreement fell from 90.0% to 81.0% (tolerance 1.0 pt)" in text
    assert "| mobilenet_v2.fp32.onnx ×2 | 2.60 |" in text and "⏭️ skipped: onnxruntime is not installed" in text


def test_markdown_escapes_hostile_text_and_keeps_tables_intact():
    text = markdown_summary(hostile_check())
    assert not re.search(r"(?<!\\)<[A-Za-z/]", text), "no raw HTML tag may reach the comment"
    assert "\\<script\\>alert(1)\\</script\\>" in text
    for block in text.split("\n\n"):
        lines = [line for line in block.splitlines() if line.startswith("|")]
        assert len({unescaped_pipes(line) for line in lines}) <= 1, block


# HTML


class TagBalance(HTMLParser):
    """Tracks open elements, to catch markup that a hostile string broke open."""

    VOID = frozenset({"meta", "br", "hr", "img", "input", "link"})

    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []
        self.seen: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.seen.append(tag)
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.seen.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, (tag, self.open[-5:])
        self.open.pop()


def svgs(page: str) -> list[str]:
    return re.findall(r"<svg\b.*?</svg>", page, flags=re.DOTALL)


@pytest.mark.parametrize("report_name", list(REPORTS))
def test_html_is_one_self_contained_well_formed_page(report_name):
    page = html_report(REPORTS[report_name]())
    assert page.startswith("<!DOCTYPE html>") and page.count("<html") == 1
    for external in ("http://", "https://", "<script", "<link", "src=", "href=", "url(", "@import"):
        assert external not in page.lower()
    parser = TagBalance()
    parser.feed(page)
    assert parser.open == [] and "script" not in parser.seen
    for chart in svgs(page):
        ET.fromstring(chart)  # each inline chart is well-formed XML, so its escaping held


def test_html_has_a_chart_for_each_diagnosis_the_agreement_and_the_bench():
    page = html_report(failing_check())
    titles = [ET.fromstring(chart).find("title").text for chart in svgs(page)]
    assert titles == ["SNR per layer of mobilenet_v2.int8.tflite (dB)", "Top-1 agreement (and SNR) between runtimes",
                      "Latency p50 (ms)", "Artifact size (MB)"]
    assert "✗ SNR 12.4 dB &lt; 15.0 dB" in page and "mdeploy check FAILED" in page
    assert len(svgs(html_report(passing_check()))) == 0
    assert [ET.fromstring(c).find("title").text for c in svgs(html_report(bench_report()))] == \
        ["Latency p50 (ms)", "Artifact size (MB)"]


def test_html_layer_chart_marks_worst_layers_and_first_jump_with_tooltips():
    chart = ET.fromstring(svgs(html_report(failing_check()))[0])
    circles = chart.findall("circle")
    assert len(circles) == 10  # eleven layers, one with an unknown (NaN) SNR left out
    tooltips = {c.find("title").text.split(" — ")[0]: c.get("fill") for c in circles}
    assert tooltips["#5 conv_5"] == tooltips["#9 conv_9"] == "#d62728" and tooltips["#1 conv_1"] == "#4c78a8"
    assert any("first jump: conv_5" == (t.text or "") for t in chart.iter("text"))
    assert "features.6.conv.0.0" in ET.tostring(chart, encoding="unicode")


def test_html_escapes_hostile_text():
    page = html_report(hostile_check())
    assert HOSTILE not in page and "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_write_html_writes_utf8(tmp_path):
    path = write_html(bench_report(), tmp_path / "report.html")
    assert "mdeploy bench FAILED" in path.read_text(encoding="utf-8")


@pytest.mark.parametrize(("schema_name", "broken"), [
    ("junit-10.xsd", lambda doc: doc.replace('errors="0"', "", 1)),  # a suite without its error count
    ("junit-ant-windyroad.xsd", lambda doc: doc.replace('type="ParityFailure"', "", 1)),  # an untyped failure
    ("junit-ant-windyroad.xsd", lambda doc: doc.replace("<testsuites>", '<testsuites tests="1">', 1)),
])
def test_the_schemas_do_reject_broken_documents(schemas, schema_name, broken):
    """Guards the validation above against a schema that would accept anything."""
    document = junit_xml(failing_check())
    assert broken(document) != document
    assert schemas[schema_name].is_valid(document)
    assert not schemas[schema_name].is_valid(broken(document))
