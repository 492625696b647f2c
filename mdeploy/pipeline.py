"""``mdeploy convert``: load, trace, quantise, export each target, prove parity, publish the output folder."""

from __future__ import annotations

import functools
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from mdeploy import __version__
from mdeploy.bundle import CHECKSUMS_FILE, copy_static_files, write_checksums, write_golden, write_readmes
from mdeploy.bundle.golden import GOLDEN_SAMPLES, GoldenOutput
from mdeploy.calibration.dataset import SampleSet, disjoint_check
from mdeploy.converters import REGISTRY
from mdeploy.converters.base import ArtifactInfo, missing_modules
from mdeploy.detection import ANCHORS_FILE, judge_detection
from mdeploy.errors import BadInputError, ConversionError, first_line
from mdeploy.graph.execute import GraphRunner
from mdeploy.graph.from_torch import graph_from_torch
from mdeploy.graph.ir import Graph
from mdeploy.latency import measure_latency
from mdeploy.loading import LoadedModel, load_model
from mdeploy.outputs import OutputRules, check_output_path, staged_output
from mdeploy.metrics import is_class_scores
from mdeploy.parity import Float32Noise, judge_outputs, run_batches_outputs, torch_outputs
from mdeploy.quantize.mixed import quantize_to_target
from mdeploy.quantize.params import QuantizedGraph
from mdeploy.quantize.ptq import quantize
from mdeploy.records import Artifact, ConvertOptions, Evaluation
from mdeploy.manifest import Bundle, Failure, Manifest, PostprocessRecord
from mdeploy.reports import (is_mdeploy_output, mixed_precision_record, mixed_precision_summary, write_manifest,
                             write_summary)
from mdeploy.samples import load_samples
from mdeploy.types import Precision, Target
from mdeploy.ui import Reporter, SilentReporter

RANDOM_EVAL_SAMPLES = 16
CHANNEL_SCALES_FILE = "int8_channel_scales.npz"  # for mdeploy check's per-layer diagnosis; apps do not need it
CALIBRATION_EVAL_SAMPLES = 64  # parity inputs taken from the calibration set when no --eval folder is given
MIN_CALIBRATION_SAMPLES = 16  # fewer cannot pin down per-tensor ranges


@dataclass
class ConvertResult:
    out: Path
    model: LoadedModel
    artifacts: list[Artifact]
    evaluation: Evaluation
    manifest: Manifest
    failures: list[Failure] = field(default_factory=list)  # conversions that failed under keep_going

    @property
    def passed(self) -> bool:
        return all(a.parity.passed for a in self.artifacts)


def input_paths(options: ConvertOptions) -> tuple[Path, ...]:
    """The user's files and folders a run reads: the output folder must hold none of them."""
    data = options.data
    detector = (options.detector.source, options.detector.anchors_file) if options.detector else ()
    return tuple(p for p in (options.model.path, data.calib, data.eval, options.labels, *detector) if p is not None)


def read_labels(path: Path | None, classes: int) -> tuple[str, ...]:
    if path is None:
        return ()
    if not path.is_file():
        raise BadInputError(f"labels file {path} does not exist: pass --labels with a text file, one class per line")
    labels = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    if len(labels) != classes:
        raise BadInputError(f"{path} has {len(labels)} labels but the model has {classes} classes: one label per line")
    return labels


def class_count(graph: Graph, labels: Path | None, source: str) -> int:
    """The class count a labels file must match: that of the model's one class-score output (N, K)."""
    scores = [graph.shapes[tensor][1] for tensor in graph.outputs if is_class_scores(graph.shapes[tensor])]
    if labels is not None and len(scores) != 1:
        raise BadInputError(f"--labels {labels.name} names the classes of one class-score output (N, K), but {source} "
                            f"has {len(scores)} among its {len(graph.outputs)} outputs: leave out --labels")
    return scores[0] if scores else 0


def check_targets(targets: tuple[Target, ...]) -> None:
    for target in targets:
        if target not in REGISTRY:
            available = ", ".join(t.value for t in REGISTRY)
            raise BadInputError(f"target {target.value} is not available in this version (available: {available})")
        missing = missing_modules(REGISTRY[target])
        if missing:
            raise BadInputError(
                f"target {target.value} needs {', '.join(missing)}: pip install 'mdeploy[{target.value}]'"
            )


