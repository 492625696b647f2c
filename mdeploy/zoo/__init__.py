"""The MobileNet zoo: architectures, their configs, and inference of a config from a state dict.

V2 and V3 state dicts are key-for-key and shape-for-shape identical to torchvision's, so torchvision
checkpoints (and models fine-tuned from them) load strictly. V1 follows the paper's layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from ..errors import BadInputError
from .layers import make_divisible
from .mobilenet_v1 import MobileNetV1
from .mobilenet_v2 import MobileNetV2
from .mobilenet_v3 import MobileNetV3Large, MobileNetV3Small

__all__ = [
    "Arch",
    "ModelConfig",
    "build_model",
    "infer_config",
    "guess_arch",
    "WIDTH_CANDIDATES",
    "MobileNetV1",
    "MobileNetV2",
    "MobileNetV3Large",
    "MobileNetV3Small",
]


class Arch(str, Enum):
    mobilenet_v1 = "mobilenet_v1"
    mobilenet_v2 = "mobilenet_v2"
    mobilenet_v3_small = "mobilenet_v3_small"
    mobilenet_v3_large = "mobilenet_v3_large"

    def __str__(self) -> str:
        return self.value


_CLASSES: dict[Arch, type[nn.Module]] = {
    Arch.mobilenet_v1: MobileNetV1,
    Arch.mobilenet_v2: MobileNetV2,
    Arch.mobilenet_v3_small: MobileNetV3Small,
    Arch.mobilenet_v3_large: MobileNetV3Large,
}
# Channels of the stem conv before the width multiplier (a cheap first filter of width candidates).
_STEM = {Arch.mobilenet_v1: 32, Arch.mobilenet_v2: 32, Arch.mobilenet_v3_small: 16, Arch.mobilenet_v3_large: 16}
# The classifier's last linear layer, whose rows are the classes.
_HEAD = {
    Arch.mobilenet_v1: "classifier.1",
    Arch.mobilenet_v2: "classifier.1",
    Arch.mobilenet_v3_small: "classifier.3",
    Arch.mobilenet_v3_large: "classifier.3",
}
_STEM_KEY = "features.0.0.weight"

# Published widths first (so that they win when two widths give identical shapes), then a 0.05 grid.
_PUBLISHED = (1.0, 0.75, 0.5, 0.35, 0.25, 1.4, 1.3, 1.25, 1.5, 2.0)
WIDTH_CANDIDATES: tuple[float, ...] = tuple(
    dict.fromkeys(_PUBLISHED + tuple(round(0.25 + 0.05 * i, 2) for i in range(36)))
)


def parse_arch(arch: Arch | str) -> Arch:
    """``Arch`` from its name; BadInputError listing the valid names otherwise."""
    if isinstance(arch, Arch):
        return arch
    try:
        return Arch(str(arch).strip().lower().replace("-", "_"))
    except ValueError:
        names = ", ".join(a.value for a in Arch)
        raise BadInputError(f"unknown architecture {arch!r}: pass one of {names}") from None


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a zoo model (dropout does not change the weights or inference)."""

    arch: Arch
    width_mult: float = 1.0
    num_classes: int = 1000
    dropout: float = 0.2

    def __post_init__(self) -> None:
        object.__setattr__(self, "arch", parse_arch(self.arch))
        if not 0.05 <= float(self.width_mult) <= 4.0:
            raise BadInputError(f"width multiplier {self.width_mult} is out of range: use a value in 0.05-4.0")
        if int(self.num_classes) != self.num_classes or self.num_classes < 1:
            raise BadInputError(f"class count {self.num_classes} is invalid: use a positive integer")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise BadInputError(f"dropout {self.dropout} is invalid: use a probability in [0, 1)")

    def describe(self) -> str:
        return f"{self.arch.value} (width {float(self.width_mult)}, {self.num_classes} classes)"


def build_model(config: ModelConfig) -> nn.Module:
    """A freshly initialised zoo model in eval mode."""
    cls = _CLASSES[config.arch]
    model = cls(width_mult=config.width_mult, num_classes=config.num_classes, dropout=config.dropout)
    return model.eval()


