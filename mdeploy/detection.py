"""SSD-style detection heads (issue 15): what the user says about them (``mdeploy convert --detector spec.toml``),
box decoding with the anchors, and parity that means something for a detector: of the PyTorch model's top-k
(anchor, class) pairs by score, the fraction the artifact also ranks in its top k, and the error of the decoded
boxes in input pixels.

A detector has two raw outputs: box regression (N, A, 4) and class logits (N, A, K), one row per anchor. The
anchors (A, 4) are ``cx, cy, w, h`` normalised to [0, 1] of the model's input (what TFLite_Detection_PostProcess
takes, as ``cy, cx, h, w``). A box decodes as torchvision's ``BoxCoder`` does (``mdeploy.detection.decode_boxes``)::

    cx = dx / sx * anchor_w + anchor_cx        w = exp(min(dw / sw, log(1000 / 16))) * anchor_w
    cy = dy / sy * anchor_h + anchor_cy        h = exp(min(dh / sh, log(1000 / 16))) * anchor_h

with the box coder scales ``(sx, sy, sw, sh)`` (torchvision's SSD: 10, 10, 5, 5), then scaled to input pixels.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mdeploy.errors import BadInputError

ANCHORS_FILE = "anchors.npy"  # the anchors' name in the bundle
ANCHOR_FORMAT = "cxcywh"  # the only anchors format: centre x, centre y, width, height, normalised to [0, 1]
ANCHOR_COLUMNS = "cx, cy, w, h normalised to [0, 1] of the model input"
ANCHOR_FORMAT_TEXT = f"(A, 4) float32 rows of {ANCHOR_COLUMNS}"
BOX_ORDERS = {"xywh": ("dx", "dy", "dw", "dh"), "yxhw": ("dy", "dx", "dh", "dw")}  # the regression's order per anchor
SCORE_FUNCTIONS = ("softmax", "sigmoid")
BBOX_XFORM_CLIP = math.log(1000.0 / 16)  # torchvision's clamp of dw, dh before exp
DEFAULT_TOP_K = 100
LIMIT_KEYS = {"min_topk_agreement": "a fraction in [0, 1]", "max_box_error_px": "pixels >= 0"}
SPEC_KEYS = ("boxes", "scores", "anchors", "anchor_format", "box_order", "box_scales", "score_function",
             "background_class", "top_k", "limits", "postprocess")
POSTPROCESS_KEYS = ("tflite", "max_detections", "score_threshold", "iou_threshold")
EXAMPLE = 'e.g. boxes = "output_0", scores = "output_1", anchors = "anchors.npy"'


@dataclass(frozen=True)
class DetectionLimits:
    """Limits on the detection metrics of one precision; None: reported only (the default, see README)."""

    min_topk_agreement: float | None = None
    max_box_error_px: float | None = None

    def to_dict(self) -> dict[str, float]:
        return {key: value for key, value in asdict(self).items() if value is not None}


@dataclass(frozen=True)
class PostprocessOptions:
    """``[postprocess]`` of a spec: an fp32 TFLite with TFLite_Detection_PostProcess (fast NMS) appended."""

    max_detections: int = 10
    score_threshold: float = 0.3
    iou_threshold: float = 0.5


@dataclass(frozen=True)
class DetectorSpec:
    """A detector spec file, read and checked (:func:`read_spec`); :meth:`check_outputs` checks it against the
    model's outputs once it is traced."""

    source: Path  # the spec file, named in every message
    boxes: str  # the output holding box regression (N, A, 4)
    scores: str  # the output holding class logits (N, A, K)
    anchors_file: Path
    anchors: np.ndarray = field(compare=False, repr=False)  # (A, 4) float32 cx, cy, w, h normalised
    box_order: str = "xywh"
    box_scales: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)  # in box_order
    score_function: str = "softmax"
    background_class: int | None = 0  # a column of the logits that is no class (softmax SSDs: 0), or None
    top_k: int = DEFAULT_TOP_K
    limits: dict[str, DetectionLimits] = field(default_factory=dict)  # per precision ("fp32", "int8")
    postprocess: PostprocessOptions | None = None  # [postprocess] tflite = true

    def limits_for(self, precision: str) -> DetectionLimits:
        return self.limits.get(precision, DetectionLimits())

    def check_outputs(self, shapes: dict[str, tuple[int, ...]], model: str) -> tuple[int, int]:
        """The anchor and class counts (background included) the outputs ``shapes`` (name -> shape) have; a
        BadInputError naming every mismatch with the spec, on one line."""
        listed = ", ".join(f"{name} {tuple(shape)}" for name, shape in shapes.items())
        problems = []
        for key, name, last in (("boxes", self.boxes, 4), ("scores", self.scores, None)):
            shape = shapes.get(name)
            if shape is None:
                problems.append(f"{key} = {name!r} is not an output of {model} (its outputs: {listed}): name one")
            elif len(shape) != 3 or (last is not None and shape[2] != last):
                want = "(N, A, 4) box regression" if last else "(N, A, K) class logits"
                problems.append(f"{key} = {name!r} has shape {tuple(shape)}, not {want}: name the right output")
        if problems:
            raise self.error(problems)
        boxes, scores = shapes[self.boxes], shapes[self.scores]
        if self.boxes == self.scores:
            problems.append(f"boxes and scores both name {self.boxes!r}: name two outputs")
        if boxes[1] != scores[1]:
            problems.append(f"{self.boxes} has {boxes[1]} anchors but {self.scores} {scores[1]}: name the box and "
                            "score outputs of the same heads")
        if len(self.anchors) != boxes[1]:
            problems.append(f"{self.anchors_file.name} holds {len(self.anchors)} anchors but {self.boxes} has "
                            f"{boxes[1]}: write the model's anchors, one row per box of its output, in its order")
        if self.background_class is not None and self.background_class >= scores[2]:
            problems.append(f"background_class = {self.background_class} but {self.scores} has {scores[2]} classes:"
                            ' give a class index or "none"')
        if self.background_class is not None and scores[2] < 2:
            problems.append(f'{self.scores} has one class, which cannot be background: background_class = "none"')
        if problems:
            raise self.error(problems)
        return boxes[1], scores[2]

    def meanings(self) -> dict[str, str]:
        """What the box and score outputs hold, for the manifest's ``outputs``."""
        order = ", ".join(BOX_ORDERS[self.box_order])
        background = f"class {self.background_class} is background" if self.background_class is not None \
            else "no background class"
        return {self.boxes: f"box regression ({order}) per anchor of {ANCHORS_FILE}",
                self.scores: f"class logits per anchor ({self.score_function}; {background})"}

    def decoding(self) -> str:
        """The box decoding formula, in the terms of the bundle's README."""
        sx, sy, sw, sh = (dict(zip(BOX_ORDERS[self.box_order], self.box_scales, strict=True))[n]
                          for n in ("dx", "dy", "dw", "dh"))
        return (f"cx = dx / {sx:g} * anchor_w + anchor_cx; cy = dy / {sy:g} * anchor_h + anchor_cy; "
                f"w = exp(min(dw / {sw:g}, ln(1000/16))) * anchor_w; "
                f"h = exp(min(dh / {sh:g}, ln(1000/16))) * anchor_h; "
                "box = (cx - w/2, cy - h/2, cx + w/2, cy + h/2), normalised: times the input width / height for pixels")

    def error(self, problems: list[str]) -> BadInputError:
        return BadInputError(f"detector spec {self.source}: " + "; ".join(problems))