def check_translation(graph: Graph, model: LoadedModel, shape: tuple[int, ...]) -> None:
    """The IR must compute what PyTorch computes before any target is written from it."""
    x = np.random.default_rng(0).standard_normal((2, *shape[1:])).astype(np.float32)
    wants = torch_outputs(model.module)(x)
    noise = Float32Noise(model.module, x, wants)
    in_float64 = functools.cache(lambda: GraphRunner(graph, torch.float64).outputs(x.astype(np.float64)))  # once
    for index, (want, got) in enumerate(zip(wants, GraphRunner(graph).outputs(x), strict=True)):  # in order
        error = float(np.abs(want - got.numpy()).max())
        limit = 1e-4 * max(1.0, float(np.abs(want).max()))
        if error <= limit:
            continue
        # A deep random-weight model on standard-normal inputs can amplify float32 rounding past the limit (a
        # segmenter's peak of 3000 carries PyTorch's own float32 error of 0.35 to 0.9). Then both run in float64:
        # the graph is right if it is within PyTorch's own float32 error there (twice it: a few of the executor's
        # constants stay float32), which a wrong op exceeds by far.
        exact, own = noise.exact, noise(index)  # own: PyTorch's float32 output against its float64 one
        if exact is None or own is None:
            raise ConversionError(f"internal: the traced graph differs from PyTorch by {error:.3g}; please report it")
        error64 = float(np.abs(in_float64()[index].numpy() - exact[index]).max())
        if not error64 <= max(limit, 2.0 * own):
            raise ConversionError(f"internal: the traced graph differs from PyTorch by {error:.3g} (by {error64:.3g} "
                                  f"in float64, where PyTorch's own float32 error is {own:.3g}); please report it")


def prepare_evaluation(options: ConvertOptions, model: LoadedModel, reporter: Reporter,
                       calib: SampleSet | None) -> tuple[Evaluation, SampleSet | None]:
    data = options.data
    eval_set = None
    if data.eval is not None:
        eval_set = load_samples(data.eval, options.preprocess, data.eval_size, data.seed, "evaluation", reporter, 1)
        if calib is not None:
            disjoint_check(calib, eval_set)
        inputs, description = eval_set.to_array(), f"{len(eval_set)} samples from {data.eval}"
        paths = [str(p) for p in eval_set.paths]
    elif calib is not None:
        count = min(CALIBRATION_EVAL_SAMPLES, len(calib))
        inputs = np.stack([calib[i] for i in range(count)])  # only those: normalising all 200 costs 120 MB
        description = (f"{count} calibration samples from {data.calib} (not held out: pass --eval FOLDER for "
                       "held-out parity)")
        paths = [str(p) for p in calib.paths[:count]]
        reporter.step(f"evaluation: {description}")
    else:
        shape = options.preprocess.input_shape(batch=RANDOM_EVAL_SAMPLES)
        inputs = np.random.default_rng(data.seed).standard_normal(shape).astype(np.float32)
        description = (f"{RANDOM_EVAL_SAMPLES} random inputs (no --eval folder): only numeric error "
                       "is judged (fp32)")
        paths = []
        reporter.step(f"evaluation: {description}")
    with reporter.track("PyTorch reference", len(inputs)) as advance:
        references = run_batches_outputs(torch_outputs(model.module), inputs, advance)
    return Evaluation(inputs, references, description, paths, Float32Noise(model.module, inputs, references)), eval_set


def export_and_check(options: ConvertOptions, graph: Graph, quantized: QuantizedGraph | None, info: ArtifactInfo,
                     target: Target, stage: Path, evaluation: Evaluation, reporter: Reporter) -> Artifact:
    converter = options.converter(target)
    precision = Precision.int8 if quantized is not None else Precision.fp32
    path = Path(f"{info.model_name}.{precision.value}{converter.suffix}")
    start = time.perf_counter()
    try:
        # The quantiser may refit float biases: an int8 artifact is written from its copy of the graph.
        converter.export(quantized.graph if quantized else graph, quantized, stage / path, info)
    except (BadInputError, ConversionError):
        raise
    except Exception as err:  # a converter library's own failure: name the target and the first line
        raise ConversionError(f"{target.value} {precision.value} export failed: {first_line(err)}") from err
    seconds = time.perf_counter() - start
    run = converter.outputs_runner(stage / path, threads=options.threads)
    names = tuple(graph.artifact_names.values())

    def run_in_order(batch: np.ndarray) -> tuple[np.ndarray, ...]:
        returned = run(batch)
        return tuple(returned[name] for name in names)

    with reporter.track(f"{path} on {converter.runtime_name}", len(evaluation.inputs)) as advance:
        outputs = run_batches_outputs(run_in_order, evaluation.inputs, advance)
    parity = judge_outputs(evaluation.references, outputs, names, options.limits.thresholds(precision),
                           evaluation.description, evaluation.float32_noise)
    if options.detector is not None:
        size = (evaluation.inputs.shape[-1], evaluation.inputs.shape[-2])  # (width, height) in input pixels
        parity = judge_detection(parity, options.detector, evaluation.references, outputs, names, precision.value,
                                 size)
    latency = None
    if options.latency_runs > 0 and converter.times_latency:
        latency = measure_latency(run_in_order, evaluation.inputs[0], options.threads, runs=options.latency_runs)
    report = converter.inspect(stage / path)
    io = {"inputs": report["inputs"], "outputs": report["outputs"]}
    golden = GoldenOutput(str(path), target, precision, converter.runtime_name, names,
                          tuple(output[:GOLDEN_SAMPLES] for output in outputs),
                          tuple(converter.golden_tolerance(precision, quantized.activations[tensor].scale
                                                           if quantized is not None else None)
                                for tensor in graph.outputs))
    return Artifact(target, precision, path, converter.runtime_name, parity, latency, seconds,
                    converter.settings(precision), io, golden)


