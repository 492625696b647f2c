"""Detectors (issue 15): ``mdeploy convert --detector spec.toml`` decodes an SSD-style model's box regression with
its anchors, judges top-k (anchor, class) agreement and box error in input pixels per artifact, records both in the
manifest and ships the anchors in the bundle; a bad spec is one line and exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from mdeploy.cli import app
from mdeploy.detection import (
    BBOX_XFORM_CLIP, DetectorSpec, class_scores, decode_boxes, detection_metrics, read_spec, top_pairs,
)
from mdeploy.errors import BadInputError, ExitCode
from tests.test_bad_inputs import the_error_line
from tests.test_graph import randomize_batch_norm

SIZE = 32
ANCHORS_PER_CELL, CLASSES = 3, 4  # classes include background (0)
runner = CliRunner()


class TinySsd(nn.Module):
    """An SSD-like detector: a conv backbone with two feature maps, box and class conv heads on the last one,
    reshaped as torchvision's SSD head does: (N, A*K, H, W) -> (N, H*W*A, K)."""

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU6())
        self.stage2 = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU6(),
                                    nn.Conv2d(16, 16, 3, 2, 1, groups=16), nn.BatchNorm2d(16), nn.Hardswish())
        self.boxes = nn.Conv2d(16, ANCHORS_PER_CELL * 4, 3, padding=1)
        self.scores = nn.Conv2d(16, ANCHORS_PER_CELL * CLASSES, 3, padding=1)

    @staticmethod
    def per_anchor(x: torch.Tensor, k: int) -> torch.Tensor:
        n, _, h, w = x.shape
        return x.view(n, -1, k, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, k)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.stage2(self.stage1(x))
        return self.per_anchor(self.boxes(features), 4), self.per_anchor(self.scores(features), CLASSES)


def tiny_ssd() -> nn.Module:
    torch.manual_seed(0)
    return randomize_batch_norm(TinySsd()).eval()


