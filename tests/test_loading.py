"""Loading user models: every format round-trips; unusable or unsafe files give one-line BadInputErrors."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from mdeploy.errors import BadInputError
from mdeploy.loading import LoadedModel, ModelFormat, load_model
from mdeploy.zoo import Arch, ModelConfig, build_model

torch.set_num_threads(1)

CONFIG = ModelConfig(Arch.mobilenet_v3_small, width_mult=0.5, num_classes=10)
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


class Payload:
    """Unpickling this creates ``marker``: stands for any code a malicious pickle would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class SavesInput(nn.Module):
    """A scriptable module that writes a file when run (TorchScript's aten::save)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.save(x, self.path)
        return x


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    m = build_model(CONFIG)
    # Non-trivial BN statistics, so that a wrongly loaded buffer shows in the outputs.
    for bn in (m for m in m.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.1, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
    return m.eval()


@pytest.fixture(scope="module")
def expected(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


@pytest.fixture(scope="module")
def pt2_file(model: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pt2") / "model.pt2"
    torch.export.save(torch.export.export(model, (X,)), path)
    return path


def check_outputs(loaded: LoadedModel, expected: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(X), expected, rtol=0, atol=1e-5)
    assert all(p.dtype == torch.float32 for p in loaded.module.parameters())


def one_line_error(path: Path, **kwargs) -> str:
    with pytest.raises(BadInputError) as err:
        load_model(path, **kwargs)
    message = str(err.value)
    assert "\n" not in message and len(message) < 600
    return message


# ------------------------------------------------------------------------------------------- round trips


def test_state_dict_round_trip(model, expected, tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"  # the extension does not matter
    torch.save(model.state_dict(), path)
    loaded = load_model(path, arch="mobilenet_v3_small")
    assert loaded.format == ModelFormat.state_dict
    assert loaded.config == CONFIG and loaded.name == "mobilenet_v3_small"
    assert loaded.source == path.resolve() and len(loaded.source_sha256) == 64
    assert not loaded.module.training
    check_outputs(loaded, expected)


def test_torchscript_round_trip(model, expected, tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(model, X), path)
    loaded = load_model(path)
    assert (loaded.format, loaded.config, loaded.name) == (ModelFormat.torchscript, None, "scripted")
    check_outputs(loaded, expected)


def test_exported_program_round_trip(pt2_file: Path, expected) -> None:
    loaded = load_model(pt2_file)
    assert (loaded.format, loaded.name) == (ModelFormat.exported_program, "model")
    check_outputs(loaded, expected)
    assert loaded.module.eval() is loaded.module and not loaded.module.training  # callers may call eval()
    with pytest.raises(NotImplementedError):
        loaded.module.train()


def test_exported_program_with_dynamic_batch(model, expected, tmp_path: Path) -> None:
    path = tmp_path / "dynamic.pt2"
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.export.save(torch.export.export(model, (X,), dynamic_shapes=({0: batch},)), path)
    loaded = load_model(path)  # its symbolic shape expressions pass the safety scan
    check_outputs(loaded, expected)
    with torch.no_grad():
        assert loaded.module(torch.randn(5, 3, 64, 64)).shape == (5, 10)


def test_pickled_module_needs_trust(model, expected, tmp_path: Path) -> None:
    path = tmp_path / "full.pt"
    torch.save(model, path)
    message = one_line_error(path)
    assert "pickled Python object" in message and "MobileNetV3Small" in message and "--trust-pickle" in message
    loaded = load_model(path, allow_pickle=True)
    assert loaded.format == ModelFormat.pickled_module
    check_outputs(loaded, expected)
    torch.save({"model": model, "epoch": 3}, path)
    check_outputs(load_model(path, allow_pickle=True), expected)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"state_dict": sd},
        lambda sd: {"model": sd},
        lambda sd: {"model_state_dict": sd, "epoch": 7, "best_acc": 0.9, "optimizer": {"lr": 0.1}},
        lambda sd: {"module." + k: v for k, v in sd.items()},  # DataParallel
        lambda sd: {"model": {"state_dict": {"module." + k: v for k, v in sd.items()}}},
        lambda sd: {k: v.half() for k, v in sd.items()},  # fp16 checkpoints are cast to fp32
    ],
    ids=["state_dict", "model", "model_state_dict", "dataparallel", "nested", "fp16"],
)
def test_state_dict_wrappers(wrap, model, expected, tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(model.state_dict()), path)
    loaded = load_model(path, arch=Arch.mobilenet_v3_small)
    assert loaded.config == CONFIG
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(X), expected, rtol=0, atol=0.05)


def test_legacy_torch_save_format(model, expected, tmp_path: Path) -> None:
    path = tmp_path / "legacy.pt"
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)
    check_outputs(load_model(path, arch="mobilenet_v3_small"), expected)


def test_state_dict_without_arch_suggests_it(model, tmp_path: Path) -> None:
    path = tmp_path / "sd.pt"
    torch.save(model.state_dict(), path)
    message = one_line_error(path)
    assert "needs --arch" in message
    assert "it looks like mobilenet_v3_small (width 0.5, 10 classes): pass --arch mobilenet_v3_small" in message


def test_state_dict_with_wrong_arch_names_the_right_one(model, tmp_path: Path) -> None:
    path = tmp_path / "sd.pt"
    torch.save(model.state_dict(), path)
    message = one_line_error(path, arch="mobilenet_v3_large")
    assert "does not fit mobilenet_v3_large" in message and "pass --arch mobilenet_v3_small" in message
    assert "unknown architecture 'resnet50': pass one of mobilenet_v1" in one_line_error(path, arch="resnet50")


# ---------------------------------------------------------------------------------------- unusable files


def test_missing_empty_and_directory(tmp_path: Path) -> None:
    assert "does not exist" in one_line_error(tmp_path / "nope.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    assert "empty" in one_line_error(tmp_path / "empty.pt")
    assert "not a file" in one_line_error(tmp_path)


def test_truncated_archive(model, tmp_path: Path) -> None:
    good = io.BytesIO()
    torch.save(model.state_dict(), good)
    path = tmp_path / "cut.pt"
    path.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    assert "truncated or corrupt" in one_line_error(path, arch="mobilenet_v3_small")


@pytest.mark.parametrize(
    "content",
    [b"hello world, not a model" * 10, b"\x80\x02garbage", bytes(range(256)) * 4, b"\x1c\x00\x00\x00TFL3" + bytes(64)],
    ids=["text", "pickle-header", "binary", "tflite"],
)
def test_garbage_files(content: bytes, tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    message = one_line_error(path, arch="mobilenet_v2")
    assert str(path) in message


def test_zip_that_is_not_a_model(tmp_path: Path) -> None:
    path = tmp_path / "photos.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("cat.jpg", b"jpeg")
    assert "not a PyTorch model" in one_line_error(path)


@pytest.mark.parametrize("obj", [torch.zeros(3), {}, {"epoch": 3, "lr": 0.1}], ids=["tensor", "empty", "no-weights"])
def test_not_a_model(obj, tmp_path: Path) -> None:
    path = tmp_path / "thing.pt"
    torch.save(obj, path)
    assert "not a model" in one_line_error(path, arch="mobilenet_v2")


def test_nan_weights_name_the_parameter(model, tmp_path: Path) -> None:
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["features.3.block.0.1.weight"][2] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(sd, path)
    assert "features.3.block.0.1.weight" in one_line_error(path, arch="mobilenet_v3_small")
    scripted = torch.jit.trace(model, X)
    with torch.no_grad():
        dict(scripted.named_parameters())["classifier.3.bias"][0] = float("inf")
    torch.jit.save(scripted, path)
    assert "classifier.3.bias" in one_line_error(path)


# ------------------------------------------------------------------------------------------ unsafe files


def test_pickle_payload_never_runs_by_default(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "args": Payload(marker)}, path)
    message = one_line_error(path, arch="mobilenet_v2")
    assert "pickled Python object" in message and "--trust-pickle" in message
    torch.save(Payload(marker), path)
    one_line_error(path)
    assert not marker.exists()


def rewrite_pt2(src: Path, dst: Path, edit) -> None:
    """Copy a .pt2 archive, passing each member's (relative name, bytes) through ``edit``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            zout.writestr(item, edit(item.filename.split("/", 1)[1], zin.read(item.filename)))


