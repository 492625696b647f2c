"""Load a user's ``model.pt`` safely: state dict, TorchScript, ExportedProgram (.pt2) or (opt-in) pickled module.

The format is found from the file's content, never its extension. By default nothing in the file can run
code: state dicts go through ``torch.load(weights_only=True)``; TorchScript and ExportedProgram archives are
scanned first for the few features through which PyTorch's own loaders run code (pickled payloads, file I/O
ops, Python expressions evaluated at load time, arbitrary Python call targets) and refused if they use them.
``allow_pickle=True`` (the CLI's ``--trust-pickle``) lifts these limits for files the user trusts.
"""

from __future__ import annotations

import pickle
import re
import types
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import BadInputError, captured_logs, first_line, logged_cause
from .graph.programs import BatchedProgram, batched_program, unwrap_module
from .model_archive import SAVE_FIX, check_records, pt2_code_risk, sniff_format
from .paths import sha256_file
from .zoo import Arch, ModelConfig, build_model, guess_arch, infer_config, parse_arch

__all__ = ["ModelFormat", "LoadedModel", "load_model"]

TRUST_FLAG = "--trust-pickle"
# Keys under which training scripts commonly nest the weights (checked in this order).
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module", "ema", "model_ema")
# Prefixes added by DataParallel/DistributedDataParallel and torch.compile.
STRIP_PREFIXES = ("module.", "_orig_mod.")


class ModelFormat(str, Enum):
    state_dict = "state_dict"
    torchscript = "torchscript"
    exported_program = "exported_program"
    pickled_module = "pickled_module"

    def __str__(self) -> str:
        return self.value


@dataclass
class LoadedModel:
    module: nn.Module  # eval mode, float32
    format: ModelFormat
    source: Path
    source_sha256: str
    config: ModelConfig | None  # set for state dicts (the zoo model they were loaded into)
    name: str  # the architecture for state dicts, else the file's stem


def load_model(path: str | Path, arch: Arch | str | None = None, allow_pickle: bool = False) -> LoadedModel:
    """Load ``path`` as an eval-mode float32 module; BadInputError with a fix for anything unusable."""
    path = Path(path)
    _check_file(path)
    sha256 = sha256_file(path)
    kind = sniff_format(path)
    config: ModelConfig | None = None
    name = path.stem
    if kind in ("torchscript", "torch_zip"):
        check_records(path)
    if kind == "torchscript":
        fmt = ModelFormat.torchscript
        module = _load_torchscript(path, allow_pickle)
    elif kind == "exported_program":
        fmt = ModelFormat.exported_program
        module = _load_exported(path, allow_pickle)
    else:
        obj = _torch_load(path, allow_pickle)
        found = _find_module(obj) if allow_pickle else None
        if found is not None:
            fmt, module = ModelFormat.pickled_module, unwrap_module(found)  # torch.compile, DataParallel
        else:
            fmt = ModelFormat.state_dict
            state_dict = _as_state_dict(obj, path)
            module, config = _load_state_dict(state_dict, arch, path)
            name = config.arch.value
    try:
        module = module.float()
    except Exception:  # noqa: BLE001 - some archives cannot be cast; the finite check below still runs
        pass
    module = module.eval()
    _check_finite(dict(_all_tensors(module)), path)
    return LoadedModel(module, fmt, path.resolve(), sha256, config, name)


def _all_tensors(module: nn.Module) -> list[tuple[str, Any]]:
    """Parameters, buffers and plain tensor attributes (an ExportedProgram's lifted constants) of every submodule."""
    if isinstance(module, BatchedProgram):
        module = module.program  # its tensors under their own names
    found: dict[int, tuple[str, Any]] = {}
    try:
        items = list(module.state_dict(keep_vars=True).items())
    except Exception:  # noqa: BLE001
        items = []
    for prefix, sub in module.named_modules():
        for attr, value in list(vars(sub).items()):
            if isinstance(value, torch.Tensor):
                items.append((f"{prefix}.{attr}" if prefix else attr, value))
    for name, value in items:
        found.setdefault(id(value), (name, value))
    return list(found.values())


# ---------------------------------------------------------------------------------------------------- files


