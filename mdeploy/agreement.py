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


def agreement(outputs: dict[str, tuple[np.ndarray, ...]]) -> AgreementMatrix | None:
    """Pairwise agreement of every artifact's outputs (name -> its outputs, in order; class scores (N, classes)
    or maps (N, C, ...), arg-max over axis 1); None for fewer than two. With several outputs, each pair gets the
    lower agreement and SNR over them."""
    names = tuple(outputs)
    if len(names) < 2:
        return None
    count = len(outputs[names[0]])
    classes = {name: [np.argmax(value, axis=1) for value in outputs[name]] for name in names}
    top1 = tuple(tuple(min(float(np.mean(classes[a][i] == classes[b][i])) for i in range(count)) for b in names)
                 for a in names)
    snr = tuple(tuple(None if a == b else round(min(snr_db(x, y) for x, y in zip(outputs[a], outputs[b], strict=True)),
                                                2) for b in names) for a in names)
    return AgreementMatrix(names, top1, snr)
