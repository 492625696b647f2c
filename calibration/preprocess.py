"""The preprocessing contract: one definition shared by calibration, parity checks and the shipped metadata.

``Preprocess`` reproduces torchvision's classic evaluation pipeline on PIL images,
``Resize(resize) + CenterCrop(crop) + ToTensor() + Normalize(mean, std)``, bit for bit: the same
output-size rounding, the same PIL bilinear (antialiased) resampling, the same crop offsets and the
same float32 arithmetic. A model calibrated or checked with different pixels than the app feeds it
gives numbers that mean nothing, so every consumer goes through this one class.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mdeploy.errors import BadInputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's convention: resize to input/0.875 (256 for 224), then centre-crop the input size.
IMAGENET_CROP_FRACTION = 0.875
INTERPOLATION = "bilinear"  # the only resampling implemented; recorded in the metadata for app developers


class ChannelOrder(str, Enum):
    RGB = "RGB"
    BGR = "BGR"


class Layout(str, Enum):
    NCHW = "NCHW"
    NHWC = "NHWC"


class UnreadableImageError(BadInputError):
    """An image file that cannot be decoded; ``reason`` is a short cause a dataset report can list."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(
            f"cannot read image {self.path}: {reason}. "
            "Re-save it as an 8-bit JPEG or PNG, or remove it from the input."
        )


