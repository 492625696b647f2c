"""Fuzz the model and sample loaders for a bounded time (``MDEPLOY_FUZZ_SECONDS``, default 20): every mutant of a
valid file must load or raise an MdeployError; never another exception, a crash or a hang (see
``tests/fuzz_loaders.py``). Mutants that once broke a loader are replayed first."""

from __future__ import annotations

import os
from pathlib import Path

from tests.fuzz_loaders import REGRESSIONS, run_fuzz

SECONDS = float(os.environ.get("MDEPLOY_FUZZ_SECONDS", "20"))
SEED = int(os.environ.get("MDEPLOY_FUZZ_SEED", "0"))


def test_mutated_models_and_samples_load_or_fail_cleanly(tmp_path: Path) -> None:
    report = run_fuzz(SECONDS, tmp_path, seed=SEED, replay=REGRESSIONS)
    print(report.summary())
    replayed = report.outcomes[: len(REGRESSIONS)]
    assert [(o.seed_file, o.mutator, o.rng_seed) for o in replayed] == REGRESSIONS
    assert len(report.outcomes) > len(REGRESSIONS)  # the time budget ran new cases too
    assert {o.status for o in report.outcomes} <= {"ok", "mdeploy_error"}, "\n".join(
        f"{o.status}: ({o.seed_file!r}, {o.mutator!r}, {o.rng_seed}): {o.detail}" for o in report.findings)
