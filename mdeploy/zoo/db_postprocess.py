"""Text boxes from a DB text detector's probability map: PaddleOCR's ``DBPostProcess``, simplified for horizontal text.

PaddleOCR (``ppocr/postprocess/db_postprocess.py``, ``boxes_from_bitmap``) binarises the shrink map at ``thresh``
(0.3), takes every contour of the bitmap (``cv2.findContours``), and for each: its minimum-area rectangle (dropped if
the short side is under ``min_size``, 3 px), the mean probability inside that rectangle (dropped if under
``box_thresh``, 0.6 in PaddleOCR's inference defaults), then "unclips" the rectangle (a polygon offset by
``area * unclip_ratio / perimeter``, ratio 1.5, with pyclipper), takes the minimum-area rectangle again (dropped if
its short side is under ``min_size + 2``) and scales it to the source image.

Here, without OpenCV and pyclipper:

- contours become the 8-connected components of the bitmap (what ``findContours`` outlines; the inner contours of
  holes, which PaddleOCR also scores and nearly always drops, are ignored);
- the minimum-area rectangle becomes the axis-aligned bounding box of the component's pixel centres, so rotated
  text gets a looser box than PaddleOCR's (the renders of ``mdeploy.zoo.text_images`` are horizontal: there the two
  agree);
- the unclip of a rectangle is exact: offsetting a ``w x h`` rectangle by ``d = w h ratio / (2 (w + h))`` with round
  joins and taking the minimum-area rectangle again gives the rectangle grown by ``d`` on every side.

Boxes are ``(left, top, right, bottom)`` in the map's pixels (the detector's input pixels for PP-OCR, whose map has
the input's size), rounded and clipped to the map, as PaddleOCR rounds and clips its corner points; with
``scale`` = (sy, sx) they are multiplied into a source image's pixels first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .ppocr_det import DET_THRESH

__all__ = ["BOX_THRESH", "MIN_SIZE", "UNCLIP_RATIO", "Component", "DetectionScore", "TextBox", "box_iou",
           "connected_components", "db_boxes", "match_boxes", "score_boxes"]

BOX_THRESH = 0.6  # PaddleOCR's det_db_box_thresh (tools/infer/utility.py)
UNCLIP_RATIO = 1.5  # PaddleOCR's det_db_unclip_ratio
MIN_SIZE = 3  # DBPostProcess.min_size: boxes whose short side is under this many pixels are noise


@dataclass(frozen=True)
class Component:
    """One 8-connected component of a bitmap: its bounding box (inclusive pixel indices) and pixel count."""

    top: int
    left: int
    bottom: int
    right: int
    pixels: int


@dataclass(frozen=True)
class TextBox:
    """A detected text box in pixels, right and bottom exclusive as an ink box, and its mean map score."""

    left: int
    top: int
    right: int
    bottom: int
    score: float

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.left, self.top, self.right, self.bottom

    def __str__(self) -> str:
        return f"({self.left},{self.top})-({self.right},{self.bottom})"


def connected_components(mask: np.ndarray) -> list[Component]:
    """The 8-connected components of a 2-D bool mask, ordered by their first pixel in raster order.

    Works on runs of True per row (union-find over runs that touch a run of the row above, diagonals included),
    so its cost follows the number of runs, not of pixels."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"connected_components needs a 2-D mask, got shape {mask.shape}")
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)  # +1 where a run starts, -1 one past where it ends
    rows, starts, ends = [], [], []
    for row in range(mask.shape[0]):
        row_starts = np.flatnonzero(edges[row] == 1)
        row_ends = np.flatnonzero(edges[row] == -1)  # exclusive
        rows.extend([row] * len(row_starts))
        starts.extend(row_starts.tolist())
        ends.extend(row_ends.tolist())
    parent = list(range(len(starts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    previous: list[int] = []  # run indices of the row above
    index = 0
    while index < len(starts):
        row = rows[index]
        current = []
        while index < len(starts) and rows[index] == row:
            current.append(index)
            index += 1
        if previous and rows[previous[0]] == row - 1:
            for run in current:
                for above in previous:  # 8-connected: [s, e) touches [s', e') if s' <= e and e' >= s
                    if starts[above] <= ends[run] and ends[above] >= starts[run]:
                        a, b = find(run), find(above)
                        if a != b:
                            parent[max(a, b)] = min(a, b)  # the earliest run stays the root
        previous = current
    boxes: dict[int, list[int]] = {}
    for run in range(len(starts)):
        root = find(run)
        box = boxes.setdefault(root, [rows[run], starts[run], rows[run], ends[run] - 1, 0])
        box[0], box[1] = min(box[0], rows[run]), min(box[1], starts[run])
        box[2], box[3] = max(box[2], rows[run]), max(box[3], ends[run] - 1)
        box[4] += ends[run] - starts[run]
    return [Component(*boxes[root]) for root in sorted(boxes)]


def db_boxes(prob: np.ndarray, thresh: float = DET_THRESH, box_thresh: float = BOX_THRESH,
             unclip_ratio: float = UNCLIP_RATIO, min_size: int = MIN_SIZE,
             scale: tuple[float, float] = (1.0, 1.0)) -> list[TextBox]:
    """Text boxes of one probability map (H, W), or (1, H, W) / (1, 1, H, W): see the module's docstring."""
    prob = np.asarray(prob, dtype=np.float32)
    while prob.ndim > 2 and prob.shape[0] == 1:
        prob = prob[0]
    if prob.ndim != 2:
        raise ValueError(f"db_boxes needs one probability map (H, W), got shape {prob.shape}")
    height, width = prob.shape
    scale_y, scale_x = scale
    found = []
    for part in connected_components(prob > thresh):
        # the rectangle through the pixel centres, as minAreaRect of the contour's points
        box_w, box_h = part.right - part.left, part.bottom - part.top
        if min(box_w, box_h) < min_size:
            continue
        score = float(prob[part.top:part.bottom + 1, part.left:part.right + 1].mean())  # box_score_fast
        if score < box_thresh:
            continue
        distance = box_w * box_h * unclip_ratio / (2 * (box_w + box_h))
        if min(box_w, box_h) + 2 * distance < min_size + 2:
            continue
        left = _clip(round((part.left - distance) * scale_x), width * scale_x)
        right = _clip(round((part.right + distance) * scale_x), width * scale_x)
        top = _clip(round((part.top - distance) * scale_y), height * scale_y)
        bottom = _clip(round((part.bottom + distance) * scale_y), height * scale_y)
        found.append(TextBox(left, top, right, bottom, score))
    return found


def _clip(value: float, limit: float) -> int:
    return int(min(max(value, 0), round(limit)))


def box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over union of two (left, top, right, bottom) boxes (right and bottom exclusive)."""
    inter_w = min(a[2], b[2]) - max(a[0], b[0])
    inter_h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0, inter_w) * max(0, inter_h)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_boxes(predicted: list[tuple[int, int, int, int]], truth: list[tuple[int, int, int, int]],
                min_iou: float = 0.5) -> dict[int, tuple[int, float]]:
    """One-to-one matches {truth index: (predicted index, IoU)} with IoU >= ``min_iou``, best pairs first."""
    pairs = sorted(((box_iou(p, t), ti, pi) for pi, p in enumerate(predicted) for ti, t in enumerate(truth)),
                   key=lambda pair: (-pair[0], pair[1], pair[2]))
    matches: dict[int, tuple[int, float]] = {}
    used: set[int] = set()
    for iou, ti, pi in pairs:
        if iou < min_iou:
            break
        if ti not in matches and pi not in used:
            matches[ti] = (pi, iou)
            used.add(pi)
    return matches


@dataclass(frozen=True)
class DetectionScore:
    """Boxes matched one-to-one at IoU >= the limit, summed over images."""

    matched: int
    predicted: int
    truth: int

    @property
    def recall(self) -> float:
        return self.matched / self.truth if self.truth else 1.0

    @property
    def precision(self) -> float:
        return self.matched / self.predicted if self.predicted else 1.0

    def __add__(self, other: DetectionScore) -> DetectionScore:
        return DetectionScore(self.matched + other.matched, self.predicted + other.predicted, self.truth + other.truth)


def score_boxes(predicted: list[tuple[int, int, int, int]], truth: list[tuple[int, int, int, int]],
                min_iou: float = 0.5) -> DetectionScore:
    return DetectionScore(len(match_boxes(predicted, truth, min_iou)), len(predicted), len(truth))
