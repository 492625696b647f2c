"""Mixed precision: the fewest layers kept in float so that the int8 model reaches a target SNR (issue 16's error
budget; ``mdeploy convert --target-snr``).

Which grids cost the most is estimated in one pass, not by converting once per layer. The rounding error e_T of a
tensor T (its activation grid, or a layer's int8 weights at that layer's output) reaches output y as J_T e_T to first
order, and its energy ||J_T e_T||^2 is E_v[(v . J_T e_T)^2] = E_v[(grad_T (v . y) . e_T)^2] for v ~ N(0, I)
(Hutchinson's estimator): one backward pass per random probe v gives the gradient at every tensor at once. Noise
from different tensors is close to independent, so the model's noise is about the sum, and keeping a tensor in float
removes its term.

A unit of float is a tensor's grid: T's producer and every consumer computed in float (``params.float_tensors``:
then T needs no grid, and those layers' weights stay float). Units are taken greedily, the most estimated noise
removed per multiply-accumulate moved to float first (float layers are what int8 was to make fast), until the
estimate reaches the target; then the fake-quantised model is simulated on the same
samples and, while it is short of the target, more units are taken. Those samples are a quarter of the calibration
set held back from the quantiser (``split_calibration``): on the samples it fitted, int8 looks better than it is.
The graph's outputs keep their grids (the int8 artifact's I/O contract), and so does its input unless every target
takes a float input (``QuantRecipe.float_input``): their own rounding is a floor no choice removes, and a target
beyond it is reported as out of reach rather than paid for with every layer in float.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mdeploy.calibration.config import QuantRecipe
from mdeploy.graph.execute import OPS, GraphRunner
from mdeploy.graph.ir import Graph, Node
from mdeploy.metrics import snr_db
from mdeploy.quantize.params import QuantizedGraph, float_tensors
from mdeploy.quantize.ranges import fake_quant
from mdeploy.quantize.simulate import Simulator, quantized_params

PROBES = 8  # random output projections per sample batch: the estimate's relative spread is about sqrt(2 / PROBES)
BATCH = 4
MAX_SAMPLES = 32  # held-back samples the search measures on; with 16 its choice fitted them (V2 aimed at 25 dB:
# 25.9 dB there, 24.6 dB on other photos; with 32: 26.1 and 25.4)
ROUNDS = 3  # searches, each followed by a requantisation around the float layers chosen so far
MARGIN_DB = 0.5  # searched beyond the target: requantised around its float layers, a model moves by about this
STRETCHES = 8  # split_calibration cuts the calibration files in name order into this many, holds back two
UNIT_COST = 0.01  # a unit's fixed cost (its QUANTIZE/DEQUANTIZE), as a share of the model's multiply-accumulates


@dataclass(frozen=True)
class FloatChoice:
    """One unit kept in float: tensor ``tensor`` without a grid, the layers ``nodes`` computing in float."""

    tensor: str
    source: str  # the user's module that makes it
    nodes: tuple[str, ...]
    noise_share: float  # of the full-int8 model's estimated noise (worst output), the part this unit removed


@dataclass(frozen=True)
class MixedPrecision:
    """What the search chose and what it measured on the calibration samples (the manifest records it)."""

    target_snr_db: float
    samples: int
    int8_snr_db: float  # full int8, simulated
    snr_db: float  # with ``choices`` in float, simulated
    choices: tuple[FloatChoice, ...]
    float_macs_share: float  # of the model's multiply-accumulates, the part now in float
    reached: bool
    ceiling_db: float  # estimated with every candidate in float: what the grids that stay allow

    @property
    def float_nodes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(name for choice in self.choices for name in choice.nodes))


def noise_by_tensor(qgraph: QuantizedGraph, samples: np.ndarray, probes: int = PROBES,
                    seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    """Per gridded tensor and per int8 layer (by its output tensor), the noise energy its rounding adds to each
    output, summed over ``samples`` (a (len(outputs),) array each, first-order estimate), and each output's signal
    energy."""
    graph = qgraph.graph
    runner = GraphRunner(graph)
    rounded = quantized_params(qgraph)
    makers = {node.output: node for node in graph.nodes}
    activation_noise: dict[str, np.ndarray] = {}
    weight_noise: dict[str, np.ndarray] = {}
    signal = np.zeros(len(graph.outputs))
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, len(samples), BATCH):
        seen: dict[str, torch.Tensor] = {}
        errors: dict[tuple[str, str], torch.Tensor] = {}  # (kind, tensor) -> its rounding error here

        def hook(name: str, value: torch.Tensor) -> torch.Tensor:
            value = value.detach().requires_grad_(True)  # a leaf: autograd.grad reaches it
            seen[name] = value
            tq = qgraph.activations.get(name)
            if tq is not None:
                errors[("activation", name)] = fake_quant(value.detach(), tq) - value.detach()
            node = makers.get(name)
            if node is not None and node.name in rounded:
                errors[("weight", name)] = _weight_error(node, seen, rounded[node.name], value.detach())
            return value

        values = _run_linked(runner, torch.from_numpy(samples[start:start + BATCH]), hook)
        names = sorted({name for _, name in errors})
        leaves = [seen[name] for name in names]
        for index, output in enumerate(graph.outputs):
            y = values[output]
            signal[index] += float((y.detach().double() ** 2).sum())
            for _ in range(probes):
                probe = torch.randn(y.shape, generator=generator)
                grads = dict(zip(names, torch.autograd.grad((probe * y).sum(), leaves, retain_graph=True,
                                                            allow_unused=True), strict=True))
                for (kind, name), error in errors.items():
                    grad = grads[name]
                    if grad is None:
                        continue
                    energy = float(((grad * error).flatten(1).sum(1).double() ** 2).sum()) / probes
                    into = activation_noise if kind == "activation" else weight_noise
                    into.setdefault(name, np.zeros(len(graph.outputs)))[index] += energy
    return activation_noise, weight_noise, signal


def _run_linked(runner: GraphRunner, x: torch.Tensor, hook: Callable) -> dict[str, torch.Tensor]:
    """The graph with every tensor a leaf the hook made, each node's output computed from those leaves, so that the
    gradient at each tensor is what reaches the outputs through it: the leaves are linked by re-running each node
    on its input leaves."""
    graph = runner.graph
    values: dict[str, torch.Tensor] = {graph.input_name: hook(graph.input_name, x)}
    with torch.enable_grad():
        for node in graph.nodes:
            y = OPS[node.op](node, [values[name] for name in node.inputs], runner.params[node.name])
            leaf = hook(node.output, y)
            # the leaf's value, but with y's history: gradients flow from consumers to the leaf and on through y
            values[node.output] = leaf + (y - y.detach())
    return values


def _weight_error(node: Node, seen: dict[str, torch.Tensor], params: dict[str, torch.Tensor],
                  exact: torch.Tensor) -> torch.Tensor:
    """What the layer's int8 weights (and int32 bias) change in its output, on the same inputs."""
    with torch.no_grad():
        return OPS[node.op](node, [seen[name].detach() for name in node.inputs], params) - exact


