"""The int8 policy of every IR op, in one typed table: what the quantiser and the int8 writers may assume about an
op's output.

- ``shares_input_grid``: the output reuses the input's scale and zero point (FLATTEN, PAD, RESHAPE, TRANSPOSE move
  values without changing them, so no requantisation and the output is exact);
- ``output_range``: the values the op can produce, when bounded (a fused ReLU6: [0, 6], sigmoid: [0, 1]);
  ``limits_calibration`` says whether the quantiser clips a calibrated range to it. It does where that has always
  been done (CONV/LINEAR with a fused activation, SIGMOID, HARDSIGMOID; SILU and GELU, new, at their minimum). For
  RELU, CLIP and SOFTMAX the observed range already lies inside, and clipping to the float64 bounds could only move a
  grid by the float32 rounding of a bound (clip(0, 0.1)) or, for a range that excludes 0 (clip(1, 6)), change what the
  estimators see: turning it on would change existing int8 artifacts, so it stays off;
- ``fixed_output``: per runtime, the output grid its int8 kernel demands (TFLite's int8 LOGISTIC needs scale 1/256,
  zero point -128); a writer requantises to the quantiser's grid after the op when the two differ. (TFLite's int8
  SOFTMAX demands it too, but the TFLite writer computes a softmax in float between int8 tensors instead: XNNPACK
  delegates no int8 SOFTMAX);
- ``keeps_channels``: output channel c depends on input channel c only, linearly, so a per-channel rescaling of the
  inputs passes through to the output (activation equalisation; FLATTEN only of a 1x1 map, see ``equalize``).
  LEAKY_RELU and PRELU keep channels because scales are positive and they are positively homogeneous; AFFINE
  (``x * scale[c] + shift[c]``) because ``equalize.apply_scales`` divides its shift by the same scale;
- ``symmetric_inputs``: inputs (by position) whose int8 grid must have zero point 0: XNNPACK (LiteRT 2.3) runs an
  int8 BATCH_MATMUL only when its second operand is symmetric (measured in tests/test_ops_attention.py; with any
  other zero point it leaves the op to LiteRT's builtin kernels, a partition boundary on each side). The quantiser
  gives the tensor that owns that grid (through RESHAPE/TRANSPOSE, which share it) a symmetric grid over its range;
- ``saturates_outside``: the input range outside which the op's output no longer changes by as much as half a
  step of its int8 grid (sigmoid: |x| > ln(511), where it is within 1/512 of 0 or 1; hard-sigmoid [-3, 3];
  hard-swish below -3; clip at its bounds). A tensor read only by such ops needs no grid beyond that range: the
  quantiser clips its calibrated range to it (a detector's logits reach +-170 before their sigmoid: a grid over
  them has steps of 1.3, a grid over +-6.24 steps of 0.05);
- ``inputs_take_output_grid``: the op's int8 kernels want every input on the output's grid (TFLite's CONCATENATION
  and XNNPACK's concatenate). The quantiser gives an input the op's grid where nothing read it earlier (its
  producer neither shares a grid nor is read before the op); any other input is requantised before the op by the
  writers (TFLite: an int8 -> int8 QUANTIZE; ExecuTorch: a quantize/dequantize pair), the rounding the quantiser
  simulates.

Adding an IR op means adding its row here; tests/test_ops.py fails until every backend (this table included)
handles every member of :class:`~mdeploy.graph.ir.Op`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

import numpy as np

from mdeploy.errors import UnsupportedOpError
from mdeploy.graph.ir import ClipAttrs, Node, Op
from mdeploy.quantize.params import TensorQuant

Runtime = Literal["onnx", "tflite", "coreml"]
Range = tuple[float, float]
RangeOf = Callable[[Node], "Range | None"]

SILU_MIN = -0.2785  # min of x * sigmoid(x), at x = -1.2785 (-0.27846...), rounded down
# min of GELU, rounded down: -0.16997 at x = -0.7518 (erf form), -0.17004 at x = -0.7525 (tanh approximation)
GELU_MIN = -0.1701

# int8 grid of a probability, [0, 255/256]: what TFLite's int8 LOGISTIC kernel writes.
PROBABILITY_GRID = TensorQuant(1.0 / 256.0, -128)
# sigmoid(x) is within half a probability step (1/512) of 0 or 1 for |x| > ln(511)
SIGMOID_SATURATION = float(np.log(511.0))


def _none(node: Node) -> Range | None:
    return None


def _fused_activation(node: Node) -> Range | None:
    low, high = node.activation.output_range
    return (low, high) if np.isfinite(low) else None


def _clip_attrs(node: Node) -> Range | None:
    attrs = node.attrs
    assert isinstance(attrs, ClipAttrs)
    return (float(attrs.min), float(attrs.max))


def _constant(low: float, high: float) -> RangeOf:
    return lambda node: (low, high)


@dataclass(frozen=True)
class QuantPolicy:
    """How one IR op's output is quantised (see the module doc for each field)."""

    shares_input_grid: bool = False
    output_range: RangeOf = _none
    limits_calibration: bool = False
    fixed_output: Mapping[Runtime, TensorQuant] = field(default_factory=lambda: MappingProxyType({}))
    keeps_channels: bool = False
    inputs_take_output_grid: bool = False
    symmetric_inputs: tuple[int, ...] = ()
    saturates_outside: RangeOf = _none

    def calibration_limit(self, node: Node) -> Range | None:
        """What the quantiser clips ``node``'s calibrated output range to (None: nothing)."""
        return self.output_range(node) if self.limits_calibration else None

    def fixed_grid(self, runtime: Runtime) -> TensorQuant | None:
        return self.fixed_output.get(runtime)