def _check_file(path: Path) -> None:
    if not path.exists():
        raise BadInputError(f"model file {path} does not exist: check the path")
    if not path.is_file():
        raise BadInputError(f"{path} is not a file: pass the model file itself (.pt, .pth or .pt2)")
    if path.stat().st_size == 0:
        raise BadInputError(f"model file {path} is empty (0 bytes): save the model again")
    try:
        with path.open("rb"):
            pass
    except OSError as err:
        raise BadInputError(f"cannot read model file {path} ({err.strerror}): check its permissions") from None


# ------------------------------------------------------------------------------------ torch.save payloads


def _torch_load(path: Path, allow_pickle: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        message = str(err)
        if "Weights only load failed" not in message or not _refused_object(message):
            raise _not_torch(path, err) from None  # a damaged pickle stream, not a Python object
        if not allow_pickle:
            found = re.search(r"GLOBAL ([\w.]+)", message)
            what = f" ({found.group(1)})" if found else ""
            raise BadInputError(
                f"{path} holds a pickled Python object{what}, which mdeploy does not unpickle by default "
                f"because that runs code from the file: {SAVE_FIX}, or pass {TRUST_FLAG} if you trust the file"
            ) from None
    except Exception as err:  # noqa: BLE001 - every torch.load failure here means an unusable file
        raise _not_torch(path, err) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001
        raise BadInputError(
            f"could not unpickle {path} ({type(err).__name__}: {first_line(err)}): load it in the Python "
            f"environment that saved it and {SAVE_FIX}"
        ) from None


def _refused_object(message: str) -> bool:
    """Whether torch's weights-only unpickler refused a Python object (a class or function the file names), as
    opposed to failing on bytes that are no valid pickle at all ("Unsupported operand 95", ...)."""
    cause = message.split("WeightsUnpickler error:", 1)[-1]
    return bool(re.search(r"GLOBAL|allowlisted|add_safe_globals|call reduce|new object|Can only build", cause))


def _torch_reason(err: BaseException) -> str:
    """The useful part of a torch.load error: torch wraps its cause in paragraphs of advice."""
    text = str(err)
    found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if found:
        text = found.group(1)
    text = re.split(r"\. This is an internal miniz error|\. The file might be corrupted| Please use `torch", text)[0]
    lines = text.strip().splitlines()
    return lines[0][:200] if lines else first_line(err)


def _not_torch(path: Path, err: BaseException) -> BadInputError:
    return BadInputError(
        f"{path} is not a PyTorch model file, or is damaged (torch.load failed with {type(err).__name__}: "
        f"{_torch_reason(err)}): copy it again, or {SAVE_FIX}"
    )


def _find_module(obj: Any) -> nn.Module | None:
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), nn.Module):
                return obj[key]
    return None


def _is_tensor_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _as_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(4):  # wrappers may nest, e.g. {"model": {"state_dict": ...}}
        if _is_tensor_dict(obj) or not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not _is_tensor_dict(obj):
        if isinstance(obj, Mapping):
            keys = ", ".join(repr(k) for k in list(obj)[:5])
            what = f"a dict without a state dict in it (keys: {keys})" if obj else "an empty dict"
        else:
            what = f"a {type(obj).__name__}"
        raise BadInputError(f"{path} holds {what}, not a model: {SAVE_FIX}")
    state_dict = dict(obj)
    stripped = True
    while stripped:  # wrappers nest: "module._orig_mod.", "_orig_mod.module."
        stripped = False
        for prefix in STRIP_PREFIXES:
            if all(k.startswith(prefix) for k in state_dict):
                state_dict, stripped = {k[len(prefix) :]: v for k, v in state_dict.items()}, True
    return state_dict


def _load_state_dict(
    state_dict: dict[str, torch.Tensor], arch: Arch | str | None, path: Path
) -> tuple[nn.Module, ModelConfig]:
    _check_finite(state_dict, path)
    if arch is None:
        guess = guess_arch(state_dict)
        hint = (
            f"it looks like {guess.describe()}: pass --arch {guess.arch.value}"
            if guess is not None
            else "it matches no zoo architecture: pass --arch NAME (one of "
            + ", ".join(a.value for a in Arch)
            + "), or save the model as TorchScript or a .pt2 ExportedProgram"
        )
        raise BadInputError(f"{path} is a state dict, which needs --arch NAME; {hint}")
    config = infer_config(parse_arch(arch), state_dict)
    model = build_model(config)
    for key, value in model.state_dict().items():  # pre-0.4.1 checkpoints lack BN counters
        if key.endswith("num_batches_tracked") and key not in state_dict:
            state_dict[key] = value
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise BadInputError(f"{path} does not load into {config.describe()}: {first_line(err)}") from None
    return model, config


