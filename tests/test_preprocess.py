"""The preprocessing contract: torchvision parity, variants, serialisation, validation and robust loading."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mdeploy.calibration.preprocess import (
    ChannelOrder,
    Layout,
    Preprocess,
    UnreadableImageError,
    decode_image,
    load_image,
    resized_size,
)
from mdeploy.errors import BadInputError

EXIF_ORIENTATION = 0x0112
SMALL = Preprocess(resize=20, crop=16, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


def torchvision_reference(image: Image.Image, resize: int, crop: int, mean, std) -> np.ndarray:
    """torchvision's Resize(resize) + CenterCrop(crop) + ToTensor + Normalize on a PIL RGB image, written
    out from its source: truncated long side, PIL bilinear, offsets int(round(x / 2.0)), torch float32."""
    width, height = image.size
    if width <= height:
        new_width, new_height = resize, int(resize * height / width)
    else:
        new_width, new_height = int(resize * width / height), resize
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), Image.BILINEAR)
    top = int(round((new_height - crop) / 2.0))
    left = int(round((new_width - crop) / 2.0))
    image = image.crop((left, top, left + crop, top + crop))
    tensor = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    tensor = tensor.to(torch.float32).div(255)
    tensor = tensor.sub(torch.tensor(mean).view(3, 1, 1)).div(torch.tensor(std).view(3, 1, 1))
    return tensor.numpy()


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def gradient_image(width: int, height: int) -> Image.Image:
    ys, xs = np.mgrid[0:height, 0:width]
    pixels = np.stack([xs * 255 // max(width - 1, 1), ys * 255 // max(height - 1, 1), (xs + ys) % 256], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


# --- torchvision parity -------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [None, (257, 300), (300, 259), (224, 224), (256, 256), (255, 1000), (100, 80)])
def test_imagenet_preprocess_matches_torchvision_bit_for_bit_on_real_photos(demo_assets, size):
    preprocess = Preprocess.imagenet()
    for name in ("chelsea.png", "grace_hopper.jpg"):
        photo = load_image(demo_assets.photos_dir / name)
        if size is not None:
            photo = photo.resize(size, Image.BILINEAR)
        expected = torchvision_reference(photo, 256, 224, preprocess.mean, preprocess.std)
        actual = preprocess(photo)
        assert actual.dtype == np.float32 and actual.shape == (3, 224, 224)
        np.testing.assert_array_equal(actual, expected)


def test_imagenet_factory_follows_the_0875_crop_convention():
    assert (Preprocess.imagenet().resize, Preprocess.imagenet().crop) == (256, 224)
    assert (Preprocess.imagenet(192).resize, Preprocess.imagenet(192).crop) == (219, 192)
    assert Preprocess.imagenet().input_shape() == (1, 3, 224, 224)
    assert Preprocess.imagenet().input_shape(batch=8) == (8, 3, 224, 224)


def test_no_resize_crops_large_images_and_zero_pads_small_ones():
    preprocess = Preprocess(resize=None, crop=8, mean=(0.0,) * 3, std=(1.0,) * 3)
    large = gradient_image(20, 11)
    np.testing.assert_array_equal(preprocess.resize_and_crop(large), np.asarray(large)[2:10, 6:14])
    small = preprocess.resize_and_crop(gradient_image(5, 8))
    assert small.shape == (8, 8, 3)
    assert (small[:, :1] == 0).all() and (small[:, -2:] == 0).all()  # torchvision pads 1 left, 2 right


def test_nhwc_layout_and_bgr_order_are_the_same_numbers_rearranged():
    image = gradient_image(37, 29)
    base = SMALL(image)
    nhwc = Preprocess(resize=20, crop=16, mean=SMALL.mean, std=SMALL.std, layout=Layout.NHWC)
    np.testing.assert_array_equal(nhwc(image), base.transpose(1, 2, 0))
    assert nhwc.input_shape(2) == (2, 16, 16, 3)
    # For BGR, mean and std are given in the model's channel order (blue first).
    bgr = Preprocess(resize=20, crop=16, mean=SMALL.mean[::-1], std=SMALL.std[::-1], channel_order=ChannelOrder.BGR)
    np.testing.assert_array_equal(bgr(image), base[::-1])


def test_scale_one_keeps_the_0_255_range():
    raw = Preprocess(resize=None, crop=4, mean=(0.0,) * 3, std=(1.0,) * 3, scale=1.0)
    image = Image.new("RGB", (4, 4), (255, 128, 0))
    np.testing.assert_array_equal(raw(image)[:, 0, 0], [255.0, 128.0, 0.0])


# --- serialisation and validation -----------------------------------------------------------------------


def test_dict_round_trip_through_json():
    custom = Preprocess(None, 96, (0.5,) * 3, (0.5,) * 3, 1.0, ChannelOrder.BGR, Layout.NHWC)
    for preprocess in (Preprocess.imagenet(), custom):
        data = json.loads(json.dumps(preprocess.to_dict()))
        assert Preprocess.from_dict(data) == preprocess
    assert Preprocess.imagenet().to_dict()["channel_order"] == "RGB"


def test_from_dict_accepts_lowercase_names_and_defaults():
    loaded = Preprocess.from_dict({"resize": 256, "crop": 224, "mean": [0, 0, 0], "std": [1, 1, 1], "layout": "nhwc"})
    assert loaded.layout is Layout.NHWC and loaded.channel_order is ChannelOrder.RGB and loaded.scale == 1 / 255


@pytest.mark.parametrize(
    "data, message",
    [
        ({"crop": 224, "mean": [0, 0, 0], "std": [1, 1, 1]}, "missing resize"),
        ({**Preprocess.imagenet().to_dict(), "colour": "RGB"}, "unknown colour"),
        ({**Preprocess.imagenet().to_dict(), "interpolation": "bicubic"}, "bicubic"),
        ({**Preprocess.imagenet().to_dict(), "layout": "NCWH"}, "layout must be one of NCHW, NHWC"),
        ([256, 224], "JSON object"),
    ],
)
def test_from_dict_rejects_bad_settings_naming_the_source(data, message):
    with pytest.raises(BadInputError, match=message) as caught:
        Preprocess.from_dict(data, source="manifest.json")
    assert "manifest.json" in str(caught.value)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"crop": 0}, "crop must be a positive integer"),
        ({"crop": -3}, "crop must be a positive integer"),
        ({"crop": 22.5}, "crop must be a positive integer"),
        ({"crop": True}, "crop must be a positive integer"),
        ({"resize": 0}, "resize must be a positive integer"),
        ({"resize": 200}, "larger than resize"),
        ({"mean": (0.5, 0.5)}, "mean needs 3 values"),
        ({"mean": "abc"}, "mean needs 3 values"),
        ({"std": (0.2, 0.0, 0.2)}, "std values must be positive"),
        ({"std": (0.2, float("nan"), 0.2)}, "finite"),
        ({"scale": 0.0}, "scale must be a positive number"),
        ({"channel_order": "XYZ"}, "channel_order must be one of RGB, BGR"),
        ({"layout": "CHW"}, "layout must be one of NCHW, NHWC"),
    ],
)
def test_invalid_fields_raise_bad_input_naming_the_fix(fields, message):
    with pytest.raises(BadInputError, match=message):
        dataclasses.replace(Preprocess.imagenet(), **fields)


def test_imagenet_rejects_a_bad_input_size():
    with pytest.raises(BadInputError, match="input_size"):
        Preprocess.imagenet(0)


# --- robust image loading ------------------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path: Path):
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 10, 20))  # red strip on the stored image's left
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # displayed rotated 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    image.save(path, "JPEG", exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.size == (20, 40) and loaded.mode == "RGB"
    assert loaded.getpixel((10, 2))[0] > 200  # the left strip is now on top


@pytest.mark.parametrize(
    "image, fmt, expected",
    [
        (Image.new("L", (4, 4), 77), "PNG", (77, 77, 77)),
        (Image.new("1", (4, 4), 1), "PNG", (255, 255, 255)),
        (Image.new("RGB", (4, 4), (10, 200, 30)).quantize(4), "PNG", (10, 200, 30)),
        (Image.new("RGBA", (4, 4), (10, 20, 30, 0)), "PNG", (10, 20, 30)),  # alpha dropped, like torchvision
        (Image.new("LA", (4, 4), (90, 255)), "PNG", (90, 90, 90)),
        (Image.new("I;16", (4, 4), 257 * 100), "PNG", (100, 100, 100)),
        (Image.new("I;16", (4, 4), 65535), "PNG", (255, 255, 255)),
        (Image.new("RGB", (4, 4), (250, 20, 20)), "BMP", (250, 20, 20)),
        (Image.new("RGB", (4, 4), (250, 20, 20)), "WEBP", (250, 20, 20)),
        (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", None),
    ],
)
def test_any_mode_loads_as_8bit_rgb(tmp_path: Path, image: Image.Image, fmt: str, expected):
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(encode(image, fmt, **({"lossless": True} if fmt == "WEBP" else {})))
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == image.size
    if expected is not None:
        assert loaded.getpixel((1, 1)) == expected
    if image.mode == "CMYK":  # C=0, M=Y=255, K=0 is red; JPEG makes it approximate
        red, green, blue = loaded.getpixel((3, 3))
        assert red > 200 and green < 60 and blue < 60


def test_palette_with_transparency_loads_without_warnings(recwarn):
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    loaded = decode_image(encode(image, "PNG", transparency=0))
    assert loaded.getpixel((0, 0)) == (200, 10, 10)
    assert not [w for w in recwarn if "ransparency" in str(w.message)]


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty file"),
        (b"definitely not an image", "UnidentifiedImageError"),
        (encode(gradient_image(64, 64), "JPEG")[:-400], "truncated"),
        (encode(Image.new("F", (4, 4), 0.5), "TIFF"), "float"),
    ],
)
def test_unreadable_images_raise_a_specific_error_with_a_reason(tmp_path: Path, content: bytes, reason: str):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(UnreadableImageError, match=f"(?i){reason}") as caught:
        load_image(path)
    assert isinstance(caught.value, BadInputError) and caught.value.path == path
    assert reason.lower() in caught.value.reason.lower()
    assert "Re-save it" in str(caught.value)


def test_missing_file_is_unreadable(tmp_path: Path):
    with pytest.raises(UnreadableImageError, match="No such file"):
        load_image(tmp_path / "missing.jpg")


# --- properties ----------------------------------------------------------------------------------------

MODES = ["RGB", "L", "P", "CMYK", "RGBA", "LA", "I;16", "1"]


@st.composite
def encoded_images(draw) -> bytes:
    mode = draw(st.sampled_from(MODES))
    width, height = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    seed = draw(st.integers(0, 2**16))
    noise = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    if mode == "I;16":
        image = Image.fromarray(noise[:, :, 0].astype(np.uint16) * 257)
    elif mode == "P":
        image = Image.fromarray(noise, "RGB").quantize(16)
    else:
        image = Image.fromarray(noise, "RGB").convert(mode)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = draw(st.integers(1, 8))
    if mode == "CMYK":
        return encode(image, "JPEG", exif=exif)
    return encode(image, "PNG", exif=exif)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=encoded_images(), layout=st.sampled_from(Layout), order=st.sampled_from(ChannelOrder))
def test_any_decodable_image_gives_a_finite_float32_sample_of_the_input_shape(data: bytes, layout, order):
    preprocess = Preprocess(resize=20, crop=16, mean=SMALL.mean, std=SMALL.std, layout=layout, channel_order=order)
    sample = preprocess(decode_image(data))
    assert sample.shape == preprocess.sample_shape and sample.dtype == np.float32
    assert np.isfinite(sample).all()
    low = (0 - np.asarray(preprocess.mean)) / np.asarray(preprocess.std)
    high = (1 - np.asarray(preprocess.mean)) / np.asarray(preprocess.std)
    channels = sample if layout is Layout.NCHW else sample.transpose(2, 0, 1)
    for channel, lo, hi in zip(channels, low, high):
        assert lo - 1e-5 <= channel.min() and channel.max() <= hi + 1e-5


@settings(max_examples=30, deadline=None)
@given(width=st.integers(1, 600), height=st.integers(1, 600), short_side=st.integers(1, 300))
def test_resize_keeps_the_short_side_and_truncates_the_long_one(width, height, short_side):
    new_height, new_width = resized_size(height, width, short_side)
    assert min(new_height, new_width) == short_side
    if width <= height:
        assert (new_width, new_height) == (short_side, int(short_side * height / width))
    else:
        assert (new_width, new_height) == (int(short_side * width / height), short_side)
