"""IR rewrites after tracing: activations written out as arithmetic become the ops a native module would give, and
constant affines (AFFINE) merge and fold into the convolution before them where that changes nothing else.

- ``x * sigmoid(x)`` -> SILU; ``x * hardsigmoid(x)`` -> HARDSWISH;
- ``relu6(x + 3) / 6`` (any of relu6 / clamp(0, 6) / hardtanh(0, 6), ``/ 6`` or ``* (1/6)``) -> HARDSIGMOID;
- ``x * relu6(x + 3) / 6`` -> HARDSWISH;
- AFFINE after AFFINE -> one AFFINE; AFFINE after a CONV/LINEAR (no fused activation, nothing else reading it)
  -> folded into its weights and bias, after which a ReLU/ReLU6 reading it fuses as the tracer's would; the same
  through RESHAPE/TRANSPOSE nodes for one scale and shift on every channel (attention's ``q * scale``); an AFFINE
  that computes ``x`` disappears.

Each rewrite needs the inner tensors to be read by the pattern only (not by another node, not a model output), so
the result computes the same function. The rewritten node keeps the name of the pattern's last node.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from mdeploy.graph.ir import WEIGHTED_OPS, Activation, ClipAttrs, Node, Op

SIXTH = 1.0 / 6.0


def simplify(nodes: list[Node], outputs: tuple[str, ...]) -> tuple[list[Node], tuple[str, ...]]:
    """The rewritten node list and model outputs (a folded AFFINE's output is renamed to its convolution's)."""
    rw = _Rewriter(list(nodes), outputs)
    while rw.patterns():
        pass
    rw.affines()
    return rw.nodes, rw.outputs


def _affine_is(node: Node | None, scale: float, shift: float) -> bool:
    return (node is not None and node.op is Op.AFFINE and np.allclose(node.params["scale"], scale, rtol=1e-5, atol=0)
            and np.allclose(node.params["shift"], shift, rtol=0, atol=1e-6 + 1e-5 * abs(shift)))


def _is_relu6(node: Node | None) -> bool:
    return (node is not None and node.op is Op.CLIP and isinstance(node.attrs, ClipAttrs)
            and (node.attrs.min, node.attrs.max) == (0.0, 6.0))


class _Rewriter:
    def __init__(self, nodes: list[Node], outputs: tuple[str, ...]) -> None:
        self.nodes, self.outputs = nodes, outputs

    def users(self) -> Counter[str]:
        return Counter([name for n in self.nodes for name in n.inputs] + list(self.outputs))

    def sole(self, tensor: str, *ops: Op) -> Node | None:
        """The node of kind ``ops`` making ``tensor`` if only one node reads it and it is no model output."""
        node = next((n for n in self.nodes if n.output == tensor), None)
        return node if node is not None and node.op in ops and self.users()[tensor] == 1 else None

    def replace(self, node: Node, op: Op, x: str, removed: list[Node]) -> None:
        node.op, node.inputs, node.attrs, node.params = op, [x], None, {}
        for dead in removed:
            self.nodes.remove(dead)

    def rename(self, old: str, new: str) -> None:
        for n in self.nodes:
            n.inputs = [new if name == old else name for name in n.inputs]
        self.outputs = tuple(new if name == old else name for name in self.outputs)

    # -- activations written out -----------------------------------------------------------------------------------
    def patterns(self) -> bool:
        for node in list(self.nodes):
            if node.op is Op.MUL and self._gated(node):
                return True
            if _affine_is(node, SIXTH, 0.0) and self._hard_sigmoid_or_swish(node):
                return True
        return False

    def _gated(self, node: Node) -> bool:
        """MUL(x, sigmoid(x)) -> SILU(x), MUL(x, hardsigmoid(x)) -> HARDSWISH(x) (either operand order)."""
        for x, g in (node.inputs, node.inputs[::-1]):
            gate = self.sole(g, Op.SIGMOID, Op.HARDSIGMOID)
            if gate is not None and gate.inputs == [x]:
                self.replace(node, Op.SILU if gate.op is Op.SIGMOID else Op.HARDSWISH, x, [gate])
                return True
        return False

    def _relu6_of_x_plus_3(self, tensor: str) -> tuple[str, list[Node]] | None:
        clip = self.sole(tensor, Op.CLIP)
        plus3 = self.sole(clip.inputs[0], Op.AFFINE) if _is_relu6(clip) else None
        if clip is None or plus3 is None or not _affine_is(plus3, 1.0, 3.0):
            return None
        return plus3.inputs[0], [clip, plus3]

    def _hard_sigmoid_or_swish(self, node: Node) -> bool:
        """AFFINE(/6) of relu6(x + 3) -> HARDSIGMOID(x); of x * relu6(x + 3) -> HARDSWISH(x)."""
        found = self._relu6_of_x_plus_3(node.inputs[0])
        if found is not None:
            self.replace(node, Op.HARDSIGMOID, found[0], found[1])
            return True
        product = self.sole(node.inputs[0], Op.MUL)
        for x, g in (product.inputs, product.inputs[::-1]) if product is not None else ():
            found = self._relu6_of_x_plus_3(g)
            if found is not None and found[0] == x:
                self.replace(node, Op.HARDSWISH, x, [product, *found[1]])
                return True
        return False

    # -- constant affines ------------------------------------------------------------------------------------------
    def affines(self) -> None:
        for node in [n for n in self.nodes if n.op is Op.AFFINE]:
            scale, shift = node.params["scale"].astype(np.float64), node.params["shift"].astype(np.float64)
            inner = self.sole(node.inputs[0], Op.AFFINE)
            if inner is not None:  # (x * a + b) * scale + shift
                scale, shift = inner.params["scale"] * scale, inner.params["shift"] * scale + shift
                node.params = {"scale": scale.astype(np.float32), "shift": shift.astype(np.float32)}
                node.inputs = list(inner.inputs)
                self.nodes.remove(inner)
            layer = self.sole(node.inputs[0], *WEIGHTED_OPS)
            moved = self._layer_before_moves(node)
            if layer is not None and layer.activation is Activation.NONE:
                self._fold(layer, node, scale, shift)
            elif moved is not None:  # the same scale and shift everywhere: they commute with moving values
                channels = moved.params["bias"].shape[0]
                self._fold(moved, node, np.full(channels, scale[0]), np.full(channels, shift[0]), node.inputs[0])
            elif _affine_is(node, 1.0, 0.0) and node.output not in self.outputs:
                self.nodes.remove(node)
                self.rename(node.output, node.inputs[0])

    def _layer_before_moves(self, node: Node) -> Node | None:
        """For an AFFINE with one scale and one shift for every channel (``q * scale`` in attention): the CONV/LINEAR
        (no activation) whose output reaches it through RESHAPE/TRANSPOSE nodes only, each read by the next alone."""
        scale, shift = node.params["scale"], node.params["shift"]
        if np.any(scale != scale[0]) or np.any(shift != shift[0]):
            return None
        tensor, moves = node.inputs[0], 0
        while (mover := self.sole(tensor, Op.RESHAPE, Op.TRANSPOSE)) is not None:
            tensor, moves = mover.inputs[0], moves + 1
        layer = self.sole(tensor, *WEIGHTED_OPS) if moves else None
        return layer if layer is not None and layer.activation is Activation.NONE else None

    def _fold(self, layer: Node, node: Node, scale: np.ndarray, shift: np.ndarray, result: str | None = None) -> None:
        """``layer`` computes ``node``'s output (as a BatchNorm after a convolution folds), or ``result`` does (the
        last move of ``_layer_before_moves``); then a ReLU/ReLU6 that alone reads the layer's output fuses into it."""
        w = layer.params["weight"].astype(np.float64)
        layer.params["weight"] = (w * scale.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.float32)
        layer.params["bias"] = (layer.params["bias"].astype(np.float64) * scale + shift).astype(np.float32)
        self.nodes.remove(node)
        self.rename(node.output, result or layer.output)
        users = self.users()
        act = next((n for n in self.nodes if layer.output in n.inputs), None)
        if act is None or users[layer.output] != 1:
            return
        if act.op is Op.RELU or _is_relu6(act):
            layer.activation = Activation.RELU if act.op is Op.RELU else Activation.RELU6
            self.nodes.remove(act)
            self.rename(act.output, layer.output)