def detection_record(spec: DetectorSpec, shapes: dict[str, tuple[int, ...]]) -> Any:
    """The manifest's ``detection`` (a :class:`mdeploy.manifest.DetectionRecord`)."""
    from mdeploy.manifest import DetectionRecord

    return DetectionRecord(
        boxes_output=spec.boxes, scores_output=spec.scores, anchors_file=ANCHORS_FILE, anchors=len(spec.anchors),
        anchor_format=ANCHOR_COLUMNS, box_order=list(BOX_ORDERS[spec.box_order]),
        box_scales=list(spec.box_scales), score_function=spec.score_function,
        background_class=spec.background_class, classes=int(shapes[spec.scores][-1]), decoding=spec.decoding(),
        top_k=min(spec.top_k, len(spec.anchors) * (int(shapes[spec.scores][-1]) -
                                                     (spec.background_class is not None))),
        limits={precision: limits.to_dict() for precision, limits in spec.limits.items() if limits.to_dict()})


def read_spec(path: Path) -> DetectorSpec:
    """The detector spec at ``path`` (TOML, see README "Detectors"); a BadInputError naming the file and every
    problem with its fix, on one line. The anchors path is relative to the spec file."""
    where = f"detector spec {path}"
    if not path.is_file():
        raise BadInputError(f"{where} does not exist: pass --detector with a TOML file ({EXAMPLE})")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise BadInputError(f"{where} is not valid TOML ({str(err).splitlines()[0]}): {EXAMPLE}") from None
    problems: list[str] = []
    for key in data:
        if key not in SPEC_KEYS:
            problems.append(f"unknown key {key!r} (known: {', '.join(SPEC_KEYS)})")
    values: dict[str, Any] = {}
    for key in ("boxes", "scores"):
        value = data.get(key)
        if not isinstance(value, str) or not value:
            problems.append(f"{key} must name an output of the model ({EXAMPLE})")
        values[key] = value
    if data.get("anchor_format", ANCHOR_FORMAT) != ANCHOR_FORMAT:
        problems.append(f'anchor_format = {data["anchor_format"]!r} is not supported: write the anchors as '
                        f'{ANCHOR_FORMAT_TEXT} and set anchor_format = "{ANCHOR_FORMAT}" (or leave it out)')
    order = data.get("box_order", "xywh")
    if order not in BOX_ORDERS:
        problems.append(f'box_order = {order!r}: "xywh" (dx, dy, dw, dh, torchvision) or "yxhw" (ty, tx, th, tw, '
                        "TensorFlow)")
    scales = data.get("box_scales", [10.0, 10.0, 5.0, 5.0])
    if not (isinstance(scales, list) and len(scales) == 4 and all(
            isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s > 0 for s in scales)):
        problems.append("box_scales must be four positive numbers in box_order, e.g. [10.0, 10.0, 5.0, 5.0]")
        scales = [10.0, 10.0, 5.0, 5.0]
    function = data.get("score_function", "softmax")
    if function not in SCORE_FUNCTIONS:
        problems.append(f'score_function = {function!r}: "softmax" or "sigmoid"')
    background = data.get("background_class", 0)
    if background == "none":
        background = None
    elif not (isinstance(background, int) and not isinstance(background, bool) and background >= 0):
        problems.append(f'background_class = {background!r}: a class index (0 for torchvision\'s SSD) or "none"')
        background = 0
    top_k = data.get("top_k", DEFAULT_TOP_K)
    if not (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 1):
        problems.append(f"top_k = {top_k!r}: a whole number >= 1 (default {DEFAULT_TOP_K})")
        top_k = DEFAULT_TOP_K
    limits = read_limits(data.get("limits", {}), problems)
    postprocess = read_postprocess(data.get("postprocess", {}), background, problems)
    anchors_file, anchors = read_anchors(data.get("anchors"), path, problems)
    if problems:
        raise BadInputError(f"{where}: " + "; ".join(problems))
    return DetectorSpec(path, values["boxes"], values["scores"], anchors_file, anchors, order,
                        tuple(float(s) for s in scales), function, background, top_k, limits,  # type: ignore[arg-type]
                        postprocess)


