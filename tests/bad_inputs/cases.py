"""The bad-input table: for each case, the command line, the exit code and a fragment of the one-line message.

``{key}`` in an argument is a path of the corpus (``generate.py``). ``out`` names the output path whose state must
be the same after the run as before it (created, if at all, only by a run that succeeds or fails parity).
``fault`` injects a failure mid-run (see ``tests/test_bad_inputs.py``): the model and data are fine, a converter
or the user is not.
"""

from __future__ import annotations

from dataclasses import dataclass

from mdeploy.errors import ExitCode

from .generate import SIZE


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]
    exit_code: ExitCode
    message: str  # a fragment of the one line on stderr
    out: str = "out"  # corpus key of the output path the run must leave as it was
    fault: str | None = None  # "export_error", "export_interrupt", "export_sigterm", "quantize_interrupt", "nan_outputs"


def convert(model: str, *extra: str, out: str = "out", arch: str | None = "mobilenet_v3_small") -> tuple[str, ...]:
    args = ("convert", "{" + model + "}", "--out", "{" + out + "}", "--input-size", str(SIZE))
    return args + (("--arch", arch) if arch else ()) + extra


INT8 = ("--int8", "--calib", "{calib}", "--calib-method", "minmax")
BAD = ExitCode.BAD_INPUT
FAILED = ExitCode.CONVERSION_FAILED

