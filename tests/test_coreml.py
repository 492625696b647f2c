"""Core ML target: the MIL reference executor against coremltools' own op semantics, W8A8 programs that really
hold int8, parity with PyTorch, image-input classifiers, and pins on the coremltools internals we rely on."""

from __future__ import annotations

import inspect as pyinspect
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("coremltools")

from mdeploy.converters.base import ArtifactInfo  # noqa: E402
from mdeploy.converters.coreml import CoremlConverter  # noqa: E402
from mdeploy.converters.coreml_mil_reference import (  # noqa: E402
    MIL_OPS, RUNTIME_NAME, MilExecutor, UnsupportedMilOpError, load_program,
)
from mdeploy.converters.coreml_program import ImageNormalization, import_coremltools  # noqa: E402
from mdeploy.errors import BadInputError  # noqa: E402
from mdeploy.graph.from_torch import graph_from_torch  # noqa: E402
from mdeploy.parity import torch_runner  # noqa: E402
from mdeploy.quantize.simulate import simulate  # noqa: E402
from mdeploy.zoo import Arch, ModelConfig, build_model  # noqa: E402
from tests.test_converters import nearest_int8  # noqa: E402
from tests.test_graph import randomize_batch_norm  # noqa: E402

ct = import_coremltools()
from coremltools.converters.mil import Builder as mb  # noqa: E402

IMAGENET = {"resize": 256, "crop": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
            "scale": 1 / 255, "channel_order": "RGB", "layout": "NCHW"}
INFO = ArtifactInfo("model", IMAGENET, tuple(f"class{i}" for i in range(10)), "test")


def snr_db(reference: np.ndarray, output: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(reference.astype(np.float64) ** 2)
                               / max(np.sum((output.astype(np.float64) - reference) ** 2), 1e-30)))


# -- every op of the executor against coremltools' definition of it --------------------------------------------
def _rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _arr(*shape: int, dtype: Any = np.float32, scale: float = 3.0) -> np.ndarray:
    return (_rng().standard_normal(shape) * scale).astype(dtype)


def _int8(*shape: int) -> np.ndarray:
    return _rng().integers(-128, 128, shape).astype(np.int8)


def _positive(n: int, dtype: Any) -> np.ndarray:
    return (0.01 + _rng().random(n) * 0.05).astype(dtype)


