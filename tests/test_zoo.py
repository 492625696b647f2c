"""The model zoo: torchvision-identical layouts, width/class inference, exportability."""

from __future__ import annotations

import hashlib

import pytest
import torch

from mdeploy.errors import BadInputError
from mdeploy.zoo import Arch, ModelConfig, build_model, guess_arch, infer_config
from mdeploy.zoo.layers import make_divisible

torch.set_num_threads(1)

ARCHS = list(Arch)

# Published parameter counts: torchvision's model metadata for V2/V3; V1 is the paper's 4.2M (1000 classes).
PARAMS = {
    Arch.mobilenet_v1: 4_231_976,
    Arch.mobilenet_v2: 3_504_872,
    Arch.mobilenet_v3_small: 2_542_856,
    Arch.mobilenet_v3_large: 5_483_032,
}

# State-dict size and sha256 (first 16 hex digits) of the "key:shape" lines at width 1.0, 1000 classes. For V2
# and V3 these were computed from torchvision's own mobilenetv2.py / mobilenetv3.py (whose models also gave
# bit-identical outputs with the same weights at widths 0.35-2.0); V1 pins our paper layout against drift.
LAYOUT = {
    Arch.mobilenet_v1: (164, "221c966cb2c8c5b8"),
    Arch.mobilenet_v2: (314, "2a375ead3e9604e1"),
    Arch.mobilenet_v3_small: (244, "45e84af7b7bba021"),
    Arch.mobilenet_v3_large: (312, "9cb349b03a916ada"),
}

# A few keys and shapes, as in torchvision's checkpoints, readable at a glance.
KEYS = {
    Arch.mobilenet_v1: {
        "features.0.0.weight": (32, 3, 3, 3),
        "features.1.dw.0.weight": (32, 1, 3, 3),
        "features.1.pw.0.weight": (64, 32, 1, 1),
        "features.13.pw.1.running_var": (1024,),
        "classifier.1.weight": (1000, 1024),
    },
    Arch.mobilenet_v2: {
        "features.0.0.weight": (32, 3, 3, 3),
        "features.0.1.num_batches_tracked": (),
        "features.1.conv.0.0.weight": (32, 1, 3, 3),
        "features.1.conv.1.weight": (16, 32, 1, 1),
        "features.2.conv.0.0.weight": (96, 16, 1, 1),
        "features.17.conv.2.weight": (320, 960, 1, 1),
        "features.18.0.weight": (1280, 320, 1, 1),
        "classifier.1.weight": (1000, 1280),
    },
    Arch.mobilenet_v3_small: {
        "features.0.0.weight": (16, 3, 3, 3),
        "features.1.block.0.0.weight": (16, 1, 3, 3),
        "features.1.block.1.fc1.weight": (8, 16, 1, 1),
        "features.1.block.1.fc2.bias": (16,),
        "features.1.block.2.0.weight": (16, 16, 1, 1),
        "features.12.0.weight": (576, 96, 1, 1),
        "classifier.0.weight": (1024, 576),
        "classifier.3.weight": (1000, 1024),
    },
    Arch.mobilenet_v3_large: {
        "features.1.block.0.0.weight": (16, 1, 3, 3),
        "features.2.block.0.0.weight": (64, 16, 1, 1),
        "features.4.block.2.fc1.weight": (24, 72, 1, 1),
        "features.16.0.weight": (960, 160, 1, 1),
        "classifier.0.weight": (1280, 960),
        "classifier.3.weight": (1000, 1280),
    },
}


def meta_state_dict(config: ModelConfig) -> dict[str, torch.Tensor]:
    """A state dict with the right keys and shapes and no data (fast for any width)."""
    with torch.device("meta"):
        return build_model(config).state_dict()


def layout_digest(state_dict: dict[str, torch.Tensor]) -> str:
    lines = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in state_dict.items())
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


@pytest.mark.parametrize("arch", ARCHS)
def test_param_count_matches_published(arch: Arch) -> None:
    model = build_model(ModelConfig(arch))
    assert sum(p.numel() for p in model.parameters()) == PARAMS[arch]
    assert not model.training