@dataclass(frozen=True)
class Preprocess:
    """How a PIL image becomes one model input.

    ``resize``: the short side is resized to this many pixels, bilinear, keeping the aspect ratio
    (None: no resize). ``crop``: side of the square centre crop. ``scale`` multiplies the 0..255
    pixel values, then ``(x - mean) / std`` per channel. ``mean`` and ``std`` are given in
    ``channel_order`` (for BGR, the first value is blue's).
    """

    resize: int | None
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    scale: float = 1 / 255
    channel_order: ChannelOrder = ChannelOrder.RGB
    layout: Layout = Layout.NCHW

    def __post_init__(self) -> None:
        # Frozen dataclass: normalise the fields (lists from JSON, enum names as text) in place.
        object.__setattr__(self, "resize", _checked_size("resize", self.resize, allow_none=True))
        object.__setattr__(self, "crop", _checked_size("crop", self.crop, allow_none=False))
        if self.resize is not None and self.crop > self.resize:
            raise BadInputError(
                f"Preprocess crop ({self.crop}) is larger than resize ({self.resize}): the centre crop would "
                f"be padded with black. Set resize >= crop (torchvision's ImageNet recipe is resize=256, crop=224)."
            )
        object.__setattr__(self, "mean", _checked_triple("mean", self.mean, positive=False))
        object.__setattr__(self, "std", _checked_triple("std", self.std, positive=True))
        if not _is_real_number(self.scale) or not math.isfinite(self.scale) or self.scale <= 0:
            raise BadInputError(
                f"Preprocess scale must be a positive number, got {self.scale!r}: use 1/255 for inputs in "
                f"0..1 (torchvision's ToTensor) or 1.0 for inputs in 0..255."
            )
        object.__setattr__(self, "scale", float(self.scale))
        object.__setattr__(self, "channel_order", _checked_enum(ChannelOrder, "channel_order", self.channel_order))
        object.__setattr__(self, "layout", _checked_enum(Layout, "layout", self.layout))

    @classmethod
    def imagenet(cls, input_size: int = 224) -> Preprocess:
        """torchvision's ImageNet evaluation preprocessing for a square ``input_size`` model."""
        size = _checked_size("input_size", input_size, allow_none=False)
        return cls(
            resize=round(size / IMAGENET_CROP_FRACTION), crop=size, mean=IMAGENET_MEAN, std=IMAGENET_STD
        )

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """Shape of one preprocessed sample: (3, crop, crop) for NCHW, (crop, crop, 3) for NHWC."""
        if self.layout is Layout.NCHW:
            return (3, self.crop, self.crop)
        return (self.crop, self.crop, 3)

    def input_shape(self, batch: int = 1) -> tuple[int, int, int, int]:
        return (batch, *self.sample_shape)

    def __call__(self, image: Image.Image) -> np.ndarray:
        """One float32 sample in ``layout`` from a PIL image of any mode."""
        return self.normalize(self.resize_and_crop(image))

    def resize_and_crop(self, image: Image.Image) -> np.ndarray:
        """The geometric part: uint8 RGB pixels of shape (crop, crop, 3), exactly as torchvision crops them."""
        image = to_rgb8(image)
        if self.resize is not None:
            width, height = image.size
            new_height, new_width = resized_size(height, width, self.resize)
            if (new_height, new_width) != (height, width):  # torchvision returns the image untouched then
                image = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
        pixels = np.asarray(image, dtype=np.uint8)
        return center_crop(pixels, self.crop)

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """The arithmetic part: uint8 RGB (H, W, 3) pixels to a float32 sample in ``channel_order`` and ``layout``."""
        if pixels.ndim != 3 or pixels.shape[2] != 3:
            raise BadInputError(
                f"expected RGB pixels of shape (H, W, 3), got {pixels.shape}: pass a PIL image to Preprocess instead."
            )
        if self.channel_order is ChannelOrder.BGR:
            pixels = pixels[:, :, ::-1]
        # Divide by 1/scale (255) rather than multiply by scale: torchvision's ToTensor divides, and
        # x * (1/255) differs from x / 255 in the last float32 bit for some x.
        values = pixels.astype(np.float32) / np.float32(1.0 / self.scale)
        values = (values - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        if self.layout is Layout.NCHW:
            values = values.transpose(2, 0, 1)
        return np.ascontiguousarray(values, dtype=np.float32)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (manifest.json); ``from_dict`` reads it back."""
        return {
            "resize": self.resize,
            "crop": self.crop,
            "interpolation": INTERPOLATION,
            "mean": list(self.mean),
            "std": list(self.std),
            "scale": self.scale,
            "channel_order": self.channel_order.value,
            "layout": self.layout.value,
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "preprocessing settings") -> Preprocess:
        """Inverse of ``to_dict``; ``source`` (e.g. a manifest path) names the origin in error messages."""
        if not isinstance(data, dict):
            raise BadInputError(
                f"{source} must be a JSON object like {Preprocess.imagenet().to_dict()}, got {type(data).__name__}."
            )
        required = {"resize", "crop", "mean", "std"}
        known = required | {"scale", "channel_order", "layout", "interpolation"}
        missing = sorted(required - data.keys())
        unknown = sorted(set(data) - known)
        if missing or unknown:
            problems = ([f"missing {', '.join(missing)}"] if missing else []) + (
                [f"unknown {', '.join(unknown)}"] if unknown else []
            )
            raise BadInputError(
                f"{source}: {'; '.join(problems)}. Expected the keys {sorted(known)} "
                f"(resize, crop, mean and std are required)."
            )
        interpolation = data.get("interpolation", INTERPOLATION)
        if interpolation != INTERPOLATION:
            raise BadInputError(
                f"{source}: interpolation {interpolation!r} is not supported; only {INTERPOLATION!r} is. "
                f"Re-export the model with bilinear resizing."
            )
        try:
            return cls(
                resize=data["resize"],
                crop=data["crop"],
                mean=data["mean"],
                std=data["std"],
                scale=data.get("scale", 1 / 255),
                channel_order=data.get("channel_order", ChannelOrder.RGB),
                layout=data.get("layout", Layout.NCHW),
            )
        except BadInputError as err:
            raise BadInputError(f"{source}: {err}") from None


def resized_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """torchvision's output size for ``Resize(short_side)``: the long side is truncated, not rounded."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = short_side, int(short_side * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """torchvision's ``CenterCrop(size)`` on (H, W, C) pixels, zero-padding an image smaller than the crop."""
    height, width = pixels.shape[:2]
    if size > width or size > height:
        pad_w, pad_h = max(size - width, 0), max(size - height, 0)
        pixels = np.pad(pixels, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
        height, width = pixels.shape[:2]
    # Python's round (half to even) on purpose: torchvision uses it for the offsets.
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return np.ascontiguousarray(pixels[top : top + size, left : left + size])


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as an upright 8-bit RGB PIL image, or raise ``UnreadableImageError``."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UnreadableImageError(path, err.strerror or type(err).__name__) from None
    return decode_image(data, path)


def decode_image(data: bytes, path: str | Path = "<bytes>") -> Image.Image:
    """``load_image`` for bytes already read; ``path`` only names the image in errors."""
    if not data:
        raise UnreadableImageError(path, "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns about large or odd files; failures still raise
            with Image.open(io.BytesIO(data)) as opened:
                opened.load()  # decode now, so a truncated file fails here and not later
                image = _upright(opened)
                return to_rgb8(image, path)
    except UnreadableImageError:
        raise
    except UnidentifiedImageError:  # its message names a BytesIO object, which tells the user nothing
        raise UnreadableImageError(path, "UnidentifiedImageError: not a known image format, or a damaged header") \
            from None
    # PIL's decoders raise many exception types (OSError, SyntaxError, ValueError, struct.error, MemoryError, ...).
    except Exception as err:  # noqa: BLE001
        lines = str(err).strip().splitlines()
        raise UnreadableImageError(path, f"{type(err).__name__}: {lines[0][:200] if lines else ''}") from None


def _upright(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    # A malformed EXIF block should not cost the picture: keep the stored orientation.
    except Exception:  # noqa: BLE001
        return image.copy()


def to_rgb8(image: Image.Image, path: str | Path = "<image>") -> Image.Image:
    """Any PIL mode to 8-bit RGB. Alpha is dropped, not composited, as torchvision's ImageFolder loader
    does (``convert("RGB")``), so the pixels match what the model was trained on."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        # 16-bit samples (PNG, TIFF): rescale 0..65535 to 0..255 with rounding, not truncation.
        wide = np.asarray(image).astype(np.int64).clip(0, 65535)
        return Image.fromarray(((wide + 128) // 257).astype(np.uint8)).convert("RGB")
    if mode == "F":
        raise UnreadableImageError(path, "32-bit float pixels have no defined 0..255 range")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL warns when converting such palettes straight to RGB
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as err:
        raise UnreadableImageError(path, f"cannot convert {mode} pixels to RGB ({err})") from None


def _is_real_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _checked_size(name: str, value: Any, *, allow_none: bool) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        hint = " or None to skip resizing" if allow_none else ""
        raise BadInputError(
            f"Preprocess {name} must be a positive integer number of pixels{hint}, got {value!r}: "
            f"e.g. resize=256, crop=224 for a 224x224 model."
        )
    return int(value)


def _checked_triple(name: str, value: Any, *, positive: bool) -> tuple[float, float, float]:
    example = IMAGENET_STD if positive else IMAGENET_MEAN
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 3:
        raise BadInputError(f"Preprocess {name} needs 3 values, one per channel, got {value!r}: e.g. {example}.")
    if not all(_is_real_number(v) and math.isfinite(v) for v in value):
        raise BadInputError(f"Preprocess {name} must hold 3 finite numbers, got {value!r}: e.g. {example}.")
    if positive and any(v <= 0 for v in value):
        raise BadInputError(
            f"Preprocess {name} values must be positive (they divide the pixels), got {value!r}: e.g. {example}."
        )
    return (float(value[0]), float(value[1]), float(value[2]))


def _checked_enum(enum: type[Enum], name: str, value: Any) -> Any:
    if isinstance(value, enum):
        return value
    if isinstance(value, str):
        for member in enum:
            if member.value == value.upper():
                return member
    choices = ", ".join(member.value for member in enum)
    raise BadInputError(f"Preprocess {name} must be one of {choices}, got {value!r}.")