def edit_program(change):
    def edit(name: str, data: bytes) -> bytes:
        if name.startswith("models/") and name.endswith(".json"):
            program = json.loads(data)
            change(program)
            return json.dumps(program).encode()
        return data

    return edit


def set_first_target(program: dict, target: str) -> None:
    program["graph_module"]["graph"]["nodes"][0]["target"] = target


def set_first_size(program: dict, expr: str) -> None:
    values = program["graph_module"]["graph"]["tensor_values"]
    next(iter(values.values()))["sizes"][0] = {"as_expr": {"expr_str": expr, "hint": {"as_int": 2}}}


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda p: set_first_target(p, "torch.os.system"), "calls torch.os.system"),
        (lambda p: p.__setitem__("guards_code", ["__import__('os').system('true')"]), "guard code"),
        (lambda p: set_first_size(p, "__import__('os').getcwd() and 2"), "shape expression"),
        (lambda p: set_first_size(p, "eval(chr(49))"), "shape expression"),
    ],
    ids=["call-target", "guards", "sympy-import", "sympy-eval"],
)
def test_pt2_with_code_is_refused(change, reason: str, pt2_file: Path, tmp_path: Path) -> None:
    path = tmp_path / "evil.pt2"
    rewrite_pt2(pt2_file, path, edit_program(change))
    message = one_line_error(path)
    assert reason in message and "--trust-pickle" in message


