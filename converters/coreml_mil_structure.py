"""The MIL reference's ops that move channels and windows: ``concat``, ``max_pool``, ``avg_pool``, ``transpose``,
``slice_by_index``, after the definitions in coremltools' MIL op set (``coreml_mil_reference`` merges
``STRUCTURE_MIL_OPS`` into its registry). Pools accumulate in fp32, like ``conv``; an argument value the
reference does not implement stops the run naming it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from mdeploy.errors import UnsupportedOpError

RUNTIME_NAME = "MIL reference (not Core ML)"
STRUCTURE_MIL_OPS: dict[str, Callable[..., Any]] = {}


def mil_op(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        STRUCTURE_MIL_OPS[name] = fn
        return fn

    return register


@mil_op("concat")
def concat(values: tuple[np.ndarray, ...], axis: int, interleave: bool = False) -> np.ndarray:
    if interleave:
        raise UnsupportedOpError(f"MIL concat with interleave=True is not implemented by the {RUNTIME_NAME}")
    return np.concatenate(values, axis=int(axis))


@mil_op("transpose")
def transpose(x: np.ndarray, perm: Any) -> np.ndarray:
    return np.transpose(x, [int(p) for p in np.atleast_1d(perm)])


@mil_op("slice_by_index")
def slice_by_index(x: np.ndarray, begin: Any, end: Any, stride: Any = None, begin_mask: Any = None,
                   end_mask: Any = None, squeeze_mask: Any = None) -> np.ndarray:
    rank = x.ndim
    stride = np.ones(rank, int) if stride is None else np.atleast_1d(stride)
    begin_mask = np.zeros(rank, bool) if begin_mask is None else np.atleast_1d(begin_mask)
    end_mask = np.zeros(rank, bool) if end_mask is None else np.atleast_1d(end_mask)
    index = tuple(slice(None if begin_mask[i] else int(begin[i]), None if end_mask[i] else int(end[i]),
                        int(stride[i])) for i in range(rank))
    y = x[index]
    if squeeze_mask is not None and np.any(squeeze_mask):
        y = np.squeeze(y, axis=tuple(int(i) for i in np.flatnonzero(squeeze_mask)))
    return y


def _pool(x: np.ndarray, kernel_sizes: Any, strides: Any, pad_type: str, pad: Any, ceil_mode: bool,
          fill: float) -> tuple[np.ndarray, np.ndarray]:
    """(the (taps, N, C, Ho, Wo) windows over the padded input, the same windows of a 1-where-real mask)."""
    if x.ndim != 4 or bool(ceil_mode) or str(pad_type) not in ("custom", "valid"):
        raise UnsupportedOpError(f"MIL pooling of rank {x.ndim} with pad_type {pad_type!r}, ceil_mode={ceil_mode} "
                                 f"is not implemented by the {RUNTIME_NAME}")
    (kh, kw), (sh, sw) = [int(k) for k in kernel_sizes], [int(s) for s in (strides if strides is not None else (1, 1))]
    top, bottom, left, right = [int(p) for p in pad] if str(pad_type) == "custom" and pad is not None else [0] * 4
    widths = ((0, 0), (0, 0), (top, bottom), (left, right))
    padded = np.pad(x.astype(np.float32), widths, constant_values=fill)
    real = np.pad(np.ones(x.shape[2:], np.float32), widths[2:])
    ho, wo = (padded.shape[2] - kh) // sh + 1, (padded.shape[3] - kw) // sw + 1
    taps = [(i, j) for i in range(kh) for j in range(kw)]
    windows = np.stack([padded[:, :, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw] for i, j in taps])
    counts = np.stack([real[i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw] for i, j in taps])
    return windows, counts


@mil_op("max_pool")
def max_pool(x: np.ndarray, kernel_sizes: Any, strides: Any = None, pad_type: str = "valid", pad: Any = None,
             ceil_mode: bool = False) -> np.ndarray:
    """The window maximum; padding is -inf (never the maximum)."""
    windows, _ = _pool(x, kernel_sizes, strides, pad_type, pad, ceil_mode, -np.inf)
    return windows.max(axis=0)


@mil_op("avg_pool")
def avg_pool(x: np.ndarray, kernel_sizes: Any, strides: Any = None, pad_type: str = "valid", pad: Any = None,
             exclude_padding_from_average: bool = False, ceil_mode: bool = False) -> np.ndarray:
    """The window mean over zero padding: divided by kh * kw, or by the real elements when excluding padding."""
    windows, counts = _pool(x, kernel_sizes, strides, pad_type, pad, ceil_mode, 0.0)
    total = windows.sum(axis=0, dtype=np.float32)
    if bool(exclude_padding_from_average):
        return total / counts.sum(axis=0)
    return total / np.float32(windows.shape[0])
