"""The trained PP-OCRv3 detector's weights: fetched from the RapidOCR wheel, loaded from its ONNX graph.

``ppocr_det_onnx`` downloads ``rapidocr-onnxruntime==1.2.13`` with pip (no dependencies, wheel only), reads
``ch_PP-OCRv3_det_infer.onnx`` out of the wheel, checks its pinned sha256 and caches it (atomic write, reused
afterwards). ``load_onnx_weights`` copies the graph's weights into :class:`~mdeploy.zoo.ppocr_det.PPOCRv3Det`:
the ONNX nodes with weights (Conv, BatchNormalization, ConvTranspose), in graph order, are paired with the torch
modules of the same kinds in the order a forward pass calls them, and every pair must agree on kind, shapes and
attributes (kernel, stride, padding, groups, dilation, eps, presence of a bias), else nothing is kept.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import MdeployError
from .ppocr_det import PPOCRv3Det
from .wheel_assets import WheelAssetError, WheelMember, wheel_member

RAPIDOCR_REQUIREMENT = "rapidocr-onnxruntime==1.2.13"
DET_MEMBER = "rapidocr_onnxruntime/models/ch_PP-OCRv3_det_infer.onnx"
DET_SHA256 = "3439588c030faea393a54515f51e983d8e155b19a2e8aba7891934c1cf0de526"
CACHE_SUBDIR = "ppocr"

_WEIGHTED = {"Conv": nn.Conv2d, "ConvTranspose": nn.ConvTranspose2d, "BatchNormalization": nn.BatchNorm2d}
_PROBE_SIZE = 64  # input side of the forward pass that records the modules' call order (a multiple of 32)


class OnnxWeightsError(MdeployError):
    """The ONNX graph's weights do not fit the torch module."""


class PPOCRAssetError(WheelAssetError):
    """The RapidOCR wheel or its detector model could not be fetched or verified."""


def ppocr_det_onnx(cache_dir: Path | None = None, wheel: Path | None = None) -> Path:
    """Path of the cached, verified ``ch_PP-OCRv3_det_infer.onnx`` under ``cache_dir/ppocr`` (default: the demo
    cache, ``$MDEPLOY_CACHE`` or ``.cache/mdeploy-demo``). The first call downloads the RapidOCR wheel with pip,
    or reads ``wheel`` when given (a local copy of the same wheel)."""
    return ppocr_wheel_member(DET_MEMBER, DET_SHA256, cache_dir, wheel)


def ppocr_wheel_member(member: str, sha256: str, cache_dir: Path | None = None, wheel: Path | None = None) -> Path:
    """Path of the cached, verified wheel ``member`` (pinned to ``sha256``) under ``cache_dir/ppocr``; see
    ``ppocr_det_onnx``."""
    folder = (Path(cache_dir) if cache_dir is not None else _default_cache_dir()) / CACHE_SUBDIR
    return wheel_member(WheelMember(RAPIDOCR_REQUIREMENT, member, sha256), folder, wheel, PPOCRAssetError)


def _default_cache_dir() -> Path:
    """mdeploy.demo_assets' default (a higher layer, so not imported): ``$MDEPLOY_CACHE`` or .cache/mdeploy-demo."""
    configured = os.environ.get("MDEPLOY_CACHE")
    return Path(configured) if configured else Path.cwd() / ".cache" / "mdeploy-demo"


@dataclass(frozen=True)
class LoadedPair:
    onnx_node: str  # e.g. "Conv_47"
    module: str  # e.g. "neck.ins_conv.3.in_conv"
    tensors: tuple[str, ...]  # the ONNX constants copied, e.g. ("conv2d_65.w_0",)


def load_ppocr_det(onnx_path: Path | None = None) -> PPOCRv3Det:
    """The PP-OCRv3 detector with the trained weights of ``onnx_path`` (default: ``ppocr_det_onnx()``), in eval
    mode."""
    model = PPOCRv3Det()
    load_onnx_weights(model, onnx_path if onnx_path is not None else ppocr_det_onnx())
    return model.eval()


def load_onnx_weights(model: nn.Module, onnx_path: Path) -> list[LoadedPair]:
    """Copy the weights of the ONNX graph at ``onnx_path`` into ``model`` (see the module docstring); returns the
    pairs. Raises OnnxWeightsError, leaving ``model`` unchanged, when anything does not match."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    tensors = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tensors[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    nodes = [node for node in graph.node if node.op_type in _WEIGHTED]
    modules = _call_order(model)
    if len(nodes) != len(modules):
        raise OnnxWeightsError(
            f"{Path(onnx_path).name} has {len(nodes)} weighted nodes (Conv/ConvTranspose/BatchNormalization), "
            f"the torch model calls {len(modules)} such modules: not the same architecture"
        )
    updates: dict[str, torch.Tensor] = {}
    pairs = []
    for index, (node, (name, module)) in enumerate(zip(nodes, modules)):
        where = f"weighted node #{index} {node.name} ({node.op_type}) vs module {name} ({type(module).__name__})"
        if type(module) is not _WEIGHTED[node.op_type]:
            raise OnnxWeightsError(f"{where}: different kinds of layer")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "BatchNormalization":
            names = _batch_norm(node, module, attrs, tensors, updates, name, where)
        else:
            names = _conv(node, module, attrs, tensors, producers, consumers, updates, name, where)
        pairs.append(LoadedPair(node.name, name, names))

    state = model.state_dict()
    for key, value in updates.items():
        if state[key].shape != value.shape:  # checked above; a last guard before anything is written
            raise OnnxWeightsError(f"{key}: shape {tuple(value.shape)} != {tuple(state[key].shape)}")
    with torch.no_grad():
        for key, value in updates.items():
            state[key].copy_(value)
    return pairs


def _call_order(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the model's convs, transposed convs and batch norms, in the order its forward calls them."""
    kinds = tuple(_WEIGHTED.values())
    order: list[tuple[str, nn.Module]] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, kinds):
            handles.append(module.register_forward_hook(
                lambda m, args, out, name=name: order.append((name, m))))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, _PROBE_SIZE, _PROBE_SIZE))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    called = [name for name, _ in order]
    repeated = sorted({n for n in called if called.count(n) > 1})
    if repeated:
        raise OnnxWeightsError(f"modules called more than once cannot be paired with graph nodes: {repeated}")
    return order


