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

Each target's ``Converter.layer_taps`` runs its artifact and exposes the tensors (``taps_runtime`` names what runs it).
"""

from __future__ import annotations

import math
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
    from mdeploy.converters import REGISTRY

    converter = REGISTRY.get(target)
    if converter is None or converter.taps_runtime is None:
        tapped_targets = [t.value for t, c in REGISTRY.items() if c.taps_runtime is not None]
        reason = f" ({converter.taps_unavailable})" if converter is not None else ""
        raise BadInputError(f"per-layer diagnosis is not available for {target.value} artifacts{reason}: it is for "
                            f"{' and '.join(tapped_targets)} artifacts")
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
        tapped = converter.layer_taps(artifact, graph, batch)
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
        runtime=runtime_name or converter.taps_runtime,
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
    for name in names - {graph.input_name, *graph.outputs}:  # never rescaled
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
