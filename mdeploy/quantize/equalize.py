"""Activation equalisation: per-channel rescaling that gives per-tensor int8 activations per-channel resolution.

Activations are quantised per tensor, so a channel whose values span 0.1 while another spans 20 gets almost no
levels. Every MobileNet tensor between two convolutions can be rescaled per channel without changing the
function: divide the producing conv's output rows (weight and bias) by ``s_c`` and multiply the consuming convs'
input columns by ``s_c`` (Nagel et al. 2019, cross-layer equalisation, applied to activations). Tensors joined by
ADD (the residual stream of a stage), GLOBAL_AVG_POOL, FLATTEN of a 1x1 map and PAD share one scale vector.

With ``r_c`` a channel's calibration range and ``R`` the tensor's, ``s_c = (max(r_c / R, floor)) ** alpha`` (<= 1):
small channels are magnified, the tensor's range is unchanged. A magnified channel's calibration maximum lands on
the tensor's, leaving it no headroom, and a calibration set of a few photos understates what other photos drive
its channels to (MobileNetV2, the demo's split: the held-out photos exceed the calibration maximum of one channel in
ten by 1.3x or more, of some by 4-5x, and those values were clipped). ``floor`` bounds the magnification, so a
channel calibration barely excited keeps headroom (see ``QuantRecipe.equalize_range_floor``).
When every consumer is a depthwise conv (whose weights are quantised per channel, so scaling a channel's kernel
costs nothing), alpha is 1: full per-channel resolution.
Otherwise the cost moves to the consumers' weights (input columns shrink) and alpha trades one against the other.

A fused ReLU (positively homogeneous) is exact; a fused ReLU6 then clips channel c at ``6 s_c >= r_c`` in the
original units, beyond anything calibration produced: the same clipping a per-channel grid over [0, r_c] would
apply. So the rescaled float graph equals the original on the calibration set and differs only where a held-out
input exceeds a channel's calibration range (about 55 dB below the logits on MobileNetV2's held-out crops).
"""

from __future__ import annotations

import copy

import numpy as np

from mdeploy.graph.ir import WEIGHTED_OPS, Activation, ConvAttrs, ConvTransposeAttrs, Graph, Node, Op
from mdeploy.quantize.policy import policy_of

SCALABLE_ACTIVATIONS = (Activation.NONE, Activation.RELU, Activation.RELU6)
MIN_SCALE = 1e-3


class _Groups:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


def _channels(graph: Graph, tensor: str) -> int | None:
    shape = graph.shapes.get(tensor)
    return shape[1] if shape is not None and len(shape) in (2, 4) else None


def _passes_channels(graph: Graph, node: Node) -> bool:
    """Whether a per-channel rescaling of ``node``'s inputs passes through to its output unchanged."""
    if not policy_of(node.op).keeps_channels:
        return False
    if node.op is not Op.FLATTEN:
        return True
    shape = graph.shapes.get(node.inputs[0], ())
    return len(shape) == 4 and shape[2] == shape[3] == 1


def scaling_groups(graph: Graph) -> list[list[str]]:
    """Sets of tensors that can share one per-channel rescaling (see module doc); ineligible ones are left out."""
    groups = _Groups()
    tensors = [n.output for n in graph.nodes]
    for node in graph.nodes:
        groups.find(node.output)
        if _passes_channels(graph, node):
            for name in node.inputs:
                groups.union(name, node.output)
    members: dict[str, list[str]] = {}
    for t in tensors:
        members.setdefault(groups.find(t), []).append(t)
    eligible = []
    for group in members.values():
        names = set(group)
        if graph.input_name in names or names & set(graph.outputs):
            continue
        if len({_channels(graph, t) for t in group}) != 1 or _channels(graph, group[0]) is None:
            continue
        ok = True
        for t in group:
            producer = graph.producer(t)
            if producer is None:
                ok = False
            elif policy_of(producer.op).keeps_channels:
                ok &= _passes_channels(graph, producer) and all(i in names for i in producer.inputs)
            else:
                ok &= producer.op in WEIGHTED_OPS and producer.activation in SCALABLE_ACTIVATIONS
            for consumer in graph.consumers(t):
                if policy_of(consumer.op).keeps_channels:
                    ok &= consumer.output in names
                else:
                    ok &= consumer.op in WEIGHTED_OPS and consumer.inputs == [t]
        if ok:
            eligible.append(group)
    return eligible