def write_postprocess(stage: Path, options: ConvertOptions, artifacts: list[Artifact], evaluation: Evaluation,
                      reporter: Reporter) -> PostprocessRecord | None:
    """With a detector spec's ``[postprocess] tflite = true``: the fp32 TFLite with TFLite_Detection_PostProcess
    appended (``NAME.fp32.detect.tflite``), checked on the parity inputs against NumPy decoding + NMS of the fp32
    TFLite's own raw outputs (recorded, and a warning step when they differ)."""
    spec = options.detector
    fp32 = next((a for a in artifacts if a.target == Target.tflite and a.precision is Precision.fp32), None)
    if spec is None or spec.postprocess is None or fp32 is None:
        return None
    from mdeploy.converters.tflite_detection import (OUTPUTS, append_postprocess, compare_detections,
                                                     reference_postprocess, run_postprocess)
    from mdeploy.converters.tflite_detection_metadata import detector_metadata
    from mdeploy.converters.tflite_runs import run_tflite_in_bundle

    settings = spec.postprocess
    path = fp32.path.with_name(fp32.path.name.replace(".fp32.tflite", ".fp32.detect.tflite"))
    height, width = evaluation.inputs.shape[-2:]
    provenance = options.provenance
    description = provenance.description or ("Finds objects in the image: boxes, classes and scores after "
                                              "TFLite_Detection_PostProcess (fp32 detector exported by mdeploy).")
    fields = {"version": provenance.version or __version__, "author": provenance.author, "license": provenance.license}
    metadata = detector_metadata(fp32.path.name.removesuffix(".fp32.tflite"), options.preprocess.to_dict(),
                                 int(width), int(height), description, fields)
    try:
        (stage / path).write_bytes(append_postprocess((stage / fp32.path).read_bytes(), spec, settings, metadata))
        inputs = evaluation.inputs
        raw = run_tflite_in_bundle(stage / fp32.path, inputs)
        check = compare_detections(reference_postprocess(raw[spec.boxes], raw[spec.scores], spec, settings),
                                   run_postprocess(stage / path, inputs))
    except Exception as err:  # the raw artifacts stand without it
        remove_partial(stage / path)
        raise ConversionError(f"{path}: TFLite_Detection_PostProcess model failed: {first_line(err)}") from err
    agrees = check["same_count"] and check["same_classes"] and check["box_max_abs_diff"] <= 1e-4
    reporter.step(f"{path}: TFLite_Detection_PostProcess {'matches' if agrees else 'DIFFERS from'} NumPy decoding "
                  f"+ NMS on {check['samples']} inputs (max |box diff| {check['box_max_abs_diff']:.2g})")
    return PostprocessRecord(file=str(path), op="TFLite_Detection_PostProcess", outputs=list(OUTPUTS),
                             object_detector_metadata=metadata is not None,
                             max_detections=settings.max_detections, score_threshold=settings.score_threshold,
                             iou_threshold=settings.iou_threshold,
                             nms="fast: each anchor's best class, class-agnostic greedy NMS (use_regular_nms false)",
                             check={**check, "agrees": agrees})


