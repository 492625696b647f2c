"""Fuzz the model and sample loaders: every mutant of a valid file must load or raise an MdeployError; never another
exception, a crash or a hang (see ``tests/fuzz_loaders.py``). Mutants that once broke a loader are replayed first;
then a fixed number of new mutants runs (``MIN_CASES``: the same cases however busy the machine is, so that the test
does not depend on speed), and a time budget (``MDEPLOY_FUZZ_SECONDS``, default 20) only adds more."""

from __future__ import annotations

import os
from pathlib import Path

from tests.fuzz_loaders import MODEL_SEEDS, REGRESSIONS, SAMPLE_SEEDS, run_fuzz

SECONDS = float(os.environ.get("MDEPLOY_FUZZ_SECONDS", "20"))
SEED = int(os.environ.get("MDEPLOY_FUZZ_SEED", "0"))
SEED_FILES = MODEL_SEEDS + SAMPLE_SEEDS
MIN_CASES = 2 * len(SEED_FILES)  # the seed files take turns: two new mutants of each, whatever the time


def test_mutated_models_and_samples_load_or_fail_cleanly(tmp_path: Path) -> None:
    report = run_fuzz(SECONDS, tmp_path, seed=SEED, replay=REGRESSIONS, min_cases=MIN_CASES)
    print(report.summary())
    replayed, new = report.outcomes[: len(REGRESSIONS)], report.outcomes[len(REGRESSIONS):]
    assert [(o.seed_file, o.mutator, o.rng_seed) for o in replayed] == REGRESSIONS
    assert len(new) >= MIN_CASES  # new cases ran too, however long the replay took
    assert sorted(o.seed_file for o in new[:MIN_CASES]) == sorted(SEED_FILES * 2)
    assert len({(o.seed_file, o.mutator, o.rng_seed) for o in new}) == len(new)  # each one a different mutant
    assert {o.status for o in report.outcomes} <= {"ok", "mdeploy_error"}, "\n".join(
        f"{o.status}: ({o.seed_file!r}, {o.mutator!r}, {o.rng_seed}): {o.detail}" for o in report.findings)
