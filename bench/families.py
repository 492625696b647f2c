"""Issue 14's table: every MobileNet family of mdeploy.families, from its model library's own definition, converted as
a user converts it, one Markdown row per family.

    .venv/bin/python bench/families.py [--families mobilenet_v2_100,lcnet] [--size 224] [--classes 1000]
        [--calib-count 100] [--eval-count 96] [--runs 60] [--warmup 10] [--keep DIR]

Per family (random weights with BatchNorm statistics from real photos, ``tests/model_library.py``):
- save it as users do (``torch.export`` at batch 1, ``torch.export.save``) and run ``mdeploy convert MODEL.pt2 --to
  onnx,tflite --int8 --calib ... --eval ...`` in a fresh process: its wall and CPU time, and the manifest's stage seconds;
- fp32 max |error| and SNR (worst of ONNX and TFLite), int8 SNR and top-1 agreement from the manifest;
- a control that needs no trained weights: ONNX Runtime's own ``quantize_static`` (QDQ, per-channel, MinMax, int8;
  its codes then stored as uint8, ``with_uint8_codes``)
  on the fp32 ONNX that mdeploy wrote, calibrated on the same samples (same files, same preprocessing: the
  calibration- and evaluation-set hashes are checked against the manifest's), its SNR against PyTorch on the same
  held-out samples;
- fp32 vs int8 TFLite ``invoke()`` on XNNPACK, 1 thread, medians of interleaved rounds (``bench/tflite_latency.py``),
  and the int8 model's XNNPACK partition count.
Families whose ``unsupported`` is set get a "not yet" row. With random weights, top-1 agreement over 1000 classes is
a weak signal; judge int8 by SNR.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
# as tests/conftest.py: ONNX Runtime writes a device id under $XDG_CACHE_HOME; keep it inside the repository's .cache
os.environ.setdefault("XDG_CACHE_HOME", str(ROOT / ".cache" / "library-home" / "cache"))

from mdeploy.calibration.dataset import SampleSet  # noqa: E402
from mdeploy.calibration.preprocess import Preprocess  # noqa: E402
from mdeploy.converters.tflite_report import xnnpack_partitions  # noqa: E402
from mdeploy.demo_assets import prepare_demo_assets  # noqa: E402
from mdeploy.families import FAMILIES, Family  # noqa: E402
from mdeploy.manifest import Manifest  # noqa: E402
from mdeploy.metrics import compare  # noqa: E402
from tests.model_library import build, photos, save_exported, with_photo_statistics  # noqa: E402
from tflite_latency import time_interleaved  # noqa: E402

INT8_FLAGS = ("avx2", "avx512bw", "avx512_vnni", "avx_vnni", "avx_vnni_int8", "amx_tile", "amx_int8")
T, R = TypeVar("T"), TypeVar("R")
STAGES = ("load_and_trace", "data_and_reference", "quantize", "export_parity_latency")


# -- the machine -------------------------------------------------------------------------------------------------------
def cpu_line() -> str:
    """CPU model, its int8 instruction sets, cores and load, from /proc/cpuinfo and the load average."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = re.search(r"^model name\s*:\s*(.+)$", info, re.M).group(1).strip()  # type: ignore[union-attr]
        flags = set(re.search(r"^flags\s*:\s*(.+)$", info, re.M).group(1).split())  # type: ignore[union-attr]
    except (OSError, AttributeError):
        pass
    isa = ", ".join(f for f in INT8_FLAGS if f in flags) or "none of " + ", ".join(INT8_FLAGS)
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    state = (f"a shared {cores}-core machine under load (1-min load average {load:.1f} when the run started)"
             if load > 0.5 * cores else f"{cores} cores, load average {load:.1f}")
    return f"{model} (int8 ISA: {isa}); {state}"


