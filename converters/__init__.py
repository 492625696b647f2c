"""One module per target behind :class:`converters.base.Converter`; this registry is the only list of targets."""

from __future__ import annotations

from mdeploy.converters.base import Converter, Precision, Target
from mdeploy.converters.coreml import CoremlConverter
from mdeploy.converters.onnx import OnnxConverter
from mdeploy.converters.pte import PteConverter
from mdeploy.converters.tflite import TfliteConverter

REGISTRY: dict[Target, Converter] = {
    Target.onnx: OnnxConverter(),
    Target.tflite: TfliteConverter(),
    Target.coreml: CoremlConverter(),
    PteConverter.target: PteConverter(),
}

CORE_PACKAGES = ("torch", "numpy")


def tool_packages() -> tuple[str, ...]:
    """The pip distributions whose versions the manifest and ``mdeploy doctor`` report: mdeploy's own numerics and
    every registered target's runtime packages."""
    return tuple(dict.fromkeys([*CORE_PACKAGES, *(name for c in REGISTRY.values() for name in c.packages)]))


__all__ = ["REGISTRY", "Converter", "Precision", "Target", "tool_packages"]