@lru_cache(maxsize=512)
def _expected_shapes(arch: Arch, width: float) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the state dict of ``arch`` at ``width`` with one class (built on the meta device)."""
    with torch.device("meta"):
        model = _CLASSES[arch](width_mult=width, num_classes=1)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _optional(key: str) -> bool:
    # Checkpoints saved before PyTorch 0.4.1 have no BN counters; load_state_dict fills them in.
    return key.endswith("num_batches_tracked")


def _num_classes(arch: Arch, sd: Mapping[str, Any]) -> int | None:
    weight = sd.get(_HEAD[arch] + ".weight")
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] >= 1:
        return int(weight.shape[0])
    return None


def _diff(
    arch: Arch, width: float, num_classes: int, sd: Mapping[str, Any]
) -> tuple[list[str], list[str], list[str]]:
    """(missing keys, unexpected keys, shape mismatches as text) of ``sd`` against one config."""
    expected = dict(_expected_shapes(arch, width))
    head = _HEAD[arch]
    expected[head + ".weight"] = (num_classes, expected[head + ".weight"][1])
    expected[head + ".bias"] = (num_classes,)
    missing = [k for k in expected if k not in sd and not _optional(k)]
    unexpected = [k for k in sd if k not in expected]
    shapes = []
    for key, shape in expected.items():
        value = sd.get(key)
        if isinstance(value, torch.Tensor) and tuple(value.shape) != shape:
            shapes.append(f"{key} is {tuple(value.shape)}, expected {shape}")
    return missing, unexpected, shapes


def _match(arch: Arch, sd: Mapping[str, Any]) -> ModelConfig | None:
    num_classes = _num_classes(arch, sd)
    stem = sd.get(_STEM_KEY)
    if num_classes is None or not isinstance(stem, torch.Tensor) or stem.dim() != 4:
        return None
    for width in WIDTH_CANDIDATES:
        if make_divisible(_STEM[arch] * width, 8) != stem.shape[0]:
            continue
        if _diff(arch, width, num_classes, sd) == ([], [], []):
            return ModelConfig(arch, width, num_classes)
    return None


def guess_arch(state_dict: Mapping[str, Any]) -> ModelConfig | None:
    """The first zoo config whose every key and shape matches ``state_dict``, or None."""
    for arch in Arch:
        config = _match(arch, state_dict)
        if config is not None:
            return config
    return None


def _first(names: list[str], n: int = 3) -> str:
    more = ", ..." if len(names) > n else ""
    return ", ".join(names[:n]) + more


def infer_config(arch: Arch | str, state_dict: Mapping[str, Any]) -> ModelConfig:
    """Width multiplier and class count of ``arch`` that fit every key and shape of ``state_dict``.

    Raises BadInputError naming missing/unexpected keys or mismatched shapes, and the architecture the state
    dict does fit, if any.
    """
    arch = parse_arch(arch)
    config = _match(arch, state_dict)
    if config is not None:
        return config

    # Explain against the closest width: the one whose stem matches, else 1.0.
    stem = state_dict.get(_STEM_KEY)
    width = 1.0
    if isinstance(stem, torch.Tensor) and stem.dim() == 4:
        width = next((w for w in WIDTH_CANDIDATES if make_divisible(_STEM[arch] * w, 8) == stem.shape[0]), 1.0)
    num_classes = _num_classes(arch, state_dict) or 1000
    missing, unexpected, shapes = _diff(arch, width, num_classes, state_dict)
    if missing or unexpected:
        problem = (
            f"the state dict does not fit {arch.value}: {len(missing)} missing keys"
            + (f" ({_first(missing)})" if missing else "")
            + f", {len(unexpected)} unexpected keys"
            + (f" ({_first(unexpected)})" if unexpected else "")
        )
    else:
        problem = (
            f"the state dict has the keys of {arch.value} but its shapes fit no width multiplier in "
            f"0.25-2.0 ({len(shapes)} differ from width {width:g}: {_first(shapes, 2)})"
        )
    other = guess_arch(state_dict)
    if other is not None and other.arch != arch:
        fix = f"it looks like {other.describe()}: pass --arch {other.arch.value}"
    else:
        fix = (
            "pass the --arch it was trained as (one of " + ", ".join(a.value for a in Arch) + "), or, for a "
            "model outside the zoo, give a TorchScript or torch.export (.pt2) file instead of a state dict"
        )
    raise BadInputError(f"{problem}; {fix}")
