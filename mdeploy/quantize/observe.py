"""One pass of the float model over the calibration batch, keeping only small per-channel statistics.

- ``ranges``: per-channel max |x| of every rank-2/4 tensor (for activation equalisation);
- ``output_means``: per CONV/LINEAR node, the mean of its pre-activation output over all positions and samples
  (the target of bias correction: the quantised layer must reproduce the float model's mean output).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mdeploy.graph.execute import GraphRunner
from mdeploy.graph.ir import Graph, Node, Op
from mdeploy.quantize.stats import patch_sums

BATCH = 32


@dataclass
class FloatStats:
    ranges: dict[str, np.ndarray]
    output_means: dict[str, np.ndarray]


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """NHWC memory layout: PyTorch's CPU depthwise and 1x1 convolutions run 2-4x faster on it."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def fast_runner(graph: Graph) -> GraphRunner:
    runner = GraphRunner(graph)
    for params in runner.params.values():
        for key, value in params.items():
            params[key] = channels_last(value)
    return runner


def observe(graph: Graph, calibration: np.ndarray) -> FloatStats:
    weighted: dict[str, list[Node]] = {}
    for node in graph.weighted_nodes:
        weighted.setdefault(node.inputs[0], []).append(node)
    ranges: dict[str, torch.Tensor] = {}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str, value: torch.Tensor) -> torch.Tensor:
        if value.dim() in (2, 4):
            dims = (0, 2, 3) if value.dim() == 4 else (0,)
            r = torch.maximum(value.amax(dim=dims), -value.amin(dim=dims))
            ranges[name] = torch.maximum(ranges[name], r) if name in ranges else r
        for node in weighted.get(name, []):
            s, positions = patch_sums(node, value.sum(0))
            sums[node.name] = sums[node.name] + s if node.name in sums else s
            counts[node.name] = counts.get(node.name, 0) + positions * value.shape[0]
        return value

    runner = fast_runner(graph)
    for i in range(0, len(calibration), BATCH):
        runner(channels_last(torch.from_numpy(np.ascontiguousarray(calibration[i : i + BATCH]))), hook)
    means: dict[str, np.ndarray] = {}
    for node in graph.weighted_nodes:
        mean_in = sums[node.name] / counts[node.name]  # (G, K)
        groups = mean_in.shape[0]
        w = torch.from_numpy(node.weight).double().reshape(groups, -1, mean_in.shape[1])
        out = (w @ mean_in[..., None])[..., 0].reshape(-1) + torch.from_numpy(node.bias).double()
        means[node.name] = out.numpy()
    return FloatStats({k: v.double().numpy() for k, v in ranges.items()}, means)


def rescaled_means(stats: FloatStats, graph: Graph, scales: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Output means after equalisation divided each rescaled output channel by its scale."""
    return {
        node.name: stats.output_means[node.name] / scales.get(node.output, 1.0)
        for node in graph.nodes
        if node.op in (Op.CONV, Op.LINEAR)
    }
