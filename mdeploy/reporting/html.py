"""One self-contained HTML report: inline CSS and SVG, no script and no external URL, so a CI artifact or an e-mailed
file opens anywhere, offline, and shows the same thing."""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

from mdeploy.reporting.charts import (
    RED, Bar, agreement_heatmap, horizontal_bar_chart, layer_snr_chart, vertical_bar_chart,
)
from mdeploy.reporting.common import (
    BENCH_FAILURES, Report, artifact_failures, as_float, baseline_regressions, bench_section, format_bytes,
    format_db, format_megabytes, format_number, format_percent, layer_text, printable, row_label,
    threshold_outcomes, verdict,
)

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; color: #222; margin: 24px auto; max-width: 1100px; padding: 0 16px; }
h1 { font-size: 20px; margin: 0; } h2 { font-size: 16px; margin: 28px 0 8px; } h3 { font-size: 14px; }
.banner { padding: 12px 16px; border-radius: 6px; margin-bottom: 12px; }
.banner.pass { background: #e6f4ea; border: 1px solid #34a853; }
.banner.fail { background: #fce8e6; border: 1px solid #d93025; }
.facts { color: #555; margin: 4px 0 0; } code { font-size: 12px; background: #f3f3f3; padding: 0 3px; }
table { border-collapse: collapse; margin: 6px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
th { background: #f6f6f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.bad { background: #fce8e6; } td.good { background: #e6f4ea; } td.skip { background: #f3f3f3; }
svg { display: block; margin: 6px 0 12px; max-width: 100%; height: auto; }
"""


@dataclass(frozen=True)
class Cell:
    text: str
    css: str = ""  # e.g. "num", "bad num"


def html_report(report: Report) -> str:
    sections = [banner(report)]
    if report.get("kind") != "bench":
        sections.append(parity_section(report.get("artifacts") or []))
        sections.extend(diagnosis_section(a) for a in report.get("artifacts") or [] if a.get("diagnosis"))
        if report.get("agreement"):
            sections.append(agreement_section(report["agreement"]))
        if report.get("baseline"):
            sections.append(baseline_section(report))
    bench = bench_section(report)
    if bench is not None:
        sections.append(latency_section(bench))
    title = f"mdeploy {'bench' if report.get('kind') == 'bench' else 'check'} — {verdict(report).word}"
    return page(title, sections)


def write_html(report: Report, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(html_report(report), encoding="utf-8")
    return path


def esc(value: object) -> str:
    return html.escape(printable(value), quote=True)


def page(title: str, sections: list[str]) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{esc(title)}</title>\n'
            f"<style>{CSS}</style>\n</head>\n<body>\n" + "\n".join(sections) + "\n</body>\n</html>\n")


def table(header: list[str], rows: list[list[str | Cell]]) -> str:
    head = "".join(f"<th>{esc(name)}</th>" for name in header)
    body = "".join("<tr>" + "".join(cell_html(cell) for cell in row) + "</tr>\n" for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}</table>"


def cell_html(cell: str | Cell) -> str:
    if isinstance(cell, Cell):
        return f'<td class="{cell.css}">{esc(cell.text)}</td>' if cell.css else f"<td>{esc(cell.text)}</td>"
    return f"<td>{esc(cell)}</td>"


def banner(report: Report) -> str:
    result = verdict(report)
    tool = "bench" if report.get("kind") == "bench" else "check"
    facts = []
    model = report.get("model") or {}
    if model:
        facts.append(f"Model <code>{esc(model.get('file', '?'))}</code> "
                     f"(sha256 <code>{esc(model.get('sha256', '?'))}</code>)")
    if report.get("inputs"):
        facts.append(f"inputs: {esc(report['inputs'])}")
    machine = (bench_section(report) or {}).get("machine") or {}
    if machine:
        facts.append("machine: " + esc(", ".join(f"{key} {value}" for key, value in machine.items())))
    css = "pass" if result.passed else "fail"
    mark = "✓" if result.passed else "✗"  # plain marks: a machine without an emoji font shows them too
    return (f'<div class="banner {css}"><h1>{mark} mdeploy {tool} {result.word}</h1>'
            f'<p class="facts">{esc("; ".join(result.details))}</p>'
            + "".join(f'<p class="facts">{fact}</p>' for fact in facts) + "</div>")


def parity_section(artifacts: list[Report]) -> str:
    if not artifacts:
        return "<h2>Parity with PyTorch</h2><p>No artifacts were checked.</p>"
    columns = [("max_abs_error", "Max abs err", format_number), ("mean_abs_error", "Mean abs err", format_number),
               ("cosine", "Cosine", lambda v: format_number(v, ".4f")), ("snr_db", "SNR dB", format_db),
               ("top1_agreement", "Top-1", format_percent), ("top5_agreement", "Top-5", format_percent)]
    rows = []
    for artifact in artifacts:
        parity = artifact.get("parity") or {}
        metrics = parity.get("metrics") or {}
        outcomes, _ = threshold_outcomes(parity)
        judged = {o.metric: o.passed for o in outcomes}  # metrics under a limit get coloured by how they did
        failures = artifact_failures(artifact)
        rows.append([artifact.get("file", "?"), artifact.get("runtime", "?"),
                     *(Cell(show(metrics.get(key)), metric_css(judged.get(key))) for key, _, show in columns),
                     Cell("✗ " + "; ".join(failures), "bad") if failures else Cell("✓ passed", "good")])
    header = ["Artifact", "Runtime", *(title for _, title, _ in columns), "Verdict"]
    return "<h2>Parity with PyTorch</h2>\n" + table(header, rows)


def metric_css(passed: bool | None) -> str:
    return "num" if passed is None else ("good num" if passed else "bad num")


def diagnosis_section(artifact: Report) -> str:
    diagnosis = artifact["diagnosis"]
    layers, jump, worst = diagnosis.get("layers") or [], diagnosis.get("first_jump"), diagnosis.get("worst") or []
    parts = [f"<h2>Where {esc(artifact.get('file', '?'))} loses accuracy</h2>",
             f"<p>Per-layer SNR against PyTorch on {esc(diagnosis.get('samples', '?'))} samples "
             f"({esc(diagnosis.get('runtime') or artifact.get('runtime', '?'))}). First jump: "
             + (f"<strong>{esc(layer_text(jump))}</strong>" if jump else "none") + ".</p>"]
    if layers:
        parts.append(layer_snr_chart(layers, first_jump=jump, worst=worst,
                                     title=f"SNR per layer of {artifact.get('file', '?')} (dB)"))
    if worst:
        rows = [[layer.get("name", "?"), layer.get("source") or "—", layer.get("op", "?"),
                 Cell(format_db(layer.get("snr_db")), "num"), Cell(format_db(layer.get("drop_db")), "num"),
                 Cell(format_number(layer.get("max_abs_error")), "num")] for layer in worst]
        parts.append(table(["Worst layer", "Module", "Op", "SNR dB", "Drop dB", "Max abs err"], rows))
    if diagnosis.get("unavailable"):
        parts.append("<p>Not compared: " + esc("; ".join(map(str, diagnosis["unavailable"]))) + "</p>")
    return "\n".join(parts)


def agreement_section(agreement: Report) -> str:
    labels = [str(name) for name in agreement.get("artifacts") or []]
    chart = agreement_heatmap(labels, agreement.get("top1") or [], agreement.get("snr_db"),
                              title="Top-1 agreement (and SNR) between runtimes")
    return "<h2>Agreement between runtimes</h2>\n<p>Top-1 agreement and SNR of each pair of artifacts.</p>\n" + chart


def baseline_section(report: Report) -> str:
    file = esc(report["baseline"].get("file", "the baseline"))
    regressions = baseline_regressions(report)
    if not regressions:
        return f"<h2>Baseline</h2><p>No regressions against <code>{file}</code>.</p>"
    items = "".join(f"<li><code>{esc(r.get('artifact', '?'))}</code>: "
                    f"{esc(r.get('message', r.get('metric', '?')))}</li>" for r in regressions)
    return f"<h2>Regressions against <code>{file}</code></h2>\n<ul>{items}</ul>"


def latency_section(bench: Report) -> str:
    rows = bench.get("rows") or []
    timed = [row for row in rows if as_float(row.get("p50_ms")) is not None]
    parts = ["<h2>Latency (batch of one)</h2>"]
    if timed:
        parts.append("<p>Bars: p50; ticks: p90 and p99.</p>")
        parts.append(horizontal_bar_chart([latency_bar(row) for row in timed], title="Latency p50 (ms)", unit="ms"))
    sizes = {str(row.get("file")): as_float(row.get("size_bytes")) for row in rows}  # one bar per file
    bars = [Bar(file, size / 1e6, text=format_bytes(size), tooltip=file) for file, size in sizes.items() if size]
    if bars:
        parts.append(vertical_bar_chart(bars, title="Artifact size (MB)", unit="MB"))
    header = ["Artifact × threads", "Status", "p50 ms", "p90 ms", "p99 ms", "Mean ms", "Size", "Peak memory"]
    parts.append(table(header, [latency_row(row) for row in rows]))
    return "\n".join(parts)


def latency_bar(row: Report) -> Bar:
    p50, p90, p99 = (as_float(row.get(key)) for key in ("p50_ms", "p90_ms", "p99_ms"))
    summary = " · ".join(f"{name} {format_number(value, '.2f')}" for name, value in
                         (("p50", p50), ("p90", p90), ("p99", p99))) + " ms"
    markers = tuple((f"{name} {value:.2f} ms", value) for name, value in (("p90", p90), ("p99", p99))
                    if value is not None)
    failed = str(row.get("status")) in BENCH_FAILURES
    return Bar(row_label(row), p50, text=summary, markers=markers,
               tooltip=f"{row_label(row)} on {row.get('runtime', '?')}: {summary} ({row.get('status')})",
               **({"color": RED} if failed else {}))


def latency_row(row: Report) -> list[str | Cell]:
    status = str(row.get("status", "?"))
    css = {"passed": "good", "skipped": "skip"}.get(status, "bad")
    reason = f": {row['reason']}" if row.get("reason") else ""
    return [row_label(row), Cell(status + reason, css),
            *(Cell(format_number(row.get(key), ".2f"), "num") for key in ("p50_ms", "p90_ms", "p99_ms", "mean_ms")),
            Cell(format_bytes(row.get("size_bytes")), "num"), Cell(format_megabytes(row.get("peak_memory_mb")), "num")]
