"""What every writer needs from a report dict: its sections, each threshold's outcome, the verdict, and numbers
formatted for people. Reports are the JSON that `mdeploy check --json` / `mdeploy bench --json` print, so values may
be strings ("nan", "inf") or None where a float is expected, and optional sections may be None or absent."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

Report = dict[str, Any]

BENCH_FAILURES = ("parity failed", "conversion failed", "failed", "checksum mismatch")

# Characters XML 1.0 cannot carry at all, escaped or not (control characters, lone surrogates, U+FFFE/FFFF); HTML
# calls them parse errors and a lone surrogate cannot even be written as UTF-8.
NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


@dataclass(frozen=True)
class ThresholdRule:
    metric: str  # key in parity["metrics"]
    comparison: str  # "<=" or ">=": how the metric must relate to the limit
    sentence_prefix: str  # how mdeploy.parity words a failure of this limit


# Keyed like parity["thresholds"]; the order is the one mdeploy.parity lists failures in.
THRESHOLD_RULES = {
    "max_abs_error": ThresholdRule("max_abs_error", "<=", "max |error|"),
    "min_snr_db": ThresholdRule("snr_db", ">=", "SNR"),
    "min_top1": ThresholdRule("top1_agreement", ">=", "top-1"),
    "min_cosine": ThresholdRule("cosine", ">=", "cosine"),
}


@dataclass(frozen=True)
class ThresholdOutcome:
    metric: str
    comparison: str
    limit: float
    value: float | None
    failure: str | None  # the readable sentence when the limit was missed

    @property
    def passed(self) -> bool:
        return self.failure is None

    @property
    def label(self) -> str:
        return f"{self.metric} {self.comparison} {self.limit:g}"


@dataclass(frozen=True)
class Verdict:
    passed: bool
    details: list[str]  # short counts, e.g. "2 of 3 artifacts passed parity"

    @property
    def word(self) -> str:
        return "PASSED" if self.passed else "FAILED"

    @property
    def icon(self) -> str:
        return "✅" if self.passed else "❌"


def as_float(value: Any) -> float | None:
    """A metric as a float: JSON spells non-finite numbers as strings, and a missing one is None."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def printable(value: object) -> str:
    """Text every output format can carry: the characters XML forbids are spelled out as \\xNN."""
    return NOT_XML.sub(lambda match: f"\\x{ord(match.group()):02x}", str(value))


def rule_for(key: str) -> ThresholdRule:
    # A limit this module does not know still gets judged, named after its key ("min_x" means x >= limit).
    if key in THRESHOLD_RULES:
        return THRESHOLD_RULES[key]
    metric, comparison = (key[4:], ">=") if key.startswith("min_") else (key.removeprefix("max_"), "<=")
    return ThresholdRule(metric, comparison, "\0")  # "\0": no sentence can claim it


def meets(value: float | None, comparison: str, limit: float) -> bool:
    if value is None or math.isnan(value):
        return False
    return value <= limit if comparison == "<=" else value >= limit


def threshold_outcomes(parity: Report) -> tuple[list[ThresholdOutcome], list[str]]:
    """Each threshold with its failure sentence, and the failure sentences that no threshold claimed.

    The report's sentences are the authority (they are what the user saw); re-judging the metric only fills in a
    sentence when the report left one out, so a failed limit can never show as passed."""
    metrics, unclaimed = parity.get("metrics") or {}, list(parity.get("failures") or [])
    outcomes = []
    for key, limit in (parity.get("thresholds") or {}).items():
        rule, limit = rule_for(key), float(limit)
        value = as_float(metrics.get(rule.metric))
        sentence = next((s for s in unclaimed if str(s).startswith(rule.sentence_prefix)), None)
        if sentence is not None:
            unclaimed.remove(sentence)
        elif not meets(value, rule.comparison, limit):
            sentence = f"{rule.metric} {format_number(value)} is not {rule.comparison} {limit:g}"
        outcomes.append(ThresholdOutcome(rule.metric, rule.comparison, limit, value, sentence))
    if parity.get("passed") is False and not unclaimed and all(o.passed for o in outcomes):
        unclaimed.append("parity failed (the report gives no reason)")
    return outcomes, [str(s) for s in unclaimed]


