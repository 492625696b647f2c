"""A Markdown summary for a pull-request comment: the verdict first, then one compact table per question (parity,
agreement, where accuracy is lost, regressions, latency). Plain GitHub-flavoured Markdown, no HTML."""

from __future__ import annotations

import re

from mdeploy.reporting.common import (
    Report, artifact_failures, baseline_regressions, bench_section, format_bytes, format_db, format_megabytes,
    format_number, format_percent, limit_notes, printable, row_label, short_hash, verdict,
)

# Markdown punctuation that could start emphasis, links, HTML, math or a table cell, escaped wherever report text goes.
# An underscore between letters or digits (mobilenet_v2) can never be emphasis in GitHub Markdown, so it stays bare.
MARKDOWN_SPECIAL = re.compile(r"[\\`*{}\[\]<>|~&$#!]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


def markdown_summary(report: Report) -> str:
    sections = [verdict_lines(report)]
    if report.get("kind") != "bench":
        sections.append(parity_table(report.get("artifacts") or []))
        if report.get("agreement"):
            sections.append(agreement_table(report["agreement"]))
        sections.extend(diagnosis_section(a) for a in report.get("artifacts") or [] if a.get("diagnosis"))
        if report.get("baseline"):
            sections.append(baseline_section(report))
    bench = bench_section(report)
    if bench is not None:
        sections.append(bench_table(bench))
    return "\n\n".join("\n".join(lines) for lines in sections if lines) + "\n"


def md(value: object) -> str:
    """Report text as literal Markdown: on one line, with every character Markdown would act on escaped."""
    return MARKDOWN_SPECIAL.sub(lambda match: "\\" + match.group(), " ".join(printable(value).split()))


def table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    """`align` has one letter per column: l(eft) or r(ight)."""
    rule = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(cells) + " |" for cells in [header, rule, *rows]]


def verdict_lines(report: Report) -> list[str]:
    result = verdict(report)
    tool = "bench" if report.get("kind") == "bench" else "check"
    lines = [f"### {result.icon} mdeploy {tool} {result.word} — {'; '.join(result.details)}"]
    model = report.get("model") or {}
    facts = []
    if model:
        facts.append(f"model {md(model.get('file', '?'))} (sha256 {md(short_hash(model.get('sha256')))})")
    if report.get("inputs"):
        facts.append(f"inputs: {md(report['inputs'])}")
    machine = (bench_section(report) or {}).get("machine")
    if machine:
        facts.append(f"machine: {md(machine.get('cpu', '?'))}, {md(machine.get('cores', '?'))} cores")
    return lines + ([" · ".join(facts)] if facts else [])


def parity_table(artifacts: list[Report]) -> list[str]:
    if not artifacts:
        return ["No artifacts were checked."]
    rows = []
    for artifact in artifacts:
        metrics = (artifact.get("parity") or {}).get("metrics") or {}
        failures = artifact_failures(artifact)
        rows.append([md(artifact.get("file", "?")), md(artifact.get("runtime", "?")),
                     format_number(metrics.get("max_abs_error")), format_db(metrics.get("snr_db")),
                     format_percent(metrics.get("top1_agreement")), format_percent(metrics.get("top5_agreement")),
                     "❌ " + md("; ".join(failures)) if failures else "✅ pass"])
    header = ["Artifact", "Runtime", "Max abs err", "SNR dB", "Top-1", "Top-5", "Verdict"]
    notes = [f"- {md(note)}" for note in limit_notes(artifacts)]
    limits = ["", "Limits:", *notes] if notes else []
    return ["#### Parity with PyTorch", "", *table(header, rows, "llrrrrl"), *limits]


def agreement_table(agreement: Report) -> list[str]:
    names = [str(name) for name in agreement.get("artifacts") or []]
    top1, snr = agreement.get("top1") or [], agreement.get("snr_db") or []
    rows = []
    for i, name in enumerate(names):
        cells = [agreement_cell(cell_at(top1, i, j), cell_at(snr, i, j)) if i != j else "—"
                 for j in range(len(names))]
        rows.append([f"**{md(name)}**", *cells])
    return ["#### Agreement between runtimes (top-1, SNR dB)", "",
            *table(["", *(md(name) for name in names)], rows, "l" + "r" * len(names))]


def cell_at(matrix: list[list[object]], i: int, j: int) -> object:
    try:
        return matrix[i][j]
    except (IndexError, TypeError):
        return None


def agreement_cell(top1: object, snr_db: object) -> str:
    return format_percent(top1) + ("" if snr_db is None else f" ({format_db(snr_db)} dB)")


def diagnosis_section(artifact: Report) -> list[str]:
    diagnosis = artifact["diagnosis"]
    runtime = diagnosis.get("runtime") or artifact.get("runtime", "?")
    lines = [f"#### Where {md(artifact.get('file', '?'))} loses accuracy", "",
             f"Per-layer comparison on {md(diagnosis.get('samples', '?'))} samples ({md(runtime)})."]
    jump = diagnosis.get("first_jump")
    lines.append(f"First jump: {layer_summary(jump)}." if jump else "First jump: none — the error grows gradually.")
    worst = diagnosis.get("worst") or []
    if worst:
        rows = [[md(layer.get("name", "?")), md(layer.get("source") or "—"), md(layer.get("op", "?")),
                 format_db(layer.get("snr_db")), format_db(layer.get("drop_db")),
                 format_number(layer.get("max_abs_error"))] for layer in worst]
        lines += ["", *table(["Worst layers", "Module", "Op", "SNR dB", "Drop dB", "Max abs err"], rows, "lllrrr")]
    unavailable = diagnosis.get("unavailable") or []
    if unavailable:
        lines += ["", "Not compared: " + md("; ".join(str(item) for item in unavailable))]
    return lines


def layer_summary(layer: Report) -> str:
    return (f"**{md(layer.get('name', '?'))}** ({md(layer.get('source') or 'no module')}, {md(layer.get('op', '?'))})"
            f" — SNR {format_db(layer.get('snr_db'))} dB, drop {format_db(layer.get('drop_db'))} dB")


def baseline_section(report: Report) -> list[str]:
    file = md(report["baseline"].get("file", "the baseline"))
    regressions = baseline_regressions(report)
    if not regressions:
        return [f"No regressions against {file}."]
    items = [f"- ❌ {md(r.get('artifact', '?'))}: {md(r.get('message', r.get('metric', 'regression')))}"
             for r in regressions]
    return [f"#### Regressions against {file}", "", *items]


def bench_table(bench: Report) -> list[str]:
    rows = [[md(row_label(row)), *(format_number(row.get(key), ".2f") for key in ("p50_ms", "p90_ms", "p99_ms")),
             format_bytes(row.get("size_bytes")), format_megabytes(row.get("peak_memory_mb")), bench_status(row)]
            for row in bench.get("rows") or []]
    if not rows:
        return ["No benchmark rows."]
    header = ["Artifact × threads", "p50 ms", "p90 ms", "p99 ms", "Size", "Peak memory", "Status"]
    return ["#### Latency (batch of one)", "", *table(header, rows, "lrrrrrl")]


def bench_status(row: Report) -> str:
    status = str(row.get("status", "?"))
    icon = {"passed": "✅", "skipped": "⏭️"}.get(status, "❌")
    reason = row.get("reason")
    return f"{icon} {md(status)}" + (f": {md(reason)}" if reason else "")
