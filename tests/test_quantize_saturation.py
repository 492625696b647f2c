"""A tensor read only by ops that saturate (sigmoid, hard-sigmoid, hard-swish's low end, clip) gets a grid over
the range where their output still moves (QuantPolicy.saturates_outside): a detector's logits of +-100 before
their sigmoid would otherwise get steps of 0.8, and every pixel near the decision boundary would err by up to 0.1."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mdeploy.calibration.config import QuantRecipe
from mdeploy.graph.from_torch import graph_from_torch
from mdeploy.metrics import compare
from mdeploy.quantize import ptq
from mdeploy.quantize.policy import SIGMOID_SATURATION
from mdeploy.quantize.simulate import simulate_outputs

SHAPE = (1, 3, 16, 16)


class Head(nn.Module):
    """A conv whose output reaches +-gain, read by ``activation`` (and, with ``tap``, also returned)."""

    def __init__(self, activation: nn.Module, gain: float, tap: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.activation, self.tap = activation, tap
        with torch.no_grad():
            self.conv.weight.mul_(gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x)
        return (self.activation(y), y) if self.tap else self.activation(y)


def inputs(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, *SHAPE[1:])).astype(np.float32)


def conv_range(model: nn.Module) -> tuple[float, float]:
    qgraph = ptq.quantize(graph_from_torch(model, SHAPE), inputs(32, 0), QuantRecipe.default())
    return qgraph.activations[qgraph.graph.nodes[0].output].range


@pytest.mark.parametrize(("activation", "expected"), [
    (nn.Sigmoid(), (-SIGMOID_SATURATION, SIGMOID_SATURATION)),
    (nn.Hardsigmoid(), (-3.0, 3.0)),
    (nn.Hardtanh(-1.0, 2.0), (-1.0, 2.0)),
], ids=["sigmoid", "hardsigmoid", "clip"])
def test_the_grid_covers_where_the_activation_moves(activation: nn.Module, expected: tuple[float, float]) -> None:
    torch.manual_seed(0)
    low, high = conv_range(Head(activation, gain=40.0))
    step = (expected[1] - expected[0]) / 255
    assert expected[0] - step <= low <= expected[0] + step and expected[1] - step <= high <= expected[1] + step


def test_hardswish_clips_only_its_low_end() -> None:
    torch.manual_seed(0)
    low, high = conv_range(Head(nn.Hardswish(), gain=40.0))
    step = (high - low) / 255  # the zero point is an integer: the grid's ends move by up to a step
    assert -3.0 - step <= low <= -3.0 + step and high > 20.0  # no bound above: hard-swish is x there


def test_a_tensor_the_model_also_returns_keeps_its_whole_range() -> None:
    torch.manual_seed(0)
    low, high = conv_range(Head(nn.Sigmoid(), gain=40.0, tap=True))
    assert low < -20.0 and high > 20.0


def test_sigmoid_of_large_logits_is_accurate(monkeypatch: pytest.MonkeyPatch) -> None:
    """The point of it: the probability errs far less than on a grid over the logits' whole range."""
    torch.manual_seed(0)
    model = Head(nn.Sigmoid(), gain=40.0).eval()
    graph = graph_from_torch(model, SHAPE)
    calibration, held_out = inputs(32, 0), inputs(16, 1)
    with torch.no_grad():
        reference = model(torch.from_numpy(held_out)).numpy()
    limited = simulate_outputs(ptq.quantize(graph, calibration, QuantRecipe.default()), held_out)[0]
    monkeypatch.setattr(ptq, "_saturation_limits", lambda graph: {})  # a grid over the logits' whole range
    whole = simulate_outputs(ptq.quantize(graph, calibration, QuantRecipe.default()), held_out)[0]
    near = np.abs(torch.logit(torch.from_numpy(reference).double()).numpy()) < 2.0  # where the sigmoid moves
    assert near.mean() > 0.01
    limited_error, whole_error = np.abs(limited - reference)[near].mean(), np.abs(whole - reference)[near].mean()
    assert limited_error <= 0.85 * whole_error, (limited_error, whole_error)  # the input and weights err too
    assert compare(reference, limited).snr_db > compare(reference, whole).snr_db
