"""One module per target behind :class:`converters.base.Converter`; this registry is the only list of targets."""

from __future__ import annotations

from mdeploy.converters.base import Converter, Precision, Target
from mdeploy.converters.coreml import CoremlConverter
from mdeploy.converters.onnx import OnnxConverter
from mdeploy.converters.tflite import TfliteConverter

REGISTRY: dict[Target, Converter] = {
    Target.onnx: OnnxConverter(),
    Target.tflite: TfliteConverter(),
    Target.coreml: CoremlConverter(),
}

__all__ = ["REGISTRY", "Converter", "Precision", "Target"]
