"""The ops attention is made of (issue 14): RESHAPE and TRANSPOSE of any rank, MATMUL of two feature maps, SOFTMAX
over the last axis of any rank, and ``F.scaled_dot_product_attention`` decomposed into them, each in the PyTorch
forms users write, through the executor, ONNX Runtime, LiteRT (XNNPACK) and the MIL reference, fp32 and int8; a
faithful small copy of timm's ``MultiQueryAttention2d`` and timm's module itself (fused and unfused attention,
saved as ``.pt2`` and as TorchScript); TFLite's layouts (tensors in PyTorch's order among NHWC feature maps) and
its XNNPACK partitions; the clear errors for what is not supported.

Each small model puts its ops between convolutions (so the int8 grids around them are real ones), is calibrated
on real photos and checked on other photos.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mdeploy.calibration.config import QuantRecipe
from mdeploy.converters import REGISTRY, Target
from mdeploy.converters.tflite_attention import reshape_plan
from mdeploy.converters.tflite_report import xnnpack_partitions
from mdeploy.errors import UnsupportedOpError
from mdeploy.graph.execute import GraphRunner
from mdeploy.graph.from_torch import graph_from_torch
from mdeploy.graph.ir import Graph, Op
from mdeploy.loading import load_model
from mdeploy.quantize.ptq import quantize
from tests.model_library import SAVERS, install_torchvision_shim, photos
from tests.op_harness import (INFO, assert_fp32_everywhere, assert_int8_everywhere, build_and_trace, photo_sets,
                              reference)

SIZE = 32
C = 16


class Around(nn.Module):
    """conv -> op -> conv: the op reads and feeds real int8 grids."""

    def __init__(self, op: Callable[[torch.Tensor], torch.Tensor] | nn.Module, out: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, C, 3, stride=2, padding=1), nn.ReLU6())
        self.op = op if isinstance(op, nn.Module) else Fn(op)
        self.head = nn.LazyConv2d(out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.op(self.stem(x)))


class Fn(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class MultiQuery(nn.Module):
    """A faithful small copy of how timm's MultiQueryAttention2d (MobileNetV4-Hybrid) computes: 1x1 query conv;
    key and value as a stride-2 depthwise ``down_conv``, a BatchNorm ``norm`` and a 1x1 ``proj``; the query reshaped
    to (B, heads, key_dim, -1) and transposed; keys and values to (B, C, -1), transposed and unsqueezed to one head;
    fused attention or ``q * scale``, ``q @ k.transpose(-1, -2)``, ``softmax(-1)``, ``attn @ v``; the output
    transposed, reshaped to (B, H, W, C), permuted back and projected; then a residual add."""

    def __init__(self, fused: bool, heads: int = 2, key_dim: int = 8) -> None:
        super().__init__()
        self.fused, self.heads, self.key_dim = fused, heads, key_dim
        self.scale = key_dim ** -0.5
        self.query = nn.Sequential()
        self.query.add_module("proj", nn.Conv2d(C, heads * key_dim, 1, bias=False))
        self.key, self.value = (nn.Sequential(nn.Conv2d(C, C, 3, 2, 1, groups=C, bias=False), nn.BatchNorm2d(C),
                                              nn.Conv2d(C, key_dim, 1, bias=False)) for _ in range(2))
        self.output = nn.Conv2d(heads * key_dim, C, 1, bias=False)
        with torch.no_grad():  # attention that is not uniform: larger queries than a random init gives
            self.query.proj.weight.mul_(4.0)
            for norm in (self.key[1], self.value[1]):
                norm.running_mean.uniform_(-0.2, 0.2)
                norm.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.query(x).reshape(b, self.heads, self.key_dim, -1).transpose(-1, -2).contiguous()
        k = self.key(x).reshape(b, self.key_dim, -1).transpose(1, 2).unsqueeze(1).contiguous()
        v = self.value(x).reshape(b, self.key_dim, -1).transpose(1, 2).unsqueeze(1).contiguous()
        if self.fused:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            q = q * self.scale
            attn = (q @ k.transpose(-1, -2)).softmax(dim=-1)
            o = attn @ v
        o = o.transpose(1, 2).reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
        return x + self.output(o)


def timm_attention(fused: bool) -> nn.Module:
    """timm's own MultiQueryAttention2d as MobileNetV4-Hybrid-Medium configures it (kv stride 2, BatchNorm), small,
    behind a residual add as in timm's MobileAttention block."""
    install_torchvision_shim()  # before timm imports torchvision
    from timm.layers.attention2d import MultiQueryAttention2d

    attention = MultiQueryAttention2d(C, C, num_heads=2, key_dim=8, value_dim=8, kv_stride=2, dw_kernel_size=3)
    attention.fused_attn = fused
    for norm in (attention.key.norm, attention.value.norm):
        norm.running_var.uniform_(0.5, 2.0)
    return _Residual(attention)