def unit(graph: Graph, tensor: str) -> frozenset[str]:
    """The layers that compute in float when ``tensor`` loses its grid: its producer and every consumer."""
    producer = graph.producer(tensor)
    return frozenset([producer.name] if producer else []) | {node.name for node in graph.consumers(tensor)}


def with_float(qgraph: QuantizedGraph, nodes: frozenset[str], float_input: bool = False) -> QuantizedGraph:
    """``qgraph`` with ``nodes`` in float and the grids they make unnecessary dropped (not recalibrated: the search
    simulates with this; the artifacts are quantised again with ``float_nodes``)."""
    floating = float_tensors(qgraph.graph, nodes, float_input)
    return dataclasses.replace(
        qgraph, activations={k: v for k, v in qgraph.activations.items() if k not in floating},
        weights={k: v for k, v in qgraph.weights.items() if k not in nodes}, float_nodes=frozenset(nodes))


def simulated_snr(qgraph: QuantizedGraph, samples: np.ndarray, references: tuple[np.ndarray, ...]) -> float:
    """The worst output's SNR of the fake-quantised model against ``references`` (the float graph's outputs)."""
    outputs = Simulator(qgraph).outputs(samples)
    return min(snr_db(want, got) for want, got in zip(references, outputs, strict=True))


def choose_float(qgraph: QuantizedGraph, samples: np.ndarray, target_snr_db: float,
                 progress: Callable[[str], None] | None = None, margin_db: float = 0.0,
                 float_input: bool = False) -> MixedPrecision:
    """The fewest units (see the module's docstring) to keep in float so that the simulated SNR on ``samples``
    (calibration inputs ``qgraph`` was not fitted to: :func:`split_calibration`) reaches ``target_snr_db``; none
    if even every candidate in float would not, by the estimate (the grids that stay, the outputs' and, unless
    ``float_input``, the input's, are then the floor). Below the target, it aims ``margin_db`` above it."""
    graph = qgraph.graph
    samples = np.ascontiguousarray(samples[:MAX_SAMPLES], dtype=np.float32)
    references = tuple(t.numpy() for t in GraphRunner(graph).outputs(samples))
    full_snr = simulated_snr(qgraph, samples, references)
    activation_noise, weight_noise, signal = noise_by_tensor(qgraph, samples)
    by_node = {graph.producer(name).name: noise for name, noise in weight_noise.items()}  # type: ignore[union-attr]
    total = sum(activation_noise.values(), np.zeros(len(signal))) + sum(by_node.values(), np.zeros(len(signal)))
    worst = int(np.argmin(signal / np.maximum(total, 1e-300)))
    candidates = [name for name in activation_noise
                  if (float_input or name != graph.input_name) and name not in graph.outputs]

    def removed(nodes: frozenset[str]) -> np.ndarray:
        # a tensor already float in ``qgraph`` (an earlier round's choice) has no grid and so no noise to remove
        gone = sum((activation_noise[t] for t in float_tensors(graph, nodes, float_input) if t in activation_noise),
                   np.zeros(len(signal)))
        return gone + sum((by_node.get(n, 0.0) for n in nodes), np.zeros(len(signal)))

    def estimate(nodes: frozenset[str]) -> float:
        left = np.maximum(total - removed(nodes), 1e-300)
        return float(np.min(10 * np.log10(signal / left)))

    macs = layer_macs(graph)
    unit_cost = UNIT_COST * sum(macs.values())

    def cost(added: frozenset[str]) -> float:
        return sum(macs[name] for name in added) + unit_cost

    nodes: frozenset[str] = frozenset()
    chosen: list[tuple[str, frozenset[str]]] = []
    snr, aim = full_snr, target_snr_db + margin_db
    ceiling = estimate(frozenset(name for t in candidates for name in unit(graph, t)))
    if full_snr < target_snr_db and ceiling < target_snr_db and progress is not None:
        stay = "the outputs" if float_input else \
            "the input and outputs; the input can stay float when every target takes a float input: --tflite-io float"
        progress(f"{target_snr_db:g} dB is out of reach: with every layer in float, the grids that must stay "
                 f"({stay}) allow about {ceiling:.1f} dB")
    while full_snr < target_snr_db <= ceiling and snr < aim:
        base = removed(nodes)[worst]
        gains = {t: removed(nodes | unit(graph, t))[worst] - base for t in candidates if not unit(graph, t) <= nodes}
        if not gains or max(gains.values()) <= 0:
            break
        best = max(gains, key=lambda t: gains[t] / cost(unit(graph, t) - nodes))  # noise removed per float MAC
        nodes = nodes | unit(graph, best)
        chosen.append((best, nodes))
        if estimate(nodes) >= aim:  # the estimate says enough: check it on the samples
            snr = simulated_snr(with_float(qgraph, nodes, float_input), samples, references)
            if progress is not None:
                progress(f"{len(chosen)} tensor grid(s) in float: {snr:.1f} dB simulated")
    if chosen and snr < aim:
        snr = simulated_snr(with_float(qgraph, nodes, float_input), samples, references)

    choices, before = [], frozenset[str]()
    for tensor, after in chosen:
        share = (removed(after) - removed(before))[worst] / max(total[worst], 1e-300)
        maker = graph.producer(tensor)
        choices.append(FloatChoice(tensor, maker.source or tensor if maker else "the model's input",
                                   tuple(sorted(after - before)), round(float(share), 4)))
        before = after
    return MixedPrecision(target_snr_db, len(samples), round(full_snr, 2), round(snr, 2), tuple(choices),
                          round(macs_share(macs, nodes), 4), snr >= target_snr_db, round(ceiling, 2))


