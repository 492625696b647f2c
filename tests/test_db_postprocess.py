"""The DB post-processing of mdeploy.zoo.db_postprocess: components, PaddleOCR's filters and unclip, box matching."""

from __future__ import annotations

import numpy as np
import pytest

from mdeploy.zoo.db_postprocess import (
    DetectionScore, box_iou, connected_components, db_boxes, match_boxes, score_boxes,
)


def brute_force_components(mask: np.ndarray) -> list[tuple[int, int, int, int, int]]:
    """Flood fill, 8-connected: (top, left, bottom, right, pixels) in raster order of first pixels."""
    seen = np.zeros_like(mask, dtype=bool)
    found = []
    for r, c in zip(*np.nonzero(mask)):
        if seen[r, c]:
            continue
        stack, pixels = [(r, c)], []
        seen[r, c] = True
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        ys, xs = zip(*pixels)
        found.append((min(ys), min(xs), max(ys), max(xs), len(pixels)))
    return found


@pytest.mark.parametrize("seed", range(6))
def test_components_match_a_flood_fill(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = rng.random((37, 53)) < [0.1, 0.3, 0.45, 0.55, 0.6, 0.8][seed]
    got = [(c.top, c.left, c.bottom, c.right, c.pixels) for c in connected_components(mask)]
    assert got == brute_force_components(mask)


def test_components_are_8_connected_and_handle_u_shapes() -> None:
    mask = np.zeros((6, 8), dtype=bool)
    mask[0, 0] = mask[1, 1] = True  # diagonal neighbours: one component
    mask[2:5, 3] = mask[2:5, 6] = mask[4, 3:7] = True  # a U: its arms join only at the bottom row
    parts = connected_components(mask)
    assert [(c.top, c.left, c.bottom, c.right, c.pixels) for c in parts] == [(0, 0, 1, 1, 2), (2, 3, 4, 6, 8)]
    assert connected_components(np.zeros((4, 4), dtype=bool)) == []
    assert len(connected_components(np.ones((4, 4), dtype=bool))) == 1
    with pytest.raises(ValueError, match="2-D"):
        connected_components(np.zeros((1, 4, 4), dtype=bool))


def test_box_is_paddleocr_unclip_of_the_component_rectangle() -> None:
    prob = np.zeros((1, 1, 64, 96), dtype=np.float32)
    prob[0, 0, 20:31, 10:51] = 0.9  # 41 x 11 pixels: centres span 40 x 10
    (box,) = db_boxes(prob)
    distance = 40 * 10 * 1.5 / (2 * (40 + 10))  # area * unclip_ratio / perimeter = 6.0
    assert box.box == (round(10 - distance), round(20 - distance), round(50 + distance), round(30 + distance))
    assert box.box == (4, 14, 56, 36)
    assert box.score == pytest.approx(0.9)
    assert str(box) == "(4,14)-(56,36)"
    # a source image twice the map's size: the same box in its pixels
    (scaled,) = db_boxes(prob, scale=(2.0, 2.0))
    assert scaled.box == (8, 28, 112, 72)


def test_threshold_score_and_size_filters() -> None:
    prob = np.zeros((40, 40), dtype=np.float32)
    prob[5:15, 5:30] = 0.35  # above the 0.3 threshold, but its mean score is under box_thresh 0.6
    prob[20:22, 5:30] = 0.95  # two rows: the short side through pixel centres is 1 < min_size 3
    prob[30:36, 30:31] = 0.95  # one column
    prob[30:35, 5:12] = 0.29  # under the threshold
    assert db_boxes(prob) == []
    assert len(db_boxes(prob, box_thresh=0.3)) == 1  # the faint one passes a lower box threshold
    # without the size filters the two-row strip passes too (short side 1 + 2 * 0.72 after unclip); the column's
    # rectangle through pixel centres has no width, hence no unclip distance, and stays out as in PaddleOCR
    assert len(db_boxes(prob, box_thresh=0.3, min_size=0)) == 2


def test_boxes_are_clipped_to_the_map() -> None:
    prob = np.zeros((32, 32), dtype=np.float32)
    prob[0:10, 0:32] = 1.0
    (box,) = db_boxes(prob)
    assert box.box[:2] == (0, 0) and box.box[2] == 32


def test_iou_and_matching() -> None:
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0
    truth = [(0, 0, 10, 10), (20, 0, 30, 10), (40, 0, 50, 10)]
    predicted = [(1, 0, 11, 10), (0, 0, 9, 10), (21, 1, 30, 10), (60, 0, 70, 10)]
    matches = match_boxes(predicted, truth)
    assert sorted(matches) == [0, 1]  # the third word is missed
    assert matches[0][0] == 1  # the better of the two boxes on the first word; the other is a false positive
    assert matches[1][0] == 2
    score = score_boxes(predicted, truth)
    assert score == DetectionScore(matched=2, predicted=4, truth=3)
    assert (score.recall, score.precision) == (2 / 3, 0.5)
    assert score + score == DetectionScore(4, 8, 6)
    assert DetectionScore(0, 0, 0).recall == 1.0 and DetectionScore(0, 0, 0).precision == 1.0
    assert match_boxes([(5, 0, 15, 10)], [(0, 0, 10, 10)]) == {}  # IoU 1/3 < 0.5
