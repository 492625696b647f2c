"""How the equalisation floor (``QuantRecipe.equalize_range_floor``) was chosen, and what it does on held-out photos.

Equalisation magnifies a channel that calibration barely excites until its calibration maximum reaches the tensor's,
which leaves it no headroom for photos that excite it more. The floor bounds the magnification. It is chosen here
on the calibration photos alone: two-fold cross-validation over the two halves of the calibration folder (whole
photos: a photo's crops sit together in name order), each half quantised and judged on the other, in the quantiser's
simulation. Then each floor is judged once on the held-out photos, which played no part in the choice.

    .venv/bin/python bench/equalize_floor.py [--models mobilenet_v2,efficientnet_lite0] [--floors 0,0.1,0.2,0.3,0.4]
        [--held-out]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from ptq_compare import Case, selected_cases  # noqa: E402

from mdeploy.calibration.config import QuantRecipe  # noqa: E402
from mdeploy.graph.from_torch import graph_from_torch  # noqa: E402
from mdeploy.graph.ir import Graph  # noqa: E402
from mdeploy.metrics import compare  # noqa: E402
from mdeploy.parity import run_batches, torch_runner  # noqa: E402
from mdeploy.quantize.ptq import quantize  # noqa: E402
from mdeploy.quantize.simulate import Simulator  # noqa: E402

CROPS_PER_PHOTO = 16  # mdeploy.demo_assets: CALIB_CROPS over 16 photos
DEMO_CALIB = 200  # the demo's --calib-size: the held-out column quantises on these, as the demo does


def snr(graph: Graph, floor: float, fit: np.ndarray, test: np.ndarray, reference: np.ndarray) -> float:
    recipe = dataclasses.replace(QuantRecipe.default(), equalize_range_floor=floor)
    return compare(reference, Simulator(quantize(graph, fit, recipe))(test)).snr_db


def run(case: Case, floors: list[float], held_out: bool) -> None:
    graph = graph_from_torch(case.model, (1, *case.calib.shape[1:]))
    calib, n = case.calib, len(case.calib)
    half = (n // (2 * CROPS_PER_PHOTO)) * CROPS_PER_PHOTO  # a photo boundary
    first, second = calib[:half], calib[half:]
    ref_first, ref_second = (run_batches(torch_runner(case.model), part) for part in (first, second))
    ref_eval = run_batches(torch_runner(case.model), case.eval) if held_out else None
    print(f"\n### {case.name}: calibration halves of {len(first)} / {len(second)} crops; "
          f"held out: {len(case.eval)} crops of other photos\n")
    print("| floor | first half -> second | second -> first | mean (the choice) |"
          + (f" held out, quantised on the first {DEMO_CALIB} calibration crops |" if held_out else ""))
    print("|---|---|---|---|" + ("---|" if held_out else ""))
    for floor in floors:
        a = snr(graph, floor, first, second, ref_second)
        b = snr(graph, floor, second, first, ref_first)
        row = f"| {floor:g} | {a:.2f} | {b:.2f} | {(a + b) / 2:.2f} |"
        if ref_eval is not None:
            row += f" {snr(graph, floor, calib[:DEMO_CALIB], case.eval, ref_eval):.2f} |"
        print(row, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobilenet_v2,efficientnet_lite0", type=lambda s: s.split(","))
    parser.add_argument("--floors", default="0,0.1,0.2,0.3,0.4", type=lambda s: [float(f) for f in s.split(",")])
    parser.add_argument("--calib", type=int, default=256)
    parser.add_argument("--eval", type=int, default=320)
    parser.add_argument("--held-out", action="store_true", help="also judge each floor on the held-out photos")
    args = parser.parse_args()
    for _, case in selected_cases(parser, args):
        run(case, args.floors, args.held_out)


if __name__ == "__main__":
    main()
