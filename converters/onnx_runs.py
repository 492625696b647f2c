"""How the bundle's ``verify_bundle.py`` runs an ONNX artifact: this function's source is copied into the verifier,
so it imports inside its body and uses nothing of mdeploy (``OnnxConverter.bundle_runner``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def run_onnx_in_bundle(path: Path, inputs: Any) -> Any:
    """The artifact's outputs for ``inputs`` (N, C, H, W) float32, one image at a time, on one CPU thread."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[None]})[0] for x in inputs])