# -- one family --------------------------------------------------------------------------------------------------------
@dataclass
class Row:
    family: Family
    params_m: float = 0.0
    exit_code: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    stages: dict[str, float] | None = None
    fp32_max_err: float = 0.0
    fp32_snr: float = 0.0
    int8: dict[str, tuple[float, float]] | None = None  # target -> (SNR dB, top-1 agreement)
    ort_snr: float = 0.0
    ort_top1: float = 0.0
    fp32_ms: float = 0.0
    int8_ms: float = 0.0
    partitions: int = 0
    outside: str = ""  # ops XNNPACK leaves to the builtin kernels, when it splits the graph
    error: str = ""


def number(value: float | str) -> float:
    return float(value)  # the manifest spells non-finite metrics out ("inf", "nan")


def cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def convert_command(model_path: Path, out: Path, args: argparse.Namespace, assets,  # type: ignore[no-untyped-def]
                    targets: str = "onnx,tflite", *extra: str) -> list[str]:
    """``mdeploy convert`` as a user runs it: ``--int8`` on ``args``' calibration and evaluation counts and size."""
    return [sys.executable, "-m", "mdeploy.cli", "convert", str(model_path), "--to", targets, "--int8",
            "--calib", str(assets.calib_dir), "--calib-size", str(args.calib_count),
            "--eval", str(assets.eval_dir), "--eval-size", str(args.eval_count),
            "--input-size", str(args.size), "--out", str(out), "--overwrite", *extra]


def run_subprocess(command: list[str]) -> tuple[int, float, float, str]:
    """``command`` in a fresh process (imports included): exit code, wall s, CPU s (user + system, all its threads:
    what load from other processes does not inflate), stderr."""
    start, cpu = time.perf_counter(), cpu_of_children()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    return done.returncode, time.perf_counter() - start, cpu_of_children() - cpu, done.stderr


def ort_session(path: Path):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(path: Path, samples: np.ndarray) -> np.ndarray:
    """One sample at a time: works whether the file's batch is static 1 or dynamic."""
    session = ort_session(path)
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: samples[i:i + 1]})[0] for i in range(len(samples))])


def ort_control(fp32_onnx: Path, calib: np.ndarray, work: Path) -> Path:
    """ONNX Runtime's own int8: quantize_static, QDQ, per-channel weights, MinMax ranges, int8 activations."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    name = ort_session(fp32_onnx).get_inputs()[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(calib[i:i + 1] for i in range(len(calib)))

        def get_next(self):  # type: ignore[no-untyped-def]
            item = next(self.items, None)
            return None if item is None else {name: item}

    out = work / "ort_control.int8.onnx"
    quantize_static(str(fp32_onnx), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    calibrate_method=CalibrationMethod.MinMax, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8)
    with_uint8_codes(out)
    return out


def with_uint8_codes(path: Path) -> None:
    """Every int8 initializer of a QDQ model (weight codes and zero points) as uint8, code + 128: the same grid, as
    mdeploy stores its own (``converters/onnx_dense.stored_codes``). ONNX Runtime's fused int8 x int8 kernels
    saturate on x86 without VNNI (MobileNetV2: 22.2 -> 10.0 dB on an AVX2-only EPYC): a control stored as int8
    would be judged by the CPU instead of by its quantiser's choices."""
    import onnx
    from onnx import numpy_helper

    from mdeploy.converters.onnx_dense import stored_codes

    model = onnx.load(str(path))
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.INT8:
            init.CopyFrom(numpy_helper.from_array(stored_codes(numpy_helper.to_array(init)), init.name))
    del model.graph.value_info[:]  # recorded int8 types of the codes (NNCF writes them): ONNX Runtime infers them
    onnx.save(model, str(path))


def load_set(folder: Path, args: argparse.Namespace, limit: int, recorded) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The samples mdeploy used (same seeded selection and preprocessing), checked by the manifest's hash."""
    samples = SampleSet.from_folder(folder, Preprocess.imagenet(args.size), limit=limit, seed=0)
    if recorded is None or samples.sha256 != recorded.sha256:
        raise RuntimeError(f"{folder}: the samples differ from those mdeploy recorded in manifest.json")
    return samples.to_array()


