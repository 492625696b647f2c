"""Calibration and evaluation samples read from a folder of images and tensors.

Images go through the shared ``Preprocess``; ``.npy``/``.npz`` tensors are taken as already
preprocessed. Unreadable files are skipped and reported rather than aborting a long run, but a
tensor of the wrong shape is an error: it means the whole folder was prepared for another model.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
import stat
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mdeploy.calibration.preprocess import (
    Layout,
    Preprocess,
    UnreadableImageError,
    decode_image,
)
from mdeploy.errors import BadInputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
TENSOR_SUFFIXES = (".npy", ".npz")
_NPY_MAGIC = b"\x93NUMPY"
_NPZ_MAGIC = b"PK"  # .npz files are zip archives
_SHOWN_IN_ERRORS = 3  # skipped files named in a one-line error; the report lists them all
SMALL_IMAGE_FRACTION = 0.5  # images whose short side is under this fraction of the crop are reported as small


@dataclass(frozen=True)
class SkippedFile:
    path: Path
    reason: str


@dataclass
class DatasetReport:
    """What ``SampleSet.from_folder`` found: ``used`` samples came from ``files_used`` of ``total_files``
    candidate files; ``files_beyond_limit`` were not read because ``limit`` samples were reached."""

    folder: Path | None
    used: int = 0
    files_used: int = 0
    total_files: int = 0
    skipped: list[SkippedFile] = field(default_factory=list)
    ignored_files: int = 0  # files whose suffix is neither an image nor a tensor
    files_beyond_limit: int = 0
    small_images: int = 0  # images whose short side is under SMALL_IMAGE_FRACTION of the crop: upscaled a lot

    def small_images_warning(self, crop: int) -> str | None:
        """A warning when images are much smaller than the model's input (upscaled, they look unlike real
        inputs, so ranges calibrated on them fit real inputs badly), else None."""
        if not self.small_images:
            return None
        images = f"{self.small_images} of {self.files_used} files used"
        return (f"{images} are images whose short side is under {int(crop * SMALL_IMAGE_FRACTION)} px, much smaller "
                f"than the {crop} px input: they are upscaled, so they may not represent real inputs; use images "
                "at least as large as the input")

    def summary(self) -> str:
        text = f"{self.used} samples from {self.files_used} of {self.total_files} files in {self.folder}"
        if self.skipped:
            text += f"; {len(self.skipped)} skipped ({_describe_skipped(self.skipped)})"
        return text


class SampleSet:
    """An ordered, re-iterable set of preprocessed float32 samples of shape ``preprocess.sample_shape``."""

    def __init__(
        self,
        samples: list[np.ndarray],
        paths: list[Path],
        preprocess: Preprocess,
        report: DatasetReport,
        file_digests: dict[Path, str],
    ):
        # Image samples are kept as uint8 crops (4x smaller than float32) and normalised on access;
        # tensor samples are float32 already. The dtype tells them apart.
        self._samples = samples
        self.paths = paths
        self.preprocess = preprocess
        self.report = report
        self._file_digests = file_digests  # resolved path -> sha256 of the file's bytes
        self._sha256: str | None = None

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        preprocess: Preprocess,
        limit: int | None = None,
        seed: int = 0,
        min_samples: int = 1,
    ) -> SampleSet:
        """Read every image and tensor file under ``folder`` (recursively) in a seeded shuffled order,
        keeping the first ``limit`` samples; raise ``BadInputError`` when fewer than ``min_samples`` remain."""
        folder = Path(folder)
        if not folder.exists():
            raise BadInputError(f"sample folder {folder} does not exist: check the path.")
        if not folder.is_dir():
            raise BadInputError(f"{folder} is not a folder: pass the folder that holds the images or tensors.")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise BadInputError(f"sample limit must be a positive integer or None, got {limit!r}.")
        if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 0:
            raise BadInputError(f"min_samples must be a non-negative integer, got {min_samples!r}.")
        if limit is not None and limit < min_samples:
            raise BadInputError(
                f"sample limit {limit} is below the {min_samples} samples needed: "
                f"raise the limit to {min_samples} or more."
            )

        entries = sorted((p for p in folder.rglob("*") if not p.is_dir()), key=lambda p: p.relative_to(folder).as_posix())
        files = [p for p in entries if p.is_file()]
        candidates = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES + TENSOR_SUFFIXES]
        random.Random(seed).shuffle(candidates)
        # FIFOs, sockets, devices and broken links: never opened (reading a FIFO would wait forever), but listed.
        special = [SkippedFile(p, _not_regular(p)) for p in entries if not p.is_file()]
        report = DatasetReport(folder, total_files=len(candidates) + len(special),
                               ignored_files=len(files) - len(candidates), skipped=special)

        samples: list[np.ndarray] = []
        paths: list[Path] = []
        digests: dict[Path, str] = {}
        for path in candidates:
            if limit is not None and len(samples) >= limit:
                report.files_beyond_limit += 1
                continue
            try:
                data = path.read_bytes()
                if not data:
                    raise _Unusable("empty file")
                file_samples = _read_samples(path, data, preprocess, report)
            except _Unusable as err:
                report.skipped.append(SkippedFile(path, str(err)))
                continue
            except OSError as err:
                report.skipped.append(SkippedFile(path, f"cannot read: {err.strerror or err}"))
                continue
            if limit is not None:
                file_samples = file_samples[: limit - len(samples)]
            samples.extend(file_samples)
            paths.extend([path] * len(file_samples))
            digests[path.resolve()] = hashlib.sha256(data).hexdigest()
            report.files_used += 1
        report.used = len(samples)

        if len(samples) < min_samples:
            found = f"found {len(samples)} usable sample{'s' if len(samples) != 1 else ''} in {len(candidates)} files"
            if report.skipped:
                found += f" ({len(report.skipped)} skipped: {_describe_skipped(report.skipped)})"
            if report.ignored_files:
                found += f"; {report.ignored_files} files with other extensions were ignored"
            raise BadInputError(
                f"{folder}: {found}; at least {min_samples} are needed. Add images ({' '.join(IMAGE_SUFFIXES)}) "
                f"or .npy/.npz tensors of shape {preprocess.sample_shape} to the folder."
            )
        return cls(samples, paths, preprocess, report, digests)

    @classmethod
    def from_arrays(cls, samples: np.ndarray, preprocess: Preprocess, name: str = "<arrays>") -> SampleSet:
        """A set from preprocessed samples already in memory, shape (N, *preprocess.sample_shape)."""
        arrays = _tensor_samples(np.asarray(samples), name, preprocess)
        report = DatasetReport(folder=None, used=len(arrays))
        return cls(arrays, [Path(name)] * len(arrays), preprocess, report, {})

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int) -> np.ndarray:
        sample = self._samples[index]
        if sample.dtype == np.uint8:
            return self.preprocess.normalize(sample)
        return sample.copy()  # callers may modify what they get; the set stays as read

    def __iter__(self) -> Iterator[np.ndarray]:
        for index in range(len(self._samples)):
            yield self[index]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Consecutive (N, *sample_shape) float32 batches; the last one may be smaller."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise BadInputError(f"batch size must be a positive integer, got {batch_size!r}.")
        for start in range(0, len(self._samples), batch_size):
            stop = min(start + batch_size, len(self._samples))
            yield np.stack([self[index] for index in range(start, stop)])

    def to_array(self) -> np.ndarray:
        if not self._samples:
            return np.empty((0, *self.preprocess.sample_shape), np.float32)
        return np.stack(list(self))

    @property
    def sha256(self) -> str:
        """Digest of every sample's float32 bytes, in order, and of the preprocessing: the calibration-set
        hash recorded in manifest.json."""
        if self._sha256 is None:
            digest = hashlib.sha256(json.dumps(self.preprocess.to_dict(), sort_keys=True).encode())
            for sample in self:
                digest.update(sample.tobytes())
            self._sha256 = digest.hexdigest()
        return self._sha256

    def __repr__(self) -> str:
        return f"SampleSet({len(self)} samples of {self.preprocess.sample_shape} from {self.report.folder})"


def disjoint_check(calib: SampleSet, evaluation: SampleSet) -> None:
    """Raise ``BadInputError`` when a file (same path or same bytes) feeds both sets: judging int8 on its own
    calibration data flatters it."""
    eval_by_digest = {digest: path for path, digest in evaluation._file_digests.items()}
    shared: list[str] = []
    for path, digest in calib._file_digests.items():
        if path in evaluation._file_digests:
            shared.append(str(path))
        elif digest in eval_by_digest:
            shared.append(f"{path} = {eval_by_digest[digest]}")
    if shared:
        shown = ", ".join(shared[:_SHOWN_IN_ERRORS]) + (", ..." if len(shared) > _SHOWN_IN_ERRORS else "")
        raise BadInputError(
            f"the calibration and evaluation sets share {len(shared)} file{'s' if len(shared) != 1 else ''} "
            f"({shown}): evaluating on calibration data overstates int8 accuracy. "
            f"Keep the two sets in separate folders with different files."
        )


class _Unusable(Exception):
    """A file that is skipped and reported (corrupt, empty), as opposed to one that stops the run."""


def _not_regular(path: Path) -> str:
    try:
        mode = path.stat().st_mode
    except OSError:
        return "a broken link: never read"
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"))
    kind = next((name for test, name in kinds if test(mode)), "a special file")
    return f"not a regular file ({kind}): never read"


def _read_samples(path: Path, data: bytes, preprocess: Preprocess, report: DatasetReport) -> list[np.ndarray]:
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        try:
            image = decode_image(data, path)
        except UnreadableImageError as err:
            raise _Unusable(err.reason) from None
        if min(image.size) < preprocess.crop * SMALL_IMAGE_FRACTION:
            report.small_images += 1
        return [preprocess.resize_and_crop(image)]
    magic = _NPY_MAGIC if suffix == ".npy" else _NPZ_MAGIC
    if not data.startswith(magic):
        raise _Unusable(f"not a {suffix} file (its first bytes are not {magic!r})")
    try:
        if suffix == ".npy":
            arrays = [("", _load_npy(data))]
        else:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                arrays = []
                for member in archive.namelist():
                    key = member.removesuffix(".npy")
                    arrays.append((f"[{key}]", _load_npy(archive.read(member), f"member {key} ")))
    except _Unusable:
        raise
    # numpy raises ValueError, EOFError, ...; zipfile BadZipFile, zlib.error, UnicodeDecodeError, ... on damaged files.
    except Exception as err:  # noqa: BLE001
        raise _Unusable(f"not a readable {suffix} file ({type(err).__name__}: {_short(err)})") from None
    samples: list[np.ndarray] = []
    for key, array in arrays:
        samples.extend(_tensor_samples(array, f"{path}{key}", preprocess))
    return samples


def _load_npy(data: bytes, what: str = "") -> np.ndarray:
    """One .npy array from its bytes, never unpickling (files may come from anywhere), and checking first that the
    file holds the bytes its header announces: a damaged header must not make NumPy allocate gigabytes."""
    if not data.startswith(_NPY_MAGIC):
        raise _Unusable(f"{what}is not .npy data (its first bytes are not {_NPY_MAGIC!r})")
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    if dtype.hasobject:
        raise _Unusable(f"{what}holds Python objects, which are never unpickled; save a float array")
    needed = math.prod(shape) * dtype.itemsize
    available = len(data) - stream.tell()
    if needed > available:
        raise _Unusable(f"{what}is truncated: its header announces {needed} bytes of data, the file holds {available}")
    stream.seek(0)
    return np.load(stream, allow_pickle=False)


def _tensor_samples(array: np.ndarray, name: str, preprocess: Preprocess) -> list[np.ndarray]:
    """Split one (C,H,W) sample or an (N,C,H,W) batch (per layout) into float32 samples, or raise."""
    expected = preprocess.sample_shape
    if not np.issubdtype(array.dtype, np.floating):
        raise BadInputError(
            f"{name} holds {array.dtype} values; tensors must be preprocessed float arrays of shape {expected}. "
            f"Save raw pictures as .png/.jpg instead, or move this file out of the folder."
        )
    if array.shape == expected:
        batch: Sequence[np.ndarray] = [array]
    elif array.ndim == 4 and array.shape[1:] == expected:
        batch = list(array)
    else:
        raise BadInputError(
            f"{name} has shape {array.shape}, but the model takes one sample {expected} or a batch "
            f"(N, {', '.join(map(str, expected))}).{_layout_hint(array.shape, preprocess)} "
            f"Save tensors in the model's input shape, or move this file out of the folder."
        )
    samples = [np.ascontiguousarray(sample, dtype=np.float32) for sample in batch]
    if not all(np.isfinite(sample).all() for sample in samples):
        raise BadInputError(f"{name} contains NaN or infinite values: fix the code that produced it.")
    return samples


def _short(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else type(err).__name__


def _layout_hint(shape: tuple[int, ...], preprocess: Preprocess) -> str:
    other = Layout.NHWC if preprocess.layout is Layout.NCHW else Layout.NCHW
    c, s = 3, preprocess.crop
    other_shape = (c, s, s) if other is Layout.NCHW else (s, s, c)
    if shape[-3:] == other_shape:
        return f" It looks like {other.value} data: set the layout to {other.value} or transpose the arrays."
    return ""


def _describe_skipped(skipped: list[SkippedFile]) -> str:
    shown = "; ".join(f"{item.path.name}: {item.reason}" for item in skipped[:_SHOWN_IN_ERRORS])
    return shown + ("; ..." if len(skipped) > _SHOWN_IN_ERRORS else "")
