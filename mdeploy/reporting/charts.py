"""Tiny inline SVG charts with no plotting library: bar charts, per-layer SNR, and an agreement heat map.

Each function returns one <svg> element as a string, sized in pixels, ready to paste into HTML. Hovering shows a
<title> tooltip, so labels can be clipped to keep charts narrow. Every piece of report text is XML-escaped."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from xml.sax import saxutils

from mdeploy.reporting.common import printable

FONT = 'font-family="system-ui, sans-serif" font-size="11"'
CHAR_WIDTH = 6.2  # roughly one 11 px character, to size label columns without measuring text
BLUE, RED, ORANGE, GREY = "#4c78a8", "#d62728", "#ff7f0e", "#888888"


@dataclass(frozen=True)
class Bar:
    label: str
    value: float | None  # None or non-finite: listed, but no bar drawn
    text: str = ""  # written beside the bar; default: the value
    markers: tuple[tuple[str, float], ...] = ()  # extra values drawn as ticks, e.g. (("p99", 5.6),)
    tooltip: str = ""
    color: str = BLUE


def escape(content: str) -> str:
    return saxutils.escape(printable(content))


def quoteattr(content: str) -> str:
    return saxutils.quoteattr(printable(content))


def svg(width: float, height: float, body: Sequence[str], label: str) -> str:
    return (f'<svg width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" role="img" '
            f'aria-label={quoteattr(label)} {FONT}><title>{escape(label)}</title>{"".join(body)}</svg>')


def text(x: float, y: float, content: str, anchor: str = "start", extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" {extra}>{escape(content)}</text>'


def tip(content: str) -> str:
    return f"<title>{escape(content)}</title>"


def clip(label: str, chars: int, keep_end: bool = False) -> str:
    """At most `chars` characters; `keep_end` keeps the tail, where artifact names differ (".int8.tflite")."""
    if len(label) <= chars:
        return label
    return "…" + label[1 - chars:] if keep_end else label[: chars - 1] + "…"


def finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def bar_scale(bars: Sequence[Bar]) -> float:
    values = [v for bar in bars for v in (finite(bar.value), *(finite(m) for _, m in bar.markers)) if v is not None]
    return max([v for v in values if v > 0], default=1.0)


def horizontal_bar_chart(bars: Sequence[Bar], *, title: str, unit: str = "", bar_width: float = 360) -> str:
    label_width = min(max((len(bar.label) for bar in bars), default=4), 40) * CHAR_WIDTH + 10
    row, top, scale = 24, 8, bar_scale(bars)
    body = []
    for i, bar in enumerate(bars):
        y, value = top + i * row, finite(bar.value)
        body.append(f"<g>{tip(bar.tooltip or bar.label)}")
        body.append(text(label_width - 6, y + 15, clip(bar.label, 40), "end"))
        length = 0.0 if value is None else bar_width * max(value, 0.0) / scale
        if value is not None:
            body.append(f'<rect x="{label_width:.1f}" y="{y + 4}" width="{length:.1f}" height="15" '
                        f'fill="{bar.color}"/>')
        for name, marker in bar.markers:  # a tick across the bar at each extra value (p90, p99, ...)
            if finite(marker) is not None:
                x = label_width + bar_width * max(float(marker), 0.0) / scale
                body.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y + 1}" y2="{y + 22}" stroke="#333">'
                            f"{tip(name)}</line>")
        shown = bar.text or (f"{value:.3g} {unit}".strip() if value is not None else "—")
        drawn_to = max(length, bar_width * marker_max(bar) / scale)  # the text goes past the last tick too
        body.append(text(label_width + drawn_to + 6, y + 15, shown))
        body.append("</g>")
    return svg(label_width + bar_width + 240, top * 2 + row * max(len(bars), 1), body, title)


def marker_max(bar: Bar) -> float:
    return max([max(finite(m) or 0.0, 0.0) for _, m in bar.markers], default=0.0)


def vertical_bar_chart(bars: Sequence[Bar], *, title: str, unit: str = "", height: float = 160) -> str:
    step, top, scale = 100, 18, bar_scale(bars)
    body = []
    for i, bar in enumerate(bars):
        x, value = 10 + i * step, finite(bar.value)
        length = 0.0 if value is None else height * max(value, 0.0) / scale
        body.append(f"<g>{tip(bar.tooltip or bar.label)}")
        if value is not None:
            body.append(f'<rect x="{x + 30}" y="{top + height - length:.1f}" width="36" height="{length:.1f}" '
                        f'fill="{bar.color}"/>')
        shown = bar.text or (f"{value:.3g} {unit}".strip() if value is not None else "—")
        body.append(text(x + 48, top + height - length - 4, shown, "middle"))
        body.append(text(x + 48, top + height + 14, clip(bar.label, 15, keep_end=True), "middle"))
        body.append("</g>")
    return svg(20 + step * max(len(bars), 1), top + height + 24, body, title)


def snr_axis(values: Sequence[float]) -> tuple[float, float, float]:
    """Low and high ends (dB) and a tick step, in round numbers around the finite values."""
    low, high = (min(values), max(values)) if values else (0.0, 10.0)
    step = next((s for s in (2.0, 5.0, 10.0, 20.0, 50.0) if (high - low) / s <= 6), 100.0)
    low, high = math.floor(low / step) * step, math.ceil(high / step) * step
    return low, (high if high > low else low + step), step


def layer_snr_chart(layers: Sequence[dict[str, Any]], *, first_jump: dict[str, Any] | None = None,
                    worst: Sequence[dict[str, Any]] = (), title: str = "SNR per layer (dB)") -> str:
    """SNR of each layer's output against PyTorch, in topological order: the line falls where error enters.
    Worst layers are red, the first jump orange with a dashed marker; infinite SNR (exact) sits on the top edge."""
    width, height, left, top, bottom = 720, 230, 44, 14, 40
    plot_w, plot_h = width - left - 12, height - top - bottom
    low, high, step = snr_axis([v for v in (finite(layer.get("snr_db")) for layer in layers) if v is not None])

    def x_of(index: int) -> float:
        return left + (index + 0.5) * plot_w / max(len(layers), 1)

    def y_of(db: float) -> float:
        return top + plot_h * (1 - (min(max(db, low), high) - low) / (high - low))

    body = [axis_lines(left, top, plot_w, plot_h, low, high, step, y_of)]
    points = [(i, layer_snr(layer, low, high)) for i, layer in enumerate(layers)]
    body.extend(polylines([(x_of(i), y_of(v)) if v is not None else None for i, v in points]))
    worst_names = {layer.get("name") for layer in worst}
    jump_name = first_jump.get("name") if first_jump else None
    for (i, value), layer in zip(points, layers):
        if layer.get("name") == jump_name:
            body.append(f'<line x1="{x_of(i):.1f}" x2="{x_of(i):.1f}" y1="{top}" y2="{top + plot_h}" '
                        f'stroke="{ORANGE}" stroke-dasharray="4 3"/>')
            label = f"first jump: {clip(str(jump_name), 30)}"
            body.append(text(x_of(i) + 4, top + 10, label, extra=f'fill="{ORANGE}"'))
        if value is None:
            continue
        worst_one, jump = layer.get("name") in worst_names, layer.get("name") == jump_name
        fill = RED if worst_one else ORANGE if jump else BLUE
        ring = f' stroke="{ORANGE}" stroke-width="2.5"' if jump and worst_one else ""  # both at once: orange ring
        body.append(f'<circle cx="{x_of(i):.1f}" cy="{y_of(value):.1f}" r="{5 if worst_one or jump else 2.5}" '
                    f'fill="{fill}"{ring}>{tip(layer_tooltip(i, layer))}</circle>')
    body.append(text(left, height - 8, f"layer index (0–{len(layers) - 1}, topological order) · "
                                        "red: worst layers · orange: first jump"))
    return svg(width, height, body, title)


def layer_snr(layer: dict[str, Any], low: float, high: float) -> float | None:
    try:
        value = float(layer.get("snr_db"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    if math.isnan(value):
        return None
    return high if value == math.inf else low if value == -math.inf else value


def layer_tooltip(index: int, layer: dict[str, Any]) -> str:
    return (f"#{index} {layer.get('name', '?')} — {layer.get('source') or 'no module'} ({layer.get('op', '?')}): "
            f"SNR {layer.get('snr_db')} dB, drop {layer.get('drop_db')} dB, max |error| {layer.get('max_abs_error')}")


def axis_lines(left: float, top: float, plot_w: float, plot_h: float, low: float, high: float, step: float,
               y_of: Any) -> str:
    parts = [f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#ccc"/>']
    for k in range(round((high - low) / step) + 1):
        db, y = low + k * step, y_of(low + k * step)
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        parts.append(text(left - 4, y + 4, f"{db:g}", "end"))
    return "".join(parts)


def polylines(points: Sequence[tuple[float, float] | None]) -> list[str]:
    """One line per run of known values, so an unknown SNR leaves a gap instead of a made-up slope."""
    runs: list[list[tuple[float, float]]] = [[]]
    for point in points:
        if point is None:
            runs.append([])
        else:
            runs[-1].append(point)
    return [f'<polyline fill="none" stroke="{BLUE}" stroke-width="1.5" points="'
            + " ".join(f"{x:.1f},{y:.1f}" for x, y in run) + '"/>' for run in runs if len(run) > 1]


def heat_color(top1: float | None) -> str:
    """Green at full agreement, through yellow, to red at 80 % or less (where int8 artifacts clearly differ)."""
    if top1 is None:
        return "#eeeeee"
    hue = 120 * min(max((top1 - 0.8) / 0.2, 0.0), 1.0)
    return f"hsl({hue:.0f},65%,78%)"


def agreement_heatmap(labels: Sequence[str], top1: Sequence[Sequence[Any]],
                      snr_db: Sequence[Sequence[Any]] | None = None, *, title: str = "Top-1 agreement") -> str:
    """Pairwise agreement as a coloured grid; rows are named, columns numbered like the rows."""
    n, cell_w, cell_h = len(labels), 78, 34
    label_w, top = min(max((len(s) for s in labels), default=4), 32) * CHAR_WIDTH + 28, 20
    body = []
    for j in range(n):
        body.append(f"<g>{tip(labels[j])}{text(label_w + j * cell_w + cell_w / 2, top - 6, str(j + 1), 'middle')}</g>")
    for i, label in enumerate(labels):
        y = top + i * cell_h
        body.append(f"<g>{tip(label)}{text(label_w - 6, y + cell_h / 2 + 4, f'{i + 1}  {clip(label, 32)}', 'end')}</g>")
        for j in range(n):
            body.append(heat_cell(label_w + j * cell_w, y, cell_w, cell_h, i == j, labels, (i, j), top1, snr_db))
    return svg(label_w + n * cell_w + 8, top + n * cell_h + 8, body, title)


def heat_cell(x: float, y: float, w: float, h: float, diagonal: bool, labels: Sequence[str], at: tuple[int, int],
              top1: Sequence[Sequence[Any]], snr_db: Sequence[Sequence[Any]] | None) -> str:
    i, j = at
    agreement, snr = (None, None) if diagonal else (matrix_value(top1, i, j), matrix_value(snr_db, i, j))
    lines = ["—"] if diagonal else [f"{agreement:.1%}" if agreement is not None else "—"]
    if snr is not None:
        lines.append(f"{snr:.1f} dB")
    words = "".join(text(x + w / 2, y + 14 + k * 12, line, "middle") for k, line in enumerate(lines))
    hover = f"{labels[i]} vs {labels[j]}: top-1 {lines[0]}" + (f", SNR {snr:.1f} dB" if snr is not None else "")
    return (f'<g>{tip(hover)}<rect x="{x:.1f}" y="{y:.1f}" width="{w - 2}" height="{h - 2}" '
            f'fill="{heat_color(None if diagonal else agreement)}"/>{words}</g>')


def matrix_value(matrix: Sequence[Sequence[Any]] | None, i: int, j: int) -> float | None:
    try:
        return finite(matrix[i][j]) if matrix is not None else None
    except (IndexError, TypeError):
        return None
