"""Small formatters the app READMEs share (the bundle's contract section and each target's README): numbers as the
READMEs spell them, the parity line and which artifact of a target the README is about. All read the typed manifest
(:mod:`mdeploy.manifest`), never its JSON form."""

from __future__ import annotations

from collections.abc import Iterable

from mdeploy.manifest import ArtifactRecord, Manifest, ParityMetricsRecord, PreprocessRecord

QUANTISED = ("int8", "uint8")  # I/O tensor dtypes that carry a scale and zero point


def floats(values: Iterable[float], suffix: str = "") -> str:
    return ", ".join(f"{v:.6g}{suffix}" for v in values)


def divisor(preprocess: PreprocessRecord) -> str:
    """What an 8-bit pixel is divided by before mean and std (255 for the usual scale 1/255)."""
    return f"{1 / preprocess.scale:g}"


def parity_line(artifact: ArtifactRecord) -> str:
    """The artifact's parity in one line: per output when the model has several."""
    parts = [(f"{o.output}: ", o.metrics) for o in artifact.parity.outputs or ()] or [("", artifact.parity.metrics)]
    return "; ".join(f"{name}{_metrics_text(m)}" for name, m in parts) + f" on {artifact.parity.inputs}"


def _metrics_text(m: ParityMetricsRecord) -> str:
    agreement = (f"top-1 agreement {_percent(m.top1_agreement)}, " if m.top1_agreement is not None else
                 f"per-pixel arg-max agreement {_percent(m.pixel_agreement)}, " if m.pixel_agreement is not None else "")
    return f"{agreement}SNR {_number(m.snr_db, '.1f')} dB, max |error| {_number(m.max_abs_error, '.3g')}"


def _number(value: float | str, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def _percent(value: float | str | None) -> str:
    return format(value, ".1%") if isinstance(value, (int, float)) else str(value)


def shipped(manifest: Manifest, target: str) -> ArtifactRecord | None:
    """The artifact of ``target`` an app ships: int8 when there is one, else fp32, else None."""
    return manifest.artifact(target, "int8") or manifest.artifact(target, "fp32")


def kotlin_object_name(model_name: str, suffix: str) -> str:
    """The Kotlin object a README's snippet defines for ``model_name`` (``mobilenet_v2`` -> ``MobilenetV2Model``)."""
    return "".join(part.capitalize() for part in model_name.replace("-", "_").split("_")) + suffix


def kotlin_channels(preprocess: PreprocessRecord) -> str:
    """The three 8-bit channels of an ARGB ``Int`` pixel ``p`` in the model's channel order, as Kotlin."""
    if preprocess.channel_order == "BGR":
        return "(p) and 0xFF, (p shr 8) and 0xFF, (p shr 16) and 0xFF"
    return "(p shr 16) and 0xFF, (p shr 8) and 0xFF, p and 0xFF"
