"""Calibration and evaluation folders read for a command, with a progress line and warnings."""

from __future__ import annotations

from pathlib import Path

from mdeploy.calibration.dataset import SampleSet
from mdeploy.calibration.preprocess import Preprocess
from mdeploy.ui import Reporter


def load_samples(folder: Path, preprocess: Preprocess, limit: int, seed: int, role: str, reporter: Reporter,
                 min_samples: int) -> SampleSet:
    samples = SampleSet.from_folder(folder, preprocess, limit=limit, seed=seed, min_samples=min_samples)
    skipped = len(samples.report.skipped)
    note = f", {skipped} unreadable files skipped (listed in manifest.json)" if skipped else ""
    reporter.step(f"{role}: {len(samples)} samples from {folder}{note}")
    warning = samples.report.small_images_warning(preprocess.crop)
    if warning:
        reporter.warn(f"{role} data {folder}: {warning}")
    return samples
