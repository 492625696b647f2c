#!/usr/bin/env python3
"""Checks an mdeploy bundle with nothing but NumPy and the runtimes (no mdeploy needed):

1. every file matches SHA256SUMS, and every file of the bundle is listed there;
2. each artifact this script can run (ONNX with onnxruntime, TFLite with ai-edge-litert or tflite-runtime,
   ExecuTorch programs with executorch) reproduces its golden outputs from the golden inputs within the tolerance
   manifest.json gives; the others (Core ML needs an Apple platform) are reported as skipped, with the reason.

    python3 verify_bundle.py [BUNDLE_DIR]      exit 0: all good; 1: an output is off; 2: a file is corrupt

Every problem is printed on one line; a path read from SHA256SUMS or manifest.json must stay inside the bundle.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable, NamedTuple

import numpy as np

CHECKSUMS = "SHA256SUMS"
IGNORED = {".DS_Store"}  # written by macOS Finder into any folder it shows: never part of a bundle
SUM_LINE = re.compile(r"([0-9a-fA-F]{64}) [ *](.+)")  # sha256sum's text and binary modes


class Corrupt(Exception):
    """An integrity problem: the message is the line to print, without the CORRUPT: prefix."""


def show(name: str) -> str:
    """A name as printed: on one line, whatever it holds."""
    return name if name.isprintable() else repr(name)


def inside(root: Path, name: str, source: str) -> Path:
    """``root / name``; Corrupt naming ``source`` unless it is relative and stays in the bundle, symlinks resolved."""
    pure, windows = PurePosixPath(name), PureWindowsPath(name)
    if not name or "\0" in name:
        reason = "not a file name"
    elif pure.is_absolute() or windows.drive or windows.root:
        reason = "an absolute path, not one inside the bundle"
    elif ".." in pure.parts or ".." in windows.parts:
        reason = "contains '..', leaving the bundle"
    else:
        try:
            (root / name).resolve().relative_to(root)
            return root / name
        except (ValueError, OSError, RuntimeError):  # RuntimeError: a symlink loop
            reason = "resolves outside the bundle"
    raise Corrupt(f"{source}: {show(name)}: {reason}")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_sums(root: Path, problems: list[str]) -> dict[str, str] | None:
    """SHA256SUMS as {name: digest} (None if unreadable); each malformed or unsafe line is one problem."""
    try:
        lines = (root / CHECKSUMS).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        problems.append(f"{CHECKSUMS}: missing")
        return None
    except (OSError, ValueError) as err:
        problems.append(f"{CHECKSUMS}: unreadable ({first_line(err)})")
        return None
    sums: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        match = SUM_LINE.fullmatch(line)
        where = f"{CHECKSUMS} line {number}"
        try:
            if match is None:
                raise Corrupt(f'{where}: not "<64 hex digits>  <file>": {show(line[:80])}')
            digest, name = match.groups()
            name = PurePosixPath(name).as_posix()  # ./a//b is a/b
            if name in sums:
                raise Corrupt(f"{where}: {show(name)}: listed twice")
            inside(root, name, where)
            sums[name] = digest.lower()
        except Corrupt as err:
            problems.append(str(err))
    return sums


def check_sums(root: Path, sums: dict[str, str], problems: list[str]) -> set[str]:
    """Each listed file against its digest; returns the names that failed."""
    bad = set()
    for name, digest in sums.items():
        try:
            if (root / name).is_file() and sha256(root / name) == digest:
                continue
            problem = "does not match SHA256SUMS" if (root / name).exists() else "listed in SHA256SUMS but missing"
        except OSError as err:
            problem = f"unreadable ({first_line(err)})"
        problems.append(f"{show(name)}: {problem}")
        bad.add(name)
    return bad


def bundle_files(root: Path, problems: list[str]) -> set[str]:
    """Every file of the bundle (and every symlinked folder) as a relative POSIX name."""
    found = set()

    def unreadable(err: OSError) -> None:
        problems.append(f"{show(str(err.filename))}: unreadable folder ({err.strerror})")

    for folder, dirs, files in os.walk(root, onerror=unreadable):
        links = [d for d in dirs if os.path.islink(os.path.join(folder, d))]
        for name in files + links:
            if name not in IGNORED:
                found.add(Path(folder, name).relative_to(root).as_posix())
    found.discard(CHECKSUMS)
    return found


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]


def field(record: Any, key: str, kind: type, where: str) -> Any:
    value = record.get(key) if isinstance(record, dict) else None
    if not isinstance(value, kind):
        raise Corrupt(f"manifest.json: {where}.{key} missing or not {'an object' if kind is dict else 'a string'}")
    return value


def read_golden(root: Path, problems: list[str]) -> dict[str, Any]:
    """The manifest's golden section; each artifact's record is checked where it is used (verify_artifact)."""
    try:
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Corrupt("manifest.json: missing") from None
    except (OSError, ValueError, RecursionError) as err:
        raise Corrupt(f"manifest.json: not readable JSON ({first_line(err)})") from None
    golden = field(manifest, "golden", dict, "manifest")
    field(field(golden, "inputs", dict, "golden"), "npy", str, "golden.inputs")
    field(golden, "artifacts", dict, "golden")
    images = golden.get("images") if isinstance(golden.get("images"), list) else []
    by_output = golden.get("pytorch_by_output")
    records = [golden["inputs"], golden.get("pytorch_outputs"),
               *(by_output.values() if isinstance(by_output, dict) else ())]
    for path in [*images, *(r.get(k) for r in records if isinstance(r, dict) for k in ("npy", "f32"))]:
        try:
            if isinstance(path, str):
                inside(root, path, "manifest.json")
        except Corrupt as err:  # not read by this script: the artifacts can still be checked
            problems.append(str(err))
    return golden


def tolerance_of(tolerance: dict[str, Any], where: str) -> tuple[str, float]:
    for key in ("max_abs_error", "min_snr_db"):
        if key in tolerance:
            value = tolerance[key]
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                    and (key == "min_snr_db" or value >= 0):
                return key, float(value)
            raise Corrupt(f"manifest.json: {where}.tolerance.{key} is not a valid number: {json.dumps(value)[:40]}")
    raise Corrupt(f"manifest.json: {where}.tolerance has neither max_abs_error nor min_snr_db")


def load_array(root: Path, name: str) -> np.ndarray:
    try:
        array = np.load(inside(root, name, "manifest.json"), allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise Corrupt(f"{show(name)}: not a readable .npy file ({first_line(err)})") from None
    if not isinstance(array, np.ndarray) or not (np.issubdtype(array.dtype, np.integer)
                                                 or np.issubdtype(array.dtype, np.floating)):
        raise Corrupt(f"{show(name)}: holds {getattr(array, 'dtype', 'no array')}, not numbers")
    return array.astype(np.float32)


class BundleRunner(NamedTuple):
    """How this script runs one target's artifacts (registered below by mdeploy when it writes the bundle)."""

    suffix: str  # the artifact's file name ends with it, e.g. ".onnx"
    runtime: str  # named in messages, e.g. "onnxruntime"
    # (artifact, inputs NCHW) -> every output by name (a one-output target may return the array); None: cannot run here
    run: Callable[[Path, np.ndarray], dict[str, np.ndarray] | np.ndarray] | None
    why_not: str  # why not, when ``run`` is None


