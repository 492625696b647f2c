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
    top1_agreement: float  # fraction of samples whose arg-max matches the reference's
    top5_agreement: float  # fraction whose reference top-1 class is in the artifact's top 5

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


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
    """Both arrays are (samples, ...) batches of the same shape; classification metrics use the last axis."""
    if reference.shape != output.shape:
        raise ValueError(f"output shape {output.shape} differs from the reference's {reference.shape}")
    if not np.all(np.isfinite(output)):  # NaN/Inf in an artifact's output is the worst parity there is
        return ParityMetrics(len(reference), float("inf"), float("inf"), float("nan"), float("-inf"), 0.0, 0.0)
    ref = reference.reshape(len(reference), -1).astype(np.float64)
    out = output.reshape(len(output), -1).astype(np.float64)
    diff = np.abs(out - ref)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    cosine = np.where(norms > 0, np.sum(ref * out, axis=1) / np.maximum(norms, 1e-300), 0.0)
    ref_top1 = np.argmax(ref, axis=1)
    top5 = np.argsort(-out, axis=1)[:, :5]
    return ParityMetrics(
        samples=len(ref),
        max_abs_error=float(diff.max()),
        mean_abs_error=float(diff.mean()),
        cosine=float(cosine.mean()),
        snr_db=snr_db(ref, out),
        top1_agreement=float(np.mean(np.argmax(out, axis=1) == ref_top1)),
        top5_agreement=float(np.mean(np.any(top5 == ref_top1[:, None], axis=1))),
    )
