"""What the TFLite writer (``tflite.py``) can be told, shared with the op translator (``tflite_ops.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class IOType(str, Enum):
    """Type of an int8 artifact's input and output tensors (fp32 artifacts are always float)."""

    int8 = "int8"  # LiteRT's convention for full-integer models: no QUANTIZE/DEQUANTIZE op at all
    uint8 = "uint8"  # QUANTIZE uint8<->int8 at both ends (XNNPACK leaves those two ops to the builtin kernels)
    float = "float"  # QUANTIZE float->int8 at the input, DEQUANTIZE at the output, both inside XNNPACK

    def __str__(self) -> str:
        return self.value


class HardSwishMode(str, Enum):
    """How an int8 hardswish is written (fp32 graphs always use the HARD_SWISH op, which XNNPACK takes)."""

    decomposed = "decomposed"  # ADD(x, 3; relu6) -> MUL(x, .) -> MUL(., 1/6): XNNPACK keeps one partition
    builtin = "builtin"  # int8 HARD_SWISH: XNNPACK refuses it, each one splits the graph (for comparison)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Options:
    io: IOType = IOType.int8
    hardswish: HardSwishMode = HardSwishMode.decomposed
