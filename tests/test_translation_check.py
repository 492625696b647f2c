"""pipeline.check_translation: the IR must compute what PyTorch computes before any artifact is written from it. A
wrong graph fails in float32 and in float64 (where float32 rounding, which a deep random-weight segmenter amplifies
past the float32 limit, cannot hide it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from mdeploy.errors import ConversionError
from mdeploy.graph.from_torch import graph_from_torch
from mdeploy.loading import LoadedModel, ModelFormat
from mdeploy.pipeline import check_translation

SHAPE = (1, 3, 16, 16)


def loaded(module: nn.Module) -> LoadedModel:
    return LoadedModel(module, ModelFormat.exported_program, Path("model.pt2"), "", None, "model")


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Sigmoid()).eval()


def test_a_right_graph_passes() -> None:
    module = model()
    check_translation(graph_from_torch(module, SHAPE), loaded(module), SHAPE)


def test_a_wrong_graph_fails_in_float64_too() -> None:
    module = model()
    graph = graph_from_torch(module, SHAPE)
    graph.nodes[-2].params["bias"] = graph.nodes[-2].params["bias"] + 1e-3  # a small, real difference
    with pytest.raises(ConversionError, match=r"internal: the traced graph differs from PyTorch by .* in float64"):
        check_translation(graph, loaded(module), SHAPE)