class _Residual(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inner(x)


class TokenMixer(nn.Module):
    """Channel attention over tokens with every form of the ops: flatten(2), ``.mT``, ``@``/``torch.matmul``,
    ``torch.bmm`` (on rank 3, batch first), ``expand`` that changes nothing, softmax of rank 3, view back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = x.flatten(2)  # (B, C, HW)
        gram = torch.matmul(t, t.mT) * (1.0 / (h * w))  # (B, C, C)
        mixed = torch.bmm(gram.softmax(-1), t.expand(b, c, h * w))
        return mixed.view(b, c, h, w)


class PooledKeys(nn.Module):
    """Two heads of every pixel attending to 4x4-pooled keys and values, with an explicit scale: the query is no
    convolution's output (a ReLU6 is fused into it), so its scale stays an AFFINE of a tensor in PyTorch's order."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = x.reshape(x.shape[0], 2, 8, -1).mT
        kv = F.avg_pool2d(x, 4).reshape(x.shape[0], 2, 8, -1).mT
        return F.scaled_dot_product_attention(q, kv, kv, scale=0.3).mT.reshape(x.shape)


# name -> (model, the IR ops it must produce)
MODELS: dict[str, tuple[Callable[[], nn.Module], set[Op]]] = {
    "tokens_round_trip": (lambda: Around(lambda x: F.relu(x.reshape(x.shape[0], C, -1).transpose(1, 2))
                                         .transpose(1, 2).reshape(x.shape)), {Op.RESHAPE, Op.TRANSPOSE}),
    "softmax_over_channels": (lambda: Around(lambda x: x.permute(0, 2, 3, 1).softmax(-1).permute(0, 3, 1, 2)),
                              {Op.TRANSPOSE, Op.SOFTMAX}),
    "softmax_over_width": (lambda: Around(lambda x: x.softmax(-1)), {Op.SOFTMAX}),
    "unsqueeze_squeeze_view": (lambda: Around(lambda x: F.relu(x.unsqueeze(2) - 1.0).squeeze(2).view(
        x.shape[0], 4, 4, -1).transpose(1, 2).reshape(x.shape)), {Op.RESHAPE, Op.TRANSPOSE}),
    "token_mixer_matmul_bmm": (lambda: Around(TokenMixer()), {Op.MATMUL, Op.SOFTMAX, Op.RESHAPE}),
    "multi_query_fused": (lambda: Around(MultiQuery(fused=True)), {Op.MATMUL, Op.SOFTMAX}),
    "multi_query_unfused": (lambda: Around(MultiQuery(fused=False)), {Op.MATMUL, Op.SOFTMAX}),
    "timm_multi_query_fused": (lambda: Around(timm_attention(fused=True)), {Op.MATMUL, Op.SOFTMAX}),
    "timm_multi_query_unfused": (lambda: Around(timm_attention(fused=False)), {Op.MATMUL, Op.SOFTMAX}),
    "sdpa_heads_pooled_keys": (lambda: Around(PooledKeys()), {Op.AFFINE, Op.AVG_POOL, Op.MATMUL, Op.SOFTMAX}),
}


@pytest.fixture(scope="module")
def images(calib_dir: Path, demo_assets) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """(calibration photos, other photos to check on), preprocessed at SIZE."""
    return photo_sets(calib_dir, demo_assets.eval_dir, SIZE)


def _build(name: str, x: np.ndarray) -> tuple[nn.Module, Graph]:
    return build_and_trace(MODELS[name][0], SIZE, materialise=x)  # materialises the lazy head


@pytest.mark.parametrize("name", list(MODELS))
def test_fp32_everywhere(name: str, images: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    calibration, x = images
    model, graph = _build(name, calibration)
    assert MODELS[name][1] <= {n.op for n in graph.nodes}
    assert_fp32_everywhere(model, graph, x, tmp_path, limit=1e-5)  # float32 reordering only


# int8 SNR against PyTorch on photos the calibration did not see: stem -> attention -> head quantises 8-12 tensors
# in a row (the query, key and value convs, the scores, the attention weights, the product, the output conv, the
# residual add, the head), each per tensor over its calibrated range; the simulation measures 25-47 dB here (the
# lowest: the token mixer's product of a map with itself). 22 dB leaves margin and fails a wrong layout (a transpose
# missed or doubled in TFLite: < 5 dB) or a wrong grid. Each runtime must reproduce the simulation to 33 dB (measured
# 39 dB and up): Core ML's W8A8 program computes in fp16 between them. An int8 grid over [0, 1] is coarse for
# attention over many keys: weights near 1/n get few codes, so these models attend over 16-64 keys, as
# MobileNetV4-Hybrid's do (its keys are pooled).
INT8_SNR_DB = 22.0


@pytest.mark.parametrize("name", list(MODELS))
def test_int8_everywhere(name: str, images: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    calibration, x = images
    model, graph = _build(name, calibration)
    quantized = quantize(graph, calibration, QuantRecipe.default())
    assert_int8_everywhere(model, quantized.graph, quantized, x, tmp_path, min_snr_db=INT8_SNR_DB,  # as the pipeline
                           min_snr_vs_simulation_db=33.0)  # the runtime runs what the quantiser chose


# XNNPACK (LiteRT 2.3) takes RESHAPE, TRANSPOSE and BATCH_MATMUL in fp32 and int8 (an int8 BATCH_MATMUL only with a
# second operand of zero point 0, which the quantiser gives it), and SOFTMAX in fp32 only: the int8 graph computes
# each softmax in float between a DEQUANTIZE and a QUANTIZE, inside the one partition.
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_tflite_xnnpack_partitions(name: str, precision: str, images: tuple[np.ndarray, np.ndarray],
                                   tmp_path: Path) -> None:
    calibration, _ = images
    _, graph = _build(name, calibration)
    quantized = quantize(graph, calibration, QuantRecipe.default()) if precision == "int8" else None
    path = tmp_path / f"m.{precision}.tflite"
    REGISTRY[Target.tflite].export(quantized.graph if quantized else graph, quantized, path, INFO)
    report = xnnpack_partitions(path.read_bytes())
    assert report["ops_outside"] == [] and report["partitions"] == 1, report
    if precision == "int8":
        inspected = REGISTRY[Target.tflite].inspect(path)["graph"]
        assert inspected["float_ops_inside"] == [], inspected
        assert len(inspected["float_softmaxes"]) == sum(n.op is Op.SOFTMAX for n in graph.nodes), inspected
        matmuls = [n for n in graph.nodes if n.op is Op.MATMUL]
        assert all(quantized.activations[n.inputs[1]].zero_point == 0 for n in matmuls)  # type: ignore[union-attr]


def _tflite_ops(graph: Graph, path: Path) -> Counter[str]:
    REGISTRY[Target.tflite].export(graph, None, path, INFO)
    return Counter(REGISTRY[Target.tflite].inspect(path)["ops"])


def test_timm_attention_is_four_ops_and_two_transposes_in_tflite(images: tuple[np.ndarray, np.ndarray],
                                                                  tmp_path: Path) -> None:
    """timm's attention: the query scale folds into the query conv, the key's transpose is BATCH_MATMUL's adj_y,
    and of the reshapes and transposes around it TFLite needs one TRANSPOSE for the query (NHWC read as heads) and
    one for the output (heads back to pixels); the keys' and values' NHWC maps are read with RESHAPEs only."""
    calibration, _ = images
    for name in ("timm_multi_query_fused", "timm_multi_query_unfused", "multi_query_fused"):
        _, graph = _build(name, calibration)
        assert Op.AFFINE not in {n.op for n in graph.nodes}, name  # q * scale folded into the query's conv
        ops = _tflite_ops(graph, tmp_path / f"{name}.tflite")
        assert ops["BATCH_MATMUL"] == 2 and ops["SOFTMAX"] == 1 and ops["TRANSPOSE"] == 2, (name, ops)
    _, graph = _build("tokens_round_trip", calibration)  # NHWC -> tokens -> NHWC: RESHAPEs, no TRANSPOSE
    assert _tflite_ops(graph, tmp_path / "round_trip.tflite")["TRANSPOSE"] == 0


def test_reshape_plan_moves_no_data_where_it_can() -> None:
    nhwc = (0, 3, 1, 2)
    # NHWC (1, 6, 6, 64) read as (1, 64, 36): a RESHAPE to (1, 36, 64), stored with its last two axes swapped
    assert reshape_plan((1, 6, 6, 64), nhwc, (1, 64, 36)) == ((1, 36, 64), (0, 2, 1))
    # the query's (1, 4, 16, 36) heads: (1, 36, 4, 16) in storage
    assert reshape_plan((1, 6, 6, 64), nhwc, (1, 4, 16, 36)) == ((1, 36, 4, 16), (0, 2, 3, 1))
    # tokens (1, 36, 64) in PyTorch's order back to pixels (1, 6, 6, 64), and unsqueezed
    assert reshape_plan((1, 36, 64), (0, 1, 2), (1, 6, 6, 64)) == ((1, 6, 6, 64), (0, 1, 2, 3))
    assert reshape_plan((1, 36, 64), (0, 1, 2), (1, 1, 36, 64)) == ((1, 1, 36, 64), (0, 1, 2, 3))
    # heads and channels apart in storage: needs a TRANSPOSE
    assert reshape_plan((1, 4, 36, 16), (0, 2, 1, 3), (1, 6, 6, 64)) is None


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_timm_attention_saved_both_ways_traces_the_same(fused: bool, tmp_path: Path) -> None:
    """``torch.export`` + ``torch.export.save`` and ``torch.jit.trace`` + ``torch.jit.save`` both keep
    ``aten.scaled_dot_product_attention`` (fused) or matmul/softmax (unfused): the same IR either way."""
    torch.manual_seed(0)
    model = Around(timm_attention(fused)).eval()
    example = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        model(example)
    x = np.random.default_rng(0).standard_normal((3, 3, SIZE, SIZE)).astype(np.float32)
    expected = reference(model, x)
    histograms = []
    for kind, (save, suffix) in SAVERS.items():
        path = tmp_path / f"attention{suffix}"
        save(model, example, path)
        graph = graph_from_torch(load_model(path).module, (1, 3, SIZE, SIZE))
        assert np.abs(GraphRunner(graph)(x).numpy().reshape(len(x), -1) - expected).max() <= 1e-4, kind
        assert any("MultiQueryAttention2d" in n.source for n in graph.nodes if n.op is Op.MATMUL), kind
        histograms.append(graph.op_histogram())
    assert histograms[0] == histograms[1]


# -- what is not supported: one line naming the op and the user's module ---------------------------------------
class Attend(nn.Module):
    def __init__(self, **kwargs: object) -> None:
        super().__init__()
        self.kwargs = kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = x.flatten(2).mT.unsqueeze(1)
        kwargs = dict(self.kwargs)
        if kwargs.pop("mask", False):
            kwargs["attn_mask"] = torch.zeros(q.shape[2], q.shape[2])
        return F.scaled_dot_product_attention(q, q, q, **kwargs).squeeze(1).mT.reshape(x.shape)


ERRORS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "attn_mask": (lambda: Attend(mask=True), r"scaled_dot_product_attention with attn_mask \(a tensor\) at op "
                                             r"\(Attend\) is not supported"),
    "dropout": (lambda: Attend(dropout_p=0.1), r"with dropout_p=0.1 at op \(Attend\) is not supported"),
    "is_causal": (lambda: Attend(is_causal=True), r"with is_causal=True at op \(Attend\) is not supported"),
    "reshape_of_the_batch": (lambda: Fn(lambda x: x.reshape(-1, 16, 16, 4)),
                             r"reshape \(1, 16, 16, 16\) -> \(4, 16, 16, 4\) at op \(Fn\) is not supported: it merges "
                             "or drops the batch axis"),
    "transpose_of_the_batch": (lambda: Fn(lambda x: x.transpose(0, 1)),
                               r"transpose moving the batch axis .* at op \(Fn\) is not supported"),
    "matmul_with_a_weight": (lambda: MatmulWeight(), r"matmul with a constant operand .* at op \(MatmulWeight\) is "
                                                     "not supported: .* use nn.Linear"),
    "expand_that_broadcasts": (lambda: Fn(lambda x: x[:, :1].expand(-1, C, -1, -1)),
                               r"expand \(1, 1, 16, 16\) -> \(1, 16, 16, 16\) at op \(Fn\) is not supported"),
    "linear_on_tokens": (lambda: nn.Sequential(Fn(lambda x: x.flatten(2).mT), nn.Linear(C, C)),
                         r"linear layer on a rank-3 tensor \(1, 256, 16\) at op.1 \(Linear\) is not supported"),
    "matmul_of_two_ranks": (lambda: Fn(lambda x: x @ x.flatten(2)),
                            r"matmul of \(1, 16, 16, 16\) and \(1, 16, 256\) at op \(Fn\) is not supported: mdeploy "
                            "multiplies two tensors of one rank"),
}


class MatmulWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


@pytest.mark.parametrize("name", list(ERRORS))
def test_unsupported_forms_are_one_clear_line(name: str) -> None:
    make, message = ERRORS[name]
    model = Around(make()).eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, SIZE, SIZE))  # it runs in PyTorch (and materialises the lazy head)
    with pytest.raises(UnsupportedOpError, match=message) as raised:
        graph_from_torch(model, (1, 3, SIZE, SIZE))
    assert "\n" not in str(raised.value)


