"""Property-based tests (hypothesis) of the preprocessing contract and of the parity metrics and thresholds.

Kept fast: small images, modest ``max_examples``, no deadline (the machine is shared).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from mdeploy.calibration.preprocess import (
    IMAGENET_CROP_FRACTION,
    ChannelOrder,
    Layout,
    Preprocess,
    center_crop,
    resized_size,
    to_rgb8,
)
from mdeploy.converters.base import Precision
from mdeploy.metrics import compare, snr_db
from mdeploy.parity import Thresholds, judge

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MODES = ["RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "YCbCr", "1", "I;16", "I", "HSV"]


# ------------------------------------------------------------------------------------------- strategies


@st.composite
def images(draw, max_side: int = 40) -> Image.Image:
    """A PIL image of any mode PIL decoders produce, any size (1 pixel wide included), random content."""
    mode = draw(st.sampled_from(MODES))
    width, height = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(0, 65536, (height, width)).astype(np.int32), "I")
    if mode == "P":
        return rgb.quantize(draw(st.integers(2, 64)))
    if mode == "PA":
        return rgb.quantize(8).convert("PA")
    return rgb.convert(mode)


finite = st.floats(-3.0, 3.0, allow_nan=False, allow_infinity=False)
positive = st.floats(0.01, 5.0, allow_nan=False, allow_infinity=False)
triples = st.tuples(finite, finite, finite)
positive_triples = st.tuples(positive, positive, positive)


@st.composite
def preprocessings(draw) -> Preprocess:
    crop = draw(st.integers(1, 24))
    resize = draw(st.one_of(st.none(), st.integers(crop, 40)))
    return Preprocess(
        resize=resize, crop=crop, mean=draw(triples), std=draw(positive_triples),
        scale=draw(st.sampled_from([1 / 255, 1.0, 2 / 255])),
        channel_order=draw(st.sampled_from(ChannelOrder)), layout=draw(st.sampled_from(Layout)),
    )


def torchvision_resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision.transforms.functional._compute_resized_output_size for an int size, as written there."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    return new_h, new_w


def torchvision_center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """torchvision's CenterCrop on (H, W, C): pad (left/top get the floor half) when smaller, then round() offsets."""
    height, width = pixels.shape[:2]
    if size > width or size > height:
        left = (size - width) // 2 if size > width else 0
        top = (size - height) // 2 if size > height else 0
        right = (size - width + 1) // 2 if size > width else 0
        bottom = (size - height + 1) // 2 if size > height else 0
        pixels = np.pad(pixels, ((top, bottom), (left, right), (0, 0)))
        height, width = pixels.shape[:2]
    top = round((height - size) / 2.0)  # torchvision writes int(round(...)): Python's round already is an int
    left = round((width - size) / 2.0)
    return pixels[top:top + size, left:left + size]


# ---------------------------------------------------------------------------------------- preprocessing


@FAST
@given(image=images(), preprocess=preprocessings())
def test_any_image_gives_exactly_the_sample_shape_with_finite_float32_values(image, preprocess: Preprocess):
    sample = preprocess(image)
    assert sample.shape == preprocess.sample_shape and sample.dtype == np.float32
    assert sample.flags.c_contiguous and np.isfinite(sample).all()
    # Every value is an affine image of a 0..255 pixel: within the range the normalisation maps 0..255 to.
    mean = np.asarray(preprocess.mean, np.float64)
    std = np.asarray(preprocess.std, np.float64)
    low, high = (0 - mean) / std, (255 * preprocess.scale - mean) / std
    channels = sample if preprocess.layout is Layout.NCHW else sample.transpose(2, 0, 1)
    for channel, lo, hi in zip(channels, low, high):  # float32 arithmetic: a relative tolerance
        assert lo - 1e-5 * max(1.0, abs(lo)) <= channel.min() and channel.max() <= hi + 1e-5 * max(1.0, abs(hi))


@FAST
@given(image=images())
def test_any_mode_becomes_8bit_rgb_of_the_same_size(image: Image.Image):
    rgb = to_rgb8(image)
    assert rgb.mode == "RGB" and rgb.size == image.size


