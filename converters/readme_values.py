"""Small formatters the app READMEs share (the bundle's contract section and each target's README): numbers as the
READMEs spell them, the parity line and which artifact of a target the README is about. All read the typed manifest
(:mod:`mdeploy.manifest`), never its JSON form."""

from __future__ import annotations

from collections.abc import Iterable

from mdeploy.manifest import ArtifactRecord, Manifest, PreprocessRecord

QUANTISED = ("int8", "uint8")  # I/O tensor dtypes that carry a scale and zero point


def floats(values: Iterable[float], suffix: str = "") -> str:
    return ", ".join(f"{v:.6g}{suffix}" for v in values)


def divisor(preprocess: PreprocessRecord) -> str:
    """What an 8-bit pixel is divided by before mean and std (255 for the usual scale 1/255)."""
    return f"{1 / preprocess.scale:g}"


def parity_line(artifact: ArtifactRecord) -> str:
    m = artifact.parity.metrics
    return (f"top-1 agreement {m.top1_agreement:.1%}, SNR {m.snr_db:.1f} dB, max |error| "
            f"{m.max_abs_error:.3g} on {artifact.parity.inputs}")


def shipped(manifest: Manifest, target: str) -> ArtifactRecord | None:
    """The artifact of ``target`` an app ships: int8 when there is one, else fp32, else None."""
    return manifest.artifact(target, "int8") or manifest.artifact(target, "fp32")