RUNNERS: dict[str, BundleRunner] = {}  # target name -> its runner


def register(target: str, suffix: str, runtime: str,
             run: Callable[[Path, np.ndarray], dict[str, np.ndarray] | np.ndarray] | None,
             why_not: str = "") -> None:
    RUNNERS[target] = BundleRunner(suffix, runtime, run, why_not)


def runner_for(file: str) -> BundleRunner | None:
    """The runner of the target whose artifacts end like ``file`` (the longest such ending), or None."""
    found = [r for r in RUNNERS.values() if r.suffix and file.endswith(r.suffix)]
    return max(found, key=lambda r: len(r.suffix)) if found else None


# Each target's runner and the functions it calls, written in by mdeploy (mdeploy/bundle/verifier.py):
# --- mdeploy: target runners ---


def within(expected: np.ndarray, actual: np.ndarray, tolerance: tuple[str, float]) -> tuple[bool, str]:
    key, limit = tolerance
    if key == "max_abs_error":
        error = float(np.abs(expected - actual).max(initial=0.0))
        return error <= limit, f"max |diff| {error:.3g} (tolerance {limit:.3g})"
    noise = float(np.sum((expected.astype(np.float64) - actual) ** 2))
    snr = float("inf") if noise == 0 else 10 * np.log10(np.sum(expected.astype(np.float64) ** 2) / noise)
    return snr >= limit, f"SNR {snr:.1f} dB (tolerance {limit:g} dB)"


