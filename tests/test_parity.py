"""Parity metrics and thresholds: right outputs pass, wrong ones fail, and every failure is reported."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mdeploy.converters import Precision
from mdeploy.errors import BadInputError
from mdeploy.metrics import compare, snr_db
from mdeploy.parity import Thresholds, judge


def logits(n: int = 64, classes: int = 100, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, classes)).astype(np.float32) * 3


def test_identical_outputs_are_perfect() -> None:
    ref = logits()
    m = compare(ref, ref.copy())
    assert m.max_abs_error == 0 and m.snr_db == math.inf
    assert m.top1_agreement == 1 and m.top5_agreement == 1 and m.cosine == pytest.approx(1)


def test_snr_of_known_noise() -> None:
    ref = np.ones((10, 10))
    assert snr_db(ref, ref + 0.1) == pytest.approx(20.0)  # noise power 1/100 of the signal's


def test_permuted_classes_fail_int8_thresholds() -> None:
    ref = logits()
    wrong = ref[:, ::-1].copy()
    result = judge(ref, wrong, Thresholds.default(Precision.int8), "test")
    assert not result.passed
    assert len(result.failures) == 2  # both SNR and top-1 are reported, not only the first
    assert result.metrics.top1_agreement < 0.1


def test_fp32_threshold_catches_a_small_error() -> None:
    ref = logits()
    out = ref.copy()
    out[3, 7] += 1e-3
    assert not judge(ref, out, Thresholds.default(Precision.fp32), "test").passed
    assert judge(ref, ref + 1e-6, Thresholds.default(Precision.fp32), "test").passed


def test_nan_output_fails_everything() -> None:
    ref = logits()
    out = ref.copy()
    out[0, 0] = np.nan
    result = judge(ref, out, Thresholds.default(Precision.int8), "test")
    assert not result.passed and result.to_dict()["metrics"]["snr_db"] == "-inf"


def test_shape_mismatch_is_bad_input() -> None:
    with pytest.raises(BadInputError, match="converted from"):
        judge(logits(classes=10), logits(classes=12), Thresholds(), "test")


def test_overrides_only_touch_named_limits() -> None:
    t = Thresholds.default(Precision.int8).override(min_top1=0.5, min_snr_db=None)
    assert t.min_top1 == 0.5 and t.min_snr_db == 15.0


@settings(max_examples=50, deadline=None)
@given(arrays(np.float32, (8, 10), elements=st.floats(-50, 50, width=32)),
       st.floats(1e-4, 1.0))
def test_metrics_properties(ref: np.ndarray, noise_scale: float) -> None:
    noise = np.random.default_rng(0).standard_normal(ref.shape).astype(np.float32) * noise_scale
    m = compare(ref, ref + noise)
    assert 0 <= m.top1_agreement <= 1 and 0 <= m.top5_agreement <= 1
    assert m.top1_agreement <= m.top5_agreement
    assert m.max_abs_error >= m.mean_abs_error >= 0
    assert -1 - 1e-9 <= m.cosine <= 1 + 1e-9
    assert compare(ref, ref).snr_db >= m.snr_db


def test_dense_outputs_get_dense_metrics_not_top1() -> None:
    """Top-1/top-5 only for class scores ((N, K) or (N, K, 1, 1)); a segmentation map (N, C, H, W) gets per-pixel
    arg-max agreement and mean IoU over the classes PyTorch predicts; a one-channel map neither."""
    want = np.zeros((2, 3, 4, 4), np.float32)
    want[:, 0] = 1.0  # every pixel class 0 ...
    want[:, 1, :2, :] = 2.0  # ... except the top half: class 1
    got = want.copy()
    got[0, 2, 0, 0] = 5.0  # one pixel of 32 turns to class 2
    metrics = compare(want, got)
    assert metrics.top1_agreement is None and metrics.top5_agreement is None
    assert metrics.pixel_agreement == 31 / 32
    assert metrics.mean_iou == np.mean([16 / 16, 15 / 16])  # class 0 intact, class 1 lost one pixel
    assert compare(want[:, :1], got[:, :1]).pixel_agreement is None
    scores = np.eye(4, dtype=np.float32)[:, :, None, None]
    assert compare(scores, scores).top1_agreement == 1.0 and compare(scores, scores).pixel_agreement is None
    assert "top1_agreement" not in metrics.to_dict() and "mean_iou" in metrics.to_dict()
