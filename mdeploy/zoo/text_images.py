"""Seeded synthetic text images for the text detector: words drawn with Pillow on plain and photo backgrounds.

Each image gets a few horizontal words in Pillow's built-in font (Aileron, ``ImageFont.load_default(size=...)``,
Pillow >= 10.1 with FreeType) at random sizes, in dark or saturated colours on light plain backgrounds, and in a
colour contrasting with the spot underneath on photo crops. Words never overlap. Every image records the ink box
of each word, so calibration can use the images and evaluation can score a probability map against the boxes.
Images depend only on (seed, index, size, photo files): the same call gives the same pixels.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["TextImage", "render_text_images", "text_mask", "WORDS"]

WORDS: tuple[str, ...] = (
    "OPEN", "Exit", "SALE", "Coffee", "Station", "Parking", "Welcome", "Ticket", "Menu", "Price", "Hotel", "Bakery",
    "Platform 3", "No Entry", "Pharmacy", "Taxi", "Museum", "Library", "Market", "Garden", "Bus Stop", "Main St",
    "Fresh Fruit", "Closed", "Pull", "Push", "Tea", "Pizza", "Books", "2024", "42", "$9.99", "10:30", "A-12",
    "Detector", "Runtime", "mobile", "hello world", "OCR", "Quick brown fox", "Danger", "Police", "Airport",
    "Gate B7", "Cinema", "Bank", "Post Office", "Sushi", "Flowers", "Repair", "Laundry", "Keep Out",
)
FONT_SIZES = (16, 56)  # pixel size range of the font
WORDS_PER_IMAGE = (2, 6)
PLAIN_TEXT_COLOURS = ((0, 0, 0), (20, 20, 20), (40, 40, 90), (120, 10, 10), (10, 80, 20), (0, 60, 140),
                      (90, 0, 90), (150, 60, 0))
PHOTO_TEXT_COLOURS = ((0, 0, 0), (255, 255, 255), (255, 230, 0), (230, 20, 20), (20, 40, 200), (0, 200, 255))
MIN_CONTRAST = 110  # minimum luma difference between a word on a photo and the mean of the spot it covers
_PLACEMENT_TRIES = 60


@dataclass(frozen=True)
class TextImage:
    image: Image.Image  # RGB, ``size`` of the call
    boxes: tuple[tuple[int, int, int, int], ...]  # ink box of each word: (left, top, right, bottom), exclusive
    words: tuple[str, ...]
    background: str  # "plain" or the photo's file name


def render_text_images(count: int, size: tuple[int, int] = (320, 320), seed: int = 0,
                       photos: Sequence[Path] = (), photo_share: float = 0.5) -> list[TextImage]:
    """``count`` images of ``size`` = (height, width). With ``photos``, about ``photo_share`` of them (every
    image whose index falls in that share, by a seeded draw) have a random crop of one of the photos behind the
    text; the others a plain light colour."""
    photo_paths = sorted(Path(p) for p in photos)
    return [_render(random.Random(f"mdeploy-text/{seed}/{index}"), size, photo_paths, photo_share)
            for index in range(count)]


def text_mask(item: TextImage) -> np.ndarray:
    """(H, W) bool: True inside the words' ink boxes."""
    mask = np.zeros((item.image.height, item.image.width), dtype=bool)
    for left, top, right, bottom in item.boxes:
        mask[top:bottom, left:right] = True
    return mask


def _render(rng: random.Random, size: tuple[int, int], photos: list[Path], photo_share: float) -> TextImage:
    height, width = size
    use_photo = bool(photos) and rng.random() < photo_share
    if use_photo:
        photo = photos[rng.randrange(len(photos))]
        background = _photo_crop(rng, photo, width, height)
        name = photo.name
    else:
        base = [rng.randint(200, 255) for _ in range(3)]
        background = Image.new("RGB", (width, height), tuple(base))
        name = "plain"
    image = background.copy()
    draw = ImageDraw.Draw(image)
    luma = np.asarray(background.convert("L"), dtype=np.float32)
    boxes: list[tuple[int, int, int, int]] = []
    words: list[str] = []
    for _ in range(rng.randint(*WORDS_PER_IMAGE)):
        word = WORDS[rng.randrange(len(WORDS))]
        font = ImageFont.load_default(size=rng.randint(*FONT_SIZES))
        x0, y0, x1, y1 = draw.textbbox((0, 0), word, font=font)
        box_w, box_h = x1 - x0, y1 - y0
        margin = max(2, box_h // 3)
        if box_w + 2 * margin > width or box_h + 2 * margin > height:
            continue
        box = _place(rng, boxes, box_w, box_h, margin, width, height)
        if box is None:
            continue
        left, top, right, bottom = box
        if use_photo:
            colour = _contrasting(rng, float(luma[top:bottom, left:right].mean()))
            if colour is None:
                continue
        else:
            colour = PLAIN_TEXT_COLOURS[rng.randrange(len(PLAIN_TEXT_COLOURS))]
        draw.text((left - x0, top - y0), word, font=font, fill=colour)
        boxes.append(box)
        words.append(word)
    return TextImage(image, tuple(boxes), tuple(words), name)


def _place(rng: random.Random, boxes: list[tuple[int, int, int, int]], box_w: int, box_h: int, margin: int,
           width: int, height: int) -> tuple[int, int, int, int] | None:
    """A random box of box_w x box_h inside the image, at least ``margin`` away from the edges and other boxes."""
    for _ in range(_PLACEMENT_TRIES):
        left = rng.randint(margin, width - margin - box_w)
        top = rng.randint(margin, height - margin - box_h)
        box = (left, top, left + box_w, top + box_h)
        if all(box[2] + margin <= b[0] or b[2] + margin <= box[0] or box[3] + margin <= b[1]
               or b[3] + margin <= box[1] for b in boxes):
            return box
    return None


def _contrasting(rng: random.Random, spot_luma: float) -> tuple[int, int, int] | None:
    """A random text colour whose luma differs from ``spot_luma`` by MIN_CONTRAST, or None if none does."""
    choices = [c for c in PHOTO_TEXT_COLOURS if abs(_luma(c) - spot_luma) >= MIN_CONTRAST]
    return choices[rng.randrange(len(choices))] if choices else None


def _luma(colour: tuple[int, int, int]) -> float:
    r, g, b = colour
    return 0.299 * r + 0.587 * g + 0.114 * b  # ITU-R 601, as PIL's convert("L")


def _photo_crop(rng: random.Random, path: Path, width: int, height: int) -> Image.Image:
    """A random crop of the photo with the target aspect ratio, 40-100% of the largest such crop, resized."""
    with Image.open(path) as opened:
        photo = opened.convert("RGB")
    aspect = width / height
    full_w = min(photo.width, photo.height * aspect)
    scale = 0.4 + 0.6 * rng.random()
    crop_w = max(1.0, full_w * scale)
    crop_h = crop_w / aspect
    left = rng.random() * (photo.width - crop_w)
    top = rng.random() * (photo.height - crop_h)
    return photo.resize((width, height), Image.Resampling.BILINEAR, box=(left, top, left + crop_w, top + crop_h))