def test_a_matmul_tflite_cannot_run_is_one_clear_line(tmp_path: Path) -> None:
    six = Fn(lambda x: (x.reshape(1, 2, 2, 4, 16, 16) @ x.reshape(1, 2, 2, 4, 16, 16)).reshape(x.shape))
    model = Around(six).eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, SIZE, SIZE))
    graph = graph_from_torch(model, (1, 3, SIZE, SIZE))
    with pytest.raises(UnsupportedOpError, match=r"the TFLite target does not support matmul of rank-6 tensors "
                                                 r"\(at op \(Fn\)\): TFLite's BATCH_MATMUL takes up to 5 axes"):
        REGISTRY[Target.tflite].export(graph, None, tmp_path / "m.tflite", INFO)


# -- the library model ---------------------------------------------------------------------------------------
def test_mobilenet_v4_hybrid_int8_tflite_is_one_xnnpack_partition(calib_dir: Path, tmp_path: Path) -> None:
    """timm's MobileNetV4-Hybrid-Medium: fp32 and int8 TFLite are one XNNPACK partition each; the int8 graph's only
    float ops are its 8 softmaxes, each between a DEQUANTIZE and a QUANTIZE (XNNPACK refuses int8 SOFTMAX)."""
    from mdeploy.families import FAMILIES
    from tests.model_library import library_model

    family = next(f for f in FAMILIES if f.name == "mobilenet_v4_hybrid")
    model = library_model(family, calib_dir)
    graph = graph_from_torch(model, (1, 3, family.size, family.size))
    assert sum(n.op is Op.SOFTMAX for n in graph.nodes) == 8 and sum(n.op is Op.MATMUL for n in graph.nodes) == 16
    path = tmp_path / "hybrid.fp32.tflite"
    REGISTRY[Target.tflite].export(graph, None, path, INFO)
    assert xnnpack_partitions(path.read_bytes())["partitions"] == 1
    quantized = quantize(graph, photos(calib_dir, family.size, 16).numpy(), QuantRecipe.stock_minmax())
    path = tmp_path / "hybrid.int8.tflite"
    REGISTRY[Target.tflite].export(quantized.graph, quantized, path, INFO)
    report = xnnpack_partitions(path.read_bytes())
    assert report["ops_outside"] == [] and report["partitions"] == 1, report
    inspected = REGISTRY[Target.tflite].inspect(path)["graph"]
    assert inspected["float_ops_inside"] == [] and len(inspected["float_softmaxes"]) == 8, inspected
