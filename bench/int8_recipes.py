"""int8 recipes side by side on the real ImageNet MobileNetV2: stock ONNX Runtime quantisation vs mdeploy's.

    ./run bench            (or .venv/bin/python bench/int8_recipes.py [--calib 200] [--eval 320])

Same data for every row: calibration crops and held-out evaluation crops of other photos (mdeploy.demo_assets).
Every row is an int8 ONNX model run on ONNX Runtime and compared with fp32 PyTorch (top-1 agreement, logit SNR).
Stock rows use onnxruntime.quantization.quantize_static on a torch.onnx.export'ed fp32 model; mdeploy rows use
mdeploy's quantiser and QDQ writer.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from families import with_uint8_codes  # noqa: E402
from mdeploy.calibration.config import QuantRecipe, WeightRounding  # noqa: E402
from mdeploy.calibration.dataset import SampleSet  # noqa: E402
from mdeploy.calibration.preprocess import Preprocess  # noqa: E402
from mdeploy.converters.base import ArtifactInfo  # noqa: E402
from mdeploy.converters.onnx import OnnxConverter  # noqa: E402
from mdeploy.demo_assets import default_cache_dir, prepare_demo_assets  # noqa: E402
from mdeploy.graph.from_torch import graph_from_torch  # noqa: E402
from mdeploy.loading import load_model  # noqa: E402
from mdeploy.metrics import compare  # noqa: E402
from mdeploy.parity import run_batches, torch_runner  # noqa: E402
from mdeploy.quantize.ptq import quantize  # noqa: E402
from mdeploy.quantize.simulate import Simulator  # noqa: E402
from mdeploy.zoo import Arch  # noqa: E402


def stock_rows(model: torch.nn.Module, calib: np.ndarray, work: Path) -> list[tuple[str, object, float]]:
    from onnxruntime.quantization import CalibrationMethod, CalibrationDataReader, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static

    fp32 = work / "stock.fp32.onnx"
    torch.onnx.export(model, (torch.zeros(1, *calib.shape[1:]),), str(fp32), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "n"}})

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(calib[i:i + 1] for i in range(len(calib)))

        def get_next(self):  # type: ignore[no-untyped-def]
            item = next(self.items, None)
            return None if item is None else {"input": item}

    recipes = [
        ("ORT quantize_static defaults (per-tensor, MinMax, uint8 act.)",
         dict(per_channel=False, calibrate_method=CalibrationMethod.MinMax, activation_type=QuantType.QUInt8)),
        ("ORT per-channel, MinMax, int8",
         dict(per_channel=True, calibrate_method=CalibrationMethod.MinMax, activation_type=QuantType.QInt8)),
        ("ORT per-channel, Percentile 99.999, int8",
         dict(per_channel=True, calibrate_method=CalibrationMethod.Percentile, activation_type=QuantType.QInt8,
              extra_options={"CalibPercentile": 99.999})),
        ("ORT per-channel, Entropy, int8",
         dict(per_channel=True, calibrate_method=CalibrationMethod.Entropy, activation_type=QuantType.QInt8)),
    ]
    rows = []
    for i, (name, kwargs) in enumerate(recipes):
        path = work / f"stock{i}.int8.onnx"
        start = time.perf_counter()
        quantize_static(str(fp32), str(path), Reader(), quant_format=QuantFormat.QDQ, weight_type=QuantType.QInt8,
                        **kwargs)
        with_uint8_codes(path)  # as mdeploy stores its own: ONNX Runtime on x86 without VNNI saturates int8 codes
        rows.append((name, OnnxConverter().runner(path), time.perf_counter() - start))
    return rows


def mdeploy_rows(model: torch.nn.Module, calib: np.ndarray, work: Path) -> list[tuple[str, object, float, object]]:
    """Each recipe: its ONNX artifact on ONNX Runtime, and mdeploy's fake-quant simulation of the same parameters
    (the two agree to a few LSB; the simulation is what the quantiser optimises)."""
    graph = graph_from_torch(model, (1, *calib.shape[1:]))
    default = QuantRecipe.default()
    recipes = [
        ("mdeploy stock_minmax (nearest rounding, MinMax, float inputs)", QuantRecipe.stock_minmax()),
        ("mdeploy stock_percentile (nearest rounding, 99.999th pct)", QuantRecipe.stock_percentile()),
        ("mdeploy default, no equalisation", replace(default, name="no_equalize", equalize=False)),
        ("mdeploy default, nearest rounding", replace(default, name="nearest", weight_rounding=WeightRounding.nearest)),
        ("mdeploy default, float-input calibration", replace(default, name="float_inputs", sequential=False)),
        ("mdeploy default, no bias correction", replace(default, name="no_bias_corr", bias_correction=False)),
        ("mdeploy default (equalisation, MSE ranges, sequential GPTQ, bias corr.)", default),
    ]
    rows = []
    for i, (name, recipe) in enumerate(recipes):
        start = time.perf_counter()
        quantized = quantize(graph, calib, recipe)
        seconds = time.perf_counter() - start
        path = work / f"mdeploy{i}.int8.onnx"
        OnnxConverter().export(quantized.graph, quantized, path, ArtifactInfo("bench", {}, ()))
        rows.append((name, OnnxConverter().runner(path), seconds, Simulator(quantized)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=200)
    parser.add_argument("--eval", type=int, default=320)
    args = parser.parse_args()
    torch.set_num_threads(2)
    assets = prepare_demo_assets(default_cache_dir())
    preprocess = Preprocess.imagenet(224)
    calib = SampleSet.from_folder(assets.calib_dir, preprocess, limit=args.calib).to_array()
    evaluation = SampleSet.from_folder(assets.eval_dir, preprocess, limit=args.eval).to_array()
    model = load_model(assets.weights, arch=Arch.mobilenet_v2).module
    reference = run_batches(torch_runner(model), evaluation)
    print(f"real ImageNet MobileNetV2, {len(calib)} calibration crops, {len(evaluation)} held-out crops, "
          "int8 ONNX on ONNX Runtime vs fp32 PyTorch\n")
    print("| recipe | top-1 agreement | logit SNR dB | top-5 | simulation: top-1 / SNR dB | seconds to quantise |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        stock = [(*row, None) for row in stock_rows(model, calib, Path(tmp))]
        for name, run, seconds, sim in stock + mdeploy_rows(model, calib, Path(tmp)):
            m = compare(reference, run_batches(run, evaluation))  # type: ignore[arg-type]
            simulated = "–"
            if sim is not None:
                ms = compare(reference, sim(evaluation))
                simulated = f"{ms.top1_agreement:.1%} / {ms.snr_db:.1f}"
            print(f"| {name} | {m.top1_agreement:.1%} | {m.snr_db:.1f} | {m.top5_agreement:.1%} | {simulated} "
                  f"| {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
