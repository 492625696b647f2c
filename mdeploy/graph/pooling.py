"""The windows of a MAX_POOL / AVG_POOL as PyTorch computes them, in the one form every target writes.

Every target writes a pool the same way, so they agree with PyTorch in every corner case (``ceil_mode``,
``count_include_pad=False``, ``divisor_override``): pad explicitly (with -inf for max pooling, zeros for average
pooling) by PyTorch's padding plus the extra rows/columns ``ceil_mode`` adds at the bottom/right, then pool VALID.
An average pool divides by kh * kw everywhere and, where PyTorch divides by something else, multiplies by the
per-position ``correction`` = kh * kw / PyTorch's divisor (a constant (Ho, Wo) map; None when it is 1 everywhere).

Channel shuffles and adaptive pooling reduce to this module's helpers too (``shuffle_permutation``,
``adaptive_window``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mdeploy.graph.ir import PoolAttrs


@dataclass(frozen=True)
class PoolGeometry:
    out: tuple[int, int]  # (Ho, Wo)
    pads: tuple[int, int, int, int]  # top, bottom, left, right: PyTorch's padding + ceil_mode's extra
    correction: np.ndarray | None  # (Ho, Wo) float64: kh * kw / PyTorch's divisor, None where uniformly 1

    @property
    def padded(self) -> bool:
        return any(self.pads)


def _axis(size: int, k: int, s: int, p: int, ceil_mode: bool) -> tuple[int, int]:
    """(output size, extra padding at the end) along one axis, as torch's pooling_output_shape."""
    span = size + 2 * p - k
    out = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= size + p:  # the last window must start inside the input or left padding
        out -= 1
    return out, max(0, (out - 1) * s + k - (size + 2 * p))


def _divisors(size: int, k: int, s: int, p: int, out: int, include_pad: bool) -> np.ndarray:
    """Per output position along one axis: (window size counted by PyTorch, as a factor of the product)."""
    start = np.arange(out) * s - p
    end = np.minimum(start + k, size + p)
    if include_pad:
        return (end - start).astype(np.float64)
    return (np.minimum(end, size) - np.maximum(start, 0)).astype(np.float64)


def pool_geometry(attrs: PoolAttrs, size: tuple[int, int], average: bool) -> PoolGeometry:
    (kh, kw), (sh, sw), (ph, pw) = attrs.kernel, attrs.stride, attrs.padding
    ho, extra_h = _axis(size[0], kh, sh, ph, attrs.ceil_mode)
    wo, extra_w = _axis(size[1], kw, sw, pw, attrs.ceil_mode)
    correction = None
    if average:
        if attrs.divisor_override:
            divisor = np.full((ho, wo), float(attrs.divisor_override))
        else:
            dh = _divisors(size[0], kh, sh, ph, ho, attrs.count_include_pad)
            dw = _divisors(size[1], kw, sw, pw, wo, attrs.count_include_pad)
            divisor = np.outer(dh, dw)
        ratio = (kh * kw) / divisor
        correction = None if np.all(ratio == 1.0) else ratio
    return PoolGeometry((ho, wo), (ph, ph + extra_h, pw, pw + extra_w), correction)


def adaptive_window(size: int, out: int) -> tuple[int, int] | None:
    """(kernel, stride) when PyTorch's adaptive pooling of ``size`` to ``out`` uses equal, evenly spaced windows."""
    starts = [(i * size) // out for i in range(out)]
    ends = [-(-((i + 1) * size) // out) for i in range(out)]
    kernels = {e - s for s, e in zip(starts, ends, strict=True)}
    steps = {b - a for a, b in zip(starts, starts[1:], strict=False)} or {1}
    if len(kernels) == 1 and len(steps) == 1:
        return kernels.pop(), steps.pop()
    return None


def shuffle_permutation(channels: int, groups: int) -> np.ndarray:
    """Output channel i reads input channel ``perm[i]`` (ShuffleNet's view(g, c/g) -> transpose -> view)."""
    return np.arange(channels).reshape(groups, channels // groups).T.reshape(-1)
