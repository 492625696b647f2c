"""SampleSet: folder reading, skipping and reporting, determinism, hashing and the disjointness check."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mdeploy.calibration.dataset import SampleSet, disjoint_check
from mdeploy.calibration.preprocess import Layout, Preprocess
from mdeploy.errors import BadInputError

PREPROCESS = Preprocess(resize=20, crop=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
GOOD_SAMPLES = 12  # 4 images + 1 + 4 (.npy) + 1 + 2 (.npz)


def noise_image(seed: int, size=(30, 24)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def tensor(seed: int, shape=(3, 16, 16)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    """Images and tensors in nested folders, plus files that must be skipped or ignored."""
    root = tmp_path / "samples"
    (root / "nested" / "deeper").mkdir(parents=True)
    noise_image(1).save(root / "a.jpg")
    noise_image(2).save(root / "nested" / "b.PNG")
    noise_image(3).save(root / "nested" / "deeper" / "c.bmp")
    noise_image(4).save(root / "d.webp", lossless=True)
    np.save(root / "one.npy", tensor(5))
    np.save(root / "nested" / "batch.npy", tensor(6, (4, 3, 16, 16)))
    np.savez(root / "pack.npz", single=tensor(7), pair=tensor(8, (2, 3, 16, 16)).astype(np.float64))
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (root / "nested" / "empty.png").write_bytes(b"")
    (root / "damaged.npy").write_bytes(b"\x93NUMPY garbage")
    (root / "notes.txt").write_text("not a sample")
    return root


def test_reads_images_and_tensors_recursively_and_reports_skipped_files(mixed_folder: Path):
    samples = SampleSet.from_folder(mixed_folder, PREPROCESS)
    report = samples.report
    assert len(samples) == GOOD_SAMPLES == report.used
    assert report.total_files == 10 and report.files_used == 7 and report.ignored_files == 1
    assert sorted(item.path.name for item in report.skipped) == ["corrupt.jpg", "damaged.npy", "empty.png"]
    reasons = {item.path.name: item.reason for item in report.skipped}
    assert reasons["empty.png"] == "empty file"
    assert "3 skipped" in report.summary()
    assert len(samples.paths) == GOOD_SAMPLES
    assert samples.paths.count(mixed_folder / "nested" / "batch.npy") == 4
    assert samples.paths.count(mixed_folder / "pack.npz") == 3


def test_samples_are_float32_in_the_preprocess_layout(mixed_folder: Path):
    samples = SampleSet.from_folder(mixed_folder, PREPROCESS)
    for sample in samples:
        assert sample.dtype == np.float32 and sample.shape == (3, 16, 16)
    image_index = samples.paths.index(mixed_folder / "a.jpg")
    expected = PREPROCESS(Image.open(mixed_folder / "a.jpg"))
    np.testing.assert_array_equal(samples[image_index], expected)
    np.testing.assert_array_equal(samples[samples.paths.index(mixed_folder / "one.npy")], tensor(5))


def test_order_is_deterministic_per_seed(mixed_folder: Path):
    first = SampleSet.from_folder(mixed_folder, PREPROCESS, seed=3)
    again = SampleSet.from_folder(mixed_folder, PREPROCESS, seed=3)
    assert first.paths == again.paths
    np.testing.assert_array_equal(first.to_array(), again.to_array())
    orders = {tuple(SampleSet.from_folder(mixed_folder, PREPROCESS, seed=seed).paths) for seed in range(4)}
    assert len(orders) > 1


def test_limit_keeps_the_first_samples_of_the_shuffled_order(mixed_folder: Path):
    full = SampleSet.from_folder(mixed_folder, PREPROCESS, seed=1)
    limited = SampleSet.from_folder(mixed_folder, PREPROCESS, seed=1, limit=5)
    assert len(limited) == limited.report.used == 5
    np.testing.assert_array_equal(limited.to_array(), full.to_array()[:5])
    assert limited.report.files_used + len(limited.report.skipped) + limited.report.files_beyond_limit == 10


def test_is_re_iterable_and_batches_cover_every_sample_once(mixed_folder: Path):
    samples = SampleSet.from_folder(mixed_folder, PREPROCESS)
    first, second = list(samples), list(samples)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    batches = list(samples.batches(5))
    assert [batch.shape[0] for batch in batches] == [5, 5, 2]
    all_samples = samples.to_array()
    assert all_samples.shape == (GOOD_SAMPLES, 3, 16, 16) and all_samples.dtype == np.float32
    np.testing.assert_array_equal(np.concatenate(batches), all_samples)
    first[0][:] = 0  # callers own what they get
    assert not np.array_equal(samples[0], first[0])
    with pytest.raises(BadInputError, match="batch size"):
        next(samples.batches(0))


def test_sha256_is_stable_and_follows_content_and_preprocessing(mixed_folder: Path):
    digest = SampleSet.from_folder(mixed_folder, PREPROCESS).sha256
    assert digest == SampleSet.from_folder(mixed_folder, PREPROCESS).sha256
    assert len(digest) == 64
    other_preprocess = Preprocess(resize=20, crop=16, mean=(0.4, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    np.savez(mixed_folder / "pack.npz", single=tensor(7), pair=tensor(8, (2, 3, 16, 16)))  # rewrite as float32
    assert SampleSet.from_folder(mixed_folder, PREPROCESS).sha256 == digest  # same values, same hash
    noise_image(99).save(mixed_folder / "a.jpg")
    assert SampleSet.from_folder(mixed_folder, PREPROCESS).sha256 != digest
    (mixed_folder / "a.jpg").unlink()
    noise_image(1).save(mixed_folder / "a.jpg")
    assert SampleSet.from_folder(mixed_folder, PREPROCESS).sha256 == digest
    (mixed_folder / "notes.txt").unlink()  # ignored files do not count
    assert SampleSet.from_folder(mixed_folder, PREPROCESS).sha256 == digest
    with pytest.raises(BadInputError):  # the tensors do not fit a different crop
        SampleSet.from_folder(mixed_folder, Preprocess(resize=20, crop=12, mean=(0,) * 3, std=(1,) * 3))
    images_only = mixed_folder.parent / "images"
    images_only.mkdir()
    shutil.copy(mixed_folder / "a.jpg", images_only)
    assert (
        SampleSet.from_folder(images_only, PREPROCESS).sha256
        != SampleSet.from_folder(images_only, other_preprocess).sha256
    )


def test_too_few_samples_names_the_folder_the_counts_and_the_need(mixed_folder: Path):
    with pytest.raises(BadInputError) as caught:
        SampleSet.from_folder(mixed_folder, PREPROCESS, min_samples=50)
    message = str(caught.value)
    assert str(mixed_folder) in message and "found 12 usable samples" in message
    assert "3 skipped" in message and "at least 50" in message and ".jpg" in message


def test_a_folder_of_only_unusable_files_is_an_error(tmp_path: Path):
    (tmp_path / "broken.png").write_bytes(b"nope")
    (tmp_path / "readme.md").write_text("hi")
    with pytest.raises(BadInputError, match="found 0 usable samples.*1 skipped.*1 files with other extensions"):
        SampleSet.from_folder(tmp_path, PREPROCESS)


def test_missing_folder_and_file_instead_of_folder_are_errors(tmp_path: Path):
    with pytest.raises(BadInputError, match="does not exist"):
        SampleSet.from_folder(tmp_path / "nowhere", PREPROCESS)
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(BadInputError, match="is not a folder"):
        SampleSet.from_folder(tmp_path / "file.jpg", PREPROCESS)


@pytest.mark.parametrize(
    "limit, min_samples, message",
    [(0, 1, "limit must be a positive integer"), (4, 8, "below the 8 samples needed"), (None, -1, "min_samples")],
)
def test_bad_limits_are_errors(tmp_path: Path, limit, min_samples, message):
    with pytest.raises(BadInputError, match=message):
        SampleSet.from_folder(tmp_path, PREPROCESS, limit=limit, min_samples=min_samples)


def test_tensors_of_the_wrong_shape_or_type_stop_with_a_clear_error(tmp_path: Path):
    np.save(tmp_path / "nhwc.npy", tensor(1, (2, 16, 16, 3)))
    with pytest.raises(BadInputError, match=r"nhwc\.npy has shape \(2, 16, 16, 3\).*looks like NHWC"):
        SampleSet.from_folder(tmp_path, PREPROCESS)
    (tmp_path / "nhwc.npy").unlink()
    np.save(tmp_path / "ints.npy", np.zeros((3, 16, 16), np.uint8))
    with pytest.raises(BadInputError, match="uint8 values"):
        SampleSet.from_folder(tmp_path, PREPROCESS)
    (tmp_path / "ints.npy").unlink()
    np.savez(tmp_path / "nan.npz", x=np.full((3, 16, 16), np.nan, np.float32))
    with pytest.raises(BadInputError, match=r"nan\.npz\[x\] contains NaN"):
        SampleSet.from_folder(tmp_path, PREPROCESS)


def test_nhwc_layout_reads_nhwc_tensors_and_lays_images_out_channels_last(tmp_path: Path):
    nhwc = Preprocess(resize=20, crop=16, mean=(0.5,) * 3, std=(0.25,) * 3, layout=Layout.NHWC)
    np.save(tmp_path / "batch.npy", tensor(1, (3, 16, 16, 3)))
    noise_image(2).save(tmp_path / "photo.png")
    samples = SampleSet.from_folder(tmp_path, nhwc)
    assert len(samples) == 4 and samples.to_array().shape == (4, 16, 16, 3)


def test_from_arrays_wraps_in_memory_samples():
    arrays = tensor(3, (6, 3, 16, 16))
    samples = SampleSet.from_arrays(arrays, PREPROCESS)
    np.testing.assert_array_equal(samples.to_array(), arrays)
    assert [batch.shape[0] for batch in samples.batches(4)] == [4, 2]


def test_disjoint_check_catches_a_shared_path_or_shared_content(tmp_path: Path):
    calib_dir, eval_dir = tmp_path / "calib", tmp_path / "eval"
    calib_dir.mkdir()
    eval_dir.mkdir()
    for seed in range(3):
        noise_image(seed).save(calib_dir / f"c{seed}.png")
        noise_image(10 + seed).save(eval_dir / f"e{seed}.png")
    calib = SampleSet.from_folder(calib_dir, PREPROCESS)
    disjoint_check(calib, SampleSet.from_folder(eval_dir, PREPROCESS))  # no error
    with pytest.raises(BadInputError, match="share 3 files"):
        disjoint_check(calib, SampleSet.from_folder(calib_dir, PREPROCESS))
    shutil.copy(calib_dir / "c1.png", eval_dir / "copy.png")
    with pytest.raises(BadInputError, match=r"share 1 file \(.*c1\.png = .*copy\.png\).*separate folders"):
        disjoint_check(calib, SampleSet.from_folder(eval_dir, PREPROCESS))


def source_photo(crop: Path) -> str:
    return crop.stem.rsplit("_", 1)[0]  # crops are named <photo>_<index>.jpg


def test_real_demo_crops_form_disjoint_imagenet_sets(calib_dir: Path, eval_dir: Path):
    preprocess = Preprocess.imagenet()
    calib = SampleSet.from_folder(calib_dir, preprocess, min_samples=256)
    evaluation = SampleSet.from_folder(eval_dir, preprocess, min_samples=320)
    assert (len(calib), len(evaluation)) == (256, 320) and not calib.report.skipped
    disjoint_check(calib, evaluation)
    assert not {source_photo(p) for p in calib.paths} & {source_photo(p) for p in evaluation.paths}
    batch = next(calib.batches(8))
    assert batch.shape == (8, 3, 224, 224) and np.isfinite(batch).all()
    assert -2.2 < batch.min() < -1.0 and 2.0 < batch.max() < 2.7  # ImageNet-normalised real pixels
