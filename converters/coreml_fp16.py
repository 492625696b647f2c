"""Whether an int8 program's numbers survive Core ML's fp16 compute.

A W8A8 program computing in fp16 holds every weight and activation scale as an fp16 number. Below fp16's normal
range (2**-14) the spacing is 2**-24, so a scale under 2**-18 is stored more than 0.8% off, and one near 1e-8 (an
untrained layer scale of 1e-5 folded into a conv: timm's MobileNetV4-Hybrid) rounds to 0 or to a multiple of itself:
the whole channel or tensor is then wrong, not noisy. Trained networks have no such scales; where one occurs, the
default compute precision of the int8 artifact becomes fp32 and the manifest says why.
"""

from __future__ import annotations

import numpy as np

from mdeploy.quantize.params import QuantizedGraph

SMALLEST_FAITHFUL_SCALE = 2.0**-18  # fp16 keeps it within 2**-24 / 2 / 2**-18 = 0.8%


def scales_fp16_cannot_hold(quantized: QuantizedGraph) -> list[str]:
    """The user's modules whose int8 weight scales (of channels in use) or output scale are too small for fp16, in
    graph order."""
    small: list[str] = []
    for node in quantized.graph.nodes:
        weight = quantized.weights.get(node.name)
        weights_small = weight is not None and bool(np.any((weight.scale < SMALLEST_FAITHFUL_SCALE)
                                                           & _channels_in_use(weight.values)))
        output = quantized.activations.get(node.output)
        if weights_small or (output is not None and output.scale < SMALLEST_FAITHFUL_SCALE):
            small.append(node.source or node.name)
    return list(dict.fromkeys(small))


def _channels_in_use(codes: np.ndarray) -> np.ndarray:
    return np.any(codes.reshape(len(codes), -1) != 0, axis=1)


def fp16_fallback_reason(quantized: QuantizedGraph) -> str | None:
    """Why the int8 program computes in fp32 by default, or None when fp16 holds it."""
    small = scales_fp16_cannot_hold(quantized)
    if not small:
        return None
    named = ", ".join(small[:3]) + (f" and {len(small) - 3} more" if len(small) > 3 else "")
    return (f"int8 scales below {SMALLEST_FAITHFUL_SCALE:.2g}, which fp16 cannot hold, at {named}; "
            f"--coreml-precision fp16 forces fp16")
