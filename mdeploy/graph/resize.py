"""How PyTorch samples in ``F.interpolate`` (nearest, nearest-exact, bilinear), per axis, in its own float32
arithmetic: what the tracer normalises RESIZE with and what each writer checks its target's op against.

PyTorch maps output index ``d`` on an axis of ``n_in`` -> ``n_out`` samples with a ratio ``r``: ``n_in / n_out``
(float32 division), or ``1 / scale_factor`` when a scale factor was given and not recomputed. Then

- nearest: source ``min(floor(d * r), n_in - 1)``;
- nearest-exact: ``min(floor((d + 0.5) * r), n_in - 1)``;
- bilinear: source coordinate ``max((d + 0.5) * r - 0.5, 0)``, or with ``align_corners`` ``d * (n_in - 1) /
  (n_out - 1)`` (0 for one output), interpolating between its floor and the next sample (the last one at the end).

TFLite's RESIZE_NEAREST_NEIGHBOR computes ``floor((d + offset) * (n_in / n_out))`` with the same float32 operations
(offset 0.5 with ``half_pixel_centers``), so it reproduces both nearest modes whenever the ratio is ``n_in / n_out``.
"""

from __future__ import annotations

import numpy as np

from mdeploy.graph.ir import ResizeAttrs

NEAREST_MODES = ("nearest", "nearest-exact")


def ratio(n_in: int, n_out: int, scale: float | None = None) -> np.float32:
    """PyTorch's float32 ratio of input to output samples on one axis (``compute_scales_value``)."""
    if scale is not None and scale > 0:
        return np.float32(1.0 / scale)
    return np.float32(n_in) / np.float32(n_out)


def nearest_indices(n_in: int, n_out: int, exact: bool, scale: float | None = None) -> np.ndarray:
    """The input index each output index reads, as PyTorch's nearest (``exact``: nearest-exact) computes it."""
    offset = np.float32(0.5 if exact else 0.0)
    d = np.arange(n_out, dtype=np.float32)
    return np.minimum(np.floor((d + offset) * ratio(n_in, n_out, scale)).astype(np.int64), n_in - 1)


def source_indices(attrs: ResizeAttrs, in_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) of the input a nearest-mode RESIZE reads, in output order."""
    scales = attrs.scales or (None, None)
    exact = attrs.mode == "nearest-exact"
    return tuple(nearest_indices(n, m, exact, s)  # type: ignore[return-value]
                 for n, m, s in zip(in_size, attrs.size, scales, strict=True))


def integer_factors(in_size: tuple[int, int], out_size: tuple[int, int]) -> tuple[int, int] | None:
    """(fh, fw) when each output axis is a whole multiple of its input axis (nearest upsampling by repetition)."""
    if any(m % n for n, m in zip(in_size, out_size, strict=True)):
        return None
    return out_size[0] // in_size[0], out_size[1] // in_size[1]


def repeats(attrs: ResizeAttrs, in_size: tuple[int, int]) -> tuple[int, int] | None:
    """(fh, fw) when the RESIZE repeats every input sample fh x fw times (nearest sampling by whole factors)."""
    if attrs.mode not in NEAREST_MODES:
        return None
    factors = integer_factors(in_size, attrs.size)
    if factors is None:
        return None
    wanted = source_indices(attrs, in_size)
    plain = tuple(np.arange(m) // f for m, f in zip(attrs.size, factors, strict=True))
    return factors if all(np.array_equal(a, b) for a, b in zip(wanted, plain, strict=True)) else None


def normalised(attrs: ResizeAttrs, in_size: tuple[int, int]) -> ResizeAttrs:
    """The same sampling in its simplest form: scale factors dropped where the sizes give the same sampling,
    nearest-exact as nearest where both read the same samples (upsampling by whole factors), align_corners only
    for bilinear."""
    mode, scales = attrs.mode, attrs.scales
    if scales is not None:
        if mode == "bilinear":
            same = attrs.align_corners or all(
                ratio(n, m, s) == ratio(n, m) for n, m, s in zip(in_size, attrs.size, scales, strict=True))
        else:
            same = all(np.array_equal(nearest_indices(n, m, mode == "nearest-exact", s),
                                      nearest_indices(n, m, mode == "nearest-exact"))
                       for n, m, s in zip(in_size, attrs.size, scales, strict=True))
        scales = None if same else scales
    if mode == "nearest-exact" and all(
            np.array_equal(nearest_indices(n, m, True, s), nearest_indices(n, m, False, s))
            for n, m, s in zip(in_size, attrs.size, scales or (None, None), strict=True)):
        mode = "nearest"
    return ResizeAttrs(attrs.size, mode, attrs.align_corners and mode == "bilinear", scales)
