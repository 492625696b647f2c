"""ExecuTorch programs from IR graphs (``converters/pte_program.py``, the coming `.pte` target): XNNPACK takes the
whole graph, fp32 equals PyTorch, and int8 carries the quantiser's decisions (no fp32 weights, outputs within a few
output steps of the simulation, the same SNR against PyTorch), on the trained MobileNetV2 and real photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mdeploy.calibration.config import QuantRecipe
from mdeploy.converters.pte_partition import INT8_TABLE_CONFIGS
from mdeploy.converters.pte_program import Int8Program, program_runner, write_program
from mdeploy.graph.execute import GraphRunner
from mdeploy.graph.from_torch import graph_from_torch
from mdeploy.graph.ir import Graph, Op
from mdeploy.metrics import snr_db
from mdeploy.quantize.ptq import quantize
from mdeploy.quantize.simulate import simulate
from mdeploy.zoo import Arch, ModelConfig, build_model
from tests.model_library import photos, short_mobilenet_v3
from tests.test_graph import randomize_batch_norm
from tests.test_ops_attention import timm_attention

SIZE = 128
# XNNPACK requantises in fixed point, as for TFLite (tests/test_converters.py: 8 output steps); measured 4 on the
# trained V2 at 224 px.
LSB_FROM_SIMULATION = 8.0
# A module of the op of each ExecuTorch config that pte_partition lets XNNPACK run in int8 (a lookup table).
TABLE_OPS = {"HardswishConfig": torch.nn.Hardswish, "SigmoidConfig": torch.nn.Sigmoid}


def run_all(path: Path, inputs: np.ndarray) -> np.ndarray:
    run = program_runner(path)
    return np.concatenate([run(inputs[i:i + 1])[0] for i in range(len(inputs))])


@pytest.mark.parametrize("arch", [Arch.mobilenet_v2, Arch.mobilenet_v3_small])
def test_fp32_program_is_one_delegate_and_equals_pytorch(arch: Arch, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = randomize_batch_norm(build_model(ModelConfig(arch, 0.5, 10))).eval()
    graph = graph_from_torch(model, (1, 3, SIZE, SIZE))
    lowered = write_program(graph, None, tmp_path / "fp32.pte")
    assert lowered.delegates == 1 and lowered.outside == {}, lowered  # V3: no scalar copies outside either
    assert "XNNConvert" not in lowered.inside and lowered.inside.get("XNNConv2d", 0) > 10, lowered
    # NCHW to channels-last at the input and back before the classifier only: an op with a scalar operand (a
    # hard-swish spelled as x * hardtanh(x + 3) * (1/6)) puts a transpose pair around itself (56 on V3-Small)
    assert lowered.inside["XNNStaticTranspose"] == 2, lowered
    x = np.random.default_rng(0).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    want = model(torch.from_numpy(x)).detach().numpy()
    got = run_all(tmp_path / "fp32.pte", x)
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, float(np.abs(want).max()))


def test_int8_program_carries_the_quantisers_decisions(real_v2_weights: Path, calib_dir: Path, eval_dir: Path,
                                                       tmp_path: Path) -> None:
    model = build_model(ModelConfig(Arch.mobilenet_v2))
    model.load_state_dict(torch.load(real_v2_weights, weights_only=True))
    graph = graph_from_torch(model.eval(), (1, 3, SIZE, SIZE))
    qgraph = quantize(graph, photos(calib_dir, SIZE, 48, spread=True).numpy())
    held_out = photos(eval_dir, SIZE, 16, spread=True).numpy()

    lowered = write_program(graph, qgraph, tmp_path / "v2.int8.pte")
    assert lowered.delegates == 1 and lowered.outside == {}, lowered
    # float only at the boundary: the input's quantize and the output's dequantize are the delegate's 2 conversions
    assert lowered.inside["XNNConvert"] == 2 and lowered.inside["XNNConv2d"] == 35, lowered
    module = Int8Program(qgraph)
    assert all(not b.is_floating_point() or b.dim() < 2 for b in module.buffers())  # no fp32 weight tensor left
    fp32_size = sum(w.nbytes for w in (n.params.get("weight") for n in graph.nodes) if w is not None)
    assert (tmp_path / "v2.int8.pte").stat().st_size < 0.32 * fp32_size  # a quarter: int8 codes, plus scales and biases

    got = run_all(tmp_path / "v2.int8.pte", held_out)
    simulated = simulate(qgraph, held_out)
    step = qgraph.activations[graph.outputs[0]].scale
    assert np.abs(got - simulated).max() <= LSB_FROM_SIMULATION * step
    reference = GraphRunner(graph).outputs(held_out)[0].numpy()
    assert abs(snr_db(reference, got) - snr_db(reference, simulated)) < 0.3
    assert snr_db(reference, got) > 15.0  # trained V2 at 128 px on 48 photos: ~20 dB


@pytest.mark.parametrize("arch", [Arch.mobilenet_v3_small, Arch.mobilenet_v3_large])
def test_int8_v3_has_no_float_inside_the_delegate(arch: Arch, tmp_path: Path) -> None:
    """Issue 17's acceptance: hard-swish, hard-sigmoid and squeeze-excitation in int8 forms XNNPACK keeps (the
    classifier's hard-swish on (N, C) too), float only at the program's input and output. Random weights: the
    structure is under test (each lowering takes 1-2 minutes here: ExecuTorch's passes grow with the node count)."""
    torch.manual_seed(0)
    model = randomize_batch_norm(build_model(ModelConfig(arch, 0.5, 10)))
    graph = graph_from_torch(model, (1, 3, 64, 64))
    x = np.random.default_rng(0).standard_normal((16, 3, 64, 64)).astype(np.float32)
    qgraph = quantize(graph, x)
    lowered = write_program(graph, qgraph, tmp_path / "v3.int8.pte")
    assert lowered.delegates == 1 and lowered.outside == {}, lowered
    # a multiply per squeeze-excitation, an int8 table per hard-swish
    assert lowered.inside["XNNConvert"] == 2, lowered
    assert lowered.inside["XNNMultiply"] == sum(n.op is Op.MUL for n in graph.nodes), lowered
    assert lowered.inside["XNNHardswish"] == sum(n.op is Op.HARDSWISH for n in graph.nodes), lowered
    got = run_all(tmp_path / "v3.int8.pte", x[:4])
    step = qgraph.activations[graph.outputs[0]].scale
    # measured 0 steps on V3-Small, 2 on V3-Large (XNNPACK's fixed-point requantisation; 6 and 3 when hard-swish was
    # a gate convolution times its input)
    assert np.abs(got - simulate(qgraph, x[:4])).max() <= LSB_FROM_SIMULATION * step


def conv_op_conv(op: torch.nn.Module) -> tuple[Graph, np.ndarray]:
    """A convolution, ``op``, a 1x1 convolution: the op between int8 tensors, and calibration images."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), op, torch.nn.Conv2d(16, 8, 1)).eval()
    return graph_from_torch(model, (1, 3, 16, 16)), np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(
        np.float32)


def assert_int8_inside(op: torch.nn.Module, steps: float, nodes: dict[str, int], path: Path) -> None:
    """``op`` between two int8 convolutions as a program: one delegate with nothing outside, the XNNPACK node
    counts ``nodes`` (``XNNConvert`` 2: float only at the program's input and output), outputs within ``steps``
    output steps of the quantiser's simulation."""
    graph, x = conv_op_conv(op)
    qgraph = quantize(graph, x)
    lowered = write_program(graph, qgraph, path)
    assert lowered.delegates == 1 and lowered.outside == {}, lowered
    assert all(lowered.inside.get(k) == v for k, v in nodes.items()), lowered
    got = run_all(path, x[:4])
    step = qgraph.activations[graph.outputs[0]].scale
    assert np.abs(got - simulate(qgraph, x[:4])).max() <= max(steps * step, 1e-6)  # 0 steps: float32 noise only


@pytest.mark.parametrize("config", INT8_TABLE_CONFIGS)
def test_int8_table_ops_run_in_int8_exactly(config: str, tmp_path: Path) -> None:
    """Each op ``pte_partition`` gives XNNPACK in int8 is one int8 node (a table maps each code as the quantiser's
    simulation does): no float inside the delegate but at its input and output, outputs on the simulation's codes."""
    nodes = {"XNNConvert": 2, f"XNN{config.removesuffix('Config')}": 1}
    assert_int8_inside(TABLE_OPS[config](), 1.0, nodes, tmp_path / "op.pte")  # measured 0 (hard-swish, sigmoid)


# Ops XNNPACK has no int8 kernel for, in the int8 forms the program writes (pte_program, pte_forms), and attention
# (int8 batched matmuls, transposes as copies): a module, the output steps the program may be off the simulation,
# XNNPACK nodes it must make (float/int8 conversions: 2 = only at the program's input and output).
INT8_FORMS = {
    "silu": (torch.nn.SiLU, 2.0, {"XNNConvert": 2, "XNNSigmoid": 1, "XNNMultiply": 1}),  # 1: the sigmoid's rounding
    "channel_shuffle": (lambda: torch.nn.ChannelShuffle(2), 0.0, {"XNNConvert": 2, "XNNStaticTranspose": 5}),
    # timm's MobileNetV4-Hybrid attention: only its softmax in float (14 conversions before), measured 1 step
    "attention": (lambda: timm_attention(fused=False), 2.0, {"XNNConvert": 4, "XNNBatchMatrixMultiply": 2}),
}


@pytest.mark.parametrize("name", INT8_FORMS)
def test_int8_forms_keep_int8_inside_the_delegate(name: str, tmp_path: Path) -> None:
    """SiLU is its input times the int8 sigmoid held on ``GATE_GRID``; a channel shuffle's reshapes and transpose
    each hold the input's grid (32 float conversions in ShuffleNetV2 x0.5 before); attention's matmuls are int8."""
    module, steps, nodes = INT8_FORMS[name]
    assert_int8_inside(module(), steps, nodes, tmp_path / f"{name}.pte")


def test_gate_of_a_tiny_input_grid_keeps_its_bias_in_int32(tmp_path: Path) -> None:
    """A squeeze-excitation whose logits are ~1e-5 (random weights): the code of the gate's 1/2 on the input grid
    would overflow int32 (XNNPACK then wraps it: gates of 0 instead of 1/2)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1, bias=False), torch.nn.Hardsigmoid()).eval()
    graph = graph_from_torch(model, (1, 3, 4, 4))
    x = np.random.default_rng(0).standard_normal((8, 3, 4, 4)).astype(np.float32) * 1e-6
    qgraph = quantize(graph, x)
    assert qgraph.activations[graph.nodes[0].output].scale < 2e-7  # the code of 1/2 would exceed 2^31
    write_program(graph, qgraph, tmp_path / "gate.pte")
    got = run_all(tmp_path / "gate.pte", x[:2])
    step = qgraph.activations[graph.outputs[0]].scale
    assert np.abs(got - simulate(qgraph, x[:2])).max() <= step and np.abs(got - 0.5).max() < 0.01


@pytest.mark.parametrize("float_input", [False, True])
def test_mixed_precision_computes_the_float_layers_in_float(float_input: bool, tmp_path: Path) -> None:
    """Layers the quantiser kept in float (``--target-snr``) read dequantized tensors, or float ones where no grid is
    left between them; with a float input the first layers compute on the image itself."""
    model = randomize_batch_norm(short_mobilenet_v3())
    graph = graph_from_torch(model, (1, 3, 64, 64))
    x = np.random.default_rng(0).standard_normal((16, 3, 64, 64)).astype(np.float32)
    early = [node.name for node in graph.nodes[:4]]  # the stem conv, its hard-swish, the first depthwise conv...
    mixed = quantize(graph, x, QuantRecipe(float_nodes=tuple(early), float_input=float_input))
    assert (graph.input_name in mixed.activations) is not float_input and graph.nodes[0].output not in mixed.activations
    lowered = write_program(graph, mixed, tmp_path / "mixed.pte")
    assert lowered.delegates == 1 and lowered.outside == {}, lowered
    # int8 -> float into the float layers (after the input's float -> int8, unless the input is float), float -> int8
    # after them, int8 -> float at the output
    assert lowered.inside["XNNConvert"] == (2 if float_input else 4), lowered
    module = Int8Program(mixed)
    assert sum(b.is_floating_point() and b.dim() == 4 for b in module.buffers()) == 2  # two float convolutions
    got = run_all(tmp_path / "mixed.pte", x[:4])
    step = mixed.activations[graph.outputs[0]].scale
    assert np.abs(got - simulate(mixed, x[:4])).max() <= LSB_FROM_SIMULATION * step
