"""TFLite Support metadata (``TFLITE_METADATA`` + ``labels.txt``) read back by the standard tool, tflite-support's
own ``MetadataDisplayer``, compared with what its image_classifier metadata writer produces for the same model, and
checked against the C++ minimum-parser-version function; the files still load and run on LiteRT and are
byte-identical from one export to the next.

tflite-support is not installed into the venv (its top-level package conflicts with our protobuf): ``./run setup``
unpacks the pinned wheel's ``tensorflow_lite_support/metadata`` into ``.venv/tflite-support/``, with the
``libusb-1.0.so.0`` its compiled modules link to (from the libusb-package wheel: no system library needed), and the
reader runs in a subprocess with ``PYTHONPATH`` and ``LD_LIBRARY_PATH`` pointing there. Nothing is downloaded here."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mdeploy.calibration.preprocess import Preprocess
from mdeploy.converters import REGISTRY, Target
from mdeploy.converters.base import ArtifactInfo, missing_modules
from mdeploy.converters.tflite import TfliteConverter
from mdeploy.converters.tflite_flatbuffer import read_metadata
from mdeploy.converters.tflite_metadata import LABELS_FILE, METADATA_NAME, MIN_PARSER_VERSION, read_summary
from mdeploy.graph.from_torch import graph_from_torch
from mdeploy.graph.ir import Graph
from mdeploy.parity import torch_runner
from mdeploy.quantize.params import QuantizedGraph
from mdeploy.zoo import Arch, ModelConfig, build_model
from tests.test_converters import nearest_int8

pytestmark = pytest.mark.skipif(bool(missing_modules(TfliteConverter())), reason="ai-edge-litert not installed")

SUPPORT = Path(sys.prefix) / "tflite-support"  # where ./run setup unpacks it (see setup() in ./run)
SIZE = 64
CLASSES = 10
PREPROCESS = Preprocess.imagenet(SIZE)
LABELS = tuple(f"class {i} ünïcode" for i in range(CLASSES))
INFO = ArtifactInfo("mnv3-small", PREPROCESS.to_dict(), LABELS, "0.0.test",
                    {"author": "Vision team", "license": "Apache-2.0", "mdeploy.recipe": "{}"})
IMAGENET_MEAN_255 = [123.675, 116.28, 103.53]
IMAGENET_STD_255 = [58.395, 57.12, 57.375]

# Runs in a subprocess with tflite-support's metadata package on the path: reads each model with the standard
# displayer, computes the C++ minimum parser version of its metadata, validates it with MetadataPopulator, and
# writes the reference metadata of tflite-support's image_classifier writer for the same model and parameters.
_READER = r"""
import io, json, os, sys, tempfile, zipfile
from tensorflow_lite_support.metadata.cc.python import _pywrap_metadata_version
from tensorflow_lite_support.metadata.python import metadata as md
from tensorflow_lite_support.metadata.python.metadata_writers import image_classifier

request = json.load(open(sys.argv[1]))
results = {}
for path in request["models"]:
    displayer = md.MetadataDisplayer.with_model_file(path)
    buf = bytes(displayer.get_metadata_buffer())
    files = displayer.get_packed_associated_file_list()
    content = open(path, "rb").read()
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        model_only = content[: min(info.header_offset for info in archive.infolist())]
    md.MetadataPopulator.with_model_buffer(model_only).load_metadata_buffer(buf)  # validates tensor counts
    with tempfile.TemporaryDirectory() as folder:
        labels = os.path.join(folder, "labels.txt")
        with open(labels, "wb") as f:
            f.write(displayer.get_associated_file_buffer("labels.txt"))
        writer = image_classifier.MetadataWriter.create_for_inference(
            model_only, request["mean"], request["std"], [labels])
        reference = md.MetadataDisplayer.with_model_buffer(writer.populate()).get_metadata_json()
    results[path] = {
        "json": json.loads(displayer.get_metadata_json()),
        "files": files,
        "labels": displayer.get_associated_file_buffer("labels.txt").decode("utf-8") if "labels.txt" in files else None,
        "min_parser_version": _pywrap_metadata_version.GetMinimumMetadataParserVersion(buf),
        "reference": json.loads(reference),
    }
