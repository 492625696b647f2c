"""How the bundle's ``verify_bundle.py`` runs a TFLite artifact: this function's source is copied into the verifier
with its helpers ``tensor_encoder``/``tensor_decoder`` (``converters/tflite_io.py``), so it imports inside its body
and uses nothing else of mdeploy (``TfliteConverter.bundle_runner``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mdeploy.converters.tflite_io import tensor_decoder, tensor_encoder


def run_tflite_in_bundle(path: Path, inputs: Any) -> Any:
    """The artifact's outputs for ``inputs`` (N, C, H, W) float32, one image at a time, on one CPU thread: the
    input is transposed to the artifact's NHWC and encoded, each output decoded (rank 4 back to NCHW), as
    ``TfliteConverter.outputs_runner`` does: every output by name, in the model's order."""
    import numpy as np

    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        from tflite_runtime.interpreter import Interpreter
    interpreter = Interpreter(model_path=str(path), num_threads=1)
    interpreter.allocate_tensors()
    (feed,), fetches = interpreter.get_input_details(), interpreter.get_output_details()
    encode, decoders = tensor_encoder(feed), [tensor_decoder(fetch) for fetch in fetches]
    outputs: list[list[Any]] = [[] for _ in fetches]
    for image in np.asarray(inputs, dtype=np.float32):
        interpreter.set_tensor(feed["index"], encode(np.transpose(image, (1, 2, 0))[None]))
        interpreter.invoke()
        for found, fetch, decode in zip(outputs, fetches, decoders):
            found.append(decode(interpreter.get_tensor(fetch["index"])))
    joined = [np.concatenate(found) for found in outputs]
    return {fetch["name"]: np.transpose(out, (0, 3, 1, 2)) if out.ndim == 4 else out
            for fetch, out in zip(fetches, joined)}
