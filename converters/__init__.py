"""One module per target behind :class:`converters.base.Converter`; this registry is the only list of targets."""

from __future__ import annotations

from converters.base import Converter, Precision, Target
from converters.onnx import OnnxConverter

REGISTRY: dict[Target, Converter] = {
    Target.onnx: OnnxConverter(),
}

__all__ = ["REGISTRY", "Converter", "Precision", "Target"]
