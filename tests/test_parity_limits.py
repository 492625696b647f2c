"""The fp32 parity limit scales with the output's magnitude: max |error| <= max(1e-4, 7.5e-5 * peak |PyTorch output|).

Models whose logits are larger than torchvision's (issue 14: model-library MobileNets failed an absolute 1e-4 at SNR
90-107 dB) pass when the conversion is right; a real conversion error still fails; an explicit limit
(``--max-abs-error`` or the config's ``max_abs_error``) is absolute and wins; the manifest and the reports say how
each limit was derived (``threshold_notes``)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from click.testing import Result
from typer.testing import CliRunner

from mdeploy.cli import app
from mdeploy.config import load_config
from mdeploy.errors import ExitCode
from mdeploy.parity import FP32_MAX_ERROR_OF_PEAK, FP32_NOISE_MULTIPLE, Float32Noise, Thresholds, judge
from mdeploy.records import Limits
from mdeploy.types import Precision

runner = CliRunner()
LOGIT_GAIN = 20.0  # the real MobileNetV2's classifier scaled: peak |logit| ~450 instead of ~23
EVAL_SIZE = 48


def logits(scale: float, n: int = 64, classes: int = 100) -> np.ndarray:
    return (np.random.default_rng(0).standard_normal((n, classes)) * scale).astype(np.float32)


# Unit level: the derivation -----------------------------------------------------------------------------------
def test_large_logits_pass_with_float32_sized_error_and_record_how() -> None:
    ref = logits(100.0)  # peak ~390: float32 kernels summing in another order err a few 1e-4 here
    out = ref * np.float32(1 + 2e-6)
    result = judge(ref, out, Thresholds.default(Precision.fp32), "test")
    peak = float(np.abs(ref).max())
    assert result.metrics.max_abs_error > 1e-4  # today's absolute limit would have failed it
    assert result.passed, result.failures
    assert result.thresholds.max_abs_error == pytest.approx(FP32_MAX_ERROR_OF_PEAK * peak, rel=5e-3)
    note = result.to_dict()["threshold_notes"]["max_abs_error"]
    assert "max(0.0001, 7.5e-05 * peak |PyTorch output|" in note and f"{peak:.4g}" in note
    assert set(result.to_dict()["thresholds"]) == {"max_abs_error"}  # the applied limit, absolute


def test_small_logits_keep_the_absolute_floor() -> None:
    ref = logits(0.1)  # peak ~0.4: 7.5e-5 * peak is under 1e-4
    result = judge(ref, ref.copy(), Thresholds.default(Precision.fp32), "test")
    assert result.thresholds.to_dict() == {"max_abs_error": 1e-4}
    assert not judge(ref, ref + 2e-4, Thresholds.default(Precision.fp32), "test").passed


@pytest.mark.parametrize("relative_error", [1e-3, 3e-3])  # fp16-rounded weights err ~3e-3 of the peak
def test_a_real_conversion_error_still_fails_on_large_logits(relative_error: float) -> None:
    ref = logits(100.0)
    out = ref.copy()
    out[5, 17] += relative_error * float(np.abs(ref).max())
    result = judge(ref, out, Thresholds.default(Precision.fp32), "test")
    assert not result.passed and result.failures[0].startswith("max |error|")


def test_an_explicit_absolute_limit_wins() -> None:
    ref = logits(100.0)
    out = ref * np.float32(1 + 2e-6)
    limits = Limits(max_abs_error=1e-4).thresholds(Precision.fp32)  # --max-abs-error 1e-4
    assert limits.max_error_of_peak is None
    result = judge(ref, out, limits, "test")
    assert not result.passed and result.thresholds.to_dict() == {"max_abs_error": 1e-4}
    assert "absolute" in result.threshold_notes["max_abs_error"]
    # int8 limits are untouched by the fp32 flag, and the int8 defaults have no relative limit
    assert Limits(max_abs_error=1e-4).thresholds(Precision.int8) == Thresholds.default(Precision.int8)


class Amplifier(torch.nn.Module):
    """A model whose float32 output carries far more rounding than its peak suggests: the small difference of two large
    intermediates (as deep random-weight networks have, issue 14: MobileNetV3-Large at 224 px)."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.up, self.a, self.b = torch.nn.Linear(16, 64), torch.nn.Linear(64, 10), torch.nn.Linear(64, 10)
        with torch.no_grad():
            self.up.weight.copy_(torch.randn(64, 16, generator=generator) * 1e3)
            self.a.weight.copy_(torch.randn(10, 64, generator=generator) * 1e-1)
            self.b.weight.copy_(self.a.weight + torch.randn(10, 64, generator=generator) * 1e-5)
            self.b.bias.copy_(self.a.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        return self.a(h) - self.b(h)


def test_float32_noise_widens_a_relative_limit_to_what_float32_itself_achieves() -> None:
    model = Amplifier().eval()
    x = np.random.default_rng(1).standard_normal((32, 16)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    noise = Float32Noise(model, x, ref)
    measured = noise()
    assert measured is not None and measured > 0 and noise() == measured  # measured once
    assert model.up.weight.dtype == torch.float32  # the user's module is left as it was
    # an artifact as good as float32 can be (another summation order: here a float64 run rounded to float32)
    with torch.no_grad():
        other = model.double()(torch.from_numpy(x).double()).float().numpy()
    model.float()
    plain = judge(ref, other, Thresholds.default(Precision.fp32), "test")
    widened = judge(ref, other, Thresholds.default(Precision.fp32), "test", noise)
    assert np.abs(other - ref).max() > plain.thresholds.max_abs_error, "the model must out-round the relative limit"
    assert not plain.passed and widened.passed, (plain.failures, widened.thresholds)
    assert widened.thresholds.max_abs_error == pytest.approx(FP32_NOISE_MULTIPLE * measured, rel=1e-2)
    assert "PyTorch's own float32 error" in widened.threshold_notes["max_abs_error"]
    # a real conversion error still fails, and an explicit absolute limit is never widened
    broken = other.copy()
    broken[3, 4] += 100 * FP32_NOISE_MULTIPLE * measured
    assert not judge(ref, broken, Thresholds.default(Precision.fp32), "test", noise).passed
    absolute = Limits(max_abs_error=1e-4).thresholds(Precision.fp32)
    assert not judge(ref, other, absolute, "test", noise).passed


def test_float32_noise_is_only_measured_when_a_limit_fails() -> None:
    ref = logits(1.0)
    calls: list[int] = []

    def noise() -> float:
        calls.append(1)
        return 1.0

    assert judge(ref, ref.copy(), Thresholds.default(Precision.fp32), "test", noise).passed and not calls


def test_config_keys(tmp_path: Path) -> None:
    config = tmp_path / "mdeploy.toml"
    config.write_text("[thresholds.fp32]\nmax_abs_error = 1e-4\n")  # alone: absolute, as before
    assert load_config(config).thresholds[Precision.fp32] == Thresholds(max_abs_error=1e-4)
    config.write_text("[thresholds.fp32]\nmax_error_of_peak = 2e-5\n")  # the factor; the floor stays
    assert load_config(config).thresholds[Precision.fp32] == Thresholds(max_abs_error=1e-4, max_error_of_peak=2e-5)
    config.write_text("[thresholds.fp32]\nmax_abs_error = 1e-3\nmax_error_of_peak = 2e-5\n")  # both: floor + factor
    thresholds = load_config(config).thresholds[Precision.fp32]
    assert thresholds == Thresholds(max_abs_error=1e-3, max_error_of_peak=2e-5)
    # the flag beats the file, as an absolute limit
    assert Limits(max_abs_error=5e-4, base={Precision.fp32: thresholds}).thresholds(Precision.fp32) == \
        Thresholds(max_abs_error=5e-4)


# The real MobileNetV2 with large logits, through the CLI ------------------------------------------------------
@pytest.fixture(scope="module")
def large_logits(real_v2_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The real ImageNet MobileNetV2 with its classifier scaled by LOGIT_GAIN (same predictions, larger logits),
    and the same model with fp16-rounded weights: what a converter that stored weights in fp16 would compute."""
    root = tmp_path_factory.mktemp("large_logits")
    state = torch.load(real_v2_weights, weights_only=True)
    state["classifier.1.weight"] = state["classifier.1.weight"] * LOGIT_GAIN
    state["classifier.1.bias"] = state["classifier.1.bias"] * LOGIT_GAIN
    torch.save(state, root / "large.pt")
    torch.save({k: v.half().float() if v.is_floating_point() else v for k, v in state.items()}, root / "fp16.pt")
    return {"root": root, "model": root / "large.pt", "fp16": root / "fp16.pt"}


@pytest.fixture(scope="module")
def converted(large_logits: dict[str, Path], eval_dir: Path) -> Path:
    out = large_logits["root"] / "out"
    result = runner.invoke(app, ["convert", str(large_logits["model"]), "--arch", "mobilenet_v2", "--to",
                                 "onnx,tflite", "--eval", str(eval_dir), "--eval-size", str(EVAL_SIZE), "--out",
                                 str(out)])
    assert result.exit_code == 0, result.output
    return out


def check(large_logits: dict[str, Path], folder: Path, eval_dir: Path, model: str, *extra: str) -> Result:
    return runner.invoke(app, ["check", str(folder), "--model", str(large_logits[model]), "--arch", "mobilenet_v2",
                               "--eval", str(eval_dir), "--eval-size", str(EVAL_SIZE), "--json", *extra])


@pytest.mark.slow
def test_real_model_with_large_logits_passes_and_the_manifest_says_why(converted: Path) -> None:
    manifest = json.loads((converted / "manifest.json").read_text())
    schema = json.loads(resources.files("mdeploy").joinpath("data", "manifest.schema.json").read_text())
    jsonschema.validate(manifest, schema)
    assert manifest["manifest_version"] == "1.5" and manifest["parity_passed"]
    errors = []
    for artifact in manifest["artifacts"]:
        parity = artifact["parity"]
        limit, error = parity["thresholds"]["max_abs_error"], parity["metrics"]["max_abs_error"]
        errors.append(error)
        assert 200 * 7.5e-5 < limit < 800 * 7.5e-5, limit  # peak |logit| of the scaled model: a few hundred
        assert error <= limit and parity["metrics"]["snr_db"] > 90, parity
        note = parity["threshold_notes"]["max_abs_error"]
        assert note.startswith(f"max |error| limit {limit:.3g} = max(0.0001, 7.5e-05 * peak |PyTorch output|")
    assert max(errors) > 1e-4  # the absolute limit of before would have rejected this correct conversion
    summary = (converted / "SUMMARY.md").read_text()
    assert "Limits:" in summary and "7.5e-05 * peak |PyTorch output|" in summary


@pytest.mark.slow
def test_check_reports_the_derivation_and_an_explicit_limit_wins(large_logits: dict[str, Path], converted: Path,
                                                                  eval_dir: Path, tmp_path: Path) -> None:
    result = check(large_logits, converted, eval_dir, "model", "--report", str(tmp_path / "report"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert all("peak |PyTorch output|" in a["parity"]["threshold_notes"]["max_abs_error"]
               for a in report["artifacts"])
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "Limits:" in summary and "peak \\|PyTorch output\\|" in summary
    explicit = check(large_logits, converted, eval_dir, "model", "--max-abs-error", "1e-4")
    assert explicit.exit_code == ExitCode.PARITY_FAILED, explicit.output
    for artifact in json.loads(explicit.stdout)["artifacts"]:
        assert artifact["parity"]["thresholds"] == {"max_abs_error": 1e-4}
        assert "absolute" in artifact["parity"]["threshold_notes"]["max_abs_error"]
    config = tmp_path / "mdeploy.toml"
    config.write_text("[thresholds.fp32]\nmax_abs_error = 1e-4\n")
    from_file = check(large_logits, converted, eval_dir, "model", "--config", str(config))
    assert from_file.exit_code == ExitCode.PARITY_FAILED, from_file.output


@pytest.mark.slow
def test_a_real_conversion_error_fails_the_scaled_limit(large_logits: dict[str, Path], converted: Path,
                                                        eval_dir: Path) -> None:
    # The artifacts hold float32 weights; the "PyTorch model" has them rounded to fp16: the gap a converter that
    # stored fp16 weights would leave (~3e-3 of the peak), 40x the scaled limit.
    result = check(large_logits, converted, eval_dir, "fp16")
    assert result.exit_code == ExitCode.PARITY_FAILED, result.output
    for artifact in json.loads(result.stdout)["artifacts"]:
        assert artifact["parity"]["failures"][0].startswith("max |error|"), artifact["parity"]

