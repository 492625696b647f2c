"""Per-layer taps of an ONNX artifact for ``mdeploy.diagnose`` (``OnnxConverter.layer_taps``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mdeploy.converters.base import ir_tensors
from mdeploy.graph.ir import Graph


def onnx_layer_taps(path: Path, graph: Graph, inputs: np.ndarray) -> dict[str, np.ndarray]:
    """Every IR tensor is an ONNX value of the same name: the plain float value in fp32 graphs and, in int8 QDQ
    graphs, the DequantizeLinear output the next op consumes (the quantised input's is ``input/dq``). They become
    extra outputs of an in-memory copy, run with graph optimisations off so that none is fused away (QDQ groups are
    then evaluated as written, in float, rather than by ONNX Runtime's fused integer kernels)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    produced = {name for node in model.graph.node for name in node.output}
    names = {t: t for t in ir_tensors(graph) if t in produced}
    if f"{graph.input_name}/dq" in produced:
        names[graph.input_name] = f"{graph.input_name}/dq"
    outputs = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_tensor_value_info(v, onnx.TensorProto.FLOAT, None)
                              for v in sorted(set(names.values()) - outputs))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    wanted = list(names.values())
    results = session.run(wanted, {session.get_inputs()[0].name: np.ascontiguousarray(inputs)})
    by_value = dict(zip(wanted, results, strict=True))
    return {t: np.asarray(by_value[v], dtype=np.float32) for t, v in names.items()}