CASES: list[Case] = [
    # --- model files -------------------------------------------------------------------------------------------
    Case("model-missing", convert("missing_model"), BAD, "does not exist: check the path"),
    Case("model-empty", convert("empty_model"), BAD, "is empty (0 bytes): save the model again"),
    Case("model-is-a-folder", convert("dir_model"), BAD, "is not a file"),
    Case("state-dict-truncated", convert("truncated_pt"), BAD, "truncated or corrupt zip archive"),
    Case("legacy-state-dict-truncated", convert("truncated_legacy"), BAD, "is not a PyTorch model file, or is damaged"),
    Case("state-dict-corrupt-pickle", convert("corrupt_pkl"), BAD, "is not a PyTorch model file, or is damaged"),
    Case("state-dict-missing-tensor", convert("missing_entry"), BAD, "is not a PyTorch model file, or is damaged"),
    Case("torchscript-truncated", convert("truncated_ts", arch=None), BAD, "truncated or corrupt zip archive"),
    Case("torchscript-corrupt", convert("corrupt_ts", arch=None), BAD, "could not load TorchScript archive"),
    Case("pt2-truncated", convert("truncated_pt2", arch=None), BAD, "is damaged"),
    Case("pt2-corrupt", convert("corrupt_pt2", arch=None), BAD, "is corrupt"),
    Case("random-bytes", convert("garbage"), BAD, "is not a PyTorch model file"),
    Case("text-file", convert("text"), BAD, "is not a PyTorch model file"),
    Case("tflite-given-as-model", convert("tflite"), BAD, "is a TFLite model"),
    Case("dict-without-weights", convert("not_a_model"), BAD, "without a state dict in it"),
    Case("pickled-module-untrusted", convert("pickled_module"), BAD, "pass --trust-pickle if you trust the file"),
    # --- state dict vs --arch ----------------------------------------------------------------------------------
    Case("state-dict-without-arch", convert("good_pt", arch=None), BAD, "pass --arch mobilenet_v3_small"),
    Case("state-dict-wrong-arch", convert("good_pt", arch="mobilenet_v2"), BAD,
         "it looks like mobilenet_v3_small (width 0.25, 10 classes): pass --arch mobilenet_v3_small"),
    Case("state-dict-missing-and-unexpected-keys", convert("partial_sd"), BAD,
         "2 missing keys (classifier.0.weight, classifier.0.bias), 1 unexpected keys (head.extra.weight)"),
    Case("unknown-arch", convert("good_pt", arch="resnet50"), BAD, "Invalid value for '--arch'"),
    # --- NaN / Inf ---------------------------------------------------------------------------------------------
    Case("nan-in-state-dict", convert("nan_sd"), BAD, "weight features.2.block.0.0.weight in"),
    Case("inf-in-torchscript", convert("inf_ts", arch=None), BAD, "weight classifier.3.bias in"),
    Case("inf-in-pt2", convert("inf_pt2", arch=None), BAD, "weight classifier.3.bias in"),
    Case("nan-in-a-lifted-constant", convert("hidden_nan_pt2", arch=None), BAD, "weight offset in"),
    Case("negative-batchnorm-variance", convert("negative_var_sd"), BAD,
         "b_features_1_block_0_1_running_var hold 1 negative variance(s)"),
    Case("nan-outputs-fail-parity", convert("good_pt", out="parity_out"), ExitCode.PARITY_FAILED, "the outputs hold NaN or Inf",
         out="parity_out", fault="nan_outputs"),
    # --- operators ---------------------------------------------------------------------------------------------
    Case("unsupported-op", convert("unsupported_pt2", arch=None), FAILED,
         "operator aten.cumsum (from tail (CumsumTail)) is not supported by any mdeploy target"),
    Case("labels-for-two-class-score-outputs", convert("two_outputs_pt2", "--labels", "{labels_right}", arch=None),
         BAD, "--labels labels.txt names the classes of one class-score output (N, K), but two_outputs.pt2 has 2 "
         "among its 2 outputs: leave out --labels"),
    Case("pt2-zip-slip-member", convert("slip_pt2", arch=None), BAD, "member '../../x' points outside the archive"),
    Case("pt2-absolute-member", convert("absolute_pt2", arch=None), BAD, "member '/tmp/x' points outside"),
    Case("pt2-backslash-member", convert("backslash_pt2", arch=None), BAD, "points outside the archive"),
    Case("pt2-members-differ-by-case", convert("case_twin_pt2", arch=None), BAD, "duplicate member names, up to case"),
    Case("torchscript-zip-slip-member", convert("slip_ts", arch=None), BAD, "points outside the archive"),
    # --- calibration and evaluation data -----------------------------------------------------------------------
    Case("calib-missing", convert("good_pt", "--int8", "--calib", "{missing_dir}"), BAD, "does not exist"),
    Case("calib-is-a-file", convert("good_pt", "--int8", "--calib", "{a_file}"), BAD, "is not a folder"),
    Case("calib-empty-folder", convert("good_pt", "--int8", "--calib", "{empty_dir}"), BAD,
         "found 0 usable samples in 0 files"),
    Case("calib-zero-byte-files", convert("good_pt", "--int8", "--calib", "{zero_bytes}"), BAD,
         "3 skipped: "),
    Case("calib-corrupt-images", convert("good_pt", "--int8", "--calib", "{corrupt_images}"), BAD,
         "found 0 usable samples in 4 files (4 skipped"),
    Case("calib-no-image-files", convert("good_pt", "--int8", "--calib", "{only_text}"), BAD,
         "2 files with other extensions were ignored"),
    Case("calib-too-few", convert("good_pt", "--int8", "--calib", "{few_images}"), BAD,
         "found 3 usable samples in 3 files; at least 16 are needed"),
    Case("calib-wrong-tensor-shape", convert("good_pt", "--int8", "--calib", "{wrong_shape}"), BAD,
         f"has shape (4, 3, {2 * SIZE}, {2 * SIZE}), but the model takes one sample (3, {SIZE}, {SIZE})"),
    Case("calib-nhwc-tensors", convert("good_pt", "--int8", "--calib", "{nhwc}"), BAD, "It looks like NHWC data"),
    Case("calib-integer-tensors", convert("good_pt", "--int8", "--calib", "{int_tensors}"), BAD, "holds uint8 values"),
    Case("calib-nan-tensors", convert("good_pt", "--int8", "--calib", "{nan_tensors}"), BAD,
         "contains NaN or infinite values"),
    Case("calib-npy-header-announces-terabytes", convert("good_pt", "--int8", "--calib", "{lying_header}"), BAD,
         "huge.npy: is truncated: its header announces 12288000000000 bytes of data, the file holds 64"),
    Case("eval-empty-folder", convert("good_pt", "--eval", "{empty_dir}"), BAD, "found 0 usable samples"),
    Case("calib-and-eval-share-files", convert("good_pt", *INT8, "--eval", "{calib}"), BAD,
         "the calibration and evaluation sets share 1 file"),
    Case("int8-without-calib", convert("good_pt", "--int8"), BAD, "--int8 needs calibration data"),
    # --- sizes and flags ---------------------------------------------------------------------------------------
    Case("input-size-0", convert("good_pt")[:-4] + ("--input-size", "0", "--arch", "mobilenet_v3_small"), BAD,
         "--input-size 0 is out of range"),
    Case("input-size-5", convert("good_pt")[:-4] + ("--input-size", "5", "--arch", "mobilenet_v3_small"), BAD,
         "--input-size 5 is out of range"),
    Case("input-size-100000", convert("good_pt")[:-4] + ("--input-size", "100000", "--arch", "mobilenet_v3_small"),
         BAD, "--input-size 100000 is out of range"),
    Case("input-size-negative", convert("good_pt")[:-4] + ("--input-size=-224", "--arch", "mobilenet_v3_small"),
         BAD, "--input-size -224 is out of range"),
    Case("input-size-not-a-number", convert("good_pt")[:-4] + ("--input-size", "big", "--arch",
                                                                 "mobilenet_v3_small"), BAD, "Invalid value for '--input-size'"),
    Case("mean-two-values", convert("good_pt", "--mean", "0.5,0.5"), BAD, "--mean takes three comma-separated"),
    Case("std-zero", convert("good_pt", "--std", "0,0,0"), BAD, "--std 0,0,0 must be three positive numbers"),
    Case("unknown-target", convert("good_pt", "--to", "tensorrt"), BAD, "unknown target 'tensorrt'"),
    Case("unknown-option", convert("good_pt", "--quantise"), BAD, "No such option: --quantise"),
    Case("labels-count-mismatch", convert("good_pt", "--labels", "{labels_wrong}"), BAD,
         "has 2 labels but the model has 10 classes"),
    Case("labels-missing", convert("good_pt", "--labels", "{missing_model}"), BAD, "labels file"),
    # --- output paths ------------------------------------------------------------------------------------------
    Case("out-exists-not-empty", convert("good_pt", out="existing"), BAD,
         "exists and is not empty: pass --overwrite", out="existing"),
    Case("out-is-a-file", convert("good_pt", "--overwrite", out="out_file"), BAD, "is a file", out="out_file"),
    Case("out-under-a-file", convert("good_pt", out="under_file"), BAD, "is a file, not a folder",
         out="under_file"),
    Case("out-parent-missing", convert("good_pt", out="no_parent"), BAD, "does not exist: create it first",
         out="no_parent"),
    Case("out-not-writable", convert("good_pt", out="unwritable"), BAD, "cannot write to /proc", out="unwritable"),
    Case("overwrite-folder-holding-the-model", convert("good_pt", "--overwrite", out="models_dir"), BAD,
         "holds your input", out="models_dir"),
    Case("overwrite-any-folder-holding-the-model", convert("good_pt", "--overwrite-any", out="models_dir"), BAD,
         "holds your input", out="models_dir"),
    Case("overwrite-folder-above-the-model", convert("good_pt", "--overwrite", out="root"), BAD,
         "holds your input", out="root"),
    Case("overwrite-the-calibration-folder", convert("good_pt", *INT8, "--overwrite", out="calib"), BAD,
         "holds your input", out="calib"),
    Case("overwrite-folder-above-eval", convert("good_pt", "--eval", "{eval}", "--overwrite", out="data_dir"), BAD,
         "holds your input", out="data_dir"),
    Case("out-is-the-labels-file", convert("good_pt", "--labels", "{labels_right}", "--overwrite", out="labels_out"),
         BAD, "is a file", out="labels_out"),
    Case("out-inside-the-calibration-folder", convert("good_pt", *INT8, out="inside_calib"), BAD,
         "lies inside your input folder", out="inside_calib"),
    Case("overwrite-folder-mdeploy-did-not-write", convert("good_pt", "--overwrite", out="existing"), BAD,
         "holds no earlier mdeploy output (manifest.json), so it is not replaced", out="existing"),
    # --- failures and interruptions mid-run: the previous output stays as it was -------------------------------
    Case("export-fails-mid-run", convert("good_pt", "--overwrite", out="previous"), FAILED,
         "onnx fp32 export failed", out="previous", fault="export_error"),
    Case("ctrl-c-mid-export", convert("good_pt", "--overwrite", out="previous"), ExitCode.INTERRUPTED,
         "interrupted", out="previous", fault="export_interrupt"),
    Case("sigterm-mid-export", convert("good_pt", "--overwrite", out="previous"), ExitCode.INTERRUPTED,
         "interrupted", out="previous", fault="export_sigterm"),
    Case("ctrl-c-while-quantising", convert("good_pt", *INT8, "--overwrite", out="previous"),
         ExitCode.INTERRUPTED, "interrupted", out="previous", fault="quantize_interrupt"),
]