def test_pt2_pickled_sample_inputs_never_run(pt2_file: Path, tmp_path: Path) -> None:
    # torch.export.load falls back to an unrestricted unpickler for sample inputs: mdeploy must not call it.
    marker = tmp_path / "pwned"
    payload = io.BytesIO()
    torch.save(Payload(marker), payload)
    path = tmp_path / "evil.pt2"
    rewrite_pt2(pt2_file, path, lambda name, data: payload.getvalue() if name.startswith("data/sample_inputs/") else data)
    assert "pickled Python object" in one_line_error(path)
    assert not marker.exists()


def test_torchscript_file_io_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "written"
    path = tmp_path / "saver.pt"
    torch.jit.save(torch.jit.script(SavesInput(str(marker))), path)
    message = one_line_error(path)
    assert "save()" in message and "--trust-pickle" in message
    loaded = load_model(path, allow_pickle=True)  # trusted: loads (and would write when run)
    assert loaded.format == ModelFormat.torchscript and not marker.exists()


def test_pt2_exported_in_training_mode_is_refused(tmp_path: Path) -> None:
    m = build_model(ModelConfig(Arch.mobilenet_v1, 0.25, 4)).train()
    path = tmp_path / "train.pt2"
    torch.export.save(torch.export.export(m, (X,)), path)
    assert "training mode" in one_line_error(path)


def test_real_imagenet_v2_state_dict(real_v2_weights: Path) -> None:
    assert "it looks like mobilenet_v2 (width 1.0, 1000 classes)" in one_line_error(real_v2_weights)
    loaded = load_model(real_v2_weights, arch="mobilenet_v2")
    assert (loaded.name, loaded.config) == ("mobilenet_v2", ModelConfig(Arch.mobilenet_v2, 1.0, 1000))
    assert loaded.source_sha256 == "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