def bench_family(family: Family, args: argparse.Namespace, assets, work: Path) -> Row:  # type: ignore[no-untyped-def]
    row = Row(family)
    torch.manual_seed(0)
    model = with_photo_statistics(build(family, args.classes), photos(assets.calib_dir, args.size))
    row.params_m = sum(p.numel() for p in model.parameters()) / 1e6
    model_path = work / f"{family.name}.pt2"
    save_exported(model, torch.randn(1, 3, args.size, args.size), model_path)

    out = work / "out"
    row.exit_code, row.wall_s, row.cpu_s, stderr = run_subprocess(convert_command(model_path, out, args, assets))
    if row.exit_code not in (0, 1):  # 1: parity limits failed, artifacts written and measured all the same
        row.error = next((line for line in stderr.splitlines() if line.startswith("error:")), stderr[-300:])
        return row
    manifest = Manifest.read(out / "manifest.json")
    row.stages = manifest.seconds
    fp32 = [manifest.artifact(t, "fp32") for t in ("onnx", "tflite")]
    row.fp32_max_err = max(number(a.parity.metrics.max_abs_error) for a in fp32 if a)
    row.fp32_snr = min(number(a.parity.metrics.snr_db) for a in fp32 if a)
    row.int8 = {}
    for target in ("onnx", "tflite"):
        artifact = manifest.artifact(target, "int8")
        if artifact:
            row.int8[target] = (number(artifact.parity.metrics.snr_db), number(artifact.parity.metrics.top1_agreement))

    # the control, on exactly mdeploy's calibration and evaluation samples
    calib = load_set(assets.calib_dir, args, args.calib_count, manifest.quantization.calibration_set)
    evaluation = load_set(assets.eval_dir, args, args.eval_count, manifest.evaluation.set)
    with torch.no_grad():
        reference = torch.cat([model(torch.from_numpy(b)) for b in np.array_split(evaluation, 8)]).numpy()
    fp32_onnx = out / manifest.artifact("onnx", "fp32").file  # type: ignore[union-attr]
    control = compare(reference, run_onnx(ort_control(fp32_onnx, calib, work), evaluation))
    row.ort_snr, row.ort_top1 = control.snr_db, control.top1_agreement
    ours = compare(reference, run_onnx(out / manifest.artifact("onnx", "int8").file, evaluation))  # type: ignore[union-attr]
    if abs(ours.snr_db - row.int8["onnx"][0]) > 0.2:  # the same reference and samples as the manifest's?
        print(f"warning: {family.name}: int8 ONNX SNR recomputed here {ours.snr_db:.2f} dB, manifest "
              f"{row.int8['onnx'][0]:.2f} dB", file=sys.stderr)

    tflite = {p: out / manifest.artifact("tflite", p).file for p in ("fp32", "int8")}  # type: ignore[union-attr]
    medians = time_interleaved(tflite, 1, args.runs, args.warmup)
    row.fp32_ms, row.int8_ms = medians["fp32"], medians["int8"]
    report = xnnpack_partitions(tflite["int8"].read_bytes())
    row.partitions = report["partitions"]
    row.outside = ", ".join(f"{n} {op}" for op, n in Counter(o.split(" ")[0] for o in report["ops_outside"]).items())
    return row


# -- the table ---------------------------------------------------------------------------------------------------------
HEADER = ("| family (library) | params M | convert s: wall, CPU (quantise wall) | fp32 max abs err | fp32 SNR dB "
          "| int8 SNR dB ONNX / TFLite | int8 top-1 ONNX / TFLite | ORT per-channel int8 SNR dB (top-1) "
          "| TFLite fp32 ms | int8 ms | speed-up | int8 XNNPACK partitions |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")