def grid_anchors(cells: int = SIZE // 8, per_cell: int = ANCHORS_PER_CELL) -> np.ndarray:
    """cx, cy, w, h normalised, in the heads' order: row, column, then anchor of the cell."""
    rows = []
    for y in range(cells):
        for x in range(cells):
            for a in range(per_cell):
                rows.append([(x + 0.5) / cells, (y + 0.5) / cells, 0.2 * (a + 1), 0.3 / (a + 1)])
    return np.asarray(rows, np.float32)


def write_spec(folder: Path, anchors: np.ndarray | None = None, **keys: object) -> Path:
    np.save(folder / "anchors.npy", grid_anchors() if anchors is None else anchors)
    values = {"boxes": "output_0", "scores": "output_1", "anchors": "anchors.npy", **keys}

    def toml(value: object) -> str:  # JSON's scalars and arrays are TOML's; a table is written inline
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k} = {toml(v)}" for k, v in value.items()) + "}"
        return json.dumps(value)

    lines = [f"{key} = {toml(value)}" for key, value in values.items() if value is not None]
    (folder / "detector.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder / "detector.toml"


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_ssd")
    x = torch.randn(1, 3, SIZE, SIZE)
    torch.export.save(torch.export.export(tiny_ssd(), (x,)), folder / "tiny_ssd.pt2")
    return folder / "tiny_ssd.pt2"


def spec_of(anchors: np.ndarray, **changes: object) -> DetectorSpec:
    names = {"boxes": "boxes", "scores": "scores", **changes}
    return DetectorSpec(Path("detector.toml"), anchors_file=Path("anchors.npy"), anchors=anchors,
                        **names)  # type: ignore[arg-type]


# -- decoding -------------------------------------------------------------------------------------------------------

def test_decoding_equals_torchvision_box_coder() -> None:
    from tests.model_library import install_torchvision_shim

    install_torchvision_shim()
    from torchvision.models.detection import _utils as det_utils

    rng = np.random.default_rng(1)
    anchors = np.concatenate([rng.uniform(0.1, 0.9, (50, 2)), rng.uniform(0.02, 0.6, (50, 2))], 1).astype(np.float32)
    regression = rng.normal(0, 3, (2, 50, 4)).astype(np.float32)
    regression[0, 0, 2] = 60.0  # dw / 5 beyond log(1000/16): clamped by both
    width, height = 320, 240
    anchors64 = anchors.astype(np.float64)  # the same anchors in pixels for torchvision, without float32 rounding
    a = anchors64
    pixels = np.stack([(a[:, 0] - a[:, 2] / 2) * width, (a[:, 1] - a[:, 3] / 2) * height,
                       (a[:, 0] + a[:, 2] / 2) * width, (a[:, 1] + a[:, 3] / 2) * height], 1)
    coder = det_utils.BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    for sample in range(2):
        want = coder.decode_single(torch.from_numpy(regression[sample]).double(), torch.from_numpy(pixels).double())
        got = decode_boxes(regression, anchors, (width, height))[sample]
        assert np.abs(got - want.numpy()).max() <= 1e-9 * max(width, height)
    # the TensorFlow order (ty, tx, th, tw) with its scales decodes the same boxes
    swapped = regression[..., [1, 0, 3, 2]]
    same = decode_boxes(swapped, anchors, (width, height), "yxhw", (10.0, 10.0, 5.0, 5.0))
    assert np.abs(same - decode_boxes(regression, anchors, (width, height))).max() <= 1e-9
    assert np.isclose(np.exp(BBOX_XFORM_CLIP), 62.5)


def test_scores_and_top_pairs() -> None:
    logits = np.log(np.array([[[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]]))
    scores = class_scores(logits, "softmax", 0)
    assert np.allclose(scores, [[[0.2, 0.1], [0.3, 0.6]]])
    assert top_pairs(scores, 2).tolist() == [[3, 2]]  # (anchor 1, class 2), then (anchor 1, class 1)
    assert np.allclose(class_scores(np.zeros((1, 1, 2)), "sigmoid", None), 0.5)


# -- metrics on known perturbations ---------------------------------------------------------------------------------

def reference_outputs(rng: np.random.Generator, anchors: int = 48) -> dict[str, np.ndarray]:
    return {"boxes": rng.normal(0, 1, (4, anchors, 4)).astype(np.float32),
            "scores": rng.normal(0, 2, (4, anchors, CLASSES)).astype(np.float32)}


def test_identical_outputs_agree_fully() -> None:
    reference = reference_outputs(np.random.default_rng(2))
    metrics = detection_metrics(spec_of(grid_anchors(), top_k=10), reference, reference, (SIZE, SIZE))
    assert (metrics.top_k, metrics.topk_agreement, metrics.box_error_px_max, metrics.score_max_abs_error) \
        == (10, 1.0, 0.0, 0.0)


def test_a_flipped_top_anchor_and_a_shifted_box() -> None:
    reference = reference_outputs(np.random.default_rng(3))
    anchors = grid_anchors()
    spec = spec_of(anchors, top_k=10)
    best = top_pairs(class_scores(reference["scores"]), 10)
    anchor, column = divmod(int(best[0, 0]), CLASSES - 1)  # sample 0's best (anchor, class)
    flipped = {key: value.copy() for key, value in reference.items()}
    flipped["scores"][0, anchor, column + 1] = -50.0  # that class (column + 1: background first) drops out
    metrics = detection_metrics(spec, reference, flipped, (SIZE, SIZE))
    assert metrics.topk_agreement == pytest.approx(1 - 1 / 10 / 4)  # one of 10 pairs, in one of 4 samples
    shifted = {key: value.copy() for key, value in reference.items()}
    shifted["boxes"][0, anchor, 0] += 1.0  # dx + 1: the box moves by anchor width / 10
    metrics = detection_metrics(spec, reference, shifted, (SIZE, SIZE))
    expected = anchors[anchor, 2] * SIZE / 10
    assert metrics.topk_agreement == 1.0 and metrics.box_error_px_max == pytest.approx(expected, rel=1e-5)
    assert metrics.box_error_px_mean == pytest.approx(expected / 40, rel=1e-5)  # one anchor of 4 x 10
    nan = {key: value.copy() for key, value in reference.items()}
    nan["boxes"][1, 0, 0] = np.nan
    metrics = detection_metrics(spec, reference, nan, (SIZE, SIZE))
    assert metrics.topk_agreement == 0.0 and metrics.box_error_px_max == float("inf")


# -- mdeploy convert --detector -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def converted(model_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("detector")
    (root / "calib").mkdir()
    calib = np.random.default_rng(0).uniform(-2, 2, (16, 3, SIZE, SIZE)).astype(np.float32)
    np.save(root / "calib" / "batch.npy", calib)
    spec = write_spec(root, top_k=20)
    with spec.open("a") as f:
        f.write("[postprocess]\ntflite = true\nmax_detections = 5\nscore_threshold = 0.2\n")
    result = runner.invoke(app, [
        "convert", str(model_file), "--to", "onnx,tflite,coreml", "--int8", "--calib", str(root / "calib"),
        "--input-size", str(SIZE), "--detector", str(spec), "--out", str(root / "out"), "--min-snr", "0"])
    assert result.exit_code == 0, result.output
    assert "top-k agreement" in result.output and "box err max px" in result.output
    return root / "out"


def test_convert_records_detection_parity_and_ships_the_anchors(converted: Path) -> None:
    import jsonschema

    manifest = json.loads((converted / "manifest.json").read_text())
    jsonschema.validate(manifest, json.loads((converted / "manifest.schema.json").read_text()))
    detection = manifest["detection"]
    assert detection["boxes_output"] == "output_0" and detection["scores_output"] == "output_1"
    assert (detection["anchors"], detection["classes"], detection["top_k"]) == (48, CLASSES, 20)
    assert detection["box_scales"] == [10.0, 10.0, 5.0, 5.0] and detection["box_order"] == ["dx", "dy", "dw", "dh"]
    assert detection["limits"] == {}  # reported only
    assert set(manifest["detection"]) >= {"anchor_format", "decoding"} and "10" in detection["decoding"]
    assert np.array_equal(np.load(converted / detection["anchors_file"]), grid_anchors())
    assert [o["meaning"].split(" (")[0] for o in manifest["outputs"]] == ["box regression", "class logits per anchor"]
    for artifact in manifest["artifacts"]:
        found = artifact["parity"]["detection"]
        assert found["top_k"] == 20
        if artifact["precision"] == "fp32":  # float32 kernels: the same pairs, boxes within float rounding
            assert found["topk_agreement"] == 1.0 and found["box_error_px_max"] < 1e-3, artifact["file"]
        else:  # int8: the metrics mean something, whatever their value on random weights
            assert 0.0 <= found["topk_agreement"] <= 1.0 and 0.0 <= found["box_error_px_max"] < SIZE
    summary = (converted / "SUMMARY.md").read_text()
    assert "| artifact | top-k agreement |" in summary and "reported only" in summary
    for readme in ("README_android.md", "README_ios.md"):  # the shared contract section of both
        text = (converted / readme).read_text()
        assert "## Detections: decoding boxes and scores" in text and "cx = dx / 10 * aw + acx" in text
        assert "w = exp(min(dw / 5, 4.135)) * aw" in text and "`anchors.npy`" in text
    assert "anchors.npy" in (converted / "SHA256SUMS").read_text()
    postprocess = detection["postprocess"]
    assert postprocess["file"] == "tiny_ssd.fp32.detect.tflite" and postprocess["check"]["agrees"] is True
    assert postprocess["check"]["detections"] == 5 * postprocess["check"]["samples"]
    assert "`detection_boxes` `[1, 5, 4]`" in (converted / "README_android.md").read_text()


def test_verify_bundle_passes_on_a_detector_bundle(converted: Path) -> None:
    done = subprocess.run([sys.executable, str(converted / "verify_bundle.py"), str(converted)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("ok      ") == 8  # fp32 + int8 ONNX and TFLite, two outputs each (Core ML: skipped)


# -- bad specs: one line naming the file and the fix, exit 2, before any work -------------------------------------

BAD_SPECS = [
    ("anchor-count", dict(anchors=grid_anchors()[:40]),
     "anchors.npy holds 40 anchors but output_0 has 48: write the model's anchors"),
    ("unknown-output", dict(boxes="bbox_regression"),
     "boxes = 'bbox_regression' is not an output of tiny_ssd.pt2 (its outputs: output_0 (1, 48, 4), "
     "output_1 (1, 48, 4)): name one"),
    ("scores-not-per-anchor", dict(boxes="output_1", scores="output_0", background_class=7),
     "background_class = 7 but output_0 has 4 classes"),
    ("pixel-anchors", dict(anchors=grid_anchors() * SIZE), "they look like pixels"),
    ("every-problem", dict(box_scales=[10, 10, 5], score_function="relu", nms=0.5),
     "unknown key 'nms' (known: boxes, scores, anchors,"),
    ("postprocess-without-tflite", dict(postprocess={"tflite": True}),
     "[postprocess] tflite = true appends to the fp32 TFLite artifact, but --to has no tflite"),
]


@pytest.mark.parametrize(("changes", "message"), [case[1:] for case in BAD_SPECS], ids=[c[0] for c in BAD_SPECS])
def test_a_bad_spec_is_one_line_and_exit_2(changes: dict, message: str, model_file: Path, tmp_path: Path) -> None:
    anchors = changes.pop("anchors", None)
    spec = write_spec(tmp_path, anchors, **changes)
    result = runner.invoke(app, ["convert", str(model_file), "--input-size", str(SIZE), "--detector", str(spec),
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == ExitCode.BAD_INPUT, result.output
    line = the_error_line(result.stderr)
    assert line.startswith(f"error: detector spec {spec}: ") and message in line, line
    assert not (tmp_path / "out").exists()


def test_every_problem_of_a_spec_file_at_once(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, box_scales=[10, 10, 5], score_function="relu", top_k=0, background_class="sky")
    with pytest.raises(BadInputError) as caught:
        read_spec(spec)
    text = str(caught.value)
    for part in ("box_scales must be four positive numbers", "score_function = 'relu'", "top_k = 0",
                 "background_class = 'sky'"):
        assert part in text, text
    (tmp_path / "broken.toml").write_text("boxes = \n")
    with pytest.raises(BadInputError, match=r"broken.toml is not valid TOML \(.*\): e.g. boxes = "):
        read_spec(tmp_path / "broken.toml")
    with pytest.raises(BadInputError, match="missing.toml does not exist: pass --detector with a TOML file"):
        read_spec(tmp_path / "missing.toml")
    (tmp_path / "anchors.npy").unlink()
    with pytest.raises(BadInputError, match="anchors.npy does not exist: write the anchors there"):
        read_spec(spec)


def test_a_detection_limit_fails_parity_with_exit_1(model_file: Path, tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    with spec.open("a") as f:
        f.write("[limits.fp32]\nmax_box_error_px = 0.0\nmin_topk_agreement = 1.0\n")
    assert read_spec(spec).limits_for("fp32").max_box_error_px == 0.0
    result = runner.invoke(app, ["convert", str(model_file), "--input-size", str(SIZE), "--detector", str(spec),
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == ExitCode.PARITY_FAILED, result.output
    line = the_error_line(result.stderr)
    assert "detection: box error" in line and "px > 0 px" in line, line
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["detection"]["limits"] == {"fp32": {"min_topk_agreement": 1.0, "max_box_error_px": 0.0}}


def test_anchors_from_torchvision_ssdlite_decode_as_its_box_coder() -> None:
    from tests.model_library import install_torchvision_shim

    install_torchvision_shim()
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large
    from torchvision.models.detection.image_list import ImageList

    from mdeploy.detection import anchors_from_torchvision

    torch.manual_seed(0)
    model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=5).eval()
    anchors = anchors_from_torchvision(model, 320)
    x = torch.randn(1, 3, 320, 320)
    with torch.no_grad():
        features = list(model.backbone(x).values())
        heads = model.head(features)
        (pixels,) = model.anchor_generator(ImageList(x, [(320, 320)]), features)
        want = model.box_coder.decode_single(heads["bbox_regression"][0], pixels)
    assert anchors.shape == (heads["bbox_regression"].shape[1], 4) == (3234, 4) and anchors.dtype == np.float32
    got = decode_boxes(heads["bbox_regression"].numpy(), anchors, (320, 320))[0]
    assert np.abs(got - want.numpy()).max() <= 1e-3  # the anchors went through float32 once
    spec = spec_of(anchors)
    assert spec.check_outputs({"boxes": (1, 3234, 4), "scores": (1, 3234, 5)}, "ssdlite.pt2") == (3234, 5)


# -- TFLite_Detection_PostProcess ----------------------------------------------------------------------------------

@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_the_postprocess_op_equals_numpy_decoding_and_nms(score_function: str, tmp_path: Path) -> None:
    from mdeploy.converters import REGISTRY, Target
    from mdeploy.converters.base import ArtifactInfo
    from mdeploy.converters.tflite_detection import (
        append_postprocess, compare_detections, reference_postprocess, run_postprocess,
    )
    from mdeploy.converters.tflite_runs import run_tflite_in_bundle
    from mdeploy.detection import PostprocessOptions
    from mdeploy.graph.from_torch import graph_from_torch

    model = tiny_ssd()
    with torch.no_grad():  # scores spread out and boxes that move: detections worth checking
        model.scores.weight *= 30
        model.boxes.weight *= 30
    path = tmp_path / "tiny.fp32.tflite"
    REGISTRY[Target.tflite].export(graph_from_torch(model, (1, 3, SIZE, SIZE)), None, path,
                                   ArtifactInfo("tiny", {"crop": SIZE}, (), "test"))
    spec = spec_of(grid_anchors(), score_function=score_function, boxes="output_0", scores="output_1")
    settings = PostprocessOptions(max_detections=8, score_threshold=0.3, iou_threshold=0.4)
    (tmp_path / "detect.tflite").write_bytes(append_postprocess(path.read_bytes(), spec, settings))
    x = np.random.default_rng(4).uniform(-2, 2, (6, 3, SIZE, SIZE)).astype(np.float32)
    raw = run_tflite_in_bundle(path, x)
    want = reference_postprocess(raw["output_0"], raw["output_1"], spec, settings)
    check = compare_detections(want, run_postprocess(tmp_path / "detect.tflite", x))
    assert check["same_count"] and check["same_classes"], check
    assert check["box_max_abs_diff"] <= 1e-5 and check["score_max_abs_diff"] <= 1e-5, check
    assert check["detections"] > 6  # boxes were found...
    unlimited = PostprocessOptions(max_detections=10000, score_threshold=0.3, iou_threshold=0.4)
    suppressed = sum(int(np.sum(class_scores(raw["output_1"][i:i + 1], score_function).max(-1) >= 0.3))
                     - len(found[0]) for i, found in enumerate(reference_postprocess(
                         raw["output_0"], raw["output_1"], spec, unlimited)))
    assert suppressed > 0  # ...and NMS removed some


_SUPPORT_READER = r"""
import json, sys
from tensorflow_lite_support.metadata.cc.python import _pywrap_metadata_version
from tensorflow_lite_support.metadata.python import metadata as md
from tensorflow_lite_support.metadata.python.metadata_writers import object_detector

mine = md.MetadataDisplayer.with_model_file(sys.argv[1])
buf = bytes(mine.get_metadata_buffer())
model = open(sys.argv[2], "rb").read()
md.MetadataPopulator.with_model_buffer(model).load_metadata_buffer(buf)  # validates the tensor counts
writer = object_detector.MetadataWriter.create_for_inference(model, [123.675, 116.28, 103.53],
                                                             [58.395, 57.12, 57.375], [])
reference = md.MetadataDisplayer.with_model_buffer(writer.populate()).get_metadata_json()
json.dump({"mine": json.loads(mine.get_metadata_json()), "reference": json.loads(reference),
           "version": _pywrap_metadata_version.GetMinimumMetadataParserVersion(buf)}, sys.stdout)
"""


def test_the_postprocess_model_carries_object_detector_metadata(converted: Path, tmp_path: Path) -> None:
    """Read back with tflite-support 0.4.4 (unpacked by ./run setup, see tests/test_tflite_metadata.py): the
    outputs' metadata equals what its object_detector writer gives the same model."""
    import os

    from mdeploy.converters.tflite_detection import append_postprocess
    from mdeploy.detection import PostprocessOptions
    from tests.test_tflite_metadata import SUPPORT

    if not (SUPPORT / ".complete").is_file():
        pytest.skip(f"{SUPPORT} is missing: `./run setup` unpacks tflite-support there")
    bare = tmp_path / "bare.tflite"  # the same op without metadata, for the reference writer
    spec = read_spec(converted.parent / "detector.toml")
    bare.write_bytes(append_postprocess((converted / "tiny_ssd.fp32.tflite").read_bytes(), spec,
                                        PostprocessOptions(5, 0.2, 0.5)))
    env = {**os.environ, "PYTHONPATH": str(SUPPORT), "TF_CPP_MIN_LOG_LEVEL": "3",
           "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [str(SUPPORT / "lib"), os.environ.get("LD_LIBRARY_PATH")]))}
    done = subprocess.run([sys.executable, "-c", _SUPPORT_READER, str(converted / "tiny_ssd.fp32.detect.tflite"),
                           str(bare)], capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    read = json.loads(done.stdout)
    mine, reference = read["mine"]["subgraph_metadata"][0], read["reference"]["subgraph_metadata"][0]
    assert mine["output_tensor_metadata"] == reference["output_tensor_metadata"]
    assert mine["output_tensor_groups"] == reference["output_tensor_groups"]
    assert mine["input_tensor_metadata"][0]["process_units"] == reference["input_tensor_metadata"][0]["process_units"]
    assert read["version"] == read["mine"]["min_parser_version"] == "1.2.0"
