"""``./run demo --ocr`` (mdeploy.demo_ocr) at a small size through the demo's own command line, and its pieces.

The full demo (256 px, 48 + 24 renders, ONNX, TFLite and Core ML) takes about 1.5 minutes on 2 cores; here 128 px,
16 + 8 renders and ONNX only keep it near 20 s. tests/test_ppocr_convert.py covers every target."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mdeploy import demo, demo_ocr
from mdeploy.demo_assets import DemoAssets
from mdeploy.zoo.text_images import TextImage

pytest.importorskip("onnxruntime")


def test_ocr_demo_end_to_end(demo_assets: DemoAssets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MDEPLOY_CACHE", str(demo_assets.photos_dir.parent))  # the assets the fixture prepared
    out = tmp_path / "demo-ocr"
    result = CliRunner().invoke(demo.app, ["--ocr", "--size", "128", "--calib-count", "16", "--eval-count", "8",
                                           "--targets", "onnx", "--out", str(out)])
    print(result.output)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # tables wrap: compare without line breaks
    for expected in ("ppocr_det: parity vs PyTorch fp32", "word drawn", "PyTorch fp32", "onnx int8", "box recall",
                     "gate applied (exit code)", "agrees with fp32 PyTorch on >= 97%", "passed", "verify_bundle.py"):
        assert expected in text, expected
    manifest = json.loads((out / "manifest.json").read_text())
    assert {a["file"] for a in manifest["artifacts"]} == {"ppocr_det.fp32.onnx", "ppocr_det.int8.onnx"}
    assert manifest["preprocess"]["channel_order"] == "BGR" and manifest["preprocess"]["resize"] is None
    assert manifest["model"]["format"] == "exported_program"


def test_default_demo_options_are_unchanged() -> None:
    runner = CliRunner()
    result = runner.invoke(demo.app, ["--size", "128"])
    assert result.exit_code == 2
    assert "only to the text detector" in " ".join(result.output.split())
    assert "--ocr" in runner.invoke(demo.app, ["--help"]).output


def test_size_must_be_a_multiple_of_32(demo_assets: DemoAssets, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MDEPLOY_CACHE", str(demo_assets.photos_dir.parent))
    result = CliRunner().invoke(demo.app, ["--ocr", "--size", "100", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert not (tmp_path / "o").exists()


def test_map_agreement() -> None:
    reference = np.array([[0.1, 0.5], [0.31, 0.0]], dtype=np.float32)
    assert demo_ocr.map_agreement(reference, reference) == 1.0
    assert demo_ocr.map_agreement(np.array([[0.29, 0.5], [0.9, 0.31]], dtype=np.float32), reference) == 0.75


def test_examples_mix_plain_and_photo_backgrounds() -> None:
    from PIL import Image

    def item(background: str, boxes: int = 1) -> TextImage:
        return TextImage(Image.new("RGB", (32, 32)), ((0, 0, 4, 4),) * boxes, ("w",) * boxes, background)

    truth = [item("plain"), item("plain"), item("plain"), item("a.jpg", 0), item("b.jpg"), item("c.jpg")]
    assert demo_ocr.pick_examples(truth, 4) == [0, 1, 4, 5]
    assert demo_ocr.pick_examples(truth[:3], 4) == [0, 1, 2]  # no photo: plain ones fill in
    assert demo_ocr.pick_examples(truth[3:], 4) == [1, 2]  # renders without words are never shown
