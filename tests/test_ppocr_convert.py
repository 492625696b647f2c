"""PaddleOCR's trained PP-OCRv3 text detector through ``mdeploy.pipeline.convert`` as a user would run it (issue 15).

The detector (weights from RapidOCR's pinned wheel) is saved as TorchScript (``torch.jit.trace`` at 160x160, the
demo uses an ExportedProgram) and converted to fp32 + int8 ONNX, TFLite and Core ML with PaddleOCR's preprocessing
(BGR, /255, ImageNet mean/std, no resize), calibrated on 16 renders of words (calibration photos) and checked on 8
held-out renders (another seed, the evaluation photos). Small on purpose: the whole run takes about 40 s on 2 cores.

fp32 must pass mdeploy's default limits on every target. int8 is judged as issue 15 asks, by the map thresholded at
0.3 (DB's binarisation): >= 97% of its pixels agree with fp32 PyTorch (measured: 99.5% at 256 px). The default int8
SNR limit (15 dB) is reported, not asserted here: the near-binary map's edge pixels that cross 0.3 err by up to 1.0
(11.8-12.5 dB at 160 px; bench/RESULTS.md, PP-OCRv3).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mdeploy.calibration.preprocess import ChannelOrder, Preprocess
from mdeploy.converters import REGISTRY
from mdeploy.demo_assets import DemoAssets
from mdeploy.parity import run_batches_outputs
from mdeploy.pipeline import ConvertResult, convert
from mdeploy.records import ConvertOptions, DataOptions, ModelSource
from mdeploy.types import Precision, Target
from mdeploy.zoo.ppocr_det import DET_MEAN, DET_STD, DET_THRESH, det_input
from mdeploy.zoo.ppocr_weights import load_ppocr_det, ppocr_det_onnx
from mdeploy.zoo.text_images import render_text_images

pytest.importorskip("onnxruntime")
pytest.importorskip("ai_edge_litert")
pytest.importorskip("coremltools")

SIZE = 160  # a multiple of 32, as the detector needs
CALIB, EVAL = 16, 8
MIN_MAP_AGREEMENT = 0.97
TARGETS = (Target.onnx, Target.tflite, Target.coreml)

torch.set_num_threads(1)  # as tests/test_ppocr_det.py: two threads on a busy 2-core machine calibrate 5x slower


@pytest.fixture(scope="module")
def converted(demo_assets: DemoAssets, tmp_path_factory: pytest.TempPathFactory) -> ConvertResult:
    work = tmp_path_factory.mktemp("ppocr")
    for name, count, seed, photos in (("calib", CALIB, 0, demo_assets.photos_calib),
                                      ("eval", EVAL, 1, demo_assets.photos_eval)):
        (work / name).mkdir()
        renders = render_text_images(count, (SIZE, SIZE), seed=seed,
                                     photos=[demo_assets.photos_dir / p for p in photos])
        for index, item in enumerate(renders):
            item.image.save(work / name / f"{index:03d}.png")
    model = load_ppocr_det(ppocr_det_onnx(demo_assets.photos_dir.parent)).eval()
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(model, torch.zeros(1, 3, SIZE, SIZE)), work / "ppocr_det.pt")
    options = ConvertOptions(
        model=ModelSource(work / "ppocr_det.pt"), out=work / "out", targets=TARGETS, int8=True,
        data=DataOptions(calib=work / "calib", eval=work / "eval", calib_size=CALIB, eval_size=EVAL),
        preprocess=Preprocess(resize=None, crop=SIZE, mean=DET_MEAN, std=DET_STD, channel_order=ChannelOrder.BGR),
        latency_runs=0)
    return convert(options)


def test_every_target_converts_and_fp32_passes_the_default_limits(converted: ConvertResult) -> None:
    assert converted.failures == []
    assert {(a.target, a.precision) for a in converted.artifacts} == {(t, p) for t in TARGETS for p in Precision}
    assert converted.model.format.value == "torchscript"
    for artifact in converted.artifacts:
        assert (converted.out / artifact.path).exists()
        assert np.isfinite(artifact.parity.metrics.snr_db)
        if artifact.precision is Precision.fp32:
            assert artifact.parity.passed, (artifact.path, artifact.parity.failures)
    assert (converted.out / "manifest.json").is_file()


def test_preprocessing_is_paddleocrs(converted: ConvertResult, demo_assets: DemoAssets) -> None:
    """The evaluation inputs convert built from the PNGs are det_input's (PaddleOCR's contract) of the renders."""
    renders = render_text_images(EVAL, (SIZE, SIZE), seed=1,
                                 photos=[demo_assets.photos_dir / p for p in demo_assets.photos_eval])
    evaluation = converted.evaluation
    assert evaluation.inputs.shape == (EVAL, 3, SIZE, SIZE)
    for sample, path in zip(evaluation.inputs, evaluation.paths):
        expected = det_input(renders[int(Path(path).stem)].image)[0]
        np.testing.assert_allclose(sample, expected, atol=1e-5)


def test_int8_thresholded_map_agrees_with_fp32_pytorch(converted: ConvertResult) -> None:
    reference = converted.evaluation.references[0]
    assert reference.shape == (EVAL, 1, SIZE, SIZE)
    assert 0.005 < float(np.mean(reference > DET_THRESH)) < 0.5  # the renders have text, and not only text
    int8 = [a for a in converted.artifacts if a.precision is Precision.int8]
    assert len(int8) == len(TARGETS)
    for artifact in int8:
        run = REGISTRY[artifact.target].outputs_runner(converted.out / artifact.path)
        (maps,) = run_batches_outputs(lambda batch: tuple(run(batch).values()), converted.evaluation.inputs)
        agreement = float(np.mean((maps > DET_THRESH) == (reference > DET_THRESH)))
        print(f"{artifact.path}: SNR {artifact.parity.metrics.snr_db:.1f} dB, map > {DET_THRESH} agreement "
              f"{agreement:.2%}")
        assert agreement >= MIN_MAP_AGREEMENT, artifact.path


def test_int8_tflite_runs_in_one_xnnpack_partition(converted: ConvertResult) -> None:
    """Paddle's hard-sigmoid, clamp(0.2 x + 0.5, 0, 1), is an int8 ADD with RELU (XNNPACK takes it), not
    MAXIMUM/MINIMUM (which it leaves to the builtin kernels, splitting the graph into 3 partitions)."""
    (artifact,) = [a for a in converted.artifacts if a.target is Target.tflite and a.precision is Precision.int8]
    graph = REGISTRY[Target.tflite].inspect(converted.out / artifact.path)["graph"]
    assert graph["int8"] and graph["float_ops_inside"] == [], graph
    assert graph["xnnpack"]["partitions"] == 1 and graph["xnnpack"]["ops_outside"] == [], graph["xnnpack"]
