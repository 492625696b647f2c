"""int8 post-training quantisation: range estimators, weight rounding, equalisation, simulation, and the bar on
the real ImageNet MobileNetV2."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn as nn

from mdeploy.calibration.config import QuantRecipe, RangeMethod, WeightRounding
from mdeploy.graph.execute import GraphRunner
from mdeploy.graph.from_torch import graph_from_torch
from mdeploy.graph.ir import Activation, ConvAttrs, Graph, Node, Op
from mdeploy.metrics import compare
from mdeploy.zoo import Arch, ModelConfig, build_model
from mdeploy.quantize.equalize import equalize, scaling_groups
from mdeploy.quantize.observe import channel_ranges
from mdeploy.quantize.stats import LayerStats
from mdeploy.quantize.params import QuantizedGraph, TensorQuant, WeightQuant
from mdeploy.quantize.ptq import quantize
from mdeploy.quantize.ranges import estimate_range, fake_quant
from mdeploy.quantize.rounding import channel_scale, gptq, round_nearest
from mdeploy.quantize.simulate import simulate

from tests.test_graph import randomize_batch_norm

torch.set_num_threads(2)


# Range estimators ---------------------------------------------------------------------------------------------
def test_minmax_is_the_observed_range_widened_to_zero() -> None:
    x = torch.tensor([0.5, 1.0, 3.0])
    assert estimate_range(x, RangeMethod.minmax) == (0.0, 3.0)
    assert estimate_range(x - 5.0, RangeMethod.minmax) == (-4.5, 0.0)


def test_percentile_of_a_uniform_distribution() -> None:
    x = torch.rand(1_000_000, generator=torch.Generator().manual_seed(0)) * 2 - 1
    low, high = estimate_range(x, RangeMethod.percentile, percentile=99.0)
    assert low == pytest.approx(-0.98, abs=0.005) and high == pytest.approx(0.98, abs=0.005)


def test_mse_and_entropy_clip_heavy_tails_but_not_a_uniform() -> None:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    heavy = torch.distributions.Laplace(0.0, 1.0).sample((1_000_000,))
    uniform = torch.rand(1_000_000, generator=gen) * 4 - 2
    lo, hi = heavy.min().item(), heavy.max().item()
    for method in (RangeMethod.mse, RangeMethod.entropy):
        low, high = estimate_range(heavy, method)
        assert 3.0 < high < 0.8 * hi and 0.8 * lo < low < -3.0, method
    low, high = estimate_range(uniform, RangeMethod.mse)
    assert high > 1.9 and low < -1.9


def test_mse_range_beats_minmax_on_heavy_tails() -> None:
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((200_000,))
    errors = {}
    for method in (RangeMethod.minmax, RangeMethod.mse):
        tq = TensorQuant.from_range(*estimate_range(x, method))
        errors[method] = float((fake_quant(x, tq) - x).pow(2).mean())
    assert errors[RangeMethod.mse] < 0.9 * errors[RangeMethod.minmax]


def test_nonnegative_tensors_start_at_zero_and_respect_a_known_limit() -> None:
    x = torch.rand(10_000) * 7.0
    low, high = estimate_range(x, RangeMethod.mse, limit=(0.0, 6.0))
    assert low == 0.0 and high <= 6.0
    assert TensorQuant.from_range(low, high).zero_point == -128


def test_fake_quant_matches_the_integer_codes() -> None:
    tq = TensorQuant.from_range(-1.3, 2.7)
    x = np.random.default_rng(0).uniform(-2, 3, 1000).astype(np.float32)
    expected = tq.dequantize(tq.quantize(x))
    np.testing.assert_allclose(fake_quant(torch.from_numpy(x), tq).numpy(), expected, atol=1e-6)


# Weight rounding ----------------------------------------------------------------------------------------------
def test_gptq_reduces_layer_output_error_against_nearest() -> None:
    gen = torch.Generator().manual_seed(0)
    k, rows, out = 48, 4000, 16
    mix = torch.randn(k, k, generator=gen) / k**0.5
    x = (torch.randn(rows, k, generator=gen) @ mix).double()  # correlated inputs, as in a real layer
    w = torch.randn(1, out, k, generator=gen).double()
    h = (x.T @ x / rows)[None]
    scale = channel_scale(w)
    near = round_nearest(w, scale) * scale[..., None]
    codes, _ = gptq(w, h, scale)
    assert codes.abs().max() <= 127 and torch.equal(codes, codes.round())
    opt = codes * scale[..., None]

    def error(wq: torch.Tensor) -> float:
        return float(((x @ (wq - w)[0].T) ** 2).mean())

    assert error(opt) < 0.6 * error(near)


def test_gptq_free_bias_column_absorbs_the_mean_error() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 8, generator=gen).double() + 2.0  # inputs with a large mean
    xa = torch.cat([x, torch.ones(3000, 1, dtype=torch.float64)], 1)
    w = torch.randn(1, 4, 9, generator=gen).double()
    h = (xa.T @ xa / 3000)[None]
    scale = channel_scale(w[..., :8])
    codes, free = gptq(w, h, scale, free=1, damping=1e-10)  # undamped: the exact optimum
    y = xa @ w[0].T
    yq = x @ (codes[0] * scale[0, :, None]).T + free[0, :, 0]
    assert float((yq - y).mean(0).abs().max()) < 1e-6  # no mean error left


# Simulation semantics -----------------------------------------------------------------------------------------
def _one_conv_graph() -> Graph:
    rng = np.random.default_rng(0)
    conv = Node(
        "conv", Op.CONV, ["input"], "conv", ConvAttrs(), activation=Activation.RELU6,
        params={"weight": rng.normal(size=(2, 3, 1, 1)).astype(np.float32),
                "bias": rng.normal(size=2).astype(np.float32)},
    )
    return Graph([conv], "input", (1, 3, 2, 2), ("conv",), {"input": (1, 3, 2, 2), "conv": (1, 2, 2, 2)})


def test_simulate_matches_a_hand_computed_int8_conv() -> None:
    graph = _one_conv_graph()
    node = graph.nodes[0]
    t_in, t_out = TensorQuant.from_range(-2.0, 2.0), TensorQuant.from_range(0.0, 3.0)
    scale = np.abs(node.weight).reshape(2, -1).max(1) / 127
    codes = np.round(node.weight / scale[:, None, None, None]).astype(np.int8)
    qgraph = QuantizedGraph(graph, {"input": t_in, "conv": t_out}, {"conv": WeightQuant(scale, codes)})
    x = np.random.default_rng(1).uniform(-2.5, 2.5, (2, 3, 2, 2)).astype(np.float32)

    # integer pipeline: int8 input codes, int32 accumulator with int32 bias, requantise, clamp to the grid
    xq = t_in.quantize(x).astype(np.int64) - t_in.zero_point
    acc = np.einsum("oi,nihw->nohw", codes[:, :, 0, 0].astype(np.int64), xq)
    bias_q = np.round(node.bias / (t_in.scale * scale)).astype(np.int64)
    acc = acc + bias_q[None, :, None, None]
    real = acc * (t_in.scale * scale)[None, :, None, None]
    out_q = np.clip(np.round(real / t_out.scale) + t_out.zero_point, -128, 127)
    out_q = np.maximum(out_q, t_out.quantize(np.zeros(1))[0])  # ReLU6 in the integer domain (6 is above 3)
    expected = (out_q - t_out.zero_point) * t_out.scale
    np.testing.assert_allclose(simulate(qgraph, x), expected, atol=1e-5)


def test_float_nodes_use_float_weights_on_dequantised_inputs() -> None:
    graph = _one_conv_graph()
    t_in = TensorQuant.from_range(-2.0, 2.0)
    wq = WeightQuant(np.ones(2, np.float32), np.zeros((2, 3, 1, 1), np.int8))  # would zero the output if used
    qgraph = QuantizedGraph(graph, {"input": t_in}, {"conv": wq}, frozenset({"conv"}))
    x = np.random.default_rng(2).uniform(-2, 2, (2, 3, 2, 2)).astype(np.float32)
    expected = GraphRunner(graph)(torch.from_numpy(t_in.dequantize(t_in.quantize(x)))).numpy()
    np.testing.assert_allclose(simulate(qgraph, x), expected, atol=1e-6)


# The quantiser on a small network -----------------------------------------------------------------------------
class TinyNet(nn.Module):
    """A MobileNetV2 block in miniature: stem, expansion, depthwise, projection with a residual, head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)

        def cbr(i: int, o: int, k: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
            layers = [nn.Conv2d(i, o, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(o)]
            return nn.Sequential(*layers, *([nn.ReLU6()] if act else []))

        self.stem = cbr(3, 8, 3)
        self.project0 = cbr(8, 8, act=False)
        self.block = nn.Sequential(cbr(8, 32), cbr(32, 32, 3, groups=32), cbr(32, 8, act=False))
        self.fc = nn.Linear(8, 5)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):  # uneven channel ranges, as trained nets have
                m.weight.data.uniform_(0.05, 3.0)
                m.bias.data.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project0(self.stem(x))
        x = x + self.block(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@pytest.fixture(scope="module")
def tiny() -> tuple[Graph, np.ndarray]:
    graph = graph_from_torch(TinyNet().eval(), (1, 3, 16, 16))
    return graph, np.random.default_rng(0).normal(size=(48, 3, 16, 16)).astype(np.float32)


def test_equalisation_preserves_the_function(tiny: tuple[Graph, np.ndarray]) -> None:
    graph, x = tiny
    equalized, scales = equalize(graph, channel_ranges(graph, x), alpha=1.0)
    groups = scaling_groups(graph)
    assert any(len(g) >= 3 for g in groups)  # the residual stream: projection, block output and their sum
    assert scales and any(float(s.min()) < 0.5 for s in scales.values())
    before, after = GraphRunner(graph)(x).numpy(), GraphRunner(equalized)(x).numpy()
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4)


def test_equalisation_magnifies_a_channel_at_most_one_over_the_floor(tiny: tuple[Graph, np.ndarray]) -> None:
    graph, x = tiny
    ranges = channel_ranges(graph, x)
    for ranges_of_tensor in ranges.values():  # one channel calibration barely excites, as rare features are
        ranges_of_tensor[0] = 1e-4 * ranges_of_tensor.max()
    unbounded = equalize(graph, ranges, alpha=1.0, range_floor=0.0)[1]
    bounded = equalize(graph, ranges, alpha=1.0, range_floor=0.2)[1]
    assert min(float(s.min()) for s in unbounded.values()) < 0.01  # magnified 100x and more without the floor
    assert min(float(s.min()) for s in bounded.values()) >= 0.2 - 1e-9


def test_layer_input_mean_counts_every_position_and_the_padding(tiny: tuple[Graph, np.ndarray]) -> None:
    graph, x = tiny
    for node in graph.weighted_nodes:
        stats = LayerStats(node, total_images=len(x), out_positions=256)
        value = GraphRunner(graph).run(x, keep={node.inputs[0]})[node.inputs[0]]
        stats.add(value)
        rows = stats.patches(value)  # every position, im2col with zero padding
        np.testing.assert_allclose(stats.mean_input().numpy(), rows.mean(1).double().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("recipe", [QuantRecipe.default(), QuantRecipe.stock_minmax()], ids=lambda r: r.name)
def test_quantize_covers_every_tensor(tiny: tuple[Graph, np.ndarray], recipe: QuantRecipe) -> None:
    graph, x = tiny
    qgraph = quantize(graph, x, recipe)
    tensors = {graph.input_name} | {n.output for n in graph.nodes}
    assert set(qgraph.activations) == tensors
    assert set(qgraph.weights) == {n.name for n in graph.weighted_nodes}
    for node in qgraph.graph.nodes:
        tq = qgraph.activations[node.output]
        if node.op in (Op.FLATTEN, Op.PAD):
            assert tq == qgraph.activations[node.inputs[0]]
        if node.activation is Activation.RELU6:
            assert tq.zero_point == -128 and tq.range[1] <= 6.0 + 1e-6
        if node.name in qgraph.weights:
            wq = qgraph.weights[node.name]
            assert wq.values.dtype == np.int8 and np.abs(wq.values.astype(int)).max() <= 127
            assert wq.values.shape == node.weight.shape and wq.scale.shape == (node.weight.shape[0],)
    assert qgraph.recipe["name"] == recipe.name
    reference = GraphRunner(graph)(x).numpy()
    assert compare(reference, simulate(qgraph, x)).snr_db > 20.0


@pytest.mark.parametrize("arch", list(Arch))
def test_every_zoo_architecture_quantizes(arch: Arch) -> None:
    model = randomize_batch_norm(build_model(ModelConfig(arch, 0.5, 10, 0.2)))
    graph = graph_from_torch(model, (1, 3, 64, 64))
    x = np.random.default_rng(0).normal(size=(24, 3, 64, 64)).astype(np.float32)
    qgraph = quantize(graph, x, QuantRecipe.default())
    assert set(qgraph.activations) == {graph.input_name} | {n.output for n in graph.nodes}
    equalized = GraphRunner(qgraph.graph)(x).numpy()  # rescaled graph, corrected biases: still the same model
    assert compare(GraphRunner(graph)(x).numpy(), equalized).snr_db > 25.0
    assert np.isfinite(simulate(qgraph, x)).all()


def test_float_nodes_are_kept_float(tiny: tuple[Graph, np.ndarray]) -> None:
    graph, x = tiny
    name = graph.weighted_nodes[-1].name
    qgraph = quantize(graph, x, dataclasses.replace(QuantRecipe.default(), float_nodes=(name,)))
    assert name in qgraph.float_nodes and name not in qgraph.weights


# Recipe -------------------------------------------------------------------------------------------------------
def test_recipe_round_trips_through_a_plain_dict() -> None:
    recipe = dataclasses.replace(QuantRecipe.default(), float_nodes=("linear",), target_snr_db=20.0)
    data = recipe.to_dict()
    assert data["range_method"] == "mse" and data["weight_rounding"] == "gptq" and data["float_nodes"] == ["linear"]
    assert data["target_snr_db"] == 20.0 and QuantRecipe.default().to_dict()["target_snr_db"] is None
    assert all(isinstance(v, (str, int, float, bool, list)) for v in data.values())
    assert QuantRecipe.from_dict(data) == recipe
    assert QuantRecipe.from_dict(QuantRecipe.stock_percentile().to_dict()).weight_rounding is WeightRounding.nearest
    with pytest.raises(ValueError):
        QuantRecipe.from_dict({"nope": 1})


# The bar on the real network ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_mobilenet_v2_int8_meets_the_bar(real_v2_weights, calib_dir, eval_dir) -> None:  # type: ignore[no-untyped-def]
    from mdeploy.calibration.dataset import SampleSet
    from mdeploy.calibration.preprocess import Preprocess

    model = build_model(ModelConfig(Arch.mobilenet_v2, 1.0, 1000, 0.2))
    model.load_state_dict(torch.load(real_v2_weights, weights_only=True))
    graph = graph_from_torch(model.eval(), (1, 3, 224, 224))
    preprocess = Preprocess.imagenet(224)
    calibration = SampleSet.from_folder(calib_dir, preprocess, 200).to_array()
    evaluation = SampleSet.from_folder(eval_dir, preprocess, None).to_array()
    runner = GraphRunner(graph)
    reference = np.concatenate([runner(evaluation[i : i + 32]).numpy() for i in range(0, len(evaluation), 32)])

    qgraph = quantize(graph, calibration, QuantRecipe.default())
    metrics = compare(reference, simulate(qgraph, evaluation))
    assert metrics.top1_agreement >= 0.85 and metrics.snr_db >= 15.0, metrics
