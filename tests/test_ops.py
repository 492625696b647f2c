"""Every IR op is handled by every backend: generated from the ``Op`` enum, so adding a member to ``Op`` fails here
until the executor, the int8 policy, the ONNX, TFLite and Core ML writers and the MIL reference executor all have
it (one registry per backend, one small function per op).

For the MIL reference, "has the op" means: the op's Core ML lowering declares the MIL ops it emits, and the
reference implements each of them. ``test_core_ml_lowerings_emit_only_the_mil_ops_they_declare`` keeps those
declarations honest by recording what each lowering really asks coremltools' MIL Builder for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mdeploy.converters import coreml_program, onnx, tflite_ops
from mdeploy.converters.coreml_mil_reference import MIL_OPS
from mdeploy.graph import execute
from mdeploy.graph.ir import Op
from mdeploy.quantize import policy


def _mil_reference(op: Op) -> str | None:
    lowering = coreml_program.LOWERINGS.get(op)
    if lowering is None or not lowering.mil_ops:
        return "its Core ML lowering names no MIL ops, so there is nothing the reference could run"
    missing = sorted(lowering.mil_ops - set(MIL_OPS))
    return f"the MIL reference does not implement {missing}" if missing else None


def _registered(registry: Callable[[], Any], where: str) -> Callable[[Op], str | None]:
    return lambda op: None if op in registry() else f"no entry in {where}"


# backend -> a check returning why ``op`` is not handled (None: handled). Registries are read at call time.
BACKENDS: dict[str, Callable[[Op], str | None]] = {
    "executor": _registered(lambda: execute.OPS, "mdeploy.graph.execute.OPS"),
    "quantiser policy": _registered(lambda: policy.POLICY, "mdeploy.quantize.policy.POLICY"),
    "onnx": _registered(lambda: onnx.EMITTERS, "mdeploy.converters.onnx.EMITTERS"),
    "tflite": _registered(lambda: tflite_ops.EMITTERS, "mdeploy.converters.tflite_ops.EMITTERS"),
    "coreml builder": _registered(lambda: coreml_program.LOWERINGS, "mdeploy.converters.coreml_program.LOWERINGS"),
    "mil reference": _mil_reference,
}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("op", list(Op), ids=lambda op: op.value)
def test_every_backend_handles_every_op(op: Op, backend: str) -> None:
    problem = BACKENDS[backend](op)
    assert problem is None, f"IR op {op.name} is not handled by the {backend}: {problem}"


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_a_backend_without_an_op_is_reported(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above can fail: take SOFTMAX out of one backend's registry and it says so."""
    registry: Any = {
        "executor": execute.OPS, "onnx": onnx.EMITTERS, "tflite": tflite_ops.EMITTERS,
        "coreml builder": coreml_program.LOWERINGS, "mil reference": coreml_program.LOWERINGS,
    }.get(backend)
    if backend == "quantiser policy":
        monkeypatch.setattr(policy, "POLICY", {op: p for op, p in policy.POLICY.items() if op is not Op.SOFTMAX})
    else:
        monkeypatch.delitem(registry, Op.SOFTMAX)
    assert BACKENDS[backend](Op.SOFTMAX) is not None
    assert BACKENDS[backend](Op.ADD) is None


def test_mil_reference_without_a_declared_mil_op_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(MIL_OPS, "sigmoid_hard")
    assert "sigmoid_hard" in str(_mil_reference(Op.HARDSWISH))


def test_mil_reference_implements_the_program_level_mil_ops() -> None:
    assert coreml_program.PROGRAM_MIL_OPS <= set(MIL_OPS)


def test_policy_rows_are_consistent() -> None:
    for op, row in policy.POLICY.items():
        assert not (row.shares_input_grid and row.fixed_output), op  # a shared grid cannot also be a fixed one
        for runtime, grid in row.fixed_output.items():
            assert runtime in ("onnx", "tflite", "coreml") and grid.scale > 0, (op, runtime)
    assert policy.policy_of(Op.SIGMOID).fixed_grid("tflite") == policy.PROBABILITY_GRID
    assert policy.policy_of(Op.SOFTMAX).fixed_grid("onnx") is None
    assert policy.policy_of(Op.SOFTMAX).fixed_grid("tflite") is None  # TFLite: a float softmax between int8 tensors


