"""Parity of an artifact against the PyTorch model: run both on the same preprocessed inputs and judge the gap."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

from mdeploy.types import Precision, Runner
from mdeploy.errors import BadInputError
from mdeploy.metrics import ParityMetrics, compare

BATCH = 16


@dataclass(frozen=True)
class Thresholds:
    """Limits a parity result must meet; None means not checked."""

    max_abs_error: float | None = None
    min_snr_db: float | None = None
    min_top1: float | None = None
    min_cosine: float | None = None

    @classmethod
    def default(cls, precision: Precision) -> Thresholds:
        # fp32: the ONNX/TFLite community convention (atol 1e-4). int8: what a well-quantised MobileNet reaches on
        # held-out photos (see bench/RESULTS.md); stock recipes miss it, which is the point of the gate.
        if precision is Precision.fp32:
            return cls(max_abs_error=1e-4)
        return cls(min_snr_db=15.0, min_top1=0.85)

    def override(self, **limits: float | None) -> Thresholds:
        return replace(self, **{key: value for key, value in limits.items() if value is not None})

    def failures(self, metrics: ParityMetrics) -> list[str]:
        """Every limit the metrics miss, each as a readable sentence. Non-finite outputs always fail, whatever the
        limits (a gate with every limit unset must still not pass NaN)."""
        found = []
        if not math.isfinite(metrics.max_abs_error):
            found.append("the outputs hold NaN or Inf")
        if self.max_abs_error is not None and not metrics.max_abs_error <= self.max_abs_error:
            found.append(f"max |error| {metrics.max_abs_error:.3g} > {self.max_abs_error:.3g}")
        if self.min_snr_db is not None and not metrics.snr_db >= self.min_snr_db:
            found.append(f"SNR {metrics.snr_db:.1f} dB < {self.min_snr_db:.1f} dB")
        if self.min_top1 is not None and not metrics.top1_agreement >= self.min_top1:
            found.append(f"top-1 agreement {metrics.top1_agreement:.1%} < {self.min_top1:.1%}")
        if self.min_cosine is not None and not metrics.cosine >= self.min_cosine:
            found.append(f"cosine {metrics.cosine:.4f} < {self.min_cosine:.4f}")
        return found

    def to_dict(self) -> dict[str, float]:
        return {key: value for key, value in asdict(self).items() if value is not None}


@dataclass(frozen=True)
class ParityResult:
    metrics: ParityMetrics
    thresholds: Thresholds
    failures: tuple[str, ...]
    inputs: str  # what the inputs were, e.g. "320 images from eval/ (disjoint from calibration)"

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, object]:
        return {
            "passed": self.passed,
            "inputs": self.inputs,
            "metrics": json_numbers(self.metrics.to_dict()),
            "thresholds": self.thresholds.to_dict(),
            "failures": list(self.failures),
        }


def json_number(value: Any) -> Any:
    """JSON has no NaN or infinity: spell them out ("nan", "inf"); anything else passes as it is."""
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


def json_numbers(values: dict[str, Any]) -> dict[str, Any]:
    return {key: json_number(value) for key, value in values.items()}


def run_batches(run: Callable[[np.ndarray], np.ndarray], inputs: np.ndarray,
                progress: Callable[[int], None] | None = None) -> np.ndarray:
    outputs = []
    for start in range(0, len(inputs), BATCH):
        outputs.append(np.asarray(run(inputs[start:start + BATCH]), dtype=np.float32))
        if progress:
            progress(min(BATCH, len(inputs) - start))
    return np.concatenate(outputs)


def torch_runner(module: torch.nn.Module) -> Runner:
    @torch.no_grad()
    def run(batch: np.ndarray) -> np.ndarray:
        return module(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))).float().numpy()

    return run


def judge(reference: np.ndarray, output: np.ndarray, thresholds: Thresholds, inputs: str) -> ParityResult:
    if reference.shape != output.shape:
        raise BadInputError(
            f"the artifact outputs shape {output.shape[1:]} but the PyTorch model {reference.shape[1:]}: "
            "check that --model is the model this artifact was converted from"
        )
    metrics = compare(reference, output)
    return ParityResult(metrics, thresholds, tuple(thresholds.failures(metrics)), inputs)


def top_labels(logits: np.ndarray, labels: Iterable[str], k: int = 1) -> list[list[str]]:
    names = list(labels)
    order = np.argsort(-logits, axis=1)[:, :k]
    return [[names[i] if i < len(names) else str(i) for i in row] for row in order]
