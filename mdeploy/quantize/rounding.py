"""Weight rounding: float weights to int8 codes, symmetric per output channel.

Layers are handled as ``G`` independent problems (groups of a grouped conv; one per channel for a depthwise conv)
of ``R`` output rows over ``K`` input columns. Every routine works on that batched (G, R, K) layout.

The layer's calibration statistic is the second moment of its input rows (im2col patches) augmented with a
constant 1 for the bias, ``hessian = E[x x^T]``. ``gptq`` rounds the weights column by column, moving each rounding
error onto the columns not yet rounded (Frantar et al. 2022, OBQ/GPTQ) and onto the bias, which stays in high
precision (int32); ``correct_bias`` then sets the bias so that rounding leaves no mean error on the layer's inputs.
"""

from __future__ import annotations

import numpy as np
import torch

from mdeploy.quantize.params import WEIGHT_QMAX, WeightQuant, quantize_bias

BLOCK = 64
# Largest |int32 bias code| a layer may get: half of int32's range, like TFLite's converter (AdjustWeightsForBiasScale
# keeps the bias "within the middle half of the allowable bit range"), leaving the other half to the accumulator.
BIAS_CODE_LIMIT = 2.0**30


def channel_scale(w: torch.Tensor) -> torch.Tensor:
    """Per-row scale from the absolute maximum of (..., K) weights; all-zero rows get 1/127 (keeps int32 bias
    codes in range)."""
    absmax = w.abs().amax(dim=-1)
    return torch.where(absmax > 0, absmax, torch.ones_like(absmax)) / WEIGHT_QMAX


def bias_scale_floor(bias: torch.Tensor, input_scale: float) -> torch.Tensor:
    """The smallest weight scale per row whose int32 bias code ``bias / (input_scale * scale)`` stays within
    ``BIAS_CODE_LIMIT`` (float64; 0 for a zero bias)."""
    return bias.to(torch.float64).abs() / (float(input_scale) * BIAS_CODE_LIMIT)


def round_nearest(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale[..., None]), -WEIGHT_QMAX, WEIGHT_QMAX)


def _damped(hessian: torch.Tensor, damping: float) -> torch.Tensor:
    diag = torch.diagonal(hessian, dim1=-2, dim2=-1)
    lam = damping * diag.mean(-1).clamp(min=1e-12)
    eye = torch.eye(hessian.shape[-1], dtype=hessian.dtype)
    return hessian + lam[:, None, None] * eye


def correct_bias(
    codes: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mean_in: torch.Tensor
) -> torch.Tensor:
    """The bias (G, R) that cancels the mean output error of rounded weights on inputs of mean ``mean_in`` (G, K):
    b + (w - w_q) E[x]."""
    return bias + ((weight - codes * scale[..., None]) @ mean_in[..., None])[..., 0]


def gptq(
    weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, *, free: int = 0, damping: float = 0.01,
    act_order: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round (G, R, K) weights with Hessian (G, K, K) compensation; the last ``free`` columns (the bias) are not
    rounded but absorb the remaining error. Returns int codes (G, R, K - free) and the free columns (G, R, free).
    """
    w = weight.to(torch.float64).clone()
    h = hessian.to(torch.float64).clone()
    scale = scale.to(torch.float64)
    groups, _, k = w.shape
    kq = k - free
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    # Inputs that are always zero on calibration: give them a unit Hessian entry; they round to nearest (no
    # coupling to other columns), so a held-out input that does excite them still meets sensible weights.
    g_idx, k_idx = (diag <= 0).nonzero(as_tuple=True)
    h[g_idx, k_idx, k_idx] = 1.0
    if act_order:  # most excited inputs first: their errors get the most columns to be compensated on
        perm = torch.argsort(-diag[:, :kq], dim=-1, stable=True)
        perm = torch.cat([perm, torch.arange(kq, k).expand(groups, free)], dim=-1)
    else:
        perm = torch.arange(k).expand(groups, k)
    gi = torch.arange(groups)[:, None]
    w = w[gi[:, :, None], torch.arange(w.shape[1])[None, :, None], perm[:, None, :]]
    h = h[gi[:, :, None], perm[:, :, None], perm[:, None, :]]
    for attempt in range(6):
        try:
            chol = torch.linalg.cholesky(_damped(h, damping * 10**attempt))
            u = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
            break
        except torch.linalg.LinAlgError:
            continue
    else:  # pragma: no cover - a Hessian damped 1e5 times still singular means NaNs in the inputs
        raise ValueError("input Hessian is not positive definite")
    codes = torch.empty_like(w[:, :, :kq])
    for i1 in range(0, kq, BLOCK):  # lazy batch updates: rank-BLOCK corrections of the columns after the block
        i2 = min(i1 + BLOCK, kq)
        block = w[:, :, i1:i2].clone()
        errors = torch.empty_like(block)
        ub = u[:, i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = block[:, :, j]
            q = torch.clamp(torch.round(col / scale), -WEIGHT_QMAX, WEIGHT_QMAX)
            codes[:, :, i1 + j] = q
            err = (col - q * scale) / ub[:, j, j][:, None]
            block[:, :, j + 1 :] -= err[:, :, None] * ub[:, None, j, j + 1 :]
            errors[:, :, j] = err
        w[:, :, i2:] -= errors @ u[:, i1:i2, i2:]
    inverse = torch.argsort(perm[:, :kq], dim=-1)
    codes = torch.gather(codes, 2, inverse[:, None, :].expand_as(codes))
    return codes, w[:, :, kq:]


def affine_weight_quant(scale: np.ndarray, shift: np.ndarray, input_scale: float) -> tuple[WeightQuant, np.ndarray]:
    """An AFFINE (``x * scale[c] + shift[c]``) as int8 kernels run it, a 1x1 depthwise convolution: int8 weights
    (one tap per channel, shape (C, 1, 1, 1)) and int32 bias codes. Each channel's scale is exact (code +-127 on
    scale |a| / 127; a zero scale is code 0); as for convolutions, a channel whose bias code would pass
    ``BIAS_CODE_LIMIT`` gets a larger weight scale (``bias_scale_floor``) and its scale is rounded on it."""
    a = np.asarray(scale, np.float64).reshape(-1)
    floor = bias_scale_floor(torch.from_numpy(np.asarray(shift, np.float64).reshape(-1)), input_scale).numpy()
    w_scale = np.maximum(np.abs(a) / WEIGHT_QMAX, floor * (1 + 1e-6))
    w_scale = np.where(w_scale > 0, w_scale, 1.0 / WEIGHT_QMAX).astype(np.float32)  # a zero channel: channel_scale's
    codes = np.clip(np.round(a / w_scale.astype(np.float64)), -WEIGHT_QMAX, WEIGHT_QMAX).astype(np.int8)
    wq = WeightQuant(w_scale, codes.reshape(-1, 1, 1, 1))
    return wq, quantize_bias(np.asarray(shift, np.float32).reshape(-1), input_scale, w_scale)


def affine_dequantized(scale: np.ndarray, shift: np.ndarray, input_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """The float (C,) scale and shift an int8 kernel effectively applies for an AFFINE (``affine_weight_quant``):
    what float writers (ONNX between Q/DQ, Core ML W8A8) use so that every target computes the same."""
    wq, bias_q = affine_weight_quant(scale, shift, input_scale)
    effective_shift = bias_q * (np.float64(input_scale) * wq.scale.astype(np.float64))
    return wq.dequantize().reshape(-1), effective_shift.astype(np.float32)
