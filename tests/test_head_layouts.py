"""Issue 15: torchvision's own detection and segmentation layouts on MobileNetV3-Large (SSDLite as its raw head
outputs, DeepLabV3, LR-ASPP), random weights with BatchNorm statistics from real photos, saved as users save them,
convert through the CLI to fp32 + int8 ONNX, TFLite and Core ML with exit 0: fp32 parity at the default limits on
every runtime, every output kept by name and in order, the segmenters' arg-max agreement and the detector's decoded
top-k agreement recorded, the int8 TFLite full-integer and in one XNNPACK partition.

int8 quality is judged elsewhere: with random weights the V3-Large backbone amplifies every rounding, for ONNX
Runtime's own quantiser as for ours (bench/heads.py and its table in bench/RESULTS.md compare the two); here the int8
gate is the random-weights one of tests/test_library_models.py, which a broken conversion fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mdeploy.cli import app
from mdeploy.detection import anchors_from_torchvision
from tests.model_library import HEAD_LAYOUTS, SAVERS, head_layout_model, ssd_detector_spec
from tests.test_library_models import ALL_TARGETS, RANDOM_WEIGHTS_MIN_SNR_DB, RANDOM_WEIGHTS_MIN_TOP1

torch.set_num_threads(1)
runner = CliRunner()
SIZE = 160  # SSDLite's six feature maps are then 10, 5, 3, 2, 1 and 1 cells; the segmenters' logits 10x10 upsampled
EVAL_SAMPLES = 8
CALIB_SAMPLES = 24
SSD = "ssdlite320_mobilenet_v3_large"
OUTPUTS = {SSD: ["bbox_regression", "cls_logits"], "deeplabv3_mobilenet_v3_large": ["logits"],
           "lraspp_mobilenet_v3_large": ["logits"]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, calib_dir: Path):  # type: ignore[no-untyped-def]
    """Each layout built once and saved both ways; SSDLite's anchors and detector spec beside it."""
    folder = tmp_path_factory.mktemp("layouts")
    cache: dict[str, Path] = {}

    def get(layout: str, kind: str) -> Path:
        if layout not in cache:
            model = head_layout_model(layout, calib_dir, SIZE)
            example = torch.randn(1, 3, SIZE, SIZE)
            for save, suffix in SAVERS.values():
                save(model, example, folder / f"{layout}{suffix}")
            if layout == SSD:
                np.save(folder / "anchors.npy", anchors_from_torchvision(model, SIZE))
                (folder / "detector.toml").write_text(ssd_detector_spec(top_k=50))
            cache[layout] = folder
        return folder / f"{layout}{SAVERS[kind][1]}"

    return get


def convert(model: Path, out: Path, eval_dir: Path, *extra: str):  # type: ignore[no-untyped-def]
    detector = ["--detector", str(model.parent / "detector.toml")] if model.stem == SSD else []
    return runner.invoke(app, ["convert", str(model), "--to", ALL_TARGETS, "--input-size", str(SIZE), "--eval",
                               str(eval_dir), "--eval-size", str(EVAL_SAMPLES), "--out", str(out), *detector, *extra])


def artifacts_of(out: Path) -> dict[tuple[str, str], dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {(a["target"], a["precision"]): a for a in manifest["artifacts"]}


def check_fp32(artifact: dict, layout: str) -> None:
    """Passed at the default limits, relative to each output's scale; each output by name, in the model's order."""
    parity = artifact["parity"]
    assert parity["passed"] is True, parity
    names = [o["name"] for o in artifact["io"]["outputs"]]
    assert names == OUTPUTS[layout], names
    per_output = parity["outputs"] if len(names) > 1 else [parity]
    for record in per_output:
        assert "max_abs_error" in record["thresholds"] and record["metrics"]["snr_db"] > 60, record


@pytest.mark.parametrize("layout", HEAD_LAYOUTS)
def test_layout_converts_fp32_and_int8_everywhere(layout: str, saved, calib_dir: Path,  # type: ignore[no-untyped-def]
                                                  eval_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = convert(saved(layout, "pt2"), out, eval_dir, "--int8", "--calib", str(calib_dir), "--calib-size",
                     str(CALIB_SAMPLES), "--min-snr", str(RANDOM_WEIGHTS_MIN_SNR_DB),
                     "--min-top1", str(RANDOM_WEIGHTS_MIN_TOP1))
    assert result.exit_code == 0, result.output
    artifacts = artifacts_of(out)
    assert set(artifacts) == {(t, p) for t in ALL_TARGETS.split(",") for p in ("fp32", "int8")}, artifacts
    for (target, precision), artifact in artifacts.items():
        if precision == "fp32":
            check_fp32(artifact, layout)
        metrics = artifact["parity"]["metrics"]
        if layout == SSD:  # decoded with torchvision's anchors: top-k (anchor, class) agreement and box error, px
            detection = artifact["parity"]["detection"]
            assert detection["top_k"] == 50 and 0 <= detection["topk_agreement"] <= 1, detection
            if precision == "fp32":
                assert detection["topk_agreement"] == 1 and detection["box_error_px_max"] < 0.01, detection
        else:  # arg-max over the 21 classes per pixel, and mean IoU, against PyTorch's mask
            assert 0 < metrics["pixel_agreement"] <= 1 and 0 < metrics["mean_iou"] <= 1, metrics
            if precision == "fp32":
                assert metrics["pixel_agreement"] > 0.999, metrics
        print(f"{layout} {target} {precision}: SNR {metrics['snr_db']:.1f} dB "
              + (f"top-k {artifact['parity']['detection']['topk_agreement']:.0%}" if layout == SSD
                 else f"pixels {metrics['pixel_agreement']:.1%} mIoU {metrics['mean_iou']:.2f}"))

    tflite = out / artifacts[("tflite", "int8")]["file"]
    graph = json.loads(runner.invoke(app, ["inspect", str(tflite), "--json"]).stdout)["graph"]
    assert graph["int8"] is True and graph["float_ops_inside"] == [], graph
    assert graph["xnnpack"]["partitions"] == 1, graph["xnnpack"]  # resize, concat, reshape and softmax included
    if layout == SSD:
        assert np.array_equal(np.load(out / "anchors.npy"), np.load(saved(layout, "pt2").parent / "anchors.npy"))


@pytest.mark.parametrize("layout", HEAD_LAYOUTS)
def test_layout_traced_with_torchscript_converts(layout: str, saved, eval_dir: Path,  # type: ignore[no-untyped-def]
                                                 tmp_path: Path) -> None:
    """``torch.jit.trace`` of the same model: fp32 to every target, parity at the default limits."""
    out = tmp_path / "out"
    result = convert(saved(layout, "torchscript"), out, eval_dir)
    assert result.exit_code == 0, result.output
    artifacts = artifacts_of(out)
    assert set(artifacts) == {(t, "fp32") for t in ALL_TARGETS.split(",")}, artifacts
    for artifact in artifacts.values():
        check_fp32(artifact, layout)
