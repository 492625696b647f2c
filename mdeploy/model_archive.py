"""What a model file is and whether it is safe to open, decided from its bytes alone (nothing in it runs).

``sniff_format`` tells the archive kinds apart by content; ``check_records`` verifies that each tensor file of a
torch zip holds the bytes its pickle declares (torch.jit.load would crash on a short one); ``pt2_code_risk`` scans an
ExportedProgram for call targets and expressions that would run arbitrary code when loaded.
"""

from __future__ import annotations

import ast
import io
import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import BadInputError, first_line

SAVE_FIX = (
    "save a state dict (torch.save(model.state_dict(), PATH)), TorchScript (torch.jit.save) "
    "or an ExportedProgram (torch.export.save)"
)


def sniff_format(path: Path) -> str:
    """'torchscript', 'exported_program', 'torch_zip' or 'other' (legacy torch.save, or not a torch file)."""
    with path.open("rb") as f:
        head = f.read(8)
    if head[4:8] == b"TFL3":
        raise BadInputError(
            f"{path} is a TFLite model: mdeploy takes the trained PyTorch "
            "model (state dict, TorchScript or .pt2) and produces those formats itself"
        )
    if not head.startswith(b"PK"):
        return "other"
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            archive_format = read_member(zf, names, "archive_format")
    # zipfile raises BadZipFile, but also UnicodeDecodeError (a damaged name), NotImplementedError (an unknown
    # compression method), zlib.error, struct.error, EOFError, ... on damaged archives.
    except Exception as err:  # noqa: BLE001
        raise BadInputError(
            f"{path} is a truncated or corrupt zip archive ({first_line(err)}): copy or save the model again"
        ) from None
    unsafe = next((n for n in names if unsafe_member_name(n)), None)
    if unsafe is not None:
        # PyTorch's own readers differ on such names (one refuses them, another joins them to a folder): refuse
        # them here, before any of them reads the archive.
        raise BadInputError(
            f"{path} is a damaged or crafted zip archive (member {unsafe[:80]!r} points outside the archive): "
            "save the model again"
        )
    if len({n.casefold() for n in names}) != len(names):
        # Readers disagree on which of two same-named members counts (and on case-insensitive file systems two
        # names may be one file): what was checked might not be what loads.
        raise BadInputError(
            f"{path} is a damaged or crafted zip archive (duplicate member names, up to case): save it again"
        )
    if any(re.match(r"[^/]+/code/", n) for n in names) and any(n.endswith("/constants.pkl") for n in names):
        return "torchscript"
    if archive_format is not None and archive_format.strip() == b"pt2":
        return "exported_program"
    if any(n.endswith("data.pkl") for n in names):
        return "torch_zip"
    raise BadInputError(
        f"{path} is a zip archive but not a PyTorch model (no data.pkl, TorchScript code or .pt2 model): "
        + SAVE_FIX
    )


def unsafe_member_name(name: str) -> bool:
    """Whether a zip member name is absolute, climbs out with ``..``, or uses backslashes or drive letters (which
    some readers take as separators: ``a\\..\\x``)."""
    return (name.startswith("/") or "\\" in name or re.match(r"[A-Za-z]:", name) is not None
            or ".." in name.split("/") or "\x00" in name)


# Bytes per element of the storage types a torch pickle names in its persistent ids.
_STORAGE_BYTES = {
    "UntypedStorage": 1, "ByteStorage": 1, "CharStorage": 1, "BoolStorage": 1, "QInt8Storage": 1,
    "QUInt8Storage": 1, "QUInt4x2Storage": 1, "QUInt2x4Storage": 1, "ShortStorage": 2, "HalfStorage": 2,
    "BFloat16Storage": 2, "IntStorage": 4, "FloatStorage": 4, "QInt32Storage": 4, "LongStorage": 8,
    "DoubleStorage": 8, "ComplexFloatStorage": 8, "ComplexDoubleStorage": 16,
}