def artifact_failures(artifact: Report) -> list[str]:
    """Every reason an artifact failed parity, in the report's order; empty when it passed."""
    outcomes, unclaimed = threshold_outcomes(artifact.get("parity") or {})
    return [o.failure for o in outcomes if o.failure] + unclaimed


def limit_notes(artifacts: list[Report]) -> list[str]:
    """How the derived limits came about (``parity.threshold_notes``, e.g. the fp32 limit relative to the output's
    peak): one line per distinct note, naming the artifacts it applies to."""
    grouped: dict[str, list[str]] = {}
    for artifact in artifacts:
        for note in ((artifact.get("parity") or {}).get("threshold_notes") or {}).values():
            grouped.setdefault(str(note), []).append(str(artifact.get("file", "?")))
    return [f"{note} ({', '.join(files)})" for note, files in grouped.items()]


def bench_section(report: Report) -> Report | None:
    return report if report.get("kind") == "bench" else report.get("bench")


def baseline_regressions(report: Report) -> list[Report]:
    return list((report.get("baseline") or {}).get("regressions") or [])


def verdict(report: Report) -> Verdict:
    """Pass only if the report says so (when it says) and nothing in it failed: the stricter reading wins."""
    details, failed = [], False
    artifacts = report.get("artifacts") or []
    if report.get("kind") != "bench":
        passing = sum(1 for a in artifacts if not artifact_failures(a))
        details.append(f"{passing} of {len(artifacts)} artifacts passed parity")
        failed |= passing < len(artifacts)
        regressions = len(baseline_regressions(report))
        if report.get("baseline"):
            details.append(f"{regressions} baseline regression{'' if regressions == 1 else 's'}")
        failed |= regressions > 0
    bench = bench_section(report)
    if bench is not None:
        statuses = [str(row.get("status")) for row in bench.get("rows") or []]
        counts = {status: statuses.count(status) for status in dict.fromkeys(statuses)}
        details.append("bench: " + (", ".join(f"{n} {status}" for status, n in counts.items()) or "no rows"))
        if report.get("kind") == "bench":  # in a check, the check's own verdict says whether bench rows count
            failed |= any(status in BENCH_FAILURES for status in statuses)
    return Verdict(passed=not failed and report.get("passed") is not False, details=details)


def row_label(row: Report) -> str:
    return f"{row.get('file', '?')} ×{row.get('threads', '?')}"


def format_number(value: Any, spec: str = ".3g") -> str:
    number = as_float(value)
    if number is None:
        return "—"
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "∞" if number > 0 else "−∞"
    return format(number, spec)


def format_percent(value: Any) -> str:
    number = as_float(value)
    return f"{number:.1%}" if number is not None and math.isfinite(number) else format_number(number)


def format_db(value: Any) -> str:
    return format_number(value, ".1f")


def format_bytes(value: Any) -> str:
    number = as_float(value)
    if number is None or not math.isfinite(number):
        return "—"
    for unit in ("B", "kB", "MB"):
        if abs(number) < 1000:
            return f"{number:.0f} {unit}" if unit == "B" else f"{number:.1f} {unit}"
        number /= 1000
    return f"{number:.2f} GB"


def format_megabytes(value: Any) -> str:
    number = as_float(value)
    return "—" if number is None else f"{format_number(number, '.1f')} MB"


def short_hash(sha256: Any) -> str:
    return str(sha256)[:12] if sha256 else "—"


def diagnosis_lines(diagnosis: Report) -> list[str]:
    """The diagnosis in a few plain lines: where the error first jumps and the worst layers."""
    lines = [f"diagnosis on {diagnosis.get('samples', '?')} samples ({diagnosis.get('runtime', '?')}):"]
    jump = diagnosis.get("first_jump")
    lines.append(f"  first jump: {layer_text(jump)}" if jump else "  first jump: none found")
    lines.extend(f"  worst: {layer_text(layer)}" for layer in diagnosis.get("worst") or [])
    lines.extend(f"  unavailable: {item}" for item in diagnosis.get("unavailable") or [])
    return lines


def layer_text(layer: Report) -> str:
    return (f"{layer.get('name', '?')} ({layer.get('source') or 'no module'}, {layer.get('op', '?')}): "
            f"SNR {format_db(layer.get('snr_db'))} dB, drop {format_db(layer.get('drop_db'))} dB, "
            f"max |error| {format_number(layer.get('max_abs_error'))}")
