"""Golden vectors: a few real inputs, exactly as preprocessed, and what each artifact's runtime answered.

An app engineer feeds ``golden/inputs.f32`` to the model on the phone and compares with ``golden/<artifact>.f32``
within the manifest's tolerance; feeding the raw images in ``golden/images/`` through their own preprocessing and
comparing with ``golden/inputs.f32`` checks the preprocessing code itself. Arrays are written twice: ``.npy`` for
Python, and raw little-endian float32 ``.f32`` (shape in the manifest) for Kotlin and Swift.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mdeploy.manifest import Golden, GoldenArray, GoldenArtifact, GoldenInputs, GoldenTolerance
from mdeploy.types import Precision, Target

GOLDEN_SAMPLES = 4
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
FP32_TOLERANCE = 1e-4  # another CPU's float kernels sum in another order
INT8_TOLERANCE_LSB = 1.01  # ARM and x86 int8 kernels may round one output step apart (DESIGN.md §5)


@dataclass(frozen=True)
class GoldenOutput:
    file: str  # the artifact
    target: Target
    precision: Precision
    runtime: str
    outputs: np.ndarray  # (GOLDEN_SAMPLES, classes) float32, as the runtime answered
    output_scale: float | None  # one int8 output step, for int8 artifacts


def tolerance(golden: GoldenOutput) -> dict[str, Any]:
    """How close another run of the same artifact must come to its golden outputs."""
    if golden.target is Target.coreml:
        # Recorded on the MIL reference; Core ML on a device computes in its own fp16/fp32 order.
        return {"min_snr_db": 30.0 if golden.precision is Precision.int8 else 60.0,
                "note": "outputs of the MIL reference executor: compare Core ML on a device by SNR, not exactly"}
    if golden.precision is Precision.int8 and golden.output_scale:
        # Four significant digits, not a number of decimals: a tiny output scale must not round to 0.
        return {"max_abs_error": float(f"{INT8_TOLERANCE_LSB * golden.output_scale:.4g}"),
                "note": "one int8 output step: ARM and x86 kernels may round differently"}
    return {"max_abs_error": FP32_TOLERANCE}


def _write_array(folder: Path, stem: str, array: np.ndarray) -> GoldenArray:
    array = np.ascontiguousarray(array, dtype="<f4")
    np.save(folder / f"{stem}.npy", array)
    (folder / f"{stem}.f32").write_bytes(array.tobytes())
    return GoldenArray(f"golden/{stem}.npy", f"golden/{stem}.f32", list(array.shape), "float32", "little")


def write_golden(stage: Path, inputs: np.ndarray, reference: np.ndarray, paths: list[str],
                 outputs: list[GoldenOutput], layout: str) -> Golden:
    """Writes ``stage/golden/`` and returns the manifest's ``golden`` section."""
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
    written = {golden.file: _write_array(folder, golden.file, golden.outputs[:count]) for golden in outputs}
    return Golden(
        samples=count,
        images=images,
        inputs=GoldenInputs(**vars(_write_array(folder, "inputs", inputs[:count])), layout=layout),
        pytorch_outputs=_write_array(folder, "pytorch", reference[:count]),
        artifacts={
            golden.file: GoldenArtifact(**vars(written[golden.file]), runtime=golden.runtime,
                                        tolerance=GoldenTolerance(**tolerance(golden)))
            for golden in outputs
        },
    )
