"""Per-layer taps of a TFLite artifact for ``mdeploy.diagnose`` (``TfliteConverter.layer_taps``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mdeploy.converters.base import ir_tensors
from mdeploy.converters.tflite_io import tensor_decoder, tensor_encoder
from mdeploy.converters.tflite_ops import flattened_in_nhwc_order
from mdeploy.graph.ir import Graph
from mdeploy.types import INPUT_NAME


def tflite_layer_taps(path: Path, graph: Graph, inputs: np.ndarray) -> dict[str, np.ndarray]:
    """TFLite tensors are named after the IR tensors they hold (NHWC; int8 ones carry their scale and zero point),
    except the outputs, named as ``Graph.artifact_names`` says, and a quantised input behind a QUANTIZE op,
    ``input/int8``."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    # XNNPACK (the default delegate) runs the graph as a few fused partitions and keeps no intermediate tensors:
    # LiteRT's builtin kernels, with every tensor preserved, expose them all.
    interpreter = Interpreter(model_path=str(path), experimental_preserve_all_tensors=True,
                              experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interpreter.allocate_tensors()
    details = {d["name"]: d for d in interpreter.get_tensor_details()}
    names = {t: t for t in ir_tensors(graph) if t in details and t != graph.input_name}
    for output, renamed in graph.artifact_names.items():  # the outputs carry the artifact's names
        if output not in names and renamed in details:
            names[output] = renamed
    for name in (f"{graph.input_name}/int8", INPUT_NAME):  # the input is worth comparing only when quantised
        if name in details and np.dtype(details[name]["dtype"]) != np.float32:
            names[graph.input_name] = name
            break
    (input_detail,) = interpreter.get_input_details()
    encode = tensor_encoder(input_detail)
    collected: dict[str, list[np.ndarray]] = {t: [] for t in names}
    for image in inputs:
        interpreter.set_tensor(input_detail["index"], encode(np.transpose(image, (1, 2, 0))[None]))
        interpreter.invoke()
        for t, name in names.items():
            collected[t].append(tensor_decoder(details[name])(interpreter.get_tensor(details[name]["index"])))
    return {t: _nchw(graph, t, np.concatenate(values)) for t, values in collected.items()}


def _nchw(graph: Graph, tensor: str, value: np.ndarray) -> np.ndarray:
    if value.ndim == 4:
        return np.ascontiguousarray(np.transpose(value, (0, 3, 1, 2)))
    node = graph.producer(tensor)
    nhwc = flattened_in_nhwc_order(graph, node) if node is not None else None
    if nhwc is not None:
        c, h, w = nhwc
        return value.reshape(len(value), h, w, c).transpose(0, 3, 1, 2).reshape(len(value), -1)
    return value
