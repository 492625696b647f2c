"""Fake-quantised execution of a QuantizedGraph in PyTorch: what an integer runtime computes, up to its
fixed-point requantisation (at most 1 LSB per tensor).

- every tensor in ``qgraph.activations`` (graph input and node outputs) is quantised and dequantised: round half
  to even, saturate to [-128, 127];
- a quantised CONV/LINEAR uses its dequantised int8 weights and its bias rounded to int32 with scale
  input_scale * weight_scale; the fused ReLU/ReLU6 is applied before the output is quantised;
- FLATTEN and PAD outputs carry their input's parameters (so they are exact);
- a node in ``float_nodes`` computes in float with the graph's float weights on its (dequantised) inputs.
"""

from __future__ import annotations

import numpy as np
import torch

from mdeploy.quantize.observe import channels_last, fast_runner
from mdeploy.quantize.params import QuantizedGraph, quantize_bias
from mdeploy.quantize.ranges import fake_quant


def quantized_params(qgraph: QuantizedGraph) -> dict[str, dict[str, torch.Tensor]]:
    """Per quantised CONV/LINEAR: the float weight and bias an integer runtime effectively applies."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, wq in qgraph.weights.items():
        if name in qgraph.float_nodes:
            continue
        node = qgraph.graph.node(name)
        bias = node.bias
        tq = qgraph.activations.get(node.inputs[0])
        if tq is not None:  # else a float input (weight-only studies): the bias stays float
            bias_scale = np.float64(tq.scale) * wq.scale.astype(np.float64)
            bias = (quantize_bias(node.bias, tq.scale, wq.scale).astype(np.float64) * bias_scale).astype(np.float32)
        out[name] = {"weight": torch.from_numpy(wq.dequantize()), "bias": torch.from_numpy(bias)}
    return out


class Simulator:
    """Reusable fake-quant runner of one QuantizedGraph."""

    def __init__(self, qgraph: QuantizedGraph) -> None:
        self.qgraph = qgraph
        self.runner = fast_runner(qgraph.graph)
        for name, params in quantized_params(qgraph).items():
            self.runner.params[name] = {key: channels_last(value) for key, value in params.items()}

    def _hook(self, name: str, value: torch.Tensor) -> torch.Tensor:
        tq = self.qgraph.activations.get(name)
        return value if tq is None else fake_quant(value, tq)

    @torch.no_grad()
    def outputs(self, x: np.ndarray | torch.Tensor, batch: int = 32) -> tuple[np.ndarray, ...]:
        """Every output of the int8 model, dequantised, in the model's order."""
        x = torch.as_tensor(np.asarray(x, dtype=np.float32))
        chunks = [self.runner.outputs(channels_last(x[i : i + batch]), hook=self._hook)
                  for i in range(0, x.shape[0], batch)]
        return tuple(torch.cat(parts).contiguous().numpy() for parts in zip(*chunks, strict=True))

    def __call__(self, x: np.ndarray | torch.Tensor, batch: int = 32) -> np.ndarray:
        """The output of a one-output model."""
        self.qgraph.graph.single_output("the one-output simulation")  # several: call outputs()
        (output,) = self.outputs(x, batch)
        return output


def simulate(qgraph: QuantizedGraph, x: np.ndarray | torch.Tensor, batch: int = 32) -> np.ndarray:
    """Outputs (e.g. logits) of the int8 model on a float32 batch, dequantised."""
    return Simulator(qgraph)(x, batch)


def simulate_outputs(qgraph: QuantizedGraph, x: np.ndarray | torch.Tensor, batch: int = 32) -> tuple[np.ndarray, ...]:
    """Every output of the int8 model on a float32 batch, dequantised, in the model's order."""
    return Simulator(qgraph).outputs(x, batch)