def _check_finite(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    for key, value in tensors.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            bad = ~torch.isfinite(value)
            if bool(bad.any()):
                raise BadInputError(
                    f"weight {key} in {path} holds {int(bad.sum())} NaN/Inf values: the training diverged "
                    "or the file is damaged; use an earlier checkpoint"
                )


# ----------------------------------------------------------------------------------- TorchScript archives

# The only TorchScript ops that touch the file system (checked against torch's op registry).
_TS_DANGEROUS = re.compile(r"\b(from_file|save)\b")


def _load_torchscript(path: Path, allow_pickle: bool) -> nn.Module:
    if not allow_pickle:
        found = None
        try:
            with zipfile.ZipFile(path) as zf:
                for name in zf.namelist():
                    if re.match(r"[^/]+/code/.*\.py$", name):
                        found = _TS_DANGEROUS.search(zf.read(name).decode("utf-8", "replace"))
                        if found:
                            break
        except Exception as err:  # noqa: BLE001 - a member that cannot be read (bad CRC, bad deflate stream, ...)
            raise BadInputError(
                f"TorchScript archive {path} is corrupt ({first_line(err)}): copy or save the model again"
            ) from None
        if found:
            raise BadInputError(
                f"TorchScript archive {path} calls {found.group(1)}(), which reads or writes files; mdeploy "
                f"refuses it by default: script only the model, or pass {TRUST_FLAG} if you trust the file"
            )
    try:
        with captured_logs("torch"):
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as err:  # noqa: BLE001
        raise BadInputError(
            f"could not load TorchScript archive {path} ({first_line(err)}): it may be corrupt or need "
            "custom ops; save it again with torch.jit.save"
        ) from None


# ------------------------------------------------------------------------- ExportedProgram (.pt2) archives


def _load_exported(path: Path, allow_pickle: bool) -> nn.Module:
    if not allow_pickle:
        problem = pt2_code_risk(path)
        if problem is not None:
            raise BadInputError(
                f".pt2 archive {path} {problem}, which torch.export.load would run as code; mdeploy refuses "
                f"that by default: export a plain model with torch.export, or pass {TRUST_FLAG} if you "
                "trust the file"
            )
    with captured_logs("torch") as logged:
        try:
            program = torch.export.load(str(path))
            module = program.module()
        except Exception as err:  # noqa: BLE001
            cause = logged_cause(logged) or err  # torch logs the real error, then raises "check the warnings above"
            raise BadInputError(
                f"could not load ExportedProgram {path} ({first_line(cause)}): it may be corrupt or come from "
                "another PyTorch version; export it again with torch.export.save"
            ) from None
    for node in module.graph.nodes:
        target = str(node.target)
        training = (
            ("batch_norm.default" in target and len(node.args) > 5 and node.args[5] is True)
            or ("dropout.default" in target and len(node.args) > 2 and node.args[2] is True)
            or target.endswith(("_native_batch_norm_legit.default", "_native_batch_norm_legit_functional.default"))
        )
        if training:
            raise BadInputError(
                f"ExportedProgram {path} was exported in training mode ({target}): call model.eval() "
                "before torch.export.export and save it again"
            )
    # ExportedProgram.module() makes train() and eval() raise. The graph was just checked to be in inference
    # mode, so eval() is a no-op on it: allow eval() (callers call it), keep refusing train().
    module.train = types.MethodType(_inference_only_train, module)
    try:
        del module.eval
    except AttributeError:
        pass
    return batched_program(program, module)  # runs at any batch, whatever batch it was exported with


def _inference_only_train(self: nn.Module, mode: bool = True) -> nn.Module:
    if mode:
        raise NotImplementedError("this ExportedProgram was exported for inference: train() is not supported")
    return nn.Module.train(self, False)
