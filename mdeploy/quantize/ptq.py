"""Post-training int8 quantisation of a graph: activation ranges and weight rounding from calibration inputs.

The graph is walked once in order, over the whole calibration batch, carrying two streams: the float model's
tensors and the quantised network's (int8 codes of every quantised tensor). At each CONV/LINEAR, with the
recipe's default (``sequential``), the layer's input statistics come from the quantised stream and its target is
the float stream's output: the layer is refitted to undo the error of everything before it, then rounded with
GPTQ, with the bias absorbing what rounding leaves. Each output's range is then chosen on the values the
quantised network really produces.

Which tensors are quantised (the exporters' contract): the graph input and every node output. FLATTEN and PAD
outputs share their input's parameters; a fused ReLU/ReLU6 is applied before the output is quantised, so those
grids start at 0 (zero point -128).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from calibration.config import QuantRecipe, WeightRounding
from mdeploy.errors import BadInputError
from mdeploy.graph.execute import OPS, node_params
from mdeploy.graph.ir import Graph, Node, Op
from mdeploy.quantize.params import QuantizedGraph, TensorQuant, WeightQuant, quantize_bias
from mdeploy.quantize.ranges import tensor_quant
from mdeploy.quantize.rounding import channel_scale, correct_bias, fit_to_float, gptq, round_nearest
from mdeploy.quantize.stats import LayerStats

# Called after each node with (index, number of nodes, node name).
Progress = Callable[[int, int, str], None]

SHARED_QUANT_OPS = (Op.FLATTEN, Op.PAD)  # outputs reuse the input's scale and zero point
CHUNK = 16  # images per forward step


@dataclass
class _Codes:
    """A quantised tensor of the calibration stream, kept as int8 codes."""

    codes: torch.Tensor
    tq: TensorQuant

    @classmethod
    def of(cls, x: torch.Tensor, tq: TensorQuant) -> _Codes:
        codes = torch.empty(x.shape, dtype=torch.int8)
        for i in range(0, x.shape[0], CHUNK):
            codes[i : i + CHUNK] = torch.clamp(torch.round(x[i : i + CHUNK].float() / tq.scale) + tq.zero_point,
                                               -128, 127).to(torch.int8)
        return cls(codes, tq)

    def __getitem__(self, index: slice) -> torch.Tensor:
        return (self.codes[index].float() - self.tq.zero_point) * self.tq.scale


def _chunked(n: int, fn: Callable[[slice], torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    out: torch.Tensor | None = None
    for i in range(0, n, CHUNK):
        part = slice(i, min(i + CHUNK, n))
        y = fn(part)
        if out is None:
            out = torch.empty((n,) + tuple(y.shape[1:]), dtype=dtype)
        out[part] = y
    assert out is not None
    return out


def _known_limit(node: Node) -> tuple[float, float] | None:
    if node.op in (Op.CONV, Op.LINEAR):
        low, high = node.activation.output_range
        return (low, high) if np.isfinite(low) else None
    if node.op in (Op.SIGMOID, Op.HARDSIGMOID):
        return (0.0, 1.0)
    return None


def _round_layer(
    stats: LayerStats, recipe: QuantRecipe, sequential: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int codes (G, R, K), per-row scale (G, R) and float bias (G, R) of one layer."""
    hessian, cross = stats.normalised()
    weight, bias = stats.weight(), stats.bias()
    enough_rows = stats.rows >= recipe.min_rows_per_column * (stats.k + 1)
    rounding = recipe.weight_rounding if enough_rows else WeightRounding.nearest
    target_w, target_b = weight, bias
    if sequential and enough_rows:
        fitted = fit_to_float(weight, bias, hessian, cross, recipe.damping)
        target_w, target_b = fitted[..., :-1], fitted[..., -1]
    scale = channel_scale(target_w)
    if rounding is WeightRounding.gptq:
        if recipe.bias_correction:
            aug = torch.cat([target_w, target_b[..., None]], dim=-1)
            codes, free = gptq(aug, hessian, scale, free=1, damping=recipe.damping)
            return codes, scale, free[..., 0]
        codes, _ = gptq(target_w, hessian[:, :-1, :-1], scale, damping=recipe.damping)
        return codes, scale, bias
    codes = round_nearest(target_w, scale)
    if recipe.bias_correction:
        return codes, scale, correct_bias(codes, scale, weight, bias, hessian, cross)
    return codes, scale, bias