# op -> (dtype -> keyword inputs). Values from coremltools' value inference when it has one (computed as the op is
# built from constant inputs), else from the reference named in REFERENCES.
CASES: dict[str, Callable[[Any], dict[str, Any]]] = {
    "relu": lambda dt: {"x": _arr(2, 3, 5, dtype=dt)},
    "clip": lambda dt: {"x": _arr(2, 3, 5, dtype=dt, scale=5), "alpha": dt(0.0), "beta": dt(6.0)},
    "thresholded_relu": lambda dt: {"x": _arr(2, 3, 5, dtype=dt), "alpha": dt(-3.0)},
    "sigmoid_hard": lambda dt: {"x": _arr(2, 3, 5, dtype=dt), "alpha": dt(1 / 6), "beta": dt(0.5)},
    "sigmoid": lambda dt: {"x": _arr(2, 3, 5, dtype=dt, scale=8)},
    "silu": lambda dt: {"x": _arr(2, 3, 5, dtype=dt, scale=4)},
    "gelu": lambda dt: {"x": _arr(2, 3, 5, dtype=dt, scale=2), "mode": "EXACT"},
    "concat": lambda dt: {"values": (_arr(1, 2, 4, 4, dtype=dt), _arr(1, 3, 4, 4, dtype=dt)), "axis": 1},
    "slice_by_index": lambda dt: {"x": _arr(1, 6, 4, 4, dtype=dt), "begin": np.array([0, 1, 0, 0], np.int32),
                                  "end": np.array([1, 4, 4, 4], np.int32)},
    "transpose": lambda dt: {"x": _arr(1, 2, 3, 4, dtype=dt), "perm": np.array([0, 2, 1, 3], np.int32)},
    "max_pool": lambda dt: {"x": _arr(1, 3, 6, 6, dtype=dt), "kernel_sizes": [3, 3], "strides": [2, 2],
                            "pad_type": "valid"},
    "avg_pool": lambda dt: {"x": _arr(1, 3, 6, 6, dtype=dt), "kernel_sizes": [3, 3], "strides": [2, 2],
                            "pad_type": "valid", "exclude_padding_from_average": True},
    "leaky_relu": lambda dt: {"x": _arr(2, 3, 5, dtype=dt), "alpha": dt(0.1)},
    "prelu": lambda dt: {"x": _arr(1, 3, 4, 4, dtype=dt), "alpha": _positive(3, dt)},
    "softmax": lambda dt: {"x": _arr(2, 7, dtype=dt), "axis": -1},
    "add": lambda dt: {"x": _arr(1, 3, 4, 4, dtype=dt), "y": _arr(1, 3, 1, 1, dtype=dt)},
    "sub": lambda dt: {"x": _arr(1, 3, 4, 4, dtype=dt), "y": _arr(1, 3, 1, 1, dtype=dt)},
    "mul": lambda dt: {"x": _arr(1, 3, 4, 4, dtype=dt), "y": _arr(1, 3, 1, 1, dtype=dt)},
    "real_div": lambda dt: {"x": _arr(1, 3, 4, 4, dtype=dt), "y": (2 + np.abs(_arr(1, 3, 1, 1))).astype(dt)},
    "reduce_mean": lambda dt: {"x": _arr(1, 4, 5, 6, dtype=dt), "axes": [2, 3], "keep_dims": True},
    "reshape": lambda dt: {"x": _arr(1, 4, 2, 3, dtype=dt), "shape": np.array([-1, 24], np.int32)},
    "pad": lambda dt: {"x": _arr(1, 2, 4, 5, dtype=dt), "pad": np.array([0, 0, 0, 0, 1, 2, 0, 1], np.int32),
                       "mode": "constant", "constant_val": dt(0.0)},
    "linear": lambda dt: {"x": _arr(2, 8, dtype=dt), "weight": _arr(5, 8, dtype=dt), "bias": _arr(5, dtype=dt)},
    "matmul": lambda dt: {"x": _arr(1, 2, 5, 4, dtype=dt), "y": _arr(1, 1, 4, 3, dtype=dt)},  # heads broadcast
    "cast": lambda dt: {"x": _arr(2, 3, dtype=np.float32 if dt == np.float16 else np.float16),
                        "dtype": "fp16" if dt == np.float16 else "fp32"},
    "quantize": lambda dt: {"input": _arr(1, 3, 4, 4, dtype=dt, scale=1.5), "scale": dt(0.0123),
                            "zero_point": np.int8(-5), "output_dtype": "int8"},
    "dequantize": lambda dt: {"input": _int8(1, 3, 4, 4), "scale": dt(0.0123), "zero_point": np.int8(-5)},
    "constexpr_affine_dequantize": lambda dt: {"quantized_data": _int8(4, 3, 3, 3), "zero_point": np.int8(0),
                                               "scale": _positive(4, dt), "axis": 0},
    "constexpr_blockwise_shift_scale": lambda dt: {"data": _int8(4, 6), "scale": _positive(8, dt).reshape(4, 2),
                                                   "offset": np.full((4, 2), 3, np.int8)},
    "conv": lambda dt: {"x": _arr(1, 4, 9, 9, dtype=dt), "weight": _arr(6, 2, 3, 3, dtype=dt, scale=0.3),
                        "bias": _arr(6, dtype=dt), "strides": [2, 1], "pad_type": "custom",
                        "pad": [0, 1, 1, 2], "dilations": [1, 2], "groups": 2},
    "classify": lambda dt: {"probabilities": _arr(7, dtype=np.float32), "classes": [f"c{i}" for i in range(7)]},
    "conv_transpose": lambda dt: {"x": _arr(1, 4, 5, 6, dtype=dt), "weight": _arr(4, 3, 3, 3, dtype=dt, scale=0.3),
                                  "bias": _arr(6, dtype=dt), "strides": [2, 2], "pad_type": "custom",
                                  "pad": [1, 0, 1, 1], "dilations": [1, 2], "groups": 2},
    "resize_bilinear": lambda dt: {"x": _arr(1, 2, 5, 7, dtype=dt), "target_size_height": 9, "target_size_width": 4,
                                   "sampling_mode": "UNALIGN_CORNERS"},
    "upsample_nearest_neighbor": lambda dt: {"x": _arr(1, 2, 3, 4, dtype=dt), "scale_factor_height": np.int32(2),
                                             "scale_factor_width": np.int32(3)},
    "gather": lambda dt: {"x": _arr(1, 2, 5, 4, dtype=dt), "indices": np.array([0, 0, 2, 4, 1], np.int32), "axis": 2},
}
MORE_CASES = {  # further variants of ops with several modes
    "gelu": [lambda dt: {"x": _arr(2, 3, 5, dtype=dt, scale=2), "mode": "TANH_APPROXIMATION"}],
    "quantize": [lambda dt: {"input": _arr(1, 3, 4, 4, dtype=dt, scale=1.5), "scale": _positive(3, dt),
                             "zero_point": np.array([-3, 0, 4], np.int8), "axis": 1, "output_dtype": "int8"},
                 lambda dt: {"input": np.abs(_arr(1, 3, 4, 4, dtype=dt)), "scale": dt(0.02),
                             "zero_point": np.uint8(0), "output_dtype": "uint8"}],
    "dequantize": [lambda dt: {"input": _int8(1, 3, 4, 4), "scale": _positive(3, dt),
                               "zero_point": np.array([-3, 0, 4], np.int8), "axis": 1}],
    "reshape": [lambda dt: {"x": _arr(1, 4, 2, 3, dtype=dt), "shape": np.array([0, 2, 4, 0], np.int32)}],
    "resize_bilinear": [lambda dt: {"x": _arr(1, 2, 5, 7, dtype=dt), "target_size_height": 9, "target_size_width": 1,
                                    "sampling_mode": "STRICT_ALIGN_CORNERS"},
                        lambda dt: {"x": _arr(1, 2, 1, 1, dtype=dt), "target_size_height": 4, "target_size_width": 6,
                                    "sampling_mode": "UNALIGN_CORNERS"}],  # a 1x1 map broadcast (DeepLab's pooling)
    "conv_transpose": [lambda dt: {"x": _arr(1, 3, 4, 4, dtype=dt), "weight": _arr(3, 2, 2, 2, dtype=dt),
                                   "strides": [2, 2], "pad_type": "valid"}],
    "matmul": [lambda dt: {"x": _arr(1, 4, 5, dtype=dt), "y": _arr(1, 3, 4, dtype=dt), "transpose_x": True,
                           "transpose_y": True}],
    "conv": [lambda dt: {"x": _arr(1, 6, 8, 8, dtype=dt), "weight": _arr(6, 1, 3, 3, dtype=dt),
                         "bias": _arr(6, dtype=dt), "strides": [2, 2], "pad_type": "custom", "pad": [1, 1, 1, 1],
                         "groups": 6},
             lambda dt: {"x": _arr(1, 5, 7, 7, dtype=dt), "weight": _arr(4, 5, 1, 1, dtype=dt), "pad_type": "valid"},
             lambda dt: {"x": _arr(1, 3, 9, 8, dtype=dt), "weight": _arr(4, 3, 3, 3, dtype=dt), "strides": [2, 2],
                         "pad_type": "same"}],
}


