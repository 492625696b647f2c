"""Golden vectors: a few real inputs, exactly as preprocessed, and what each artifact's runtime answered.

An app engineer feeds ``golden/inputs.f32`` to the model on the phone and compares with ``golden/<artifact>.f32``
within the manifest's tolerance; feeding the raw images in ``golden/images/`` through their own preprocessing and
comparing with ``golden/inputs.f32`` checks the preprocessing code itself. Arrays are written twice: ``.npy`` for
Python, and raw little-endian float32 ``.f32`` (shape in the manifest) for Kotlin and Swift.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from mdeploy.manifest import Golden, GoldenArray, GoldenArtifact, GoldenInputs, GoldenTolerance
from mdeploy.parity import FP32_MAX_ERROR_OF_PEAK
from mdeploy.types import Precision, Target

GOLDEN_SAMPLES = 4
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class GoldenOutput:
    file: str  # the artifact
    target: Target
    precision: Precision
    runtime: str
    names: tuple[str, ...]  # the artifact's output names, in the model's order
    outputs: tuple[np.ndarray, ...]  # per output (GOLDEN_SAMPLES, ...) float32, as the runtime answered
    tolerances: tuple[GoldenTolerance, ...]  # per output, how close another run must come (the converter's)


def scaled_tolerance(precision: Precision, tolerance: GoldenTolerance, outputs: np.ndarray) -> GoldenTolerance:
    """An fp32 artifact's absolute tolerance (the converter's) is a floor: another CPU's float kernels sum in another
    order, and float32 error grows with the magnitudes summed, so the tolerance is max(it, 7.5e-5 * peak |golden
    output|), the relative limit of fp32 parity (mdeploy.parity.FP32_MAX_ERROR_OF_PEAK)."""
    if precision != Precision.fp32 or tolerance.max_abs_error is None:
        return tolerance
    finite = np.abs(outputs[np.isfinite(outputs)])
    peak = float(finite.max(initial=0.0))
    limit = float(f"{max(tolerance.max_abs_error, FP32_MAX_ERROR_OF_PEAK * peak):.3g}")
    if limit <= tolerance.max_abs_error:
        return tolerance
    note = (f"max({tolerance.max_abs_error:.3g}, {FP32_MAX_ERROR_OF_PEAK:.3g} * peak |golden output| {peak:.4g}): "
            "float32 error grows with the output's magnitude")
    return replace(tolerance, max_abs_error=limit, note=f"{tolerance.note}; {note}" if tolerance.note else note)


def _write_array(folder: Path, stem: str, array: np.ndarray) -> GoldenArray:
    array = np.ascontiguousarray(array, dtype="<f4")
    np.save(folder / f"{stem}.npy", array)
    (folder / f"{stem}.f32").write_bytes(array.tobytes())
    return GoldenArray(f"golden/{stem}.npy", f"golden/{stem}.f32", list(array.shape), "float32", "little")


def write_golden(stage: Path, inputs: np.ndarray, references: tuple[np.ndarray, ...], paths: list[str],
                 outputs: list[GoldenOutput], layout: str) -> Golden:
    """Writes ``stage/golden/`` and returns the manifest's ``golden`` section. A model of several outputs gets one
    array per output (``golden/<artifact>.<output>.npy``, ``golden/pytorch.<output>.npy``), each with its own
    tolerance, keyed ``<artifact>:<output>``."""
    folder = stage / "golden"
    (folder / "images").mkdir(parents=True)
    count = min(GOLDEN_SAMPLES, len(inputs))
    images = []
    for index, source in enumerate(paths[:count]):
        path = Path(source)
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            name = f"{index}_{path.name}"
            shutil.copyfile(path, folder / "images" / name)
            images.append(f"golden/images/{name}")
        else:
            images.append(None)  # a preprocessed tensor from a .npy/.npz file: no raw image exists
    images += [None] * (count - len(images))
    several = len(references) > 1
    artifacts = {}
    for golden in outputs:
        for name, array, tolerance in zip(golden.names, golden.outputs, golden.tolerances, strict=True):
            stem = f"{golden.file}.{name}" if several else golden.file
            artifacts[f"{golden.file}:{name}" if several else golden.file] = GoldenArtifact(
                **vars(_write_array(folder, stem, array[:count])), runtime=golden.runtime,
                tolerance=scaled_tolerance(golden.precision, tolerance, array[:count]),
                artifact=golden.file if several else None, output=name if several else None)
    names = outputs[0].names if outputs else ()
    by_output = {name: _write_array(folder, f"pytorch.{name}", reference[:count])
                 for name, reference in zip(names, references, strict=True)} if several else None
    return Golden(
        samples=count,
        images=images,
        inputs=GoldenInputs(**vars(_write_array(folder, "inputs", inputs[:count])), layout=layout),
        pytorch_outputs=by_output[names[0]] if by_output else _write_array(folder, "pytorch", references[0][:count]),
        artifacts=artifacts,
        pytorch_by_output=by_output,
    )