class Stopwatch:
    """Seconds per pipeline stage, recorded in the manifest (bench/convert_time.py reads them)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 2)

    def record(self) -> dict[str, float]:
        return {**self.seconds, "total": round(time.perf_counter() - self.started, 2)}


def remove_partial(path: Path) -> None:
    """A failed export must not leave a file that looks like an artifact."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def convert(options: ConvertOptions, reporter: Reporter | None = None) -> ConvertResult:
    reporter = reporter or SilentReporter()
    clock = Stopwatch()
    check_targets(options.targets)
    output = OutputRules(input_paths(options), is_mdeploy_output, "output (manifest.json)", "--overwrite-any",
                         options.overwrite_any)
    check_output_path(options.out, options.overwrite, output)  # fail before minutes of work, not after
    data = options.data
    if options.int8 and data.calib is None:
        raise BadInputError("--int8 needs calibration data: pass --calib FOLDER (images or .npy/.npz tensors)")
    if options.detector is not None and options.detector.postprocess is not None \
            and Target.tflite not in options.targets:
        raise options.detector.error(["[postprocess] tflite = true appends to the fp32 TFLite artifact, but --to "
                                      "has no tflite: add it, or leave out [postprocess]"])
    with clock.stage("load_and_trace"):
        model = load_model(options.model.path, arch=options.model.arch, allow_pickle=options.model.trust_pickle)
        reporter.step(f"loaded {options.model.path} ({model.format.value}, {model.name})")
        shape = options.preprocess.input_shape(batch=1)
        graph = graph_from_torch(model.module, shape)
        check_translation(graph, model, shape)
    labels = read_labels(options.labels, class_count(graph, options.labels, options.model.path.name))
    if options.detector is not None:
        options.detector.check_outputs({name: graph.shapes[tensor] for tensor, name in graph.artifact_names.items()},
                                       options.model.path.name)
    reporter.step(f"traced {len(graph.nodes)} ops: {graph.op_histogram()}")
    calib = None
    with clock.stage("data_and_reference"):
        if options.int8:
            assert data.calib is not None
            calib = load_samples(data.calib, options.preprocess, data.calib_size, data.seed, "calibration",
                                 reporter, min_samples=MIN_CALIBRATION_SAMPLES)
        evaluation, eval_set = prepare_evaluation(options, model, reporter, calib)
    quantized = None
    if calib is not None:
        with clock.stage("quantize"), reporter.track("int8 calibration", len(graph.nodes)) as advance:
            if options.recipe.target_snr_db is None:
                quantized = quantize(graph, calib.to_array(), options.recipe,
                                     progress=lambda done, total, node: advance(1))
            else:  # a quarter of the samples held back to judge which layers to keep in float
                float_input = all(options.converter(t).int8_takes_float_input for t in options.targets)
                recipe = replace(options.recipe, float_input=float_input)
                quantized = quantize_to_target(graph, calib.to_array(), recipe, lambda done, total, node: advance(1),
                                               reporter.step, [str(path) for path in calib.paths])
        if quantized.mixed_precision is not None:
            reporter.step(mixed_precision_summary(mixed_precision_record(quantized.mixed_precision)))
        reporter.step(f"int8 parameters chosen in {clock.seconds['quantize']:.1f} s")
    info = ArtifactInfo(model.name, options.preprocess.to_dict(), labels, __version__, options.provenance.entries())
    failures: list[Failure] = []
    with staged_output(options.out, options.overwrite, output) as stage:
        artifacts = []
        with clock.stage("export_parity_latency"):
            for target in options.targets:
                for q in (None, quantized) if quantized is not None else (None,):
                    try:
                        artifacts.append(export_and_check(options, graph, q, info, target, stage, evaluation,
                                                          reporter))
                    except ConversionError as err:
                        if not options.keep_going:
                            raise
                        precision = Precision.int8 if q is not None else Precision.fp32
                        remove_partial(stage / f"{info.model_name}.{precision.value}{options.converter(target).suffix}")
                        reporter.step(f"{target.value} {precision.value} failed: {err}")
                        failures.append(Failure(target=target.value, precision=precision.value, error=str(err)))
        if quantized is not None and quantized.channel_scales:
            np.savez_compressed(stage / CHANNEL_SCALES_FILE, **quantized.channel_scales)
        postprocess = None
        if options.detector is not None:
            np.save(stage / ANCHORS_FILE, options.detector.anchors)
            postprocess = write_postprocess(stage, options, artifacts, evaluation, reporter)
        if labels:
            (stage / "labels.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
        golden = write_golden(stage, evaluation.inputs, evaluation.references, evaluation.paths,
                              [a.golden for a in artifacts if a.golden is not None], options.preprocess.layout.value)
        static_files = copy_static_files(stage)
        manifest = write_manifest(stage, options, model, graph, artifacts, evaluation, calib, eval_set, quantized,
                                  clock.record(), failures, golden)
        if postprocess is not None and manifest.detection is not None:
            manifest = replace(manifest, detection=replace(manifest.detection, postprocess=postprocess))
        manifest = manifest.with_bundle(Bundle(readmes=write_readmes(stage, manifest), files=static_files,
                                               checksums=CHECKSUMS_FILE))
        manifest.write(stage)
        write_summary(stage, manifest)
        write_checksums(stage)
    return ConvertResult(options.out, model, artifacts, evaluation, manifest, failures)