def read_postprocess(table: Any, background: int | None, problems: list[str]) -> PostprocessOptions | None:
    if not isinstance(table, dict):
        problems.append("postprocess must be a table: [postprocess] tflite = true")
        return None
    for key in table:
        if key not in POSTPROCESS_KEYS:
            problems.append(f"postprocess.{key}: unknown (known: {', '.join(POSTPROCESS_KEYS)})")
    if not table.get("tflite", False):
        return None
    values = {}
    for key, low, high in (("max_detections", 1, 10000), ("score_threshold", 0.0, 1.0), ("iou_threshold", 0.0, 1.0)):
        value = table.get(key, getattr(PostprocessOptions, key))
        whole = key == "max_detections"
        if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)) or not low <= value <= high:
            problems.append(f"postprocess.{key} = {value!r}: {'a whole number' if whole else 'a number'} in "
                            f"{low:g}..{high:g}")
        values[key] = value
    if background not in (0, None):
        problems.append(f"postprocess: TFLite_Detection_PostProcess takes background in column 0 or none, not "
                        f"{background}: leave out [postprocess]")
    return PostprocessOptions(int(values["max_detections"]), float(values["score_threshold"]),
                              float(values["iou_threshold"]))


def read_limits(table: Any, problems: list[str]) -> dict[str, DetectionLimits]:
    if not isinstance(table, dict):
        problems.append("limits must be tables [limits.fp32] / [limits.int8]")
        return {}
    limits = {}
    for precision, values in table.items():
        if precision not in ("fp32", "int8") or not isinstance(values, dict):
            problems.append(f"limits.{precision}: only [limits.fp32] and [limits.int8] tables")
            continue
        good = {}
        for key, value in values.items():
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if key not in LIMIT_KEYS:
                problems.append(f"limits.{precision}.{key}: unknown (known: {', '.join(LIMIT_KEYS)})")
            elif not number or value < 0 or (key == "min_topk_agreement" and value > 1):
                problems.append(f"limits.{precision}.{key} = {value!r}: {LIMIT_KEYS[key]}")
            else:
                good[key] = float(value)
        limits[precision] = DetectionLimits(**good)
    return limits


