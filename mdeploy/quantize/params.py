"""What an int8 model is, independent of any runtime: per-tensor activation quantisation, per-channel weights.

Conventions shared by every target (ONNX QDQ, TFLite int8, Core ML W8A8), matching their int8 kernels:
activations are int8 asymmetric per tensor (q = clamp(round(x / scale) + zero_point, -128, 127)); weights are int8
symmetric per output channel (zero point 0, q in [-127, 127]); biases are int32 with scale input_scale * weight_scale.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mdeploy.graph.ir import Graph

QMIN, QMAX = -128, 127
WEIGHT_QMAX = 127


@dataclass(frozen=True)
class TensorQuant:
    scale: float
    zero_point: int

    @classmethod
    def from_range(cls, low: float, high: float) -> TensorQuant:
        """The int8 grid covering [low, high]; the range is widened to include 0 so that 0 is exact."""
        low, high = min(float(low), 0.0), max(float(high), 0.0)
        if high - low < 1e-8:
            high = low + 1e-8
        scale = (high - low) / (QMAX - QMIN)
        zero_point = int(np.clip(round(QMIN - low / scale), QMIN, QMAX))
        return cls(scale, zero_point)

    @classmethod
    def symmetric(cls, low: float, high: float) -> TensorQuant:
        """The int8 grid with zero point 0 covering [-m, m], m = max(|low|, |high|) (codes -127..127 in use)."""
        return cls(max(abs(float(low)), abs(float(high)), 1e-8) / QMAX, 0)

    @property
    def range(self) -> tuple[float, float]:
        return ((QMIN - self.zero_point) * self.scale, (QMAX - self.zero_point) * self.scale)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        return np.clip(np.round(x / self.scale) + self.zero_point, QMIN, QMAX).astype(np.int8)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        return ((q.astype(np.float32) - self.zero_point) * self.scale).astype(np.float32)


@dataclass
class WeightQuant:
    """int8 weights of one CONV/LINEAR node, symmetric per output channel (axis 0)."""

    scale: np.ndarray  # (O,) float32
    values: np.ndarray  # int8, the weight's shape

    def dequantize(self) -> np.ndarray:
        shape = (-1,) + (1,) * (self.values.ndim - 1)
        return (self.values.astype(np.float32) * self.scale.reshape(shape)).astype(np.float32)


def quantize_bias(bias: np.ndarray, input_scale: float, weight_scale: np.ndarray) -> np.ndarray:
    return np.round(bias.astype(np.float64) / (input_scale * weight_scale.astype(np.float64))).astype(np.int32)


@dataclass
class QuantizedGraph:
    """A float graph plus everything needed to run it in int8.

    ``activations`` maps tensor names to their quantisation; ``weights`` maps CONV/LINEAR node names to int8
    weights. Nodes named in ``float_nodes`` stay in float (mixed precision): their weights are not quantised and
    their inputs are dequantised before them. ``recipe`` records how the parameters were obtained (manifest).
    """

    graph: Graph
    activations: dict[str, TensorQuant]
    weights: dict[str, WeightQuant]
    float_nodes: frozenset[str] = frozenset()
    recipe: dict[str, object] = field(default_factory=dict)
    # Per-channel scales equalisation divided tensors by (``graph`` = equalize.apply_scales(original, these)):
    # what a per-layer diagnosis needs to compare the artifact's tensors with PyTorch's.
    channel_scales: dict[str, np.ndarray] = field(default_factory=dict)
    # ``mdeploy.quantize.mixed.MixedPrecision`` when a target SNR chose layers to keep in float (the manifest's)
    mixed_precision: Any = None


def float_tensors(graph: Graph, float_nodes: Collection[str], float_input: bool = False) -> frozenset[str]:
    """The tensors of a mixed-precision model that need no int8 grid: made by a float node and read only by float
    nodes, so every target passes them on in float. The graph's outputs keep their grids, and so does its input
    unless ``float_input`` (every target's int8 artifact takes a float input: a TFLite model with int8 I/O does
    not): they are the int8 artifact's I/O contract."""
    if not float_nodes:
        return frozenset()
    readers: dict[str, list[str]] = {}
    for node in graph.nodes:
        for name in set(node.inputs):
            readers.setdefault(name, []).append(node.name)
    made = {node.output for node in graph.nodes if node.name in float_nodes and node.output not in graph.outputs}
    if float_input:
        made.add(graph.input_name)
    return frozenset(name for name in made if all(reader in float_nodes for reader in readers.get(name, ())))
