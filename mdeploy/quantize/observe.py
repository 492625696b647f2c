"""One pass of the float model over the calibration batch, keeping per-channel ranges (for equalisation)."""

from __future__ import annotations

import numpy as np
import torch

from mdeploy.graph.execute import GraphRunner
from mdeploy.graph.ir import Graph

BATCH = 32


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """NHWC memory layout: PyTorch's CPU depthwise and 1x1 convolutions run 2-4x faster on it."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def fast_runner(graph: Graph) -> GraphRunner:
    """A GraphRunner whose 4-D parameters are channels-last (feed it channels-last inputs)."""
    runner = GraphRunner(graph)
    for params in runner.params.values():
        for key, value in params.items():
            params[key] = channels_last(value)
    return runner


def channel_ranges(graph: Graph, calibration: np.ndarray) -> dict[str, np.ndarray]:
    """Per-channel max |x| of every rank-2/4 tensor (graph input and node outputs) of the float model."""
    ranges: dict[str, torch.Tensor] = {}

    def hook(name: str, value: torch.Tensor) -> torch.Tensor:
        if value.dim() in (2, 4):
            dims = (0, 2, 3) if value.dim() == 4 else (0,)
            r = torch.maximum(value.amax(dim=dims), -value.amin(dim=dims))
            ranges[name] = torch.maximum(ranges[name], r) if name in ranges else r
        return value

    runner = fast_runner(graph)
    with torch.no_grad():
        for i in range(0, len(calibration), BATCH):
            runner.run(channels_last(torch.from_numpy(np.ascontiguousarray(calibration[i : i + BATCH]))), hook)
    return {name: r.double().numpy() for name, r in ranges.items()}