def _scale_input_channels(node: Node, s: np.ndarray) -> None:
    w = node.params["weight"]
    if node.op is Op.LINEAR:
        node.params["weight"] = (w * s[None, :]).astype(np.float32)
        return
    groups = node.attrs.groups if isinstance(node.attrs, (ConvAttrs, ConvTransposeAttrs)) else 1
    out_ch, in_per_group = w.shape[:2]
    s_grouped = s.reshape(groups, 1, in_per_group)  # input channel c = g * in_per_group + local
    w = w.reshape(groups, out_ch // groups, in_per_group, *w.shape[2:]) * s_grouped[..., None, None]
    node.params["weight"] = w.reshape(node.params["weight"].shape).astype(np.float32)


def _scale_output_channels(node: Node, s: np.ndarray) -> None:
    shape = (-1,) + (1,) * (node.params["weight"].ndim - 1)
    node.params["weight"] = (node.params["weight"] / s.reshape(shape)).astype(np.float32)
    node.params["bias"] = (node.params["bias"] / s).astype(np.float32)


def equalize(
    graph: Graph, ranges: dict[str, np.ndarray], alpha: float = 0.35, range_floor: float = 0.0
) -> tuple[Graph, dict[str, np.ndarray]]:
    """A rescaled copy of ``graph`` and the per-channel scale ``s`` applied to each tensor (the new tensor is
    the old one divided by ``s``). Only tensors with calibration ranges are touched."""
    out = copy.deepcopy(graph)
    scales: dict[str, np.ndarray] = {}
    for group in scaling_groups(out):
        if any(t not in ranges for t in group):
            continue
        r = np.max([ranges[t] for t in group], axis=0)
        big = float(r.max())
        if big <= 0:
            continue
        names = set(group)
        consumers = [c for t in group for c in out.consumers(t) if c.output not in names]
        # A depthwise consumer's weights are per channel: scaling them costs no resolution, equalise fully.
        a = 1.0 if consumers and all(c.is_depthwise for c in consumers) else alpha
        s = np.where(r > 0, np.clip(r / big, max(range_floor, MIN_SCALE), 1.0) ** a, 1.0)
        for t in group:  # a fused ReLU6 clips at 6 s_c in original units: keep that beyond what calibration saw
            producer = out.producer(t)
            if producer is not None and producer.activation is Activation.RELU6:
                s = np.maximum(s, ranges[t] / 6.0)
        for t in group:
            scales[t] = s
    return apply_scales(out, scales), scales


def apply_scales(graph: Graph, scales: dict[str, np.ndarray]) -> Graph:
    """A copy of ``graph`` in which each tensor named in ``scales`` is divided by its per-channel scale: its
    producing CONV/LINEAR computes the scaled tensor and its CONV/LINEAR consumers undo the scale (the channels
    in between, through pass-through ops, share the scale). The same function as ``graph`` computes."""
    out = copy.deepcopy(graph)
    for t, s in scales.items():
        producer = out.producer(t)
        if producer is not None and producer.op in WEIGHTED_OPS:
            _scale_output_channels(producer, s)
        elif producer is not None and producer.op is Op.AFFINE:  # its input is scaled by s too: x/s * a + b/s
            producer.params["shift"] = (producer.params["shift"] / s).astype(np.float32)
        for consumer in out.consumers(t):
            if consumer.op in WEIGHTED_OPS:
                _scale_input_channels(consumer, s)
    return out