class AllOps(nn.Module):
    """A small model whose IR holds every member of Op (checked below)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8 * 5 * 5, 6)
        self.prelu = nn.PReLU(8)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2, groups=2)  # CONV_TRANSPOSE; RESIZE back to 5x5 below
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, 8))
        nn.init.uniform_(self.prelu.weight, 0.1, 0.4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c1(F.pad(x, (0, 1, 0, 1)))
        a, b = torch.relu(y), torch.clamp(y, -1.0, 1.0)
        d = F.hardswish(y) + torch.sigmoid(a) * F.hardsigmoid(b) + torch.clamp(y, 0.25, 3.0)
        d = F.relu6(self.c2(d + F.gelu(b)))
        d = self.prelu(F.leaky_relu(F.silu(d) * self.gamma.view(1, -1, 1, 1) - 0.5, 0.1))  # AFFINE: * gamma - 0.5
        d = F.interpolate(self.up(d), size=d.shape[-2:], mode="bilinear")
        lo, hi = (F.max_pool2d(d, 3, 1, 1) + F.avg_pool2d(d, 3, 1, 1, count_include_pad=False)).chunk(2, dim=1)
        d = torch.cat([hi, lo], 1).view(1, 2, 4, 5, 5).transpose(1, 2).contiguous().view(1, 8, 5, 5)
        d = d * torch.sigmoid(F.pad(d, (1, 0, 1, 0)).mean((2, 3), keepdim=True))
        t = d.flatten(2)  # RESHAPE to (1, 8, 25) tokens; TRANSPOSE, MATMUL, SOFTMAX of rank 3
        d = d + (torch.softmax(t.mT @ t, -1) @ t.mT).mT.reshape(d.shape)
        return torch.softmax(self.fc(torch.flatten(d, 1)), -1)


def test_core_ml_lowerings_emit_only_the_mil_ops_they_declare(monkeypatch: pytest.MonkeyPatch) -> None:
    """Builds fp32, W8A8 (iOS 17 and 18) and weight-only programs of a model with every op, recording which MIL
    Builder ops each lowering calls: each must be declared in its LOWERINGS entry (the rest of the program only
    uses PROGRAM_MIL_OPS), and the MIL reference must run the programs."""
    pytest.importorskip("coremltools")
    from mdeploy.calibration.config import QuantRecipe
    from mdeploy.converters.coreml_mil_reference import MilExecutor
    from mdeploy.graph.from_torch import graph_from_torch
    from mdeploy.quantize.ptq import quantize

    ct = coreml_program.import_coremltools()
    import coremltools.converters.mil as mil

    builder = mil.Builder
    current: list[Op | None] = [None]
    emitted: dict[Op | None, set[str]] = {}

    class Recorder:
        def __getattr__(self, name: str) -> Any:
            attr = getattr(builder, name)
            if name in ("program", "TensorSpec") or not callable(attr):
                return attr

            def call(*args: Any, **kwargs: Any) -> Any:
                emitted.setdefault(current[0], set()).add(name)
                return attr(*args, **kwargs)

            return call

    def recording(op: Op, lowering: coreml_program.Lowering) -> coreml_program.Lowering:
        def fn(*args: Any, **kwargs: Any) -> Any:
            current[0] = op
            try:
                return lowering.fn(*args, **kwargs)
            finally:
                current[0] = None

        return coreml_program.Lowering(fn, lowering.mil_ops)

    monkeypatch.setattr(mil, "Builder", Recorder())
    for op, lowering in list(coreml_program.LOWERINGS.items()):
        monkeypatch.setitem(coreml_program.LOWERINGS, op, recording(op, lowering))

    torch.manual_seed(0)
    graph = graph_from_torch(AllOps().eval(), (1, 3, 8, 8))
    assert {n.op for n in graph.nodes} == set(Op), "AllOps must hold every IR op: extend it with the new one"
    calibration = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
    quantized = quantize(graph, calibration, QuantRecipe.stock_minmax())
    variants = [(None, ct.target.iOS17, True), (quantized, ct.target.iOS17, True),
                (quantized, ct.target.iOS18, True), (quantized, ct.target.iOS17, False)]
    for q, opset, activations in variants:
        program = coreml_program.build_program(graph, q, coreml_program.ProgramOptions(opset, None, activations))
        outputs = MilExecutor.from_program(program).run({"input": calibration[:1]})
        assert np.all(np.isfinite(outputs[coreml_program.OUTPUT_NAME]))
        op_types = {o.op_type for o in program.functions["main"].operations} - {"const"}
        # the recorder saw every op of the program (constexpr weights may already be folded into consts)
        assert op_types <= set().union(*emitted.values())

    assert set(emitted) - {None} == set(Op)
    for op in Op:
        assert emitted[op] <= coreml_program.LOWERINGS[op].mil_ops, f"{op.name} emits undeclared MIL ops"
    assert emitted.get(None, set()) <= coreml_program.PROGRAM_MIL_OPS
