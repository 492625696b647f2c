"""Per-layer diagnosis: where does an artifact's runtime depart from the PyTorch model?

Both run the same inputs and every IR tensor the runtime exposes (ONNX and TFLite tensors are named after the IR
tensors they hold) is compared with the float IR graph's, which equals PyTorch's. Per layer:

- ``snr_db``: its output against PyTorch's, i.e. all the error accumulated up to there;
- ``drop_db``: how much SNR is lost across it (its input's SNR minus its output's);
- ``local_snr_db``: its output against the same layer run in float on the runtime's *own* inputs: the error this
  layer adds by itself, whatever it inherited.

Layers are ranked by ``excess_db``, how far their local SNR falls below the artifact's typical layer (the median),
not by ``drop_db``: in int8 every layer's rounding is comparable to the error it inherits, so drops swing +-13 dB
on a clean MobileNetV2 (ReLU6 after a depthwise conv discards most of the error and the next projection brings it
back), while local SNRs stay within +-6 dB of their median and a broken layer falls tens of dB below it.

Adding a target means one ``taps`` function registered in :data:`TAPS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mdeploy.types import Target
from mdeploy.errors import BadInputError
from mdeploy.graph.execute import OPS, GraphRunner
from mdeploy.graph.ir import Graph
from mdeploy.parity import json_numbers

JUMP_DB = 10.0  # a layer whose own error is 10x the typical layer's (in power) is where the artifact breaks
SNR_CEILING_DB = 60.0  # SNRs are capped here when compared: float32 rounding (110-150 dB) counts as exact
WORST = 3
CHUNK = 2  # samples per runtime call: every tensor of a chunk is held 3 times (MobileNetV2 at 224: ~170 MB)

# Runs the artifact at ``path`` on (N, C, H, W) float32 inputs and returns, for every IR tensor it exposes, that
# tensor as float32 in the IR's layout: (N, C, H, W) or (N, K).
Taps = Callable[[Path, Graph, np.ndarray], dict[str, np.ndarray]]
TAPS: dict[Target, Taps] = {}
TAP_RUNTIMES: dict[Target, str] = {}  # what runs the artifact for a diagnosis (may differ from the parity runtime)


def taps(target: Target, runtime: str) -> Callable[[Taps], Taps]:
    def register(fn: Taps) -> Taps:
        TAPS[target], TAP_RUNTIMES[target] = fn, runtime
        return fn

    return register


@dataclass(frozen=True)
class LayerError:
    name: str  # IR node name
    source: str  # the PyTorch module it came from
    op: str
    snr_db: float  # output against PyTorch, over all samples
    drop_db: float  # SNR of its input(s) (the worst) minus its output's, both capped at +-SNR_CEILING_DB
    local_snr_db: float  # output against this layer in float on the runtime's inputs (NaN: an input not exposed)
    excess_db: float  # the typical layer's local SNR minus this one's, capped (0 when local_snr_db is NaN)
    max_abs_error: float  # against PyTorch

    def to_dict(self) -> dict[str, Any]:
        return json_numbers(asdict(self))

    def describe(self) -> str:
        return f"{self.source} ({self.op}, own SNR {self.local_snr_db:.1f} dB, {self.snr_db:.1f} dB vs PyTorch)"


@dataclass(frozen=True)
class Diagnosis:
    artifact: str
    runtime: str
    samples: int
    typical_local_snr_db: float  # median local SNR of the layers, capped at SNR_CEILING_DB
    layers: tuple[LayerError, ...]  # topological order, only layers whose outputs the runtime exposes
    first_jump: LayerError | None  # first layer whose excess_db passes JUMP_DB
    worst: tuple[LayerError, ...]  # the WORST largest excess_db, largest first
    unavailable: tuple[str, ...]  # IR tensors the runtime does not expose (fused away, renamed)

    def to_dict(self) -> dict[str, Any]:
        return {"artifact": self.artifact, "runtime": self.runtime, "samples": self.samples,
                **json_numbers({"typical_local_snr_db": self.typical_local_snr_db, "jump_threshold_db": JUMP_DB}),
                "first_jump": self.first_jump.to_dict() if self.first_jump else None,
                "worst": [layer.to_dict() for layer in self.worst],
                "layers": [layer.to_dict() for layer in self.layers], "unavailable": list(self.unavailable)}

    def summary(self) -> str:
        typical = f"typical layer {'>= ' * (self.typical_local_snr_db >= SNR_CEILING_DB)}{self.typical_local_snr_db:.1f} dB"
        if self.first_jump is not None:
            head = f"first jump at {self.first_jump.describe()}; {typical}"
        else:
            head = f"no layer adds {JUMP_DB:.0f} dB more error than the {typical}"
        lines = [f"{head}; worst layers: " + ", ".join(layer.describe() for layer in self.worst)]
        if self.unavailable:
            shown = ", ".join(self.unavailable[:5]) + (", ..." if len(self.unavailable) > 5 else "")
            lines.append(f"{len(self.unavailable)} layer outputs not exposed by {self.runtime}: {shown}")
        return "\n".join(lines)


class _Stats:
    """Sums over chunks of samples, giving the SNR :func:`mdeploy.metrics.snr_db` gives on the whole set."""

    def __init__(self) -> None:
        self.signal = self.noise = self.max_abs = 0.0

    def add(self, reference: np.ndarray, output: np.ndarray) -> None:
        reference = reference.astype(np.float64)
        diff = output.astype(np.float64) - reference
        self.signal += float(np.sum(reference**2))
        self.noise += float(np.sum(diff**2))
        biggest = float(np.max(np.abs(diff), initial=0.0))
        self.max_abs = max(self.max_abs, biggest if not math.isnan(biggest) else math.inf)  # as metrics.compare

    @property
    def snr_db(self) -> float:
        if not math.isfinite(self.noise) or (self.signal == 0.0 and self.noise > 0.0):  # NaN/Inf from the runtime
            return float("-inf")
        return float("inf") if self.noise == 0.0 else 10.0 * math.log10(self.signal / self.noise)


def diagnose(graph: Graph, artifact: Path, target: Target, inputs: np.ndarray, runtime_name: str = "",
             artifact_graph: Graph | None = None) -> Diagnosis:
    """Compares every layer of ``artifact`` with the float ``graph`` (the PyTorch model's) on ``inputs``, a
    (N, C, H, W) float32 batch of preprocessed samples (8-16 are plenty).

    ``artifact_graph`` is the float graph the artifact was written from when it is a rescaled copy of ``graph``:
    pass ``QuantizedGraph.graph`` for int8 artifacts quantised with activation equalisation, which divides the
    channels of intermediate tensors by per-channel scales. The PyTorch reference of each intermediate tensor is
    then expressed in the artifact's units (channel by channel) and layers are re-run with its parameters.
    """
    artifact = Path(artifact)
    run_taps = TAPS.get(target)
    if run_taps is None:
        raise BadInputError(f"per-layer diagnosis is available for {' and '.join(t.value for t in TAPS)} "
                            f"artifacts, not {target.value}")
    if not artifact.exists():
        raise BadInputError(f"no artifact at {artifact}")
    inputs = np.asarray(inputs, dtype=np.float32)
    if inputs.ndim != 4 or not len(inputs) or inputs.shape[1:] != tuple(graph.input_shape[1:]):
        raise BadInputError(f"diagnosis inputs {inputs.shape} do not match the model's input {graph.input_shape}")
    reference = GraphRunner(graph)
    own = GraphRunner(artifact_graph) if artifact_graph is not None else reference
    stats: dict[str, _Stats] = {}
    local: dict[str, _Stats] = {}
    for start in range(0, len(inputs), CHUNK):
        batch = inputs[start : start + CHUNK]
        tapped = run_taps(artifact, graph, batch)
        expected = _reference(reference, own, batch, set(tapped))
        exposed = {name: v for name, v in tapped.items() if v.shape == expected[name].shape}
        recomputed = _recompute(own, batch, exposed)
        for name, value in exposed.items():
            stats.setdefault(name, _Stats()).add(expected[name], value)
            if name in recomputed:
                local.setdefault(name, _Stats()).add(recomputed[name], value)
    layers, typical = _layer_errors(graph, stats, local)
    exposed_outputs = {layer.name for layer in layers}
    return Diagnosis(
        artifact=artifact.name,
        runtime=runtime_name or TAP_RUNTIMES[target],
        samples=len(inputs),
        typical_local_snr_db=typical,
        layers=layers,
        first_jump=next((layer for layer in layers if layer.excess_db > JUMP_DB), None),
        worst=tuple(sorted(layers, key=lambda layer: (-layer.excess_db, layer.snr_db))[:WORST]),
        unavailable=tuple(n.output for n in graph.nodes if n.name not in exposed_outputs),
    )


def _reference(runner: GraphRunner, own: GraphRunner, batch: np.ndarray, names: set[str]) -> dict[str, np.ndarray]:
    """The float graph's tensors ``names``. When ``own`` runs a rescaled copy, each channel c of an
    intermediate tensor is multiplied by k_c, the least-squares slope (with intercept: bias correction shifts
    channels) of the copy's channel on the original's."""
    values = {k: v.numpy() for k, v in runner.run(batch, keep=names).items()}
    if own is runner:
        return values
    graph = runner.graph
    theirs = own.run(batch, keep=names)
    for name in names - {graph.input_name, graph.output_name}:  # never rescaled
        ours, other = values[name].astype(np.float64), theirs[name].double().numpy()
        if ours.shape != other.shape or ours.ndim < 2:
            continue
        axes = (0,) + tuple(range(2, ours.ndim))
        x = ours - ours.mean(axis=axes, keepdims=True)
        y = other - other.mean(axis=axes, keepdims=True)
        var = np.sum(x * x, axis=axes, keepdims=True)
        slope = np.where(var > 0, np.sum(x * y, axis=axes, keepdims=True) / np.maximum(var, 1e-300), 1.0)
        values[name] = (ours * slope).astype(np.float32)
    return values


@torch.no_grad()
def _recompute(own: GraphRunner, batch: np.ndarray, exposed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each exposed layer run in float on the runtime's own values of its inputs (when all of them are exposed)."""
    available = {own.graph.input_name: batch, **exposed}  # a quantised input, when exposed, replaces the float one
    out = {}
    for node in own.graph.nodes:
        if node.output in exposed and all(name in available for name in node.inputs):
            xs = [torch.from_numpy(np.ascontiguousarray(available[name])) for name in node.inputs]
            out[node.output] = OPS[node.op](node, xs, own.params[node.name]).numpy()
    return out


def _capped(snr: float) -> float:
    return min(max(snr, -SNR_CEILING_DB), SNR_CEILING_DB)


def _layer_errors(graph: Graph, stats: dict[str, _Stats], local: dict[str, _Stats]
                  ) -> tuple[tuple[LayerError, ...], float]:
    # SNR of every tensor as its consumers see it: a tensor the runtime hides passes on its inputs' worst
    seen = {graph.input_name: stats[graph.input_name].snr_db if graph.input_name in stats else float("inf")}
    rows = []
    for node in graph.nodes:
        incoming = min(seen[name] for name in node.inputs)
        seen[node.output] = stats[node.output].snr_db if node.output in stats else incoming
        if node.output in stats:
            own = local[node.output].snr_db if node.output in local else float("nan")
            rows.append((node, stats[node.output], _capped(incoming) - _capped(seen[node.output]), own))
    known = [_capped(row[3]) for row in rows if not math.isnan(row[3])]
    typical = float(np.median(known)) if known else SNR_CEILING_DB
    layers = tuple(
        LayerError(node.name, node.source or node.name, node.op.value, s.snr_db, drop, own,
                   0.0 if math.isnan(own) else typical - _capped(own), s.max_abs)
        for node, s, drop, own in rows
    )
    return layers, typical


# -- taps, one per target --------------------------------------------------------------------------------------
@taps(Target.onnx, "ONNX Runtime (CPU, graph optimisations off)")
def _onnx_taps(path: Path, graph: Graph, inputs: np.ndarray) -> dict[str, np.ndarray]:
    """Every IR tensor is an ONNX value of the same name: the plain float value in fp32 graphs and, in int8 QDQ
    graphs, the DequantizeLinear output the next op consumes (the quantised input's is ``input/dq``). They become
    extra outputs of an in-memory copy, run with graph optimisations off so that none is fused away (QDQ groups are
    then evaluated as written, in float, rather than by ONNX Runtime's fused integer kernels)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    produced = {name for node in model.graph.node for name in node.output}
    names = {t: t for t in _ir_tensors(graph) if t in produced}
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


@taps(Target.tflite, "LiteRT (builtin kernels)")
def _tflite_taps(path: Path, graph: Graph, inputs: np.ndarray) -> dict[str, np.ndarray]:
    """TFLite tensors are named after the IR tensors they hold (NHWC; int8 ones carry their scale and zero point),
    except the output, renamed ``logits``, and a quantised input behind a QUANTIZE op, ``input/int8``."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from mdeploy.converters.tflite import INPUT_NAME, OUTPUT_NAME, tensor_decoder, tensor_encoder

    # XNNPACK (the default delegate) runs the graph as a few fused partitions and keeps no intermediate tensors:
    # LiteRT's builtin kernels, with every tensor preserved, expose them all.
    interpreter = Interpreter(model_path=str(path), experimental_preserve_all_tensors=True,
                              experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interpreter.allocate_tensors()
    details = {d["name"]: d for d in interpreter.get_tensor_details()}
    names = {t: t for t in _ir_tensors(graph) if t in details and t != graph.input_name}
    if graph.output_name not in names and OUTPUT_NAME in details:
        names[graph.output_name] = OUTPUT_NAME
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
    from mdeploy.converters.tflite_ops import flattened_in_nhwc_order

    node = graph.producer(tensor)
    nhwc = flattened_in_nhwc_order(graph, node) if node is not None else None
    if nhwc is not None:
        c, h, w = nhwc
        return value.reshape(len(value), h, w, c).transpose(0, 3, 1, 2).reshape(len(value), -1)
    return value


def _ir_tensors(graph: Graph) -> list[str]:
    return [graph.input_name] + [node.output for node in graph.nodes]
