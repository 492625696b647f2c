"""Parity metrics between a reference output (PyTorch fp32) and an artifact's output on the same inputs."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class ParityMetrics:
    samples: int
    max_abs_error: float
    mean_abs_error: float
    cosine: float  # mean over samples of the cosine similarity of the output vectors
    snr_db: float  # 10 log10(sum ref^2 / sum (out - ref)^2) over the whole set
    # Class scores only (``is_class_scores``), else None: a top-1 over a dense map's pixels means nothing.
    top1_agreement: float | None  # fraction of samples whose arg-max matches the reference's
    top5_agreement: float | None  # fraction whose reference top-1 class is in the artifact's top 5
    # Dense maps of several channels (segmentation logits (N, C, H, W)) only: the fraction of pixels whose arg-max
    # over the channel axis matches the reference's.
    pixel_agreement: float | None = None
    mean_iou: float | None = None  # the same maps: IoU of the arg-max masks per class PyTorch predicts, averaged

    def to_dict(self) -> dict[str, float | int]:
        return {key: value for key, value in asdict(self).items() if value is not None}


def is_class_scores(shape: tuple[int, ...]) -> bool:
    """A batch of one score vector per sample: (N, K), or (N, K, 1, 1) as a classifier ending in a 1x1 conv gives."""
    return len(shape) >= 2 and all(size == 1 for size in shape[2:])


def snr_db(reference: np.ndarray, output: np.ndarray) -> float:
    reference = reference.astype(np.float64)
    noise = float(np.sum((output.astype(np.float64) - reference) ** 2))
    signal = float(np.sum(reference**2))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * float(np.log10(signal / noise))


def compare(reference: np.ndarray, output: np.ndarray) -> ParityMetrics:
    """Both arrays are (samples, ...) batches of the same shape. Class scores (``is_class_scores``) get top-1/top-5
    agreement; a dense map of several channels (N, C, H, W) gets per-pixel arg-max agreement over C."""
    if reference.shape != output.shape:
        raise ValueError(f"output shape {output.shape} differs from the reference's {reference.shape}")
    scores = is_class_scores(reference.shape)
    segmentation = reference.ndim == 4 and reference.shape[1] > 1 and not scores
    if not np.all(np.isfinite(output)):  # NaN/Inf in an artifact's output is the worst parity there is
        return ParityMetrics(len(reference), float("inf"), float("inf"), float("nan"), float("-inf"),
                             0.0 if scores else None, 0.0 if scores else None, 0.0 if segmentation else None,
                             0.0 if segmentation else None)
    ref = reference.reshape(len(reference), -1).astype(np.float64)
    out = output.reshape(len(output), -1).astype(np.float64)
    diff = np.abs(out - ref)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    cosine = np.where(norms > 0, np.sum(ref * out, axis=1) / np.maximum(norms, 1e-300), 0.0)
    top1 = top5 = pixels = None
    if scores:
        ref_top1 = np.argmax(ref, axis=1)
        top1 = float(np.mean(np.argmax(out, axis=1) == ref_top1))
        top5 = float(np.mean(np.any(np.argsort(-out, axis=1)[:, :5] == ref_top1[:, None], axis=1)))
    iou = None
    if segmentation:
        want, got = np.argmax(reference, axis=1), np.argmax(output, axis=1)
        pixels = float(np.mean(got == want))
        iou = float(np.mean([np.sum((want == c) & (got == c)) / np.sum((want == c) | (got == c))
                             for c in np.unique(want)]))
    return ParityMetrics(
        samples=len(ref),
        max_abs_error=float(diff.max()),
        mean_abs_error=float(diff.mean()),
        cosine=float(cosine.mean()),
        snr_db=snr_db(ref, out),
        top1_agreement=top1,
        top5_agreement=top5,
        pixel_agreement=pixels,
        mean_iou=iou,
    )