def quantize(
    graph: Graph, calibration: np.ndarray, recipe: QuantRecipe | None = None, progress: Progress | None = None
) -> QuantizedGraph:
    """int8 parameters for ``graph`` from a (N, C, H, W) float32 batch of preprocessed calibration inputs.

    Returns a :class:`QuantizedGraph` whose ``graph`` is a copy of ``graph`` with the corrected float biases (the
    exporters must quantise those, not the original graph's).
    """
    recipe = recipe or QuantRecipe.default()
    calibration = np.asarray(calibration, dtype=np.float32)
    if calibration.ndim != len(graph.input_shape) or calibration.shape[1:] != tuple(graph.input_shape[1:]):
        raise BadInputError(f"calibration batch {calibration.shape} does not match the input {graph.input_shape}")
    if recipe.max_samples:
        calibration = calibration[: recipe.max_samples]
    names = {n.name for n in graph.nodes}
    unknown = sorted(set(recipe.float_nodes) - names)
    if unknown:
        raise BadInputError(f"float_nodes not in the graph: {unknown}")
    started = time.perf_counter()
    torch.manual_seed(recipe.seed)
    sequential = recipe.sequential
    out_graph = copy.deepcopy(graph)
    n = calibration.shape[0]
    last_use = {name: i for i, node in enumerate(graph.nodes) for name in node.inputs}
    last_use[graph.output_name] = len(graph.nodes)

    x = torch.from_numpy(calibration)
    range_kwargs = {"percentile": recipe.percentile, "seed": recipe.seed}
    activations: dict[str, TensorQuant] = {graph.input_name: tensor_quant(x, recipe.range_method, **range_kwargs)}
    weights: dict[str, WeightQuant] = {}
    fp: dict[str, torch.Tensor] = {graph.input_name: x}
    qs: dict[str, _Codes] = {graph.input_name: _Codes.of(x, activations[graph.input_name])}

    with torch.no_grad():
        for i, node in enumerate(graph.nodes):
            fn = OPS[node.op]
            params_f = node_params(node)
            params_q = params_f

            def fp_inputs(part: slice) -> list[torch.Tensor]:
                return [fp[name][part].float() for name in node.inputs]

            def q_inputs(part: slice) -> list[torch.Tensor]:
                return [qs[name][part] for name in node.inputs]

            if node.op in (Op.CONV, Op.LINEAR) and node.name not in recipe.float_nodes:
                stats = LayerStats(node)
                main = node.inputs[0]
                for start in range(0, n, CHUNK):
                    part = slice(start, min(start + CHUNK, n))
                    xf = fp[main][part].float()
                    stats.add(qs[main][part] if sequential else xf, xf)
                codes, scale, bias = _round_layer(stats, recipe, sequential)
                s_in = activations[main].scale
                scale_flat = scale.reshape(-1).float().numpy()
                values = codes.reshape(node.weight.shape).to(torch.int8).numpy()
                wq = WeightQuant(scale=scale_flat, values=values)
                bias_np = bias.reshape(-1).float().numpy()
                weights[node.name] = wq
                out_graph.node(node.name).params["bias"] = bias_np
                bias_int = quantize_bias(bias_np, s_in, scale_flat)
                params_q = {
                    "weight": torch.from_numpy(wq.dequantize()),
                    "bias": torch.from_numpy((bias_int * (np.float64(s_in) * scale_flat)).astype(np.float32)),
                }
            y_fp = _chunked(n, lambda part: fn(node, fp_inputs(part), params_f), torch.float16)
            y_q = _chunked(n, lambda part: fn(node, q_inputs(part), params_q), torch.float32)
            if node.op in SHARED_QUANT_OPS:
                tq = activations[node.inputs[0]]
            else:
                tq = tensor_quant(y_q if sequential else y_fp, recipe.range_method, limit=_known_limit(node),
                                  **range_kwargs)
            activations[node.output] = tq
            qs[node.output] = _Codes.of(y_q, tq)
            fp[node.output] = y_fp
            del y_q
            for name in set(node.inputs):
                if last_use.get(name, -1) <= i:
                    fp.pop(name, None)
                    qs.pop(name, None)
            if progress is not None:
                progress(i + 1, len(graph.nodes), node.name)

    record = recipe.to_dict()
    record["calibration_samples"] = int(n)
    record["seconds"] = round(time.perf_counter() - started, 2)
    return QuantizedGraph(out_graph, activations, weights, frozenset(recipe.float_nodes), record)