json.dump(results, open(request["out"], "w"))
"""


@pytest.fixture(scope="session")
def tflite_support_path() -> Path:
    """The folder that ``./run setup`` made: ``tensorflow_lite_support/metadata`` and ``lib/libusb-1.0.so.0``."""
    marker = SUPPORT / ".complete"
    assert marker.is_file() and (SUPPORT / "lib" / "libusb-1.0.so.0").is_file(), (
        f"{SUPPORT} is missing or incomplete: `./run setup` unpacks tflite-support there")
    assert marker.read_text().split()[0] == "tflite-support==0.4.4", marker.read_text()  # the version tested here
    return SUPPORT


def read_with_tflite_support(site: Path, paths: list[Path], tmp: Path) -> dict[str, Any]:
    request = tmp / "request.json"
    out = tmp / "displayed.json"
    request.write_text(json.dumps({"models": [str(p) for p in paths], "out": str(out),
                                   "mean": IMAGENET_MEAN_255, "std": IMAGENET_STD_255}))
    library_path = os.pathsep.join(filter(None, [str(site / "lib"), os.environ.get("LD_LIBRARY_PATH")]))
    env = {**os.environ, "PYTHONPATH": str(site), "LD_LIBRARY_PATH": library_path, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", _READER, str(request)], capture_output=True, text=True, env=env,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def model() -> tuple[torch.nn.Module, Graph, QuantizedGraph, np.ndarray]:
    torch.manual_seed(0)
    network = build_model(ModelConfig(Arch.mobilenet_v3_small, 0.5, CLASSES, 0.2)).eval()
    graph = graph_from_torch(network, (1, 3, SIZE, SIZE))
    pixels = np.random.default_rng(0).integers(0, 256, (8, SIZE, SIZE, 3), dtype=np.uint8)
    x = np.stack([PREPROCESS.normalize(p) for p in pixels])  # calibrated on the image domain
    return network, graph, nearest_int8(graph, x), x


@pytest.fixture(scope="module")
def artifacts(model: tuple[Any, Graph, QuantizedGraph, np.ndarray], tmp_path_factory: pytest.TempPathFactory
              ) -> dict[str, Path]:
    _, graph, quantized, _ = model
    folder = tmp_path_factory.mktemp("tflite_metadata")
    paths = {}
    for name, converter, q in (("fp32", REGISTRY[Target.tflite], None), ("int8", TfliteConverter(), quantized),
                               ("uint8", TfliteConverter(io="uint8"), quantized)):
        paths[name] = folder / f"model.{name}.tflite"
        converter.export(graph, q, paths[name], INFO)
    return paths


@pytest.fixture(scope="module")
def displayed(tflite_support_path: Path, artifacts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
              ) -> dict[str, dict[str, Any]]:
    results = read_with_tflite_support(tflite_support_path, list(artifacts.values()),
                                       tmp_path_factory.mktemp("displayer"))
    return {name: results[str(path)] for name, path in artifacts.items()}


def _tensors(metadata: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    (subgraph,) = metadata["subgraph_metadata"]
    (source,) = subgraph["input_tensor_metadata"]
    (target,) = subgraph["output_tensor_metadata"]
    return source, target


@pytest.mark.parametrize("name", ["fp32", "int8", "uint8"])
def test_displayer_reads_normalisation_and_labels(name: str, displayed: dict[str, dict[str, Any]]) -> None:
    shown = displayed[name]
    metadata = shown["json"]
    assert (metadata["name"], metadata["version"]) == ("mnv3-small", "0.0.test")
    assert (metadata["author"], metadata["license"]) == ("Vision team", "Apache-2.0")
    assert metadata["min_parser_version"] == MIN_PARSER_VERSION == shown["min_parser_version"] == "1.0.0"
    source, target = _tensors(metadata)

    assert source["name"] == "image"
    assert source["content"]["content_properties_type"] == "ImageProperties"
    assert source["content"]["content_properties"]["color_space"] == "RGB"
    assert source["content"]["content_properties"]["default_size"] == {"width": SIZE, "height": SIZE}
    (unit,) = source["process_units"]
    assert unit["options_type"] == "NormalizationOptions"
    np.testing.assert_allclose(unit["options"]["mean"], IMAGENET_MEAN_255, rtol=1e-6)
    np.testing.assert_allclose(unit["options"]["std"], IMAGENET_STD_255, rtol=1e-6)

    assert target["name"] == "logits" and "Raw logits" in target["description"]
    assert target["content"]["content_properties_type"] == "FeatureProperties"
    assert target["associated_files"] == [{"name": LABELS_FILE, "description": target["associated_files"][0]
                                           ["description"], "type": "TENSOR_AXIS_LABELS"}]
    assert shown["files"] == [LABELS_FILE]
    assert shown["labels"].splitlines() == list(LABELS)

    # What tflite-support's own image_classifier writer makes of the same model and parameters.
    reference_source, reference_target = _tensors(shown["reference"])
    assert shown["reference"]["min_parser_version"] == metadata["min_parser_version"]
    assert reference_source["process_units"] == source["process_units"]
    assert reference_source["content"]["content_properties"]["color_space"] == "RGB"
    assert reference_target["associated_files"][0]["type"] == "TENSOR_AXIS_LABELS"
    if name == "fp32":  # the writer's stats are the normalised 0..255 range for float inputs: ours too
        np.testing.assert_allclose(source["stats"]["min"], reference_source["stats"]["min"], rtol=1e-6)
        np.testing.assert_allclose(source["stats"]["max"], reference_source["stats"]["max"], rtol=1e-6)
    else:  # ours: the integer codes that 0..255 pixels give (the writer has [0, 255] for uint8, nothing for int8)
        assert all(-128 <= v <= 255 for v in source["stats"]["min"] + source["stats"]["max"])
    if name == "int8":
        assert "does not support int8 inputs" in source["description"]


def test_task_library_normalisation_gives_the_model_input(displayed: dict[str, dict[str, Any]]) -> None:
    """The Task Library feeds a float input ``(pixel - mean) / std`` with the metadata's values (as float32, times
    1/std): that is mdeploy's Preprocess output for the same pixels."""
    (unit,) = _tensors(displayed["fp32"]["json"])[0]["process_units"]
    mean = np.asarray(unit["options"]["mean"], np.float32)
    inv_std = np.float32(1) / np.asarray(unit["options"]["std"], np.float32)
    pixels = np.random.default_rng(3).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    task_library = (pixels.astype(np.float32) - mean) * inv_std
    ours = PREPROCESS.normalize(pixels).transpose(1, 2, 0)
    assert np.abs(task_library - ours).max() <= 1e-5


