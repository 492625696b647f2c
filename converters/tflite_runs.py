"""How the bundle's ``verify_bundle.py`` runs a TFLite artifact: this function's source is copied into the verifier
with its helpers ``tensor_encoder``/``tensor_decoder`` (``converters/tflite_io.py``), so it imports inside its body
and uses nothing else of mdeploy (``TfliteConverter.bundle_runner``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mdeploy.converters.tflite_io import tensor_decoder, tensor_encoder


def run_tflite_in_bundle(path: Path, inputs: Any) -> Any:
    """The artifact's outputs for ``inputs`` (N, C, H, W) float32, one image at a time, on one CPU thread: the
    input is transposed to the artifact's NHWC and encoded, the output decoded, as ``TfliteConverter.runner`` does."""
    import numpy as np

    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        from tflite_runtime.interpreter import Interpreter
    interpreter = Interpreter(model_path=str(path), num_threads=1)
    interpreter.allocate_tensors()
    (feed,), (fetch,) = interpreter.get_input_details(), interpreter.get_output_details()
    encode, decode = tensor_encoder(feed), tensor_decoder(fetch)
    outputs = []
    for image in np.asarray(inputs, dtype=np.float32):
        interpreter.set_tensor(feed["index"], encode(np.transpose(image, (1, 2, 0))[None]))
        interpreter.invoke()
        outputs.append(decode(interpreter.get_tensor(fetch["index"])))
    out = np.concatenate(outputs)
    return np.transpose(out, (0, 3, 1, 2)) if out.ndim == 4 else out