@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_layout_matches_torchvision(arch: Arch) -> None:
    sd = meta_state_dict(ModelConfig(arch))
    for key, shape in KEYS[arch].items():
        assert tuple(sd[key].shape) == shape, key
    assert (len(sd), layout_digest(sd)) == LAYOUT[arch]


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_norm_hyperparameters(arch: Arch) -> None:
    eps, momentum = (0.001, 0.01) if arch.value.startswith("mobilenet_v3") else (1e-5, 0.1)
    bns = [m for m in build_model(ModelConfig(arch, 0.5, 10)).modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all((m.eps, m.momentum) == (eps, momentum) for m in bns)


def test_v1_follows_the_paper() -> None:
    model = build_model(ModelConfig(Arch.mobilenet_v1))
    blocks = list(model.features)[1:]
    assert len(blocks) == 13
    assert [b.pw[0].out_channels for b in blocks] == [64, 128, 128, 256, 256] + [512] * 6 + [1024, 1024]
    assert [b.dw[0].stride[0] for b in blocks] == [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1]
    assert all(isinstance(b.dw[2], torch.nn.ReLU) and isinstance(b.pw[2], torch.nn.ReLU) for b in blocks)
    half = meta_state_dict(ModelConfig(Arch.mobilenet_v1, 0.5))
    assert half["features.0.0.weight"].shape[0] == 16 and half["classifier.1.weight"].shape == (1000, 512)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_make_divisible() -> None:
    assert [make_divisible(v, 8) for v in (32, 33.6, 16 * 0.35, 1280 * 1.4, 18, 3)] == [32, 32, 8, 1792, 24, 8]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("width", [0.5, 0.75, 1.0, 1.4])
def test_infer_config_recovers_width_and_classes(arch: Arch, width: float) -> None:
    for classes in (10, 1000):
        config = infer_config(arch, meta_state_dict(ModelConfig(arch, width, classes)))
        assert (config.arch, config.width_mult, config.num_classes) == (arch, width, classes)
        assert guess_arch(meta_state_dict(ModelConfig(arch, width, classes))) == config


def test_infer_config_accepts_arch_names_and_missing_bn_counters() -> None:
    sd = meta_state_dict(ModelConfig(Arch.mobilenet_v2, 0.35, 5))
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert infer_config("mobilenet_v2", sd) == ModelConfig(Arch.mobilenet_v2, 0.35, 5)


def test_wrong_arch_names_the_right_one() -> None:
    sd = meta_state_dict(ModelConfig(Arch.mobilenet_v3_small, 1.0, 10))
    with pytest.raises(BadInputError) as err:
        infer_config(Arch.mobilenet_v2, sd)
    msg = str(err.value)
    assert "missing keys" in msg and "unexpected keys" in msg and "features.1.block.0.0.weight" in msg
    assert "it looks like mobilenet_v3_small (width 1.0, 10 classes): pass --arch mobilenet_v3_small" in msg
    assert "\n" not in msg


def test_unknown_state_dict_lists_keys_and_the_fix() -> None:
    sd = {"backbone.conv1.weight": torch.zeros(8, 3, 3, 3), "head.weight": torch.zeros(2, 8)}
    assert guess_arch(sd) is None
    with pytest.raises(BadInputError, match=r"does not fit mobilenet_v1: \d+ missing keys .*2 unexpected keys"):
        infer_config("mobilenet_v1", sd)
    with pytest.raises(BadInputError, match="--arch"):
        infer_config("mobilenet_v1", sd)


def test_shapes_that_fit_no_width_are_explained() -> None:
    sd = meta_state_dict(ModelConfig(Arch.mobilenet_v2, 1.0, 10))
    sd["features.18.0.weight"] = torch.empty(1280, 328, 1, 1, device="meta")
    with pytest.raises(BadInputError, match=r"shapes fit no width .*features\.18\.0\.weight is \(1280, 328, 1, 1\)"):
        infer_config(Arch.mobilenet_v2, sd)


def test_bad_configs_are_bad_input() -> None:
    with pytest.raises(BadInputError, match="mobilenet_v1, mobilenet_v2"):
        ModelConfig("resnet50")  # type: ignore[arg-type]
    with pytest.raises(BadInputError):
        ModelConfig(Arch.mobilenet_v2, width_mult=0.0)
    with pytest.raises(BadInputError):
        ModelConfig(Arch.mobilenet_v2, num_classes=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_torch_export_at_160_and_224(arch: Arch) -> None:
    model = build_model(ModelConfig(arch, 0.5, 10))
    for size in (160, 224):
        x = torch.randn(1, 3, size, size)
        program = torch.export.export(model, (x,))
        with torch.no_grad():
            expected = model(x)
            assert expected.shape == (1, 10)
            torch.testing.assert_close(program.module()(x), expected, rtol=0, atol=1e-6)


def test_real_imagenet_v2_weights_load_strictly(real_v2_weights) -> None:
    sd = torch.load(real_v2_weights, map_location="cpu", weights_only=True)
    config = infer_config(Arch.mobilenet_v2, sd)
    assert config == ModelConfig(Arch.mobilenet_v2, 1.0, 1000)
    assert guess_arch(sd) == config
    model = build_model(config)
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 224, 224))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
