"""ExecuTorch's XNNPACK partitioner as the `.pte` target lowers with it: its own configs, plus int8 for ops
XNNPACK runs on int8 tensors and ExecuTorch 1.5.1 offers it in fp32 only: unary ops XNNPACK computes through a
256-entry lookup table, and the batched matmul (int8 with a symmetric second operand, which the quantiser gives
it: ``policy``'s ``symmetric_inputs``). With ``pte_forms``' transpose copies, timm's MobileNetV4-Hybrid attention
went from 14 float/int8 conversions to 4 (its softmax's).

XNNPACK builds such an op's table from the input and output grids when the program is loaded: each int8 code
maps to quantize(op(dequantize(code))), the quantiser's simulation of the op exactly, on any output grid. ExecuTorch
serialises the op with the grids of the dequantize in front of it and the quantize after it, as it does for an
int8 add. Measured on MobileNetV3-Small (random weights, 224 px, 1 thread, this AMD EPYC): int8 hard-swish as a
table 5.11 ms, as a depthwise-convolution gate times its input 5.77 ms, and the program's output equal to
PyTorch's quantize/dequantize program to the last code (the gate's was 2 steps off). TinyNet-E's int8 program
(SiLU and sigmoid gates) went from 84 float/int8 conversions inside its delegate to 2.
"""

from __future__ import annotations

from functools import cache
from typing import Any

# ExecuTorch's configs (by class name) whose op XNNPACK runs in int8 through a table.
INT8_TABLE_CONFIGS = ("HardswishConfig", "SigmoidConfig")
INT8_CONFIGS = (*INT8_TABLE_CONFIGS, "BMMConfig")


def xnnpack_partitioner() -> Any:
    """A fresh ``XnnpackPartitioner`` taking the ``INT8_CONFIGS`` ops in int8 as well as in fp32 (call it
    inside ``pte_program.quiet_imports``: it imports ExecuTorch)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    return XnnpackPartitioner(configs=list(_configs()))


@cache
def _configs() -> tuple[type, ...]:
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType

    def with_int8(config: type) -> type:
        def supported_precision_types(self: Any) -> list[Any]:
            return [ConfigPrecisionType.FP32, ConfigPrecisionType.STATIC_QUANT]

        return type(f"Int8{config.__name__}", (config,), {"supported_precision_types": supported_precision_types})

    missing = set(INT8_CONFIGS) - {c.__name__ for c in ALL_PARTITIONER_CONFIGS}
    if missing:  # another ExecuTorch than the pinned one: int8 programs would quietly hold float spans
        raise RuntimeError(f"ExecuTorch has no partitioner config {sorted(missing)}; install requirements.lock")
    return tuple(with_int8(c) if c.__name__ in INT8_CONFIGS else c for c in ALL_PARTITIONER_CONFIGS)