class _Stub:
    """Stands for every class and function a pickle names, so that reading it runs no code at all."""

    _global = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Stub:  # noqa: PYI034
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _StorageLister(pickle.Unpickler):
    """Lists the (storage key, bytes) a torch pickle expects, without importing or calling anything it names."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.storages: dict[str, int] = {}

    def find_class(self, module: str, name: str) -> Any:
        return type(name, (_Stub,), {"_global": f"{module}.{name}"})

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage":
            kind = getattr(pid[1], "_global", "").rsplit(".", 1)[-1]
            if kind in _STORAGE_BYTES and isinstance(pid[4], int) and not isinstance(pid[4], bool):
                self.storages[str(pid[2])] = max(self.storages.get(str(pid[2]), 0), pid[4] * _STORAGE_BYTES[kind])
        return _Stub()


def check_records(path: Path) -> None:
    """Each tensor file of a torch zip (state dict or TorchScript) must hold the bytes its pickle declares.
    torch.jit.load does not check: a short tensor file loads, and reading the tensor then crashes the process
    (SIGSEGV; found by tests/fuzz_loaders.py). Nothing the pickles name is imported or called."""
    try:
        with zipfile.ZipFile(path) as zf:
            sizes = {info.filename: info.file_size for info in zf.infolist()}
            for name in sizes:
                # data.pkl (weights) and constants.pkl (TorchScript constants); torch.jit.load never reads
                # traced_inputs.pkl, whose tensor files torch writes empty.
                if not name.endswith(("/data.pkl", "/constants.pkl")) or name.count("/") != 1:
                    continue
                lister = _StorageLister(zf.read(name))
                try:
                    lister.load()
                except Exception:  # noqa: BLE001, S112 - a broken pickle: torch's own loader reports it in context
                    continue
                folder = name[: -len(".pkl")]
                for key, needed in lister.storages.items():
                    record = f"{folder}/{key}"
                    if record in sizes and sizes[record] < needed:
                        raise BadInputError(
                            f"{path} is damaged: tensor data {record} holds {sizes[record]} bytes where "
                            f"{needed} are needed; copy or save the model again"
                        )
    except BadInputError:
        raise
    except Exception as err:  # noqa: BLE001 - unreadable members (bad CRC, bad deflate stream, ...)
        raise BadInputError(f"{path} is a corrupt zip archive ({first_line(err)}): copy or save the model again") \
            from None


def read_member(zf: zipfile.ZipFile, names: list[str], suffix: str) -> bytes | None:
    for n in names:
        if n == suffix or n.endswith("/" + suffix):
            return zf.read(n)
    return None


# Call targets a model graph needs; anything else (e.g. torch.os.system) is refused.
SAFE_TARGET = re.compile(
    r"(torch\.ops\.(aten|prims|prim|quantized_decomposed|higher_order)\.\w+(\.\w+)?"
    r"|torch\.sym_\w+|torch\._check\w*|_operator\.(getitem|add|sub|mul|truediv|floordiv|mod|neg|pow|"
    r"eq|ne|lt|le|gt|ge|and_|or_|not_)|math\.(ceil|floor|sqrt|trunc))"
)
_SYMBOL = re.compile(r"[a-z]+\d+")
_SYMPY_NAMES = frozenset(
    "Symbol Integer Rational Float Add Mul Pow Max Min Mod floor ceiling Abs Eq Ne Lt Le Gt Ge And Or Not "
    "true false oo zoo nan True False FloorDiv ModularIndexing Where PythonMod CleanDiv CeilToInt FloorToInt "
    "CeilDiv IntTrueDiv FloatTrueDiv ToFloat TruncToInt TruncToFloat RoundToInt RoundDecimal LShift RShift "
    "PowByNatural FloatPow Identity IsNonOverlappingAndDenseIndicator OpaqueUnaryFn_sqrt BitwiseFn_bitwise_and "
    "BitwiseFn_bitwise_or".split()
)
_SYMPY_NODES = (
    ast.Expression, ast.Call, ast.Name, ast.Load, ast.Constant, ast.keyword, ast.BinOp, ast.UnaryOp,
    ast.Compare, ast.BoolOp, ast.Tuple, ast.operator, ast.unaryop, ast.cmpop, ast.boolop,
)  # fmt: skip


def _safe_sympy(expr: str) -> bool:
    """Whether ``expr`` (evaluated by sympy.sympify on load) is plain arithmetic on symbols."""
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        return False
    for node in ast.walk(tree):
        if not isinstance(node, _SYMPY_NODES):
            return False
        if isinstance(node, ast.Name) and node.id not in _SYMPY_NAMES and not _SYMBOL.fullmatch(node.id):
            return False
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in _SYMPY_NAMES):
            return False
        if isinstance(node, ast.keyword) and node.arg is None:
            return False
    return True


def _walk_json(obj: Any, key: str) -> list[Any]:
    found, stack = [], [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for k, v in item.items():
                if k == key:
                    found.append(v)
                stack.append(v)
        elif isinstance(item, list):
            stack.extend(item)
    return found


def pt2_code_risk(path: Path) -> str | None:
    """A description of the first part of a .pt2 archive that torch.export.load would run as code, or None."""
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                rel = name.split("/", 1)[1] if "/" in name else name
                if rel.startswith("data/") and rel.endswith(".pt"):  # sample inputs, legacy weights
                    try:
                        torch.load(io.BytesIO(zf.read(name)), map_location="cpu", weights_only=True)
                    except Exception:  # noqa: BLE001
                        return f"holds a pickled Python object in {rel}"
                elif rel.startswith(("data/weights/", "data/constants/")) and rel.endswith("_config.json"):
                    for fqn, meta in json.loads(zf.read(name)).get("config", {}).items():
                        if meta.get("use_pickle") or str(meta.get("path_name", "")).startswith(
                            ("custom_obj_", "opaque_obj_")
                        ):
                            return f"holds a pickled object for {fqn}"
                elif rel.startswith("models/") and rel.endswith(".json"):
                    program = json.loads(zf.read(name))
                    if program.get("guards_code"):
                        return "carries Python guard code"
                    for target in _walk_json(program, "target"):
                        if isinstance(target, str) and not SAFE_TARGET.fullmatch(target):
                            return f"calls {target[:80]}"
                    for expr in _walk_json(program, "expr_str"):
                        if not isinstance(expr, str) or not _safe_sympy(expr):
                            return f"holds a shape expression that is not plain arithmetic ({str(expr)[:60]})"
    except BadInputError:
        raise
    # BadZipFile, zlib.error, UnicodeDecodeError, JSONDecodeError, and AttributeError/TypeError from JSON of the
    # wrong structure: all mean a damaged archive.
    except Exception as err:  # noqa: BLE001
        raise BadInputError(f".pt2 archive {path} is corrupt ({first_line(err)}): export it again") from None
    return None