def layer_macs(graph: Graph) -> dict[str, int]:
    """Multiply-accumulates of each layer: a weighted one's weight size per output position, others 0."""
    def macs(node: Node) -> int:
        if "weight" not in node.params:
            return 0
        shape = graph.shapes.get(node.output, ())
        return int(node.weight.size) * (int(np.prod(shape[2:])) if len(shape) > 2 else 1)

    return {node.name: macs(node) for node in graph.nodes}


def macs_share(macs: dict[str, int], nodes: Collection[str]) -> float:
    """Of the model's multiply-accumulates (``layer_macs``), the share of ``nodes``."""
    total = sum(macs.values())
    return sum(macs[name] for name in nodes) / total if total else 0.0


def split_calibration(calibration: np.ndarray, seed: int = 0,
                      names: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The samples the quantiser fits its grids and weights to, and the ones (at most MAX_SAMPLES) the search
    measures on: fitted samples flatter any int8 model (on MobileNetV2 by 3-5 dB), and a search judged on them keeps
    too few layers in float. Near-duplicates of fitted samples flatter it almost as much (crops of one photo held
    back: 26 dB where other photos gave 23), and they usually sit together in name order (a photo's crops, a clip's
    frames, a class's folder). So with ``names`` (each sample's file), the held-back quarter is whole stretches of
    that order, two of STRETCHES, and the search's samples are spread evenly over them; without names (or with
    fewer files than stretches), a seeded quarter picked one by one."""
    rng = np.random.default_rng(seed)
    if names is None or len(set(names)) < STRETCHES:
        order = rng.permutation(len(calibration))
        held = min(MAX_SAMPLES, max(1, len(calibration) // 4))
        return calibration[np.sort(order[held:])], calibration[np.sort(order[:held])]
    if len(names) != len(calibration):
        raise ValueError(f"{len(names)} names for {len(calibration)} calibration samples")
    stretches = np.array_split(np.argsort(np.asarray(names), kind="stable"), STRETCHES)
    back = set(rng.choice(STRETCHES, STRETCHES // 4, replace=False).tolist())
    fit = np.concatenate([s for i, s in enumerate(stretches) if i not in back])
    held = np.concatenate([s for i, s in enumerate(stretches) if i in back])
    held = held[np.linspace(0, len(held) - 1, min(MAX_SAMPLES, len(held))).round().astype(int)]
    return calibration[np.sort(fit)], calibration[np.sort(held)]


def quantize_to_target(graph: Graph, calibration: np.ndarray, recipe: QuantRecipe,
                       progress: Callable[[int, int, str], None] | None = None,
                       say: Callable[[str], None] | None = None,
                       names: Sequence[str] | None = None) -> QuantizedGraph:
    """``graph`` quantised with ``recipe`` on three quarters of ``calibration`` (``names``: each sample's file, see
    :func:`split_calibration`), then, if it falls short of
    ``recipe.target_snr_db`` on the other quarter, quantised again with the layers :func:`choose_float` picks (on
    that quarter) kept in float; its ``mixed_precision`` says what was chosen and the SNR measured there, full int8
    and mixed. ``progress`` follows the first quantisation (per layer), ``say`` the search."""
    from mdeploy.quantize.ptq import quantize  # ptq does not import this module: no cycle at import time

    assert recipe.target_snr_db is not None
    target = recipe.target_snr_db
    fit, search = split_calibration(calibration, recipe.seed, names)
    model = quantize(graph, fit, recipe, progress)
    seconds = float(model.recipe["seconds"])  # type: ignore[arg-type]
    choices: list[FloatChoice] = []
    snr = first = None
    for _ in range(ROUNDS):  # requantised around its float layers, a model can land a little short: search on
        choice = choose_float(model, search, target, say, MARGIN_DB, recipe.float_input)
        first = first or choice
        if not choice.choices:
            break
        choices += choice.choices
        nodes = tuple(dict.fromkeys(name for c in choices for name in c.nodes))
        model = quantize(graph, fit, dataclasses.replace(recipe, float_nodes=(*recipe.float_nodes, *nodes)))
        seconds += float(model.recipe["seconds"])  # type: ignore[arg-type]
        references = tuple(t.numpy() for t in GraphRunner(model.graph).outputs(search))
        snr = round(simulated_snr(model, search, references), 2)
        if snr >= target:
            break
    assert first is not None
    model.mixed_precision = dataclasses.replace(
        first, target_snr_db=target, choices=tuple(choices), snr_db=first.snr_db if snr is None else snr,
        reached=(first.snr_db if snr is None else snr) >= target,
        float_macs_share=round(macs_share(layer_macs(graph), model.float_nodes), 4))
    model.recipe["seconds"] = round(seconds, 2)  # every quantisation's
    return model