def _torch_conv(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None, strides: Any = (1, 1),
                pad_type: str = "valid", pad: Any = (0, 0, 0, 0), dilations: Any = (1, 1),
                groups: int = 1) -> np.ndarray:
    """MIL conv is PyTorch's cross-correlation; ``same`` pads like TensorFlow (the extra pixel after)."""
    t = torch.from_numpy(x.astype(np.float32))
    if pad_type == "same":
        total = [max((-(-s // st) - 1) * st + k - s, 0) for s, k, st in zip(x.shape[2:], weight.shape[2:], strides)]
        pad = (total[0] // 2, total[0] - total[0] // 2, total[1] // 2, total[1] - total[1] // 2)
    elif pad_type == "valid":
        pad = (0, 0, 0, 0)
    t = torch.nn.functional.pad(t, (pad[2], pad[3], pad[0], pad[1]))
    b = None if bias is None else torch.from_numpy(bias.astype(np.float32))
    y = torch.nn.functional.conv2d(t, torch.from_numpy(weight.astype(np.float32)), b, tuple(strides),
                                   0, tuple(dilations), groups)
    return y.numpy()


def _torch_conv_transpose(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None, strides: Any = (1, 1),
                          pad_type: str = "valid", pad: Any = (0, 0, 0, 0), dilations: Any = (1, 1),
                          groups: int = 1) -> np.ndarray:
    """MIL conv_transpose is PyTorch's (weight (C_in, C_out / groups, kh, kw)) with the custom pads cropped."""
    b = None if bias is None else torch.from_numpy(bias.astype(np.float32))
    y = torch.nn.functional.conv_transpose2d(torch.from_numpy(x.astype(np.float32)),
                                             torch.from_numpy(weight.astype(np.float32)), b, tuple(strides), 0, 0,
                                             groups, tuple(dilations)).numpy()
    top, bottom, left, right = pad if pad_type == "custom" else (0, 0, 0, 0)
    return y[:, :, top:y.shape[2] - bottom, left:y.shape[3] - right]


def _torch_resize_bilinear(x: np.ndarray, target_size_height: int, target_size_width: int,
                           sampling_mode: str) -> np.ndarray:
    """UNALIGN_CORNERS is PyTorch's align_corners=False, STRICT_ALIGN_CORNERS its align_corners=True."""
    return torch.nn.functional.interpolate(torch.from_numpy(x.astype(np.float32)),
                                           size=(target_size_height, target_size_width), mode="bilinear",
                                           align_corners=sampling_mode == "STRICT_ALIGN_CORNERS").numpy()


REFERENCES: dict[str, Callable[..., Any]] = {  # ops whose coremltools definition has no build-time value
    "dequantize": lambda op, kw: op.materialized_val_inference(),
    "constexpr_affine_dequantize": lambda op, kw: op.materialized_val_inference(),
    "constexpr_blockwise_shift_scale": lambda op, kw: op.materialized_val_inference(),
    "conv": lambda op, kw: _torch_conv(**kw),  # MIL defines conv as PyTorch's cross-correlation
    "classify": lambda op, kw: kw["probabilities"],
    "conv_transpose": lambda op, kw: _torch_conv_transpose(**kw),
    "resize_bilinear": lambda op, kw: _torch_resize_bilinear(**kw),
    "upsample_nearest_neighbor": lambda op, kw: torch.nn.functional.interpolate(  # whole factors: repetition
        torch.from_numpy(kw["x"].astype(np.float32)), scale_factor=(int(kw["scale_factor_height"]),
                                                                    int(kw["scale_factor_width"]))).numpy()
    .astype(kw["x"].dtype),
    "silu": lambda op, kw: kw["x"] * (1 / (1 + np.exp(-kw["x"]))),  # MIL's definition: x * sigmoid(x)
    # coremltools infers no value for pools: PyTorch's, on the case's valid 3x3 stride-2 windows
    "max_pool": lambda op, kw: torch.nn.functional.max_pool2d(torch.from_numpy(kw["x"].astype(np.float32)), 3, 2)
    .numpy().astype(kw["x"].dtype),
    "avg_pool": lambda op, kw: torch.nn.functional.avg_pool2d(torch.from_numpy(kw["x"].astype(np.float32)), 3, 2)
    .numpy().astype(kw["x"].dtype),
}
# fp32 accumulation (interpolation), one rounding: compared to fp32 math
ACCUMULATING = {"conv", "conv_transpose", "linear", "matmul", "reduce_mean", "resize_bilinear"}


def _op_cases() -> list[Any]:
    cases = []
    for name in sorted(MIL_OPS):
        for dtype in (np.float32, np.float16):
            variants = [CASES[name], *MORE_CASES.get(name, [])] if name in CASES else [None]
            for i, make in enumerate(variants):
                cases.append(pytest.param(name, dtype, make, id=f"{name}-{np.dtype(dtype).name}-{i}"))
    return cases


def _build(name: str, kwargs: dict[str, Any]) -> tuple[Any, tuple[Any, ...], Any]:
    """(program, output vars, coremltools' value of the first output) of one op built from constant inputs."""
    built: dict[str, Any] = {}
    opset = ct.target.iOS18 if name == "constexpr_blockwise_shift_scale" else ct.target.iOS17

    @mb.program(input_specs=[mb.TensorSpec(shape=(1,))], opset_version=opset)
    def program(x: Any) -> Any:
        inputs = {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
        if name == "classify":  # as coremltools' backend writes a classifier
            from coremltools.converters.mil.mil import mil_list

            inputs["classes"] = mb.const(val=mil_list(inputs["classes"]))
        out = getattr(mb, name)(**inputs)  # thresholded_relu's value inference writes into its input: copies
        built["vars"] = tuple(out) if isinstance(out, (list, tuple)) else (out,)
        return x

    outputs = built["vars"]
    reference = REFERENCES[name](outputs[0].op, kwargs) if name in REFERENCES else outputs[0].val
    assert reference is not None, f"coremltools computed no value for {name}"
    return program, outputs, np.asarray(reference)


@pytest.mark.parametrize(("name", "dtype", "make"), _op_cases())
def test_mil_op_matches_coremltools(name: str, dtype: Any, make: Callable[[Any], dict[str, Any]] | None) -> None:
    assert make is not None, f"MIL op {name!r} has no test case: add one to CASES"
    kwargs = make(dtype)
    program, outputs, reference = _build(name, kwargs)
    executor = MilExecutor.from_program(program)
    names = [v.name for v in outputs]
    values = executor.run({"x": np.zeros(1, np.float32)}, keep=set(names))
    if name == "classify":  # (top label, the scores as an array where Core ML gives a dictionary)
        assert values[names[0]] == kwargs["classes"][int(np.argmax(kwargs["probabilities"]))]
        np.testing.assert_array_equal(values[names[1]], reference)
        return
    ours = values[names[0]]
    if name in ACCUMULATING and dtype == np.float16:
        # coremltools' NumPy value accumulates in fp16; ours (like the hardware) in fp32, rounded once: compare
        # with coremltools' value on the fp32 inputs, rounded to fp16
        fp32 = {k: v.astype(np.float32) if isinstance(v, np.ndarray) and v.dtype == np.float16 else v
                for k, v in kwargs.items()}
        exact = _build(name, fp32)[2].astype(np.float16).astype(np.float32)
        assert ours.dtype == np.float16
        np.testing.assert_allclose(ours.astype(np.float32), exact, rtol=2 ** -10, atol=1e-6)
    elif name in ACCUMULATING:
        assert ours.dtype == reference.dtype
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)
    else:
        assert ours.dtype == reference.dtype
        np.testing.assert_array_equal(ours, reference)  # bit for bit, in the declared dtype


def test_unknown_op_stops_with_a_clear_error() -> None:
    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4))], opset_version=ct.target.iOS17)
    def program(x: Any) -> Any:
        return mb.tanh(x=mb.relu(x=x), name="squashed")

    executor = MilExecutor.from_program(program)
    with pytest.raises(UnsupportedMilOpError, match="'tanh'.*squashed.*not implemented by the MIL reference"):
        executor.run({"x": np.ones((1, 4), np.float32)})


# -- pins on coremltools internals -----------------------------------------------------------------------------
def test_pinned_coremltools_internals(tmp_path: Path) -> None:
    """The executor loads programs through coremltools' private MIL proto loader; fail loudly if it moves."""
    from coremltools.converters.mil.frontend.milproto import load as milproto

    assert list(pyinspect.signature(milproto.load).parameters)[:3] == [
        "model_spec", "specification_version", "file_weights_dir"]
    graph = graph_from_torch(build_model(ModelConfig(Arch.mobilenet_v2, 0.35, 10, 0.2)), (1, 3, 32, 32))
    path = tmp_path / "m.int8.mlpackage"
    CoremlConverter().export(graph, nearest_int8(graph, _arr(2, 3, 32, 32)), path, INFO)
    model = ct.models.MLModel(str(path), skip_model_load=True)
    assert Path(model.weights_dir).is_dir()
    spec, program = load_program(path)
    weights = [op for op in program.functions["main"].operations if op.op_type == "constexpr_affine_dequantize"]
    assert weights and weights[0].inputs["quantized_data"].val.dtype == np.int8  # weights read from weight.bin


def test_coremltools_imports_without_tensorflow_and_leaves_it_importable() -> None:
    code = ("import sys, importlib.util\n"
            "from mdeploy.converters.coreml_program import import_coremltools\n"
            "ct = import_coremltools()\n"
            "assert 'tensorflow' not in sys.modules and ct.__version__\n"
            "assert sys.modules.get('tensorflow', 0) is not None\n"
            "importlib.util.find_spec('tensorflow')  # raises if the import block leaked\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


# -- whole models -----------------------------------------------------------------------------------------------
def _model(arch: Arch, width: float, classes: int, size: int) -> tuple[torch.nn.Module, Any]:
    torch.manual_seed(0)
    model = randomize_batch_norm(build_model(ModelConfig(arch, width, classes, 0.2)))
    return model, graph_from_torch(model, (1, 3, size, size))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("arch", list(Arch))
def test_executor_reproduces_pytorch(arch: Arch, precision: str, tmp_path: Path) -> None:
    model, graph = _model(arch, 1.0, 1000, 224)
    converter = CoremlConverter(compute_precision=precision)
    path = tmp_path / f"model.{precision}.mlpackage"
    converter.export(graph, None, path, ArtifactInfo("model", IMAGENET))
    report = converter.inspect(path)
    assert report["compute_precision"] == precision
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    out, reference = converter.runner(path)(x), torch_runner(model)(x)
    assert snr_db(reference, out) >= 40.0
    if precision == "fp32":
        assert np.abs(out - reference).max() <= 1e-4


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_w8a8_program_holds_our_int8_parameters(precision: str, tmp_path: Path) -> None:
    model, graph = _model(Arch.mobilenet_v3_small, 0.5, 10, 96)
    x = np.random.default_rng(1).standard_normal((8, 3, 96, 96)).astype(np.float32)
    quantized = nearest_int8(graph, x)
    converter = CoremlConverter(compute_precision=precision)
    path = tmp_path / "model.int8.mlpackage"
    converter.export(graph, quantized, path, INFO)
    report = converter.inspect(path)
    assert report["int8_weight_tensors"] == len(graph.weighted_nodes)
    assert report["compute_precision"] == precision
    # every conv and linear reads int8 weights and an activation that went through int8
    _, program = load_program(path)
    ops = list(program.functions["main"].operations)
    producer = {v.name: op for op in ops for v in op.outputs}
    for op in ops:
        if op.op_type in ("conv", "linear"):
            assert producer[op.inputs["weight"].name].op_type == "constexpr_affine_dequantize"
            assert producer[op.inputs["x"].name].op_type in ("dequantize", "reshape"), op.name
    # a quantize op per tensor, with our scale and zero point (fp16-rounded in an fp16 program); coremltools
    # rewrites int8 with zero point -128 as uint8 with zero point 0, runs the flatten reshape on int8 directly,
    # and rescales the operands of additions (its distributive_quantized_binary_op_scale_normalization pass)
    dtype = np.float16 if precision == "fp16" else np.float32
    entries = {q["tensor"]: q for q in report["activation_quantization"]}
    for name, tq in quantized.activations.items():
        producer = graph.producer(name)
        kind = producer.op.value if producer is not None else "input"
        if kind == "flatten":
            continue
        entry = entries[name]
        zero_point = entry["zero_point"] - (128 if entry["dtype"] == "uint8" else 0)
        if kind != "add":
            assert (dtype(entry["scale"]), zero_point) == (dtype(tq.scale), tq.zero_point), name
    out, simulated = converter.runner(path)(x), simulate(quantized, x)
    lsb = quantized.activations[graph.outputs[0]].scale
    assert np.abs(out - simulated).max() <= (1.01 if precision == "fp32" else 8) * lsb
    reference = torch_runner(model)(x)
    assert 0 < np.abs(out - reference).max() < 64 * lsb


def test_weight_only_int8_and_ios18_blockwise(tmp_path: Path) -> None:
    model, graph = _model(Arch.mobilenet_v2, 0.5, 10, 64)
    x = np.random.default_rng(2).standard_normal((4, 3, 64, 64)).astype(np.float32)
    quantized = nearest_int8(graph, x)
    w8 = CoremlConverter(activations=False, compute_precision="fp32")
    w8.export(graph, quantized, tmp_path / "w8.mlpackage", INFO)
    report = w8.inspect(tmp_path / "w8.mlpackage")
    assert report["int8_weight_tensors"] == len(graph.weighted_nodes) and not report["activation_quantization"]
    assert snr_db(torch_runner(model)(x), w8.runner(tmp_path / "w8.mlpackage")(x)) > 20
    ios18 = CoremlConverter(minimum_target="iOS18", compute_precision="fp32")
    ios18.export(graph, quantized, tmp_path / "ios18.mlpackage", INFO)
    report = ios18.inspect(tmp_path / "ios18.mlpackage")
    assert report["minimum_deployment_target"] == "iOS18"
    weighted = len(graph.weighted_nodes)
    assert report["ops"]["constexpr_blockwise_shift_scale"] == report["int8_weight_tensors"] == weighted
    lsb = quantized.activations[graph.outputs[0]].scale
    assert np.abs(ios18.runner(tmp_path / "ios18.mlpackage")(x) - simulate(quantized, x)).max() <= 1.01 * lsb
    with pytest.raises(BadInputError, match="iOS17"):
        CoremlConverter(minimum_target="iOS16").export(graph, quantized, tmp_path / "ios16.mlpackage", INFO)


@pytest.mark.parametrize("std", [(0.229, 0.224, 0.225), (0.5, 0.5, 0.5)])
@pytest.mark.parametrize("int8", [False, True])
def test_image_input_classifier_with_labels(std: tuple[float, ...], int8: bool, tmp_path: Path) -> None:
    model, graph = _model(Arch.mobilenet_v2, 0.5, 10, 64)
    preprocess = {**IMAGENET, "crop": 64, "resize": 64, "std": list(std)}
    info = ArtifactInfo("model", preprocess, tuple(f"class{i}" for i in range(10)), "test")
    x = np.random.default_rng(3).standard_normal((4, 3, 64, 64)).astype(np.float32)
    quantized = nearest_int8(graph, x) if int8 else None
    converter = CoremlConverter(image_input=True, compute_precision="fp32")
    path = tmp_path / "model.mlpackage"
    converter.export(graph, quantized, path, info)
    report = converter.inspect(path)
    (image,) = report["inputs"]
    assert image["kind"] == "image" and image["color_space"] == "RGB" and image["shape"] == [64, 64]
    reference_std = float(np.exp(np.mean(np.log(std))))  # one ImageType scale; the rest is folded in
    np.testing.assert_allclose(image["preprocessing"]["scale"], 1 / (255 * reference_std), rtol=1e-6)
    np.testing.assert_allclose(image["preprocessing"]["bias"], -np.array(IMAGENET["mean"]) / reference_std, rtol=1e-6)
    assert report["labels"] == list(info.labels)
    assert [o["name"] for o in report["outputs"]] == ["classLabel", "classLabel_probs"]
    assert json.loads(report["metadata"]["mdeploy.input"])["kind"] == "image"
    out = converter.runner(path)(x)
    if quantized is None:
        assert np.abs(out - torch_runner(model)(x)).max() <= 1e-4
    else:  # the per-channel std lives in the input quantisation's scales
        assert np.abs(out - simulate(quantized, x)).max() <= 1.01 * quantized.activations[graph.outputs[0]].scale


def test_image_normalization_round_trip() -> None:
    norm = ImageNormalization.from_preprocess(IMAGENET)
    pixels = np.random.default_rng(4).uniform(0, 255, (1, 3, 5, 5))
    x = (pixels / 255 - np.array(IMAGENET["mean"]).reshape(1, 3, 1, 1)) / np.array(IMAGENET["std"]).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(norm.pixels(x.astype(np.float32)), pixels, rtol=1e-5, atol=1e-3)


def test_metadata_fields_and_runtime_name(tmp_path: Path) -> None:
    graph = graph_from_torch(build_model(ModelConfig(Arch.mobilenet_v3_small, 0.5, 10, 0.2)), (1, 3, 32, 32))
    info = ArtifactInfo("model", IMAGENET, tuple(f"class{i}" for i in range(10)), "1.2.3",
                        {"license": "Apache-2.0", "author": "Vision team"})
    converter = CoremlConverter(description="Ten-class MobileNetV3-Small")
    converter.export(graph, None, tmp_path / "m.mlpackage", info)
    report = converter.inspect(tmp_path / "m.mlpackage")
    assert (report["author"], report["license"], report["version"]) == ("Vision team", "Apache-2.0", "1.2.3")
    assert report["description"] == "Ten-class MobileNetV3-Small"
    assert json.loads(report["metadata"]["mdeploy.preprocess"])["std"] == IMAGENET["std"]
    assert json.loads(report["metadata"]["mdeploy.labels"])[9] == "class9"
    assert report["metadata"]["mdeploy.compute_precision"] == "fp32"
    if sys.platform != "darwin":
        assert converter.runtime_name == RUNTIME_NAME == "MIL reference (not Core ML)"


def test_mdeploy_inspect_shows_image_scale_bias_and_labels(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mdeploy.cli import app

    _, graph = _model(Arch.mobilenet_v2, 0.5, 10, 64)
    info = ArtifactInfo("model", {**IMAGENET, "crop": 64, "resize": 64}, tuple(f"class{i}" for i in range(10)), "t")
    path = tmp_path / "model.fp32.mlpackage"
    CoremlConverter(image_input=True).export(graph, None, path, info)
    result = CliRunner().invoke(app, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "\"kind\": \"image\"" in result.stdout and "scale" in result.stdout and "bias" in result.stdout
    assert "class9" in result.stdout
