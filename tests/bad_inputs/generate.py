"""Writes the bad-input corpus into a folder: broken models, broken data folders and awkward output paths.

Nothing here is committed as a binary: ``build_corpus(root)`` makes every file from a small MobileNetV3-Small
(width 0.25, 10 classes) and NumPy/PIL in a few seconds. ``cases.py`` says what the CLI must do with each file.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from mdeploy.zoo import Arch, ModelConfig, build_model

SIZE = 32  # --input-size of every case: small enough that a whole conversion takes seconds
CONFIG = ModelConfig(Arch.mobilenet_v3_small, width_mult=0.25, num_classes=10)
EXIF_ORIENTATION = 0x0112
MIN_CALIBRATION = 16  # mdeploy.pipeline.MIN_CALIBRATION_SAMPLES
MIXED_USABLE, MIXED_SKIPPED = 16, 3  # the images of data/mixed_images that load, and those skipped
TINY_IMAGES = 3  # 1x1 images in data/odd_files


@dataclass
class Corpus:
    root: Path
    paths: dict[str, Path] = field(default_factory=dict)

    def add(self, key: str, path: Path) -> Path:
        self.paths[key] = path
        return path

    def format(self, text: str) -> str:
        """``text`` with ``{key}`` replaced by the corpus path of that key."""
        return text.format(**{key: str(path) for key, path in self.paths.items()})


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return build_model(CONFIG).eval()


def example() -> torch.Tensor:
    return torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def torch_bytes(obj: object, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)
    return buffer.getvalue()


def rewrite_zip(data: bytes, edit) -> bytes:
    """A copy of zip ``data`` with each member's bytes passed through ``edit(name, bytes)`` (None drops it)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as zin, zipfile.ZipFile(out, "w") as zout:
        for item in zin.infolist():
            new = edit(item.filename, zin.read(item.filename))
            if new is not None:
                zout.writestr(item, new)
    return out.getvalue()


def add_member(data: bytes, name: str, content: bytes) -> bytes:
    """A copy of zip ``data`` with one more member, named as given (no checks: crafted archives are the point)."""
    out = io.BytesIO(data)
    with zipfile.ZipFile(out, "a") as archive:
        archive.writestr(zipfile.ZipInfo(name), content)
    return out.getvalue()


def mark_as_mdeploy_output(folder: Path) -> None:
    """Give ``folder`` the manifest.json an earlier mdeploy run writes (what ``convert --overwrite`` looks for)."""
    (folder / "manifest.json").write_text(json.dumps({
        "$schema": "manifest.schema.json", "manifest_version": "1.1", "tool_versions": {"mdeploy": "0.1.0"}}))


class Cumsum(nn.Module):
    """A MobileNet whose head runs an op no target supports (aten.cumsum)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.tail = CumsumTail()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.body(x))


class CumsumTail(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(x, dim=1)


class TwoOutputs(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.body(x)
        return y, torch.softmax(y, dim=-1)  # two tensors: the IR carries both, convert's classifier parity does not


class HiddenNan(nn.Module):
    """A NaN in a tensor that is neither a parameter nor a buffer (a constant the trace lifts)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.offset = torch.full((10,), float("nan"))  # a plain attribute: not in the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.offset


