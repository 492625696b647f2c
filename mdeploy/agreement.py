"""Cross-runtime agreement: how closely the artifacts agree with each other on the same inputs.

Parity says how far each artifact is from PyTorch; this says whether, say, the int8 ONNX and int8 TFLite files
(one set of int8 decisions, two runtimes) pick the same classes. A pair that disagrees much more than either
differs from PyTorch points at a runtime's kernels rather than at quantisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mdeploy.metrics import snr_db
from mdeploy.parity import json_number


@dataclass(frozen=True)
class AgreementMatrix:
    artifacts: tuple[str, ...]
    top1: tuple[tuple[float, ...], ...]  # fraction of inputs where row and column pick the same class
    snr_db: tuple[tuple[float | None, ...], ...]  # of the column's outputs against the row's; None on the diagonal

    def to_dict(self) -> dict[str, Any]:
        return {"artifacts": list(self.artifacts), "top1": [list(row) for row in self.top1],
                "snr_db": [[json_number(v) for v in row] for row in self.snr_db]}


def agreement(outputs: dict[str, np.ndarray]) -> AgreementMatrix | None:
    """Pairwise agreement of every artifact's outputs (name -> (N, classes)); None for fewer than two."""
    names = tuple(outputs)
    if len(names) < 2:
        return None
    classes = {name: np.argmax(outputs[name], axis=1) for name in names}
    top1 = tuple(tuple(float(np.mean(classes[a] == classes[b])) for b in names) for a in names)
    snr = tuple(tuple(None if a == b else round(snr_db(outputs[a], outputs[b]), 2) for b in names) for a in names)
    return AgreementMatrix(names, top1, snr)