def verify_artifact(root: Path, key: str, record: Any, inputs: np.ndarray | None, bad: set[str]) -> bool | None:
    """Prints the line of one artifact (or of one output of it, keyed "<artifact>:<output>"); True if it reproduces
    its golden outputs, None if it was not run. Corrupt if its manifest record is malformed or names a path outside
    the bundle, or if its runtime cannot load it."""
    where = f"golden.artifacts[{json.dumps(key)}]"
    npy = field(record, "npy", str, where)
    file = field(record, "artifact", str, where) if "artifact" in record else key
    output = field(record, "output", str, where) if "output" in record else None
    shown = f"{show(file)} {output}" if output else show(file)
    tolerance = tolerance_of(field(record, "tolerance", dict, where), where)
    for name in (file, npy, record.get("f32")):
        if isinstance(name, str):
            inside(root, name, "manifest.json")
    if inputs is None or bad & {file, npy}:
        return None  # what is wrong with its files is already reported: running it would only repeat that
    found = runner_for(file)
    if found is None or found.run is None:
        print(f"skipped  {shown}: {found.why_not if found else 'this script does not know how to run it'}")
        return None
    runtime = found.runtime
    expected = load_array(root, npy)
    try:
        answered = found.run(root / file, inputs)  # every output by name (or the one output's array)
    except ImportError as err:  # the runners import their runtime first: nothing was read yet
        print(f"skipped  {shown}: runtime not installed ({err.name or first_line(err)})")
        return None
    except Exception as err:  # noqa: BLE001 - whatever the runtime raises on a file it cannot read
        raise Corrupt(f"{show(file)}: {runtime} cannot load or run it ({first_line(err)})") from None
    if not isinstance(answered, dict):
        answered = {"the one output": answered}
    if output is None and len(answered) != 1 or output is not None and output not in answered:
        raise Corrupt(f"{show(file)}: answers outputs {sorted(answered)}, but {where} expects "
                      f"{json.dumps(output) if output else 'one'}")
    actual = np.asarray(answered[output] if output else next(iter(answered.values())), dtype=np.float32)
    if expected.shape != actual.shape:
        raise Corrupt(f"{show(npy)}: shape {expected.shape}, but {shown} answers {actual.shape}")
    ok, detail = within(expected, actual, tolerance)
    print(f"{'ok     ' if ok else 'MISMATCH'} {shown}: {detail} with {runtime}")
    return ok


def main(root: Path) -> int:
    if not root.is_dir():
        print(f"CORRUPT: {show(str(root))}: not a bundle folder")
        return 2
    root, problems = root.resolve(), []
    sums = read_sums(root, problems)
    bad = check_sums(root, sums or {}, problems)
    for name in sorted(bundle_files(root, problems) - set(sums)) if sums is not None else []:
        problems.append(f"{show(name)}: not listed in SHA256SUMS")
    failed, golden, inputs = False, {"artifacts": {}}, None
    try:
        golden = read_golden(root, problems)
        inputs = None if golden["inputs"]["npy"] in bad else load_array(root, golden["inputs"]["npy"])
    except Corrupt as err:
        problems.append(str(err))
    for file, record in golden["artifacts"].items():
        try:
            failed |= verify_artifact(root, file, record, inputs, bad) is False
        except Corrupt as err:
            problems.append(str(err))
    for problem in problems:
        print(f"CORRUPT: {problem}")
    return 2 if problems else 1 if failed else 0


def guarded_main(argv: list[str]) -> int:
    try:
        sys.stdout.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
        return main(Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent)
    except Exception as err:  # noqa: BLE001 - last resort: one line and the documented code, never a traceback
        print(f"CORRUPT: could not check the bundle: {type(err).__name__}: {first_line(err)}")
        return 2


if __name__ == "__main__":
    sys.exit(guarded_main(sys.argv))