def format_row(row: Row) -> str:
    title = f"{row.family.title} ({row.family.library})"
    if row.family.unsupported:
        return f"| {title} | not yet: {row.family.unsupported} |" + " |" * 10
    if row.error:
        return f"| {title} | convert exit {row.exit_code}: {row.error} |" + " |" * 10
    stages = row.stages or {}
    parity = "" if row.exit_code == 0 else " (parity failed)"
    snr = " / ".join(f"{(row.int8 or {}).get(t, (float('nan'), 0))[0]:.1f}" for t in ("onnx", "tflite"))
    top1 = " / ".join(f"{(row.int8 or {}).get(t, (0, float('nan')))[1]:.0%}" for t in ("onnx", "tflite"))
    seconds = f"{row.wall_s:.0f}, {row.cpu_s:.0f} ({stages.get('quantize', 0):.0f}){parity}"
    return (f"| {title} | {row.params_m:.1f} | {seconds} | {row.fp32_max_err:.1e} | {row.fp32_snr:.0f} | {snr} "
            f"| {top1} | {row.ort_snr:.1f} ({row.ort_top1:.0%}) "
            f"| {row.fp32_ms:.2f} | {row.int8_ms:.2f} | {row.fp32_ms / row.int8_ms:.2f}x "
            f"| {row.partitions}{f' ({row.outside} outside)' if row.outside else ''} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", type=lambda s: s.split(","), default=None,
                        help="comma-separated names from mdeploy.families (default: all)")
    parser.add_argument("--size", type=int, default=224, help="input size for every family")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--calib-count", type=int, default=100)
    parser.add_argument("--eval-count", type=int, default=96)
    parser.add_argument("--runs", type=int, default=60, help="timed invoke() runs per TFLite model")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--keep", type=Path, default=None, help="keep each family's .pt2 and output folder here")
    args = parser.parse_args()
    known = {f.name: f for f in FAMILIES}
    unknown = [name for name in args.families or () if name not in known]
    if unknown:
        parser.error(f"unknown families {unknown}; known: {', '.join(known)}")
    families = [known[name] for name in args.families] if args.families else list(FAMILIES)
    torch.set_num_threads(1)
    assets = prepare_demo_assets(ROOT / ".cache" / "mdeploy-demo")

    print(f"CPU: {cpu_line()}")
    print(f"{args.size} px, {args.classes} classes, random weights with BatchNorm statistics from real photos; "
          f"{args.calib_count} calibration crops, {args.eval_count} held-out crops of other photos; TFLite latency "
          f"on XNNPACK, 1 thread, median of {args.runs} invoke() runs in interleaved rounds\n", flush=True)
    print_table(families, lambda family: family.name,
                lambda family, work: Row(family) if family.unsupported else bench_family(family, args, assets, work),
                lambda family, error: Row(family, exit_code=-1, error=error), format_row, HEADER, args.keep)


def print_table(items: list[T], name_of: Callable[[T], str], bench_one: Callable[[T, Path], R],
                failed: Callable[[T, str], R], format_row: Callable[[R], str], header: str, keep: Path | None) -> None:
    """One Markdown row per item, each benched in its own folder (under ``keep``, else a temporary one): rows go to
    stderr as they come, the table to stdout at the end. An item that raises gets a row with the error."""
    rows, started = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for item in items:
            work = keep / name_of(item) if keep else Path(tmp) / name_of(item)
            work.mkdir(parents=True, exist_ok=True)
            try:
                row = bench_one(item, work)
            except Exception as err:  # noqa: BLE001 - a bench row, not a crash: someone's half-done edit, say
                row = failed(item, f"{type(err).__name__}: {err}".splitlines()[0][:200])
            rows.append(row)
            print(format_row(row), file=sys.stderr, flush=True)
    print(header)
    for row in rows:
        print(format_row(row))
    print(f"\nwhole run {time.perf_counter() - started:.0f} s; load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
