"""The IR built from torch.export computes what PyTorch computes, for every zoo model and the odd user module."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mdeploy.errors import UnsupportedOpError
from mdeploy.graph.execute import GraphRunner
from mdeploy.graph.from_torch import graph_from_torch
from mdeploy.graph.ir import Op
from mdeploy.zoo import Arch, ModelConfig, build_model


def randomize_batch_norm(model: nn.Module) -> nn.Module:
    """Fresh BatchNorms are identities; give them real statistics so that folding is actually tested."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
    return model.eval()


@pytest.mark.parametrize("arch", list(Arch))
def test_zoo_graph_matches_pytorch(arch: Arch) -> None:
    model = randomize_batch_norm(build_model(ModelConfig(arch, 0.5, 10, 0.2)))
    graph = graph_from_torch(model, (1, 3, 96, 96))
    x = torch.randn(2, 3, 96, 96)
    np.testing.assert_allclose(GraphRunner(graph)(x).numpy(), model(x).detach().numpy(), atol=1e-4, rtol=1e-4)
    assert not any(n.source == "" for n in graph.weighted_nodes)
    assert all(n.op is not Op.PAD for n in graph.nodes)


def test_batch_norm_folds_and_relu6_fuses() -> None:
    model = build_model(ModelConfig(Arch.mobilenet_v2, 1.0, 1000, 0.2))
    graph = graph_from_torch(model, (1, 3, 64, 64))
    histogram = graph.op_histogram()
    assert histogram["conv+relu6"] == 35  # stem, 17 expansions (the first block has none) and 17 depthwise
    assert histogram["conv"] == 17  # projections, linear bottlenecks
    assert histogram["add"] == 10
    assert "batch_norm" not in str(histogram)


class TfStylePadding(nn.Module):
    """A model ported from TensorFlow: asymmetric explicit padding before a stride-2 conv, BN without a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, bias=True)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(F.pad(x, (0, 1, 0, 1)))
        x = F.relu6(self.bn(torch.sigmoid(x)))
        return self.fc(x.mean(dim=(2, 3)))


def test_explicit_asymmetric_padding_and_standalone_batch_norm() -> None:
    model = randomize_batch_norm(TfStylePadding())
    graph = graph_from_torch(model, (1, 3, 33, 33))
    conv = graph.weighted_nodes[0]
    assert conv.attrs.padding == (0, 1, 0, 1)
    # the BN after the sigmoid is a per-channel scale and shift (AFFINE), the ReLU6 after it a CLIP
    assert [n.op for n in graph.nodes][:4] == [Op.CONV, Op.SIGMOID, Op.AFFINE, Op.CLIP]
    x = torch.randn(3, 3, 33, 33)
    np.testing.assert_allclose(GraphRunner(graph)(x).numpy(), model(x).detach().numpy(), atol=1e-5)


class UsesElu(nn.Module):  # (max pooling and upsampling, the examples here before, are supported since issues 14, 15)
    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x).flatten(1)


def test_unsupported_op_names_op_and_module() -> None:
    with pytest.raises(UnsupportedOpError) as err:
        graph_from_torch(UsesElu(), (1, 3, 8, 8))
    message = str(err.value)
    assert "aten.elu" in message and "act (ELU)" in message and "supported:" in message