@FAST
@given(image=images(), preprocess=preprocessings())
def test_bgr_is_rgb_with_the_channels_reversed(image: Image.Image, preprocess: Preprocess):
    """A BGR preprocessing with the per-channel constants reversed gives the RGB sample's channels reversed,
    bit for bit."""
    rgb = Preprocess(**{**preprocess.__dict__, "channel_order": ChannelOrder.RGB})
    bgr = Preprocess(**{**preprocess.__dict__, "channel_order": ChannelOrder.BGR,
                        "mean": preprocess.mean[::-1], "std": preprocess.std[::-1]})
    axis = 0 if preprocess.layout is Layout.NCHW else 2
    np.testing.assert_array_equal(bgr(image), np.flip(rgb(image), axis=axis))


@FAST
@given(image=images(), preprocess=preprocessings())
def test_nhwc_is_nchw_transposed(image: Image.Image, preprocess: Preprocess):
    nchw = Preprocess(**{**preprocess.__dict__, "layout": Layout.NCHW})
    nhwc = Preprocess(**{**preprocess.__dict__, "layout": Layout.NHWC})
    np.testing.assert_array_equal(nhwc(image), nchw(image).transpose(1, 2, 0))


@FAST
@given(pixels=hnp.arrays(np.uint8, st.tuples(st.integers(1, 12), st.integers(1, 12), st.just(3))),
       preprocess=preprocessings())
def test_normalize_inverts_to_the_scaled_pixels(pixels: np.ndarray, preprocess: Preprocess):
    sample = preprocess.normalize(pixels)
    hwc = sample if preprocess.layout is Layout.NHWC else sample.transpose(1, 2, 0)
    if preprocess.channel_order is ChannelOrder.BGR:
        hwc = hwc[:, :, ::-1]
        mean, std = np.asarray(preprocess.mean[::-1]), np.asarray(preprocess.std[::-1])
    else:
        mean, std = np.asarray(preprocess.mean), np.asarray(preprocess.std)
    np.testing.assert_allclose(hwc * std + mean, pixels * preprocess.scale, rtol=1e-5, atol=1e-5)


@settings(max_examples=200, deadline=None)
@given(width=st.integers(1, 5000), height=st.integers(1, 5000), size=st.integers(1, 1000))
def test_resize_size_rounds_like_torchvision(width: int, height: int, size: int):
    assert resized_size(height, width, size) == torchvision_resized_size(height, width, size)
    new_height, new_width = resized_size(height, width, size)
    assert min(new_height, new_width) == size or (new_height == new_width == size)
    # The aspect ratio is kept up to the truncation of the long side.
    if width <= height:
        assert new_height <= size * height / width < new_height + 1
    else:
        assert new_width <= size * width / height < new_width + 1


@FAST
@given(height=st.integers(1, 30), width=st.integers(1, 30), size=st.integers(1, 30), seed=st.integers(0, 99))
def test_center_crop_offsets_and_padding_match_torchvision(height: int, width: int, size: int, seed: int):
    pixels = np.random.default_rng(seed).integers(1, 256, (height, width, 3), dtype=np.uint8)
    cropped = center_crop(pixels, size)
    assert cropped.shape == (size, size, 3) and cropped.flags.c_contiguous
    np.testing.assert_array_equal(cropped, torchvision_center_crop(pixels, size))
    if size <= height and size <= width:  # a plain window: its top-left corner is at the rounded offsets
        top, left = round((height - size) / 2.0), round((width - size) / 2.0)
        np.testing.assert_array_equal(cropped, pixels[top:top + size, left:left + size])
    else:  # padding adds only zeros, and keeps every pixel that fits
        kept = min(size, height) * min(size, width) * 3
        assert np.count_nonzero(cropped) == kept


@settings(max_examples=100, deadline=None)
@given(input_size=st.integers(1, 4096))
def test_imagenet_resize_is_the_rounded_0875_convention(input_size: int):
    preprocess = Preprocess.imagenet(input_size)
    assert preprocess.crop == input_size
    assert preprocess.resize == round(input_size / IMAGENET_CROP_FRACTION) >= input_size


@FAST
@given(preprocess=preprocessings())
def test_to_dict_from_dict_round_trip_through_json(preprocess: Preprocess):
    data = preprocess.to_dict()
    assert Preprocess.from_dict(data) == preprocess
    assert Preprocess.from_dict(json.loads(json.dumps(data))) == preprocess
    assert Preprocess.from_dict(json.loads(json.dumps(data))).to_dict() == data


