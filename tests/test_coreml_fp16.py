"""Core ML int8 programs whose scales fp16 cannot hold (converters/coreml_fp16.py): timm initialises MobileNetV4's
layer scales to 1e-5; folded into a conv they give weight scales near 1e-8, which fp16 stores as 0 or a multiple of
themselves. The int8 artifact then computes in fp32 by default and says why; trained-like scales keep fp16."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("coremltools")

from mdeploy.calibration.config import QuantRecipe  # noqa: E402
from mdeploy.converters.base import ArtifactInfo  # noqa: E402
from mdeploy.converters.coreml import CoremlConverter  # noqa: E402
from mdeploy.graph.from_torch import graph_from_torch  # noqa: E402
from mdeploy.quantize.ptq import quantize  # noqa: E402
from mdeploy.quantize.simulate import simulate  # noqa: E402
from mdeploy.types import Precision  # noqa: E402
from tests.model_library import photos  # noqa: E402

SIZE = 32
INFO = ArtifactInfo("model", {"crop": SIZE}, tuple(f"class{i}" for i in range(8)), "test")


class LayerScaled(nn.Module):
    """x + gamma * conv(x), gamma a per-channel parameter (timm's LayerScale2d), then a head."""

    def __init__(self, gamma: float) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.branch = nn.Conv2d(8, 8, 3, padding=1)
        self.gamma = nn.Parameter(torch.full((1, 8, 1, 1), gamma))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(x + self.gamma * self.branch(x))


def snr_db(reference: np.ndarray, value: np.ndarray) -> float:
    noise = np.sum((value.astype(np.float64) - reference) ** 2)
    return float(10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / max(noise, 1e-30)))


@pytest.mark.parametrize(("gamma", "expected"), [(1e-5, "fp32"), (0.5, "fp16")])
def test_int8_compute_precision_follows_what_fp16_can_hold(gamma: float, expected: str, calib_dir: Path,
                                                           tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = LayerScaled(gamma).eval()
    x = photos(calib_dir, SIZE, 24).numpy()
    graph = graph_from_torch(model, (1, 3, SIZE, SIZE))
    quantized = quantize(graph, x[:16], QuantRecipe.stock_minmax())
    converter = CoremlConverter()
    path = tmp_path / "model.int8.mlpackage"
    converter.export(graph, quantized, path, INFO)
    assert converter.inspect(path)["compute_precision"] == expected
    recorded = converter.settings(Precision.int8)
    assert recorded["compute_precision"] == expected
    if expected == "fp32":
        assert "branch (Conv2d)" in recorded["compute_precision_reason"], recorded
    else:
        assert "compute_precision_reason" not in recorded
    # the program computes what the quantiser chose
    out = converter.runner(path)(x[16:])
    assert snr_db(simulate(quantized, x[16:]).reshape(out.shape), out) >= 30.0
    forced = CoremlConverter(compute_precision="fp16")
    forced.export(graph, quantized, tmp_path / "forced.mlpackage", INFO)
    assert forced.inspect(tmp_path / "forced.mlpackage")["compute_precision"] == "fp16"  # an explicit choice holds
