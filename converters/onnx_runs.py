"""How the bundle's ``verify_bundle.py`` runs an ONNX artifact: this function's source is copied into the verifier,
so it imports inside its body and uses nothing of mdeploy (``OnnxConverter.bundle_runner``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def run_onnx_in_bundle(path: Path, inputs: Any) -> Any:
    """The artifact's outputs for ``inputs`` (N, C, H, W) float32, one image at a time, on one CPU thread: every
    output by name, in the model's order."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    runs = [session.run(None, {name: x[None]}) for x in inputs]
    return {o.name: np.concatenate([run[i] for run in runs]) for i, o in enumerate(session.get_outputs())}