def read_anchors(name: Any, spec: Path, problems: list[str]) -> tuple[Path, np.ndarray]:
    empty = np.zeros((0, 4), np.float32)
    if not isinstance(name, str) or not name:
        problems.append(f"anchors must name an .npy file of {ANCHOR_FORMAT_TEXT}, relative to the spec "
                        "(mdeploy.detection.anchors_from_torchvision writes one)")
        return Path(""), empty
    path = spec.parent / name
    try:
        anchors = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        problems.append(f"anchors file {path} does not exist: write the anchors there (.npy, {ANCHOR_FORMAT_TEXT})")
        return path, empty
    except (OSError, ValueError, EOFError) as err:
        problems.append(f"anchors file {path} is not a readable .npy file ({str(err).splitlines()[0][:80]}): "
                        "save it with numpy.save")
        return path, empty
    if not isinstance(anchors, np.ndarray) or anchors.ndim != 2 or anchors.shape[1] != 4 \
            or not np.issubdtype(anchors.dtype, np.floating):
        problems.append(f"anchors file {path} holds {getattr(anchors, 'dtype', '?')} "
                        f"{getattr(anchors, 'shape', '?')}, not float (A, 4): {ANCHOR_FORMAT_TEXT}")
        return path, empty
    if len(anchors) == 0 or not np.all(np.isfinite(anchors)) or not np.all(anchors[:, 2:] > 0):
        problems.append(f"anchors file {path} must hold finite anchors with w, h > 0 ({ANCHOR_FORMAT_TEXT})")
    elif np.abs(anchors).max() > 16:
        problems.append(f"anchors file {path} holds values up to {np.abs(anchors).max():.4g}: they look like "
                        f"pixels; write them {ANCHOR_FORMAT_TEXT} (mdeploy.detection.anchors_from_torchvision)")
    return path, anchors.astype(np.float32)


# -- decoding -----------------------------------------------------------------------------------------------------

def decode_boxes(regression: np.ndarray, anchors: np.ndarray, size: tuple[int, int], box_order: str = "xywh",
                 box_scales: tuple[float, ...] = (10.0, 10.0, 5.0, 5.0), clip: bool = True) -> np.ndarray:
    """Box regression (N, A, 4) in ``box_order`` with ``box_scales`` (the same order) and anchors (A, 4) cx, cy, w,
    h normalised -> boxes (N, A, 4) x1, y1, x2, y2 in input pixels (``size`` = (width, height)), as torchvision's
    ``BoxCoder.decode_single`` (dw, dh clamped at log(1000/16)), in float64."""
    names = BOX_ORDERS[box_order]
    rel = np.asarray(regression, np.float64)
    scale = dict(zip(names, box_scales, strict=True))
    dx, dy, dw, dh = (rel[..., names.index(n)] / scale[n] for n in ("dx", "dy", "dw", "dh"))
    width, height = size
    a = np.asarray(anchors, np.float64)
    aw, ah = a[:, 2] * width, a[:, 3] * height
    cx, cy = dx * aw + a[:, 0] * width, dy * ah + a[:, 1] * height
    if clip:  # torchvision's; TFLite_Detection_PostProcess does not clamp
        dw, dh = np.minimum(dw, BBOX_XFORM_CLIP), np.minimum(dh, BBOX_XFORM_CLIP)
    w, h = np.exp(dw) * aw, np.exp(dh) * ah
    return np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def class_scores(logits: np.ndarray, score_function: str = "softmax", background_class: int | None = 0
                 ) -> np.ndarray:
    """Logits (N, A, K) -> scores (N, A, K) after softmax over K or sigmoid, the background column dropped."""
    x = np.asarray(logits, np.float64)
    if score_function == "softmax":
        x = np.exp(x - x.max(axis=-1, keepdims=True))
        x /= x.sum(axis=-1, keepdims=True)
    else:
        x = 1.0 / (1.0 + np.exp(-x))
    return np.delete(x, background_class, axis=-1) if background_class is not None else x


def top_pairs(scores: np.ndarray, k: int) -> np.ndarray:
    """Per sample, the flat indices (anchor * classes + class) of its k best (anchor, class) scores, best first."""
    flat = scores.reshape(len(scores), -1)
    k = min(k, flat.shape[1])
    best = np.argpartition(-flat, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(flat, best, axis=1), axis=1, kind="stable")
    return np.take_along_axis(best, order, axis=1)