def _tensor(tensors: dict[str, np.ndarray], name: str, where: str) -> torch.Tensor:
    if name not in tensors:
        raise OnnxWeightsError(f"{where}: input {name!r} is not a constant or initializer")
    array = tensors[name]
    if array.dtype != np.float32:
        raise OnnxWeightsError(f"{where}: {name} is {array.dtype}, expected float32")
    return torch.from_numpy(array.copy())


def _expect(where: str, what: str, onnx_value: object, torch_value: object) -> None:
    if onnx_value != torch_value:
        raise OnnxWeightsError(f"{where}: {what} is {onnx_value} in ONNX, {torch_value} in torch")


def _batch_norm(node, module: nn.BatchNorm2d, attrs: dict, tensors: dict, updates: dict, name: str,
                where: str) -> tuple[str, ...]:
    _expect(where, "epsilon", np.float32(attrs.get("epsilon", 1e-5)), np.float32(module.eps))
    if not module.affine or not module.track_running_stats:
        raise OnnxWeightsError(f"{where}: the torch batch norm needs affine weights and running statistics")
    keys = ("weight", "bias", "running_mean", "running_var")
    for key, input_name in zip(keys, node.input[1:5]):
        value = _tensor(tensors, input_name, where)
        _expect(where, f"{key} ({input_name}) shape", tuple(value.shape), (module.num_features,))
        updates[f"{name}.{key}"] = value
    return tuple(node.input[1:5])


def _conv(node, module: nn.Conv2d | nn.ConvTranspose2d, attrs: dict, tensors: dict, producers: dict,
          consumers: dict, updates: dict, name: str, where: str) -> tuple[str, ...]:
    weight = _tensor(tensors, node.input[1], where)
    _expect(where, "weight shape", tuple(weight.shape), tuple(module.weight.shape))
    _expect(where, "kernel", tuple(attrs.get("kernel_shape", weight.shape[2:])), tuple(module.kernel_size))
    _expect(where, "stride", tuple(attrs.get("strides", (1, 1))), tuple(module.stride))
    _expect(where, "dilation", tuple(attrs.get("dilations", (1, 1))), tuple(module.dilation))
    _expect(where, "groups", attrs.get("group", 1), module.groups)
    pads = tuple(attrs.get("pads", (0, 0, 0, 0)))
    _expect(where, "padding (top, left, bottom, right)", pads, tuple(module.padding) * 2)
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise OnnxWeightsError(f"{where}: auto_pad {attrs['auto_pad']!r} is not supported")
    if isinstance(module, nn.ConvTranspose2d):
        _expect(where, "output_padding", tuple(attrs.get("output_padding", (0, 0))), tuple(module.output_padding))
        if "output_shape" in attrs:
            raise OnnxWeightsError(f"{where}: ConvTranspose with output_shape is not supported")
    updates[f"{name}.weight"] = weight
    names = [node.input[1]]
    bias_name = _bias_name(node, tensors, producers, consumers)
    _expect(where, "bias present", bias_name is not None, module.bias is not None)
    if bias_name is not None:
        bias = _tensor(tensors, bias_name, where)
        _expect(where, f"bias ({bias_name}) size", bias.numel(), module.bias.numel())
        updates[f"{name}.bias"] = bias.reshape(module.bias.shape)
        names.append(bias_name)
    return tuple(names)


def _bias_name(node, tensors: dict, producers: dict, consumers: dict) -> str | None:
    """The conv's bias: its third input, or (as Paddle exports it) a constant reshaped to (1, C, 1, 1) and added
    by the conv's only consumer."""
    if len(node.input) > 2 and node.input[2]:
        return node.input[2]
    users = consumers.get(node.output[0], [])
    if len(users) != 1 or users[0].op_type != "Add":
        return None
    for other in users[0].input:
        reshape = producers.get(other)
        if (other != node.output[0] and reshape is not None and reshape.op_type == "Reshape"
                and reshape.input[0] in tensors and tensors[reshape.input[0]].ndim == 1):
            shape = tensors.get(reshape.input[1])
            channels = tensors[reshape.input[0]].size
            if shape is not None and tuple(shape.tolist()) == (1, channels, 1, 1):
                return reshape.input[0]
    return None
