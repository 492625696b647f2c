"""Activation range estimators: from calibration values of one tensor to the [low, high] of its int8 grid.

Every estimator returns a range containing 0 (so zero, and zero padding, stay exact). ``nonnegative`` tensors
(outputs of a fused ReLU/ReLU6) get low = 0, which makes the zero point -128 and the whole grid useful.
"""

from __future__ import annotations

import math

import torch

from mdeploy.calibration.config import RangeMethod
from mdeploy.quantize.params import QMAX, QMIN, TensorQuant

HIST_BINS = 2048
MSE_SAMPLES = 1 << 18
_CHUNK = 1 << 24


def fake_quant(x: torch.Tensor, tq: TensorQuant) -> torch.Tensor:
    """Quantise then dequantise with ``tq``: round half to even, saturate to [-128, 127] (QuantizeLinear)."""
    q = x / tq.scale
    q.round_().add_(tq.zero_point).clamp_(QMIN, QMAX)
    return q.sub_(tq.zero_point).mul_(tq.scale).to(x.dtype)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """All values as one vector, without a copy for NCHW or channels-last tensors (order is irrelevant here)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(-1)
    return x.reshape(-1)


def _chunks(x: torch.Tensor) -> list[torch.Tensor]:
    flat = _flat(x)
    return [flat[i : i + _CHUNK].float() for i in range(0, flat.numel(), _CHUNK)]


def _minmax(x: torch.Tensor) -> tuple[float, float]:
    lows, highs = zip(*((float(c.min()), float(c.max())) for c in _chunks(x)))
    return min(lows), max(highs)


def _histogram(x: torch.Tensor, low: float, high: float, bins: int = HIST_BINS) -> torch.Tensor:
    hist = torch.zeros(bins, dtype=torch.float64)
    for c in _chunks(x):
        hist += torch.histc(c, bins, low, high).double()
    return hist


def _percentile_range(x: torch.Tensor, lo: float, hi: float, percentile: float) -> tuple[float, float]:
    if hi <= lo:
        return lo, hi
    hist = _histogram(x, lo, hi)
    cdf = torch.cumsum(hist, 0) / hist.sum()
    edges = torch.linspace(lo, hi, HIST_BINS + 1, dtype=torch.float64)

    def bin_of(p: float) -> int:
        return min(int(torch.searchsorted(cdf, torch.tensor([p], dtype=torch.float64)).item()), HIST_BINS - 1)

    q = percentile / 100.0
    low = lo if lo >= 0 else float(edges[bin_of(1.0 - q)])  # lower edge of the bin holding the low quantile
    return low, float(edges[bin_of(q) + 1])  # upper edge of the bin holding the high quantile


def _kl_threshold(hist: torch.Tensor, edges_high: float, levels: int) -> float:
    """TensorRT's entropy calibration on a histogram of |x| over [0, edges_high]: the threshold whose ``levels``-bin
    quantised histogram is closest (KL divergence) to the clipped float histogram."""
    bins = hist.numel()
    best, best_i = math.inf, bins
    eps = 1e-12
    for i in range(levels, bins + 1, max(1, bins // 256)):
        p = hist[:i].clone()
        p[i - 1] += hist[i:].sum()
        # quantise the first i bins into `levels` groups, spreading each group's mass over its non-empty bins
        idx = torch.div(torch.arange(i) * levels, i, rounding_mode="floor")
        src = hist[:i]
        nonzero = (src > 0).double()
        mass = torch.zeros(levels, dtype=torch.float64).index_add_(0, idx, src)
        count = torch.zeros(levels, dtype=torch.float64).index_add_(0, idx, nonzero)
        q = torch.where(src > 0, mass[idx] / count[idx].clamp(min=1), torch.zeros_like(src))
        p = p / p.sum()
        q = q / q.sum().clamp(min=eps)
        mask = p > 0
        kl = float(torch.sum(p[mask] * torch.log(p[mask] / q[mask].clamp(min=eps))))
        if kl < best:
            best, best_i = kl, i
    return edges_high * best_i / bins


def _entropy_range(x: torch.Tensor, lo: float, hi: float) -> tuple[float, float]:
    bound = max(-lo, hi)
    if bound <= 0:
        return lo, hi
    hist = torch.zeros(HIST_BINS, dtype=torch.float64)
    for c in _chunks(x):  # exact zeros (ReLU's spike) are exact on every grid: leave them out of the comparison
        c = c.abs()
        hist += torch.histc(c[c > 0], HIST_BINS, 0.0, bound).double()
    levels = (QMAX - QMIN + 1) // (1 if lo >= 0 else 2)
    t = _kl_threshold(hist, bound, levels)
    return max(lo, -t), min(hi, t)


def _sample(x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    flat = _flat(x)
    if flat.numel() <= n:
        return flat.float()
    g = torch.Generator().manual_seed(seed)
    return flat[torch.randint(flat.numel(), (n,), generator=g)].float()


def _grid_errors(v: torch.Tensor, lows: torch.Tensor, highs: torch.Tensor) -> torch.Tensor:
    """Mean squared fake-quant error of values ``v`` for each candidate range (on the exact int8 grid)."""
    scale = ((highs.double() - lows.double()) / (QMAX - QMIN)).clamp(min=1e-12)
    zp = torch.clamp(torch.round(QMIN - lows.double() / scale), QMIN, QMAX)
    out = torch.empty(len(lows), dtype=torch.float64)
    for i in range(0, len(lows), 16):
        s, z = scale[i : i + 16, None].float(), zp[i : i + 16, None].float()
        q = v[None] / s
        q.round_().add_(z).clamp_(QMIN, QMAX).sub_(z).mul_(s).sub_(v[None])
        out[i : i + 16] = q.square_().mean(1).double()
    return out


def _mse_range(x: torch.Tensor, lo: float, hi: float, seed: int) -> tuple[float, float]:
    """Shrink the observed range by a common factor (coarse then fine grid), then each end on its own."""
    v = _sample(x, MSE_SAMPLES, seed)  # an unbiased estimate of the error, tails included in proportion

    def best(alphas: torch.Tensor, lows: torch.Tensor, highs: torch.Tensor) -> float:
        return float(alphas[int(torch.argmin(_grid_errors(v, lows, highs)))])

    coarse = torch.linspace(0.05, 1.0, 20, dtype=torch.float64)
    a = best(coarse, lo * coarse, hi * coarse)
    fine = torch.linspace(max(a - 0.05, 0.01), min(a + 0.05, 1.0), 21, dtype=torch.float64)
    a = best(fine, lo * fine, hi * fine)
    best_lo, best_hi = lo * a, hi * a
    if lo < 0 < hi:  # refine each end on its own (asymmetric distributions, e.g. before residual additions)
        ends = torch.linspace(0.5, 1.5, 41, dtype=torch.float64)
        for _ in range(2):
            highs = (best_hi * ends).clamp(max=hi)
            best_hi = float(highs[int(torch.argmin(_grid_errors(v, torch.full_like(ends, best_lo), highs)))])
            lows = (best_lo * ends).clamp(min=lo)
            best_lo = float(lows[int(torch.argmin(_grid_errors(v, lows, torch.full_like(ends, best_hi))))])
    return best_lo, best_hi


def estimate_range(
    x: torch.Tensor,
    method: RangeMethod,
    *,
    percentile: float = 99.99,
    nonnegative: bool = False,
    limit: tuple[float, float] | None = None,
    seed: int = 0,
) -> tuple[float, float]:
    """[low, high] for the int8 grid of a tensor whose calibration values are ``x`` (any shape).

    ``limit`` clips the observed range first (a fused ReLU6 output never leaves [0, 6]).
    """
    lo, hi = _minmax(x)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if nonnegative:
        lo = 0.0
    if limit is not None:
        lo, hi = max(lo, limit[0]), min(hi, limit[1])
    if method is RangeMethod.minmax or hi - lo <= 0:
        out = (lo, hi)
    elif method is RangeMethod.percentile:
        out = _percentile_range(x, lo, hi, percentile)
    elif method is RangeMethod.entropy:
        out = _entropy_range(x, lo, hi)
    elif method is RangeMethod.mse:
        out = _mse_range(x, lo, hi, seed)
    else:  # pragma: no cover - exhaustive over the enum
        raise ValueError(method)
    return min(out[0], 0.0), max(out[1], 0.0)


def tensor_quant(x: torch.Tensor, method: RangeMethod, **kwargs: object) -> TensorQuant:
    low, high = estimate_range(x, method, **kwargs)  # type: ignore[arg-type]
    return TensorQuant.from_range(low, high)