def _fixed(**grids: TensorQuant) -> Mapping[Runtime, TensorQuant]:
    return MappingProxyType(dict(grids))  # type: ignore[arg-type]


POLICY: Mapping[Op, QuantPolicy] = MappingProxyType({
    Op.CONV: QuantPolicy(output_range=_fused_activation, limits_calibration=True),
    Op.LINEAR: QuantPolicy(output_range=_fused_activation, limits_calibration=True),
    Op.ADD: QuantPolicy(keeps_channels=True),
    Op.MUL: QuantPolicy(),
    Op.RELU: QuantPolicy(output_range=_constant(0.0, np.inf)),
    Op.CLIP: QuantPolicy(output_range=_clip_attrs, saturates_outside=_clip_attrs),
    Op.HARDSWISH: QuantPolicy(output_range=_constant(-0.375, np.inf),  # min at x = -1.5
                              saturates_outside=_constant(-3.0, np.inf)),
    Op.HARDSIGMOID: QuantPolicy(output_range=_constant(0.0, 1.0), limits_calibration=True,
                                saturates_outside=_constant(-3.0, 3.0)),
    Op.SIGMOID: QuantPolicy(output_range=_constant(0.0, 1.0), limits_calibration=True,
                            fixed_output=_fixed(tflite=PROBABILITY_GRID),
                            saturates_outside=_constant(-SIGMOID_SATURATION, SIGMOID_SATURATION)),
    Op.GLOBAL_AVG_POOL: QuantPolicy(keeps_channels=True),
    Op.FLATTEN: QuantPolicy(shares_input_grid=True, keeps_channels=True),
    Op.PAD: QuantPolicy(shares_input_grid=True, keeps_channels=True),
    Op.SOFTMAX: QuantPolicy(output_range=_constant(0.0, 1.0)),
    Op.CONCAT: QuantPolicy(inputs_take_output_grid=True),
    Op.MAX_POOL: QuantPolicy(shares_input_grid=True, keeps_channels=True),  # picks values: exact on the input grid
    Op.AVG_POOL: QuantPolicy(shares_input_grid=True, keeps_channels=True),  # a mean stays in the input's range
    Op.CHANNEL_SHUFFLE: QuantPolicy(shares_input_grid=True),  # moves channels: exact
    Op.SLICE: QuantPolicy(shares_input_grid=True),
    Op.SILU: QuantPolicy(output_range=_constant(SILU_MIN, np.inf), limits_calibration=True),
    Op.GELU: QuantPolicy(output_range=_constant(GELU_MIN, np.inf), limits_calibration=True),  # either form
    # positively homogeneous per channel (f(x / s) = f(x) / s for s > 0): equalisation's rescaling passes through
    Op.LEAKY_RELU: QuantPolicy(keeps_channels=True),
    Op.PRELU: QuantPolicy(keeps_channels=True),
    Op.AFFINE: QuantPolicy(keeps_channels=True),  # equalize.apply_scales divides its shift by the tensor's scale
    # move values without changing them (exact on the input's grid); axis 1 is no longer the channels
    Op.RESHAPE: QuantPolicy(shares_input_grid=True),
    Op.TRANSPOSE: QuantPolicy(shares_input_grid=True),
    Op.MATMUL: QuantPolicy(symmetric_inputs=(1,)),  # two int8 activations in, its own calibrated grid out
    # nearest copies samples, bilinear averages neighbours of one channel: the input's grid holds every output
    # (TFLite's int8 resize kernels and XNNPACK's want it: no requantisation)
    Op.RESIZE: QuantPolicy(shares_input_grid=True, keeps_channels=True),
    Op.CONV_TRANSPOSE: QuantPolicy(output_range=_fused_activation, limits_calibration=True),  # as CONV
})


def policy_of(op: Op) -> QuantPolicy:
    try:
        return POLICY[op]
    except KeyError:
        raise UnsupportedOpError(f"IR op {op.value} has no int8 policy: add its row to POLICY in {__name__}") from None
