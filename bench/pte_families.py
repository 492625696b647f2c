"""Issue 17: every supported family of ``mdeploy.families`` (the library models the other targets take) as fp32 and
int8 ExecuTorch programs, lowered to XNNPACK by ``converters/pte_program.py``, one Markdown row per family.

    .venv/bin/python bench/pte_families.py [--families mobilenet_v1,ghostnet] [--calib 48] [--eval 24]

Per family, at the size the tests use (random weights with BatchNorm statistics from real photos,
``tests/model_library.py``): the XNNPACK delegates and the ops left outside them, the float/int8 conversions inside
the int8 delegate, the fp32 program's max |error| against PyTorch relative to the largest output, and the int8
program against mdeploy's own int8 simulation of the same decisions (max distance in output quantisation steps, SNR
of each against PyTorch). With random weights, SNR against PyTorch says little about int8 quality (see
``bench/families.py``); the distance from the simulation is what shows the program carries the quantiser's decisions.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from families import cpu_line  # noqa: E402
from mdeploy.converters.pte_program import Lowered, program_runner, write_program  # noqa: E402
from mdeploy.demo_assets import prepare_demo_assets  # noqa: E402
from mdeploy.families import FAMILIES, Family  # noqa: E402
from mdeploy.graph.from_torch import graph_from_torch  # noqa: E402
from mdeploy.metrics import compare  # noqa: E402
from mdeploy.quantize.ptq import quantize  # noqa: E402
from mdeploy.quantize.simulate import Simulator  # noqa: E402
from tests.model_library import build, photos, with_photo_statistics  # noqa: E402

HEADER = ("| family (library) | px | fp32: delegates, ops outside | fp32 max abs err / peak | int8: delegates, ops "
          "outside | conversions inside | int8 vs simulation, output steps | int8 SNR dB: program / simulation | "
          "lowering s (fp32, int8) |\n|---|---|---|---|---|---|---|---|---|")


def outside(lowered: Lowered) -> str:
    ops = ", ".join(f"{name} x{count}" for name, count in sorted(lowered.outside.items()))
    return f"{lowered.delegates}, {ops or 'none'}"


def row(family: Family, calib_dir: Path, eval_dir: Path, calib: int, count: int, folder: Path) -> str:
    torch.manual_seed(0)
    model = with_photo_statistics(build(family), photos(calib_dir, family.size))
    calibration = photos(calib_dir, family.size, count=calib, spread=True).numpy()
    evaluation = photos(eval_dir, family.size, count=count, spread=True).numpy()
    with torch.no_grad():
        reference = model(torch.from_numpy(evaluation)).numpy()
    graph = graph_from_torch(model, (1, 3, family.size, family.size))
    qgraph = quantize(graph, calibration)
    simulated = Simulator(qgraph)(evaluation)
    cells, seconds, got = [], [], {}
    for precision, quantized in (("fp32", None), ("int8", qgraph)):
        path = folder / f"{family.name}.{precision}.pte"
        started = time.perf_counter()
        lowered = write_program(graph, quantized, path)
        seconds.append(time.perf_counter() - started)
        run = program_runner(path)
        got[precision] = np.concatenate([run(evaluation[i:i + 1])[0] for i in range(len(evaluation))])
        cells.append(outside(lowered))
        if precision == "int8":
            cells.append(str(lowered.inside.get("XNNConvert", 0)))
    peak = float(np.abs(reference).max())
    fp32_error = float(np.abs(got["fp32"] - reference).max())
    step = qgraph.activations[graph.outputs[0]].scale
    distance = float(np.abs(got["int8"] - simulated).max()) / step
    program, simulation = compare(reference, got["int8"]).snr_db, compare(reference, simulated).snr_db
    return (f"| {family.title} ({family.library}) | {family.size} | {cells[0]} | {fp32_error:.1e} / {peak:.1f} | "
            f"{cells[1]} | {cells[2]} | {distance:.1f} | {program:.1f} / {simulation:.1f} | "
            f"{seconds[0]:.0f}, {seconds[1]:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="", help="comma-separated names (default: every supported family)")
    parser.add_argument("--calib", type=int, default=48)
    parser.add_argument("--eval", type=int, default=24)
    args = parser.parse_args()
    torch.set_num_threads(1)
    wanted = [name for name in args.families.split(",") if name]
    unknown = sorted(set(wanted) - {f.name for f in FAMILIES})
    if unknown:
        parser.error(f"unknown families {', '.join(unknown)}: choose from {', '.join(f.name for f in FAMILIES)}")
    chosen = [f for f in FAMILIES if f.supported and (not wanted or f.name in wanted)]
    assets = prepare_demo_assets(ROOT / ".cache" / "mdeploy-demo")
    print(f"CPU: {cpu_line()}\n{args.calib} calibration / {args.eval} held-out photos per family\n\n{HEADER}",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for family in chosen:
            print(row(family, assets.calib_dir, assets.eval_dir, args.calib, args.eval, Path(tmp)), flush=True)


if __name__ == "__main__":
    main()