def test_files_load_and_run_on_litert(model: tuple[torch.nn.Module, Graph, QuantizedGraph, np.ndarray],
                                      artifacts: dict[str, Path]) -> None:
    network, _, _, x = model
    for name, path in artifacts.items():
        with zipfile.ZipFile(path) as archive:  # the zip comes after the flatbuffer
            assert archive.infolist()[0].header_offset > 0
        output = TfliteConverter().runner(path)(x)  # Interpreter(model_path=...): the whole file, zip included
        reference = torch_runner(network)(x)
        assert output.shape == (len(x), CLASSES)
        assert np.abs(output - reference).max() <= (1e-4 if name == "fp32" else 0.5 * np.abs(reference).max())


def test_inspect_reports_support_metadata_and_keeps_our_entries(artifacts: dict[str, Path]) -> None:
    report = REGISTRY[Target.tflite].inspect(artifacts["int8"])
    summary = report["tflite_support_metadata"]
    assert summary["min_parser_version"] == "1.0.0"
    assert summary["packed_files"] == [LABELS_FILE] and summary["labels"] == CLASSES
    (source,) = summary["inputs"]
    assert source["normalization"] == {"mean": IMAGENET_MEAN_255, "std": IMAGENET_STD_255}
    assert source["color_space"] == "RGB"
    assert summary["outputs"][0]["associated_files"] == [{"name": LABELS_FILE, "type": "TENSOR_AXIS_LABELS"}]
    metadata = report["metadata"]  # text entries only: the binary TFLITE_METADATA is left out
    assert METADATA_NAME not in metadata
    assert json.loads(metadata["mdeploy.preprocess"]) == INFO.preprocess
    assert json.loads(metadata["mdeploy.labels"]) == list(LABELS)
    assert metadata["mdeploy.precision"] == "int8" and metadata["mdeploy.recipe"] == "{}"
    assert metadata["author"] == "Vision team"


def test_exports_are_byte_identical(model: tuple[Any, Graph, QuantizedGraph, np.ndarray], tmp_path: Path) -> None:
    _, graph, quantized, _ = model
    for q in (None, quantized):
        first, second = tmp_path / "a.tflite", tmp_path / "b.tflite"
        TfliteConverter().export(graph, q, first, INFO)
        TfliteConverter().export(graph, q, second, INFO)
        assert first.read_bytes() == second.read_bytes()
        with zipfile.ZipFile(first) as archive:
            (member,) = archive.infolist()
            assert (member.filename, member.date_time, member.compress_type) == (LABELS_FILE, (1980, 1, 1, 0, 0, 0),
                                                                                 zipfile.ZIP_STORED)
            assert member.external_attr >> 16 == 0o100644


def test_bgr_and_missing_or_mismatched_fields(model: tuple[Any, Graph, QuantizedGraph, np.ndarray]) -> None:
    _, graph, _, _ = model
    converter = TfliteConverter()
    bgr = Preprocess(resize=73, crop=SIZE, mean=(0.406, 0.456, 0.485), std=(0.225, 0.224, 0.229),
                     channel_order="BGR")
    content = converter.to_bytes(graph, None, ArtifactInfo("m", bgr.to_dict(), LABELS, "1"))
    (source,) = read_summary(content)["inputs"]
    assert source["color_space"] == "UNKNOWN"  # the schema has no BGR; the description says so
    assert source["normalization"] == {"mean": IMAGENET_MEAN_255[::-1], "std": IMAGENET_STD_255[::-1]}

    # One label per class or none attached (the Task Library refuses other counts); the metadata is still there.
    content = converter.to_bytes(graph, None, ArtifactInfo("m", PREPROCESS.to_dict(), LABELS[:3], "1"))
    summary = read_summary(content)
    assert summary["packed_files"] == [] and "associated_files" not in summary["outputs"][0]
    assert not zipfile.is_zipfile(io.BytesIO(content))

    # Without mean and std the input cannot be described: no TFLite Support metadata, our entries as before.
    content = converter.to_bytes(graph, None, ArtifactInfo("m", {"crop": SIZE}, LABELS, "1"))
    assert read_summary(content) is None
    assert json.loads(read_metadata(content)["mdeploy.labels"]) == list(LABELS)