# -- metrics ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DetectionMetrics:
    """An artifact's detections against PyTorch's on the parity inputs, after decoding both the same way."""

    top_k: int  # k (at most anchors x classes)
    topk_agreement: float  # of PyTorch's top-k (anchor, class) pairs by score, the mean fraction in the artifact's
    box_error_px_mean: float  # max |corner difference| of the decoded box, in input pixels, over PyTorch's top-k
    box_error_px_max: float  # (anchor, class) pairs' anchors: the mean and the max over pairs and samples
    score_max_abs_error: float  # max |score difference| (after the score function) on those pairs

    def to_dict(self) -> dict[str, Any]:
        return {key: str(v) if isinstance(v, float) and not math.isfinite(v) else v for key, v in asdict(self).items()}

    def failures(self, limits: DetectionLimits) -> list[str]:
        found = []
        if limits.min_topk_agreement is not None and not self.topk_agreement >= limits.min_topk_agreement:
            found.append(f"top-{self.top_k} agreement {self.topk_agreement:.1%} < {limits.min_topk_agreement:.1%}")
        if limits.max_box_error_px is not None and not self.box_error_px_max <= limits.max_box_error_px:
            found.append(f"box error {self.box_error_px_max:.3g} px > {limits.max_box_error_px:.3g} px")
        return found


def detection_metrics(spec: DetectorSpec, references: dict[str, np.ndarray], outputs: dict[str, np.ndarray],
                      size: tuple[int, int]) -> DetectionMetrics:
    """``outputs`` (an artifact's, by name) against ``references`` (PyTorch's) as detections of ``spec``."""
    want = class_scores(references[spec.scores], spec.score_function, spec.background_class)
    got_logits, got_boxes = outputs[spec.scores], outputs[spec.boxes]
    k = min(spec.top_k, want.shape[1] * want.shape[2])
    if not (np.all(np.isfinite(got_logits)) and np.all(np.isfinite(got_boxes))):
        return DetectionMetrics(k, 0.0, float("inf"), float("inf"), float("inf"))
    got = class_scores(got_logits, spec.score_function, spec.background_class)
    mine, theirs = top_pairs(want, k), top_pairs(got, k)
    agreement = float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(mine, theirs, strict=True)]))
    anchors = mine // want.shape[2]  # (N, k) the anchors of PyTorch's top pairs
    decode = dict(anchors=spec.anchors, size=size, box_order=spec.box_order, box_scales=spec.box_scales)
    boxes_want = np.take_along_axis(decode_boxes(references[spec.boxes], **decode), anchors[..., None], axis=1)
    boxes_got = np.take_along_axis(decode_boxes(got_boxes, **decode), anchors[..., None], axis=1)
    errors = np.abs(boxes_got - boxes_want).max(axis=-1)
    flat_want, flat_got = want.reshape(len(want), -1), got.reshape(len(got), -1)
    score_error = np.abs(np.take_along_axis(flat_got, mine, 1) - np.take_along_axis(flat_want, mine, 1)).max()
    return DetectionMetrics(k, agreement, float(errors.mean()), float(errors.max()), float(score_error))


# -- anchors from torchvision ---------------------------------------------------------------------------------------

def anchors_from_torchvision(model: Any, image_size: int | tuple[int, int]) -> np.ndarray:
    """The anchors (A, 4) of a torchvision SSD / SSDLite (``model.anchor_generator`` on ``model.backbone``'s feature
    maps for an input of ``image_size`` (square, or (height, width)), the order of ``model.head``'s outputs) as
    cx, cy, w, h normalised to [0, 1]: ``numpy.save("anchors.npy", anchors_from_torchvision(model, 320))``."""
    import torch
    from torchvision.models.detection.image_list import ImageList

    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    images = torch.zeros(1, 3, height, width)
    with torch.no_grad():
        features = list(model.backbone(images).values())
        (boxes,) = model.anchor_generator(ImageList(images, [(height, width)]), features)
    x1, y1, x2, y2 = boxes.double().unbind(-1)
    anchors = torch.stack([(x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height], -1)
    return anchors.float().numpy()


def judge_detection(parity: Any, spec: DetectorSpec, references: tuple[np.ndarray, ...],
                    outputs: tuple[np.ndarray, ...], names: tuple[str, ...], precision: str,
                    size: tuple[int, int]) -> Any:
    """``parity`` (a :class:`mdeploy.parity.ParityResult` of every output) with the detection metrics added and
    the failures of the spec's limits for ``precision`` (none by default: the metrics are reported only)."""
    from dataclasses import replace

    metrics = detection_metrics(spec, dict(zip(names, references, strict=True)),
                                dict(zip(names, outputs, strict=True)), size)
    failures = tuple(f"detection: {failure}" for failure in metrics.failures(spec.limits_for(precision)))
    return replace(parity, detection=metrics, failures=parity.failures + failures)