def noise_image(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def write_models(corpus: Corpus) -> None:
    folder = corpus.root / "models"
    folder.mkdir()
    model = small_model()
    x = example()
    good = torch_bytes(model.state_dict())
    corpus.add("good_pt", folder / "good.pt").write_bytes(good)
    scripted = torch.jit.trace(model, x)
    corpus.add("good_ts", folder / "good_script.pt")
    torch.jit.save(scripted, corpus.paths["good_ts"])
    corpus.add("good_pt2", folder / "good.pt2")
    program = torch.export.export(model, (x,))
    torch.export.save(program, corpus.paths["good_pt2"])

    corpus.add("missing_model", folder / "missing.pt")
    corpus.add("empty_model", folder / "empty.pt").write_bytes(b"")
    corpus.add("dir_model", folder / "a_folder.pt").mkdir()
    corpus.add("truncated_pt", folder / "truncated.pt").write_bytes(good[: len(good) // 2])
    corpus.add("truncated_ts", folder / "truncated_script.pt").write_bytes(
        corpus.paths["good_ts"].read_bytes()[:-3000]
    )
    corpus.add("truncated_pt2", folder / "truncated.pt2").write_bytes(
        corpus.paths["good_pt2"].read_bytes()[:-5000]
    )
    legacy = torch_bytes(model.state_dict(), _use_new_zipfile_serialization=False)
    corpus.add("truncated_legacy", folder / "truncated_legacy.pt").write_bytes(legacy[: len(legacy) // 3])
    # data.pkl replaced by garbage: the zip is sound, its pickle is not.
    corpus.add("corrupt_pkl", folder / "corrupt_pickle.pt").write_bytes(
        rewrite_zip(good, lambda name, data: b"\x80\x02garbage" * 8 if name.endswith("data.pkl") else data)
    )
    # A tensor file missing from the archive (as after a botched copy).
    corpus.add("missing_entry", folder / "missing_entry.pt").write_bytes(
        rewrite_zip(good, lambda name, data: None if name.endswith("/data/0") else data)
    )
    corpus.add("corrupt_ts", folder / "corrupt_script.pt").write_bytes(
        rewrite_zip(
            corpus.paths["good_ts"].read_bytes(),
            lambda name, data: b"def forward(self x):\n  return ]]\n" if "/code/" in name and name.endswith(".py")
            else data,
        )
    )
    corpus.add("corrupt_pt2", folder / "corrupt.pt2").write_bytes(
        rewrite_zip(
            corpus.paths["good_pt2"].read_bytes(),
            lambda name, data: data[: len(data) // 2] if "/models/" in name and name.endswith(".json") else data,
        )
    )
    corpus.add("garbage", folder / "garbage.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    corpus.add("text", folder / "notes.pt").write_text("these are my training notes, not a model\n" * 20)
    corpus.add("tflite", folder / "model.tflite.pt").write_bytes(b"\x1c\x00\x00\x00TFL3" + bytes(256))
    corpus.add("not_a_model", folder / "hyperparameters.pt").write_bytes(torch_bytes({"epoch": 3, "lr": 0.1}))

    state = model.state_dict()
    partial = {k: v for k, v in state.items() if not k.startswith("classifier.0.")}
    partial["head.extra.weight"] = torch.zeros(3)
    corpus.add("partial_sd", folder / "partial.pt").write_bytes(torch_bytes(partial))
    nan_state = {k: v.clone() for k, v in state.items()}
    nan_state["features.2.block.0.0.weight"].view(-1)[5] = float("nan")
    corpus.add("nan_sd", folder / "nan.pt").write_bytes(torch_bytes(nan_state))
    negative_var = {k: v.clone() for k, v in state.items()}
    negative_var["features.1.block.0.1.running_var"][0] = -4.0  # finite, but BatchNorm folding takes its sqrt
    corpus.add("negative_var_sd", folder / "negative_var.pt").write_bytes(torch_bytes(negative_var))
    inf_model = small_model()
    with torch.no_grad():
        inf_model.classifier[3].bias[1] = float("inf")
    corpus.add("inf_ts", folder / "inf_script.pt")
    torch.jit.save(torch.jit.trace(inf_model, x), corpus.paths["inf_ts"])
    corpus.add("inf_pt2", folder / "inf.pt2")
    torch.export.save(torch.export.export(inf_model, (x,)), corpus.paths["inf_pt2"])
    corpus.add("hidden_nan_pt2", folder / "hidden_nan.pt2")
    torch.export.save(torch.export.export(HiddenNan(small_model()), (x,)), corpus.paths["hidden_nan_pt2"])
    corpus.add("pickled_module", folder / "whole_model.pt").write_bytes(torch_bytes(model))
    corpus.add("unsupported_pt2", folder / "cumsum.pt2")
    torch.export.save(torch.export.export(Cumsum(small_model()), (x,)), corpus.paths["unsupported_pt2"])
    corpus.add("two_outputs_pt2", folder / "two_outputs.pt2")
    torch.export.save(torch.export.export(TwoOutputs(small_model()), (x,)), corpus.paths["two_outputs_pt2"])

    # Zip members that point outside the archive (zip-slip), or that two readers may take for one file.
    good_pt2 = corpus.paths["good_pt2"].read_bytes()
    prefix = zipfile.ZipFile(io.BytesIO(good_pt2)).namelist()[0].split("/")[0]
    for key, member in {"slip_pt2": "../../x", "absolute_pt2": "/tmp/x", "backslash_pt2": f"{prefix}\\..\\..\\x",
                        "case_twin_pt2": f"{prefix.upper()}/archive_format"}.items():
        corpus.add(key, folder / f"{key}.pt2").write_bytes(add_member(good_pt2, member, b"pt2"))
    corpus.add("slip_ts", folder / "slip_script.pt").write_bytes(
        add_member(corpus.paths["good_ts"].read_bytes(), "../../x", b"x"))


def write_data(corpus: Corpus) -> None:
    folder = corpus.root / "data"
    folder.mkdir()
    rng = np.random.default_rng(0)

    calib = corpus.add("calib", folder / "calib")
    calib.mkdir()
    np.save(calib / "batch.npy", rng.standard_normal((MIN_CALIBRATION, 3, SIZE, SIZE)).astype(np.float32))
    evaluation = corpus.add("eval", folder / "eval")
    evaluation.mkdir()
    np.save(evaluation / "batch.npy", rng.standard_normal((8, 3, SIZE, SIZE)).astype(np.float32))

    corpus.add("missing_dir", folder / "missing")
    corpus.add("empty_dir", folder / "empty").mkdir()
    corpus.add("a_file", folder / "a_file.jpg").write_bytes(b"x")
    zero = corpus.add("zero_bytes", folder / "zero_bytes")
    zero.mkdir()
    for name in ("a.jpg", "b.png", "c.npy"):
        (zero / name).write_bytes(b"")
    corrupt = corpus.add("corrupt_images", folder / "corrupt_images")
    corrupt.mkdir()
    jpeg = io.BytesIO()
    noise_image(1).save(jpeg, "JPEG")
    (corrupt / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (corrupt / "not_really.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    (corrupt / "random.webp").write_bytes(rng.bytes(300))
    (corrupt / "empty.bmp").write_bytes(b"")
    only_text = corpus.add("only_text", folder / "only_text")
    only_text.mkdir()
    (only_text / "README.txt").write_text("images go here")
    (only_text / "labels.csv").write_text("a,b\n")
    few = corpus.add("few_images", folder / "few_images")
    few.mkdir()
    for seed in range(3):
        noise_image(seed).save(few / f"{seed}.png")

    for key, array in {
        "wrong_shape": rng.standard_normal((4, 3, 2 * SIZE, 2 * SIZE)).astype(np.float32),
        "nhwc": rng.standard_normal((4, SIZE, SIZE, 3)).astype(np.float32),
        "int_tensors": rng.integers(0, 255, (4, 3, SIZE, SIZE)).astype(np.uint8),
        "nan_tensors": np.full((MIN_CALIBRATION, 3, SIZE, SIZE), np.nan, np.float32),
    }.items():
        sub = corpus.add(key, folder / key)
        sub.mkdir()
        np.save(sub / "samples.npy", array)

    lying = corpus.add("lying_header", folder / "lying_header")
    lying.mkdir()
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (10**9, 3, SIZE, SIZE)})
    (lying / "huge.npy").write_bytes(header.getvalue() + bytes(64))  # the header claims 12 TB of data

    # Every awkward but legitimate image kind, plus broken files that must be skipped and counted.
    mixed = corpus.add("mixed_images", folder / "mixed_images")
    mixed.mkdir()
    for seed in range(2):
        base = noise_image(10 + seed)
        base.convert("L").save(mixed / f"gray{seed}.png")
        base.convert("CMYK").save(mixed / f"cmyk{seed}.jpg")
        Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257).save(mixed / f"sixteen_bit{seed}.png")
        base.quantize(16).save(mixed / f"palette{seed}.png")
        base.quantize(16).save(mixed / f"palette_transparent{seed}.png", transparency=0)
        base.convert("RGBA").save(mixed / f"rgba{seed}.png")
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = 6 + seed * 2
        base.save(mixed / f"rotated{seed}.jpg", exif=exif)
        base.convert("1").save(mixed / f"bilevel{seed}.bmp")
    (mixed / "zero.jpg").write_bytes(b"")
    (mixed / "truncated.jpg").write_bytes(jpeg.getvalue()[:200])
    (mixed / "garbage.png").write_bytes(rng.bytes(500))

    labels = corpus.add("labels_wrong", folder / "labels_wrong.txt")
    labels.write_text("cat\ndog\n")
    corpus.add("labels_right", folder / "labels.txt").write_text("".join(f"class {i}\n" for i in range(10)))


def write_outputs(corpus: Corpus) -> None:
    folder = corpus.root / "outs"
    folder.mkdir()
    corpus.add("out", folder / "new")
    corpus.add("parity_out", folder / "parity_failed")
    existing = corpus.add("existing", folder / "existing")
    existing.mkdir()
    (existing / "keep.txt").write_text("an earlier result")
    previous = corpus.add("previous", folder / "previous")
    previous.mkdir()
    (previous / "marker.txt").write_text("the previous output")
    mark_as_mdeploy_output(previous)
    corpus.add("out_file", folder / "out.txt").write_text("a file, not a folder")
    corpus.add("under_file", corpus.paths["out_file"] / "out")
    corpus.add("no_parent", folder / "missing" / "deeper" / "out")
    corpus.add("unwritable", Path("/proc/mdeploy-bad-inputs-out"))
    # Output paths that are, or hold, or lie inside the inputs: --overwrite must not delete the user's files.
    corpus.add("models_dir", corpus.paths["good_pt"].parent)
    corpus.add("root", corpus.root)
    corpus.add("data_dir", corpus.paths["calib"].parent)
    corpus.add("inside_calib", corpus.paths["calib"] / "out")
    corpus.add("labels_out", corpus.paths["labels_right"])
    # A data folder with a FIFO (reading it would wait forever) and images far smaller than the input.
    odd = corpus.add("odd_files", corpus.root / "data" / "odd_files")
    odd.mkdir()
    for seed in range(MIN_CALIBRATION):
        noise_image(seed, (SIZE, SIZE)).save(odd / f"{seed}.png")
    for seed in range(TINY_IMAGES):
        noise_image(seed, (1, 1)).save(odd / f"tiny{seed}.png")
    if hasattr(os, "mkfifo"):
        os.mkfifo(odd / "pipe.png")


def build_corpus(root: Path) -> Corpus:
    corpus = Corpus(root)
    write_models(corpus)
    write_data(corpus)
    write_outputs(corpus)
    return corpus


if __name__ == "__main__":  # python -m tests.bad_inputs.generate DIR: look at the files
    import sys

    target = Path(sys.argv[1])
    target.mkdir(parents=True, exist_ok=True)
    built = build_corpus(target)
    for key, path in built.paths.items():
        print(f"{key:20s} {path}")