# ----------------------------------------------------------------------------------------------- metrics


@st.composite
def output_batches(draw, min_classes: int = 2) -> np.ndarray:
    samples = draw(st.integers(1, 8))
    classes = draw(st.integers(min_classes, 20))
    values = st.floats(-50, 50, allow_nan=False, allow_infinity=False, width=32)
    return draw(hnp.arrays(np.float32, (samples, classes), elements=values))


def noisy(reference: np.ndarray, seed: int, level: float) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal(reference.shape).astype(np.float32)
    return (reference + level * noise).astype(np.float32)


@FAST
@given(reference=output_batches())
def test_identical_outputs_are_perfect(reference: np.ndarray):
    metrics = compare(reference, reference.copy())
    assert snr_db(reference, reference) == math.inf and metrics.snr_db == math.inf
    assert metrics.max_abs_error == 0.0 and metrics.mean_abs_error == 0.0
    assert metrics.top1_agreement == 1.0 and metrics.top5_agreement == 1.0
    if np.all(np.linalg.norm(reference.astype(np.float64), axis=1) > 0):
        assert metrics.cosine == pytest.approx(1.0, abs=1e-9)


@FAST
@given(reference=output_batches(), seed=st.integers(0, 999), level=st.floats(1e-3, 10.0),
       scale=st.floats(1e-3, 1e3))
def test_snr_is_invariant_to_scaling_both_outputs(reference: np.ndarray, seed: int, level: float, scale: float):
    output = noisy(reference, seed, level)
    assume(np.any(reference != 0) and np.any(output != reference))
    ref64, out64 = reference.astype(np.float64), output.astype(np.float64)
    assert snr_db(ref64 * scale, out64 * scale) == pytest.approx(snr_db(ref64, out64), abs=1e-6)


@FAST
@given(reference=output_batches(), seed=st.integers(0, 999), level=st.floats(0.0, 100.0))
def test_agreements_are_fractions_and_top5_contains_top1(reference: np.ndarray, seed: int, level: float):
    metrics = compare(reference, noisy(reference, seed, level))
    assert 0.0 <= metrics.top1_agreement <= 1.0 and 0.0 <= metrics.top5_agreement <= 1.0
    assert metrics.top5_agreement >= metrics.top1_agreement
    assert metrics.samples == len(reference)
    assert 0.0 <= metrics.mean_abs_error <= metrics.max_abs_error
    assert -1.0 - 1e-9 <= metrics.cosine <= 1.0 + 1e-9


@st.composite
def thresholds(draw) -> Thresholds:
    """Any thresholds a user can configure: a precision's defaults with finite overrides from the flags."""
    base = Thresholds.default(draw(st.sampled_from(Precision)))
    return base.override(
        max_abs_error=draw(st.one_of(st.none(), st.floats(0, 1e6))),
        min_snr_db=draw(st.one_of(st.none(), st.floats(-1e3, 1e3))),
        min_top1=draw(st.one_of(st.none(), st.floats(0, 1))),
        min_cosine=draw(st.one_of(st.none(), st.floats(-1, 1))),
    )


@FAST
@given(reference=output_batches(), limits=thresholds(), bad=st.sampled_from([np.nan, np.inf, -np.inf]),
       where=st.integers(0, 10**6), everywhere=st.booleans())
def test_non_finite_outputs_never_pass(reference: np.ndarray, limits: Thresholds, bad: float, where: int,
                                       everywhere: bool):
    output = reference.copy()
    if everywhere:
        output[:] = bad
    else:
        output.reshape(-1)[where % output.size] = bad
    result = judge(reference, output, limits, "property")
    assert not result.passed and result.failures
    assert json.dumps(result.to_dict(), allow_nan=False)  # the manifest stays valid JSON


@FAST
@given(reference=output_batches(), limits=thresholds())
def test_identical_outputs_pass_any_threshold_a_perfect_result_can_meet(reference: np.ndarray, limits: Thresholds):
    norms = np.linalg.norm(reference.astype(np.float64), axis=1)
    assume(limits.min_cosine is None or np.all(norms > 0))
    assert judge(reference, reference.copy(), limits, "property").passed
