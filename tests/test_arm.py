"""ARM kernels under emulation (mdeploy.arm): the sandbox, int8 parity of ONNX Runtime and LiteRT on emulated
ARM CPU models against the same artifacts on x86, the guest's isolation from the host, and the host left untouched
by setup (no apt source, no package, nothing in /etc).

Needs root (chroot) and a Debian-like host (apt-get, dpkg-deb); the first run builds the sandbox (~30-60 s, ~400 MB
plus ~140 MB of downloads, cached in MDEPLOY_ARM_SANDBOX or ~/.cache/mdeploy/arm64-sandbox).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mdeploy.converters import REGISTRY, Target, tflite, tflite_io
from mdeploy.converters.base import ConverterBase
from mdeploy.arm import (
    CPU_MODELS, SandboxState, codes_on_host, compare_codes, default_sandbox_dir, guest_runner, guest_sees,
    parse_cpu_list, run_on_arm, sandbox_status, setup_sandbox,
)
from mdeploy.arm.host import host_requirements
from mdeploy.arm.run import GUEST_MODULES, RUNNER, arm_formats, copy_runner
from mdeploy.arm.sandbox import STAMP, download_cache_dir, remove_sandbox, sandbox_paths
from mdeploy.arm.userland import wanted_versions
from mdeploy.errors import BadInputError, ConversionError
from mdeploy.graph.from_torch import graph_from_torch
from mdeploy.zoo import Arch, ModelConfig, build_model
from tests.test_converters import INFO, nearest_int8
from tests.test_graph import randomize_batch_norm

pytestmark = pytest.mark.arm

ARM_CPUS = ["cortex-a53", "neoverse-n1"]
IMAGES = 4


def require_root_on_debian() -> None:
    if os.geteuid() != 0:
        pytest.skip("the ARM sandbox needs root (chroot)")
    if not Path("/etc/debian_version").is_file() or shutil.which("apt-get") is None:
        pytest.skip("the ARM sandbox is built with apt and dpkg: not a Debian-like host")
    missing = [row["fix"] for row in host_requirements() if not row["ok"]]
    if missing:
        pytest.skip(f"the ARM sandbox's host lacks a package (README, ARM section): {'; '.join(map(str, missing))}")


# What a setup must leave as it was: the installed packages, every file of /etc, apt's and dpkg's own state and
# logs, the folders appstream's apt hooks write, and pip's cache in the home folder.
WATCHED_TREES = ("/var/lib/apt", "/var/cache/apt", "/var/lib/dpkg", "/var/log/apt", "/var/cache/swcatalog",
                 "/var/cache/app-info", str(Path.home() / ".cache" / "pip"))


def host_snapshot() -> dict[str, Any]:
    etc = {}
    for folder, dirs, files in os.walk("/etc"):
        for name in dirs + files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                etc[path] = "-> " + os.readlink(path)
            elif os.path.isfile(path):
                with open(path, "rb") as handle:
                    etc[path] = hashlib.sha256(handle.read()).hexdigest()
            else:
                etc[path] = "dir"
    trees = {}
    for root in WATCHED_TREES:
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                info = os.lstat(os.path.join(folder, name))
                trees[os.path.join(folder, name)] = (info.st_size, info.st_mtime_ns)
    packages = subprocess.run(["dpkg", "-l"], check=True, capture_output=True, text=True).stdout
    return {"etc": etc, "trees": trees, "packages": packages.splitlines()}


def host_changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    changes = []
    for part in ("etc", "trees"):
        for path in sorted(set(before[part]) | set(after[part])):
            if before[part].get(path) != after[part].get(path):
                changes.append(f"{path}: {before[part].get(path)} -> {after[part].get(path)}")
    changes += [f"dpkg -l: {line}" for line in sorted(set(before["packages"]) ^ set(after["packages"]))]
    return changes


COLD_SETUPS: list[tuple[Path, list[str]]] = []  # (folder, host changes) of each setup that found no download cache


def setup_watching_the_host(folder: Path) -> SandboxState:
    cold = not download_cache_dir(folder).exists() and not sandbox_status(folder).ready
    before = host_snapshot() if cold else None
    state = setup_sandbox(folder, progress=print)
    if before is not None:
        COLD_SETUPS.append((folder, host_changes(before, host_snapshot())))
    return state


@pytest.fixture(scope="module")
def sandbox() -> SandboxState:
    require_root_on_debian()
    state = setup_watching_the_host(default_sandbox_dir())
    assert state.ready, state.reason
    return state


def test_cold_setup_leaves_the_host_untouched(sandbox: SandboxState, tmp_path: Path) -> None:
    """No apt source, no installed package, no file of /etc, nothing in apt's or dpkg's state: the packages come
    from a private apt in mdeploy's cache. The sandbox fixture's own setup is the proof when it ran cold; otherwise
    a cold setup into a temporary folder is (~30-60 s more)."""
    if not COLD_SETUPS:
        state = setup_watching_the_host(tmp_path / "arm64-sandbox")
        assert state.ready, state.reason
    folder, changes = COLD_SETUPS[-1]
    assert changes == [], f"setup into {folder} changed the host: " + "; ".join(changes[:10])
    assert not list(Path("/etc/apt/sources.list.d").glob("mdeploy-*"))
    downloads = download_cache_dir(folder)
    assert {"apt-amd64", "apt-arm64", "qemu"} <= {p.name for p in downloads.iterdir()}
    for apt in ("apt-amd64", "apt-arm64"):  # every list and .deb apt fetched is in the private folders
        assert list((downloads / apt / "state" / "lists").glob("*InRelease"))
        assert list((downloads / apt / "cache" / "archives").glob("*.deb"))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], np.ndarray]:
    """int8 ONNX and TFLite of MobileNetV2 width 0.5 at 96 px, and a few preprocessed inputs."""
    torch.manual_seed(0)
    model = randomize_batch_norm(build_model(ModelConfig(Arch.mobilenet_v2, 0.5, 10, 0.2)))
    graph = graph_from_torch(model, (1, 3, 96, 96))
    calibration = np.random.default_rng(1).standard_normal((8, 3, 96, 96)).astype(np.float32)
    quantized = nearest_int8(graph, calibration)
    folder = tmp_path_factory.mktemp("arm-artifacts")
    paths = []
    for target in (Target.onnx, Target.tflite):
        path = folder / f"model.int8{REGISTRY[target].suffix}"
        REGISTRY[target].export(graph, quantized, path, INFO)
        paths.append(path)
    inputs = np.random.default_rng(2).standard_normal((IMAGES, 3, 96, 96)).astype(np.float32)
    return paths, inputs


def test_setup_is_idempotent(sandbox: SandboxState) -> None:
    stamp = sandbox.path / STAMP
    before = (stamp.read_bytes(), stamp.stat().st_mtime_ns)
    start = time.monotonic()
    again = setup_sandbox(sandbox.path)
    assert time.monotonic() - start < 5
    assert again == sandbox
    assert (stamp.read_bytes(), stamp.stat().st_mtime_ns) == before


def test_status_reports_ready(sandbox: SandboxState) -> None:
    state = sandbox_status(sandbox.path)
    assert state.ready, state.reason
    assert state.packages == wanted_versions()  # the guest runs the host's runtime versions
    assert state.python_version is not None and state.python_version.startswith("3.11")
    assert state.qemu_version is not None and int(state.qemu_version.split(".")[0]) >= 10
    assert state.size_mb is not None and 100 < state.size_mb < 1000
    assert json.loads(json.dumps(state.to_dict()))["ready"] is True


@pytest.mark.parametrize("cpu", ARM_CPUS)
def test_int8_outputs_on_arm_match_x86(sandbox: SandboxState, artifacts: tuple[list[Path], np.ndarray],
                                       cpu: str) -> None:
    paths, inputs = artifacts
    runs = run_on_arm(paths, inputs, cpu, sandbox.path)
    assert set(runs) == {str(path) for path in paths}
    for path in paths:
        arm, host = runs[str(path)], codes_on_host(path, inputs)
        difference = compare_codes(arm, host)
        print(f"{path.name} on {arm.runtime}: {difference.summary()} ({arm.seconds:.1f} s emulated, not a latency)")
        assert arm.emulated and arm.cpu == cpu
        assert arm.outputs.shape == (IMAGES, 10) and arm.outputs.dtype == np.float32
        # ONNX: recovered from its DequantizeLinear, stored as uint8 (code + 128); TFLite: its int8 output
        assert arm.codes is not None and arm.codes.dtype == (np.uint8 if path.suffix == ".onnx" else np.int8)
        assert difference.unit == "int8 output codes" and difference.total == IMAGES * 10
        assert difference.identical, difference.summary()  # ORT and XNNPACK int8 kernels are exact
        np.testing.assert_array_equal(arm.outputs, host.outputs)
    features = runs[str(paths[0])].cpu_features
    assert ("asimddp" in features) == (cpu == "neoverse-n1")  # the -cpu model picks the kernel family


def test_litert_builtin_kernels_within_one_lsb(sandbox: SandboxState,
                                               artifacts: tuple[list[Path], np.ndarray]) -> None:
    tflite = artifacts[0][1]
    inputs = artifacts[1]
    arm = run_on_arm([tflite], inputs, "cortex-a53", sandbox.path, kernels="builtin")[str(tflite)]
    difference = compare_codes(arm, codes_on_host(tflite, inputs, kernels="builtin"))
    print(f"builtin kernels: {difference.summary()}")
    assert arm.runtime.endswith("(builtin)")
    assert difference.max_lsb is not None and difference.max_lsb <= 1


def directory_state(root: Path) -> dict[str, int]:
    """mtime of every directory under ``root``: any file created or removed anywhere below changes one."""
    state = {}
    for folder, _, _ in os.walk(root):
        try:
            state[folder] = os.stat(folder).st_mtime_ns
        except OSError:
            pass
    return state


def host_python_folders() -> list[Path]:
    names = {sysconfig.get_paths()[key] for key in ("stdlib", "purelib", "platlib")}
    names |= {"/usr/lib/python3.11", "/usr/lib/python3/dist-packages", "/usr/local/lib/python3.11"}
    return sorted(Path(name) for name in names if Path(name).is_dir())


GUEST_FILE_NAMES = re.compile(r"^(a\d+\.(onnx|tflite)|inputs\.npy|re(quest|sult)\.json|guest_runner\.py|tflite_io\.py|"
                              r".*\.npy|"
                              r".*\.load\.log|__pycache__|[0-9a-f]{32})$")


def test_guest_is_isolated_from_the_host(sandbox: SandboxState, artifacts: tuple[list[Path], np.ndarray],
                                         tmp_path: Path) -> None:
    paths, inputs = artifacts
    marker = tmp_path / "host-marker.txt"
    marker.write_text("outside the sandbox", encoding="utf-8")
    codes_on_host(paths[0], inputs[:1])  # the host's own lazy imports happen now, not during the guest run
    watched = [*host_python_folders(), paths[0].parent]
    before = {str(root): directory_state(root) for root in watched}
    tmp_before = set(os.listdir("/tmp"))
    start = time.time()

    run_on_arm(paths, inputs[:1], "cortex-a53", sandbox.path)
    seen = guest_sees([str(marker), str(sandbox.path / STAMP), "/etc/debian_version", f"/{STAMP}"],
                      "cortex-a53", sandbox.path)

    assert seen["readable"] == {str(marker): False, str(sandbox.path / STAMP): False,
                                "/etc/debian_version": True, f"/{STAMP}": True}  # it sees the sandbox as /
    assert seen["guest"]["machine"] == "aarch64" and seen["guest"]["cpu_part"] == "0xd03"  # a Cortex-A53
    for root in watched:
        assert directory_state(root) == before[str(root)], f"something was written under {root}"
    new_in_tmp = sorted(name for name in set(os.listdir("/tmp")) - tmp_before if GUEST_FILE_NAMES.match(name))
    assert new_in_tmp == []
    assert list((sandbox.path / "work").iterdir()) == []  # the run's work folder is gone
    written_bytecode = [p for p in sandbox.path.rglob("*.pyc") if p.stat().st_mtime >= start]
    assert written_bytecode == []  # PYTHONDONTWRITEBYTECODE holds inside the guest too


def test_unknown_cpu_is_refused_with_the_known_ones(artifacts: tuple[list[Path], np.ndarray]) -> None:
    with pytest.raises(BadInputError, match="cortex-a53.*neoverse-n1.*neoverse-v1.*max"):
        run_on_arm(artifacts[0], artifacts[1], "pentium-4")
    assert parse_cpu_list("cortex-a53, neoverse-n1,cortex-a53") == ["cortex-a53", "neoverse-n1"]
    assert {"cortex-a53", "neoverse-n1", "neoverse-v1", "max"} <= set(CPU_MODELS)


def test_guest_crash_is_a_conversion_error(sandbox: SandboxState, tmp_path: Path) -> None:
    broken = tmp_path / "broken.int8.tflite"
    broken.write_bytes(b"not a flatbuffer" * 64)
    with pytest.raises(ConversionError, match="cortex-a53"):
        run_on_arm([broken], np.zeros((1, 3, 8, 8), np.float32), "cortex-a53", sandbox.path)
    assert list((sandbox.path / "work").iterdir()) == []


# Runs WORK/guest_runner.py WORK as the guest does (its folder first on sys.path), with mdeploy unimportable.
AS_IN_THE_GUEST = ("import runpy, sys\n"
                   "for name in ('mdeploy', 'converters', 'calibration'): sys.modules[name] = None\n"
                   "sys.path.insert(0, sys.argv[1])\n"
                   "sys.argv = [sys.argv[1] + '/guest_runner.py', sys.argv[1]]\n"
                   "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def test_guest_files_are_the_runner_and_the_converters_own_io_coding(tmp_path: Path) -> None:
    """The guest encodes and decodes TFLite I/O with converters/tflite_io.py itself (copied, not a twin), and it
    runs whatever format a registered converter names."""
    assert copy_runner(tmp_path) == tmp_path / RUNNER.name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["guest_runner.py", "tflite_io.py"]
    assert (tmp_path / "tflite_io.py").read_bytes() == GUEST_MODULES["tflite_io.py"].read_bytes()
    assert GUEST_MODULES["tflite_io.py"].resolve() == Path(tflite_io.__file__).resolve()
    assert tflite.tensor_encoder is tflite_io.tensor_encoder and tflite.tensor_decoder is tflite_io.tensor_decoder
    assert not hasattr(guest_runner, "encoder") and not hasattr(guest_runner, "decoder")
    assert arm_formats() == {c.suffix: c.arm_format for c in REGISTRY.values() if c.arm_format is not None}
    assert arm_formats() == {".onnx": "onnx", ".tflite": "tflite"}


@pytest.mark.parametrize("target", [t for t, c in REGISTRY.items() if c.arm_format is None], ids=str)
def test_a_target_the_sandbox_cannot_run_says_why(target: Target) -> None:
    """`check --platform linux-arm64` lists such artifacts as skipped with their target's own reason."""
    from mdeploy.arm.parity import skipped

    converter = REGISTRY[target]
    assert converter.arm_unavailable != ConverterBase.arm_unavailable, f"state why {target} does not run on ARM"
    assert skipped(Path(f"/out/model.int8{converter.suffix}")) == {"artifact": f"model.int8{converter.suffix}",
                                                                   "reason": converter.arm_unavailable}


def test_guest_runner_on_the_host_codes_int8_io_like_the_converter(artifacts: tuple[list[Path], np.ndarray],
                                                                   tmp_path: Path) -> None:
    """The guest's work folder exactly as run_on_arm lays it out, run by the host's Python with mdeploy
    unimportable: the same int8 codes and outputs as the host's own run of the same artifacts."""
    paths, inputs = artifacts
    copy_runner(tmp_path)
    entries = [{"key": f"a{index}", "file": f"a{index}{path.suffix}", "format": arm_formats()[path.suffix]}
               for index, path in enumerate(paths)]
    for entry, path in zip(entries, paths, strict=True):
        shutil.copyfile(path, tmp_path / entry["file"])
    np.save(tmp_path / "inputs.npy", inputs)
    request = {"inputs": "inputs.npy", "artifacts": entries, "kernels": "xnnpack", "threads": 1}
    (tmp_path / "request.json").write_text(json.dumps(request), encoding="utf-8")
    done = subprocess.run([sys.executable, "-E", "-s", "-c", AS_IN_THE_GUEST, str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "result.json").read_text(encoding="utf-8"))
    for entry, path in zip(entries, paths, strict=True):
        host = codes_on_host(path, inputs)
        np.testing.assert_array_equal(np.load(tmp_path / f"{entry['key']}.outputs.npy"), host.outputs)
        if path.suffix == ".tflite":
            assert result["artifacts"][entry["key"]]["has_codes"]
            codes = np.load(tmp_path / f"{entry['key']}.codes.npy")
            assert codes.dtype == np.int8
            np.testing.assert_array_equal(codes, host.codes)


def test_status_and_setup_refuse_folders_that_are_not_sandboxes(tmp_path: Path) -> None:
    assert sandbox_status(tmp_path / "missing").reason.startswith("not set up")
    foreign = tmp_path / "someone-elses"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me", encoding="utf-8")
    assert not sandbox_status(foreign).ready
    require_root_on_debian()
    with pytest.raises(BadInputError, match="not an mdeploy sandbox"):
        setup_sandbox(foreign)
    assert (foreign / "precious.txt").read_text(encoding="utf-8") == "keep me"


def test_failed_setup_leaves_nothing_that_looks_complete(sandbox: SandboxState, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from mdeploy.arm import sandbox as sandbox_module

    def interrupted_build(staging: Path, *args: object) -> dict[str, object]:
        (staging / "usr").mkdir(parents=True)
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C halfway

    monkeypatch.setattr(sandbox_module, "build", interrupted_build)
    folder = tmp_path / "arm64-sandbox"
    with pytest.raises(KeyboardInterrupt):
        setup_sandbox(folder)
    assert not folder.exists()
    assert not sandbox_status(folder).ready
    assert [p.name for p in tmp_path.iterdir() if ".staging-" in p.name] == []


@pytest.mark.parametrize(("patch", "message"), [
    ("geteuid", "needs root"),
    ("machine", "needs an x86_64 host"),
    ("os_release", "use a Debian or Ubuntu host"),
])
def test_setup_explains_hosts_it_cannot_use(patch: str, message: str, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from mdeploy.arm import host

    if patch == "geteuid":
        monkeypatch.setattr(host.os, "geteuid", lambda: 1000)
        message = "needs root: the ARM guest runs under chroot.*nothing is installed on the host"
    elif patch == "machine":
        monkeypatch.setattr(host.platform, "machine", lambda: "aarch64")
    else:
        monkeypatch.setattr(host, "_os_release", lambda: {"ID": "fedora", "PRETTY_NAME": "Fedora Linux 41"})
    with pytest.raises(BadInputError, match=message) as raised:
        setup_sandbox(tmp_path / "arm64-sandbox")
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "arm64-sandbox").exists()


def test_setup_without_the_mirror_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_root_on_debian()
    monkeypatch.setenv("MDEPLOY_ARM_MIRROR", "http://127.0.0.1:9/debian")  # nothing listens on the discard port
    folder = tmp_path / "arm64-sandbox"
    with pytest.raises(BadInputError, match="check network access to http://127.0.0.1:9/debian") as raised:
        setup_sandbox(folder)
    assert "\n" not in str(raised.value)
    assert not folder.exists() and not sandbox_status(folder).ready
    assert [p.name for p in tmp_path.iterdir() if ".staging-" in p.name] == []


def test_check_on_emulated_arm_through_the_cli(sandbox: SandboxState, tmp_path: Path) -> None:
    """What CI runs: convert a small model, then `check --platform linux-arm64` reports parity vs PyTorch and int8
    codes vs x86 per CPU model, labelled emulated, without any latency."""
    from typer.testing import CliRunner

    from mdeploy.cli import app

    runner = CliRunner()
    torch.manual_seed(0)
    torch.save(randomize_batch_norm(build_model(ModelConfig(Arch.mobilenet_v2, 0.5, 10, 0.2))).state_dict(),
               tmp_path / "model.pt")
    for name, count, seed in (("calib", 32, 0), ("eval", 8, 1)):
        (tmp_path / name).mkdir()
        np.save(tmp_path / name / "x.npy", np.random.default_rng(seed).standard_normal((count, 3, 96, 96))
                .astype(np.float32))
    common = ["--arch", "mobilenet_v2", "--input-size", "96", "--min-top1", "0"]
    converted = runner.invoke(app, ["convert", str(tmp_path / "model.pt"), *common, "--to", "onnx,tflite", "--int8",
                                    "--calib", str(tmp_path / "calib"), "--out", str(tmp_path / "out")])
    assert converted.exit_code == 0, converted.output
    result = runner.invoke(app, ["check", str(tmp_path / "out"), "--model", str(tmp_path / "model.pt"),
                                 "--eval", str(tmp_path / "eval"), *common[:2], "--min-top1", "0",
                                 "--platform", "linux-arm64", "--cpu", "cortex-a53", "--json"])
    assert result.exit_code == 0, result.output
    arm = json.loads(result.stdout)["arm"]
    assert arm["emulated"] and arm["cpus"] == ["cortex-a53"] and len(arm["results"]) == 4
    for row in arm["results"]:
        assert row["emulated"] and row["parity"]["passed"] and "latency" not in json.dumps(row).replace(
            "no latency", "")
        if ".int8." in row["artifact"]:
            assert row["vs_x86"]["unit"] == "int8 output codes" and row["vs_x86"]["max_lsb"] <= 1
    ready = runner.invoke(app, ["arm", "status", "--json"])
    assert ready.exit_code == 0 and json.loads(ready.stdout)["ready"]
    doctor = json.loads(runner.invoke(app, ["doctor", "--json"]).stdout)
    assert doctor["arm_sandbox"]["ready"] and {t["target"] for t in doctor["targets"]} == set(REGISTRY)
    refused = runner.invoke(app, ["check", str(tmp_path / "out"), "--model", str(tmp_path / "model.pt"), "--eval",
                                  str(tmp_path / "eval"), *common[:2], "--cpu", "cortex-a53"])
    assert refused.exit_code == 2 and "--platform linux-arm64" in refused.stderr


def test_private_apt_reads_its_plan_and_names_debs_as_apt_does() -> None:
    from mdeploy.apt import parse_plan

    plan = parse_plan("NOTE: simulation\nInst qemu-user (1:10.0.2+ds-2+deb13u1~bpo12+1 Debian Backports:12 [amd64])\n"
                      "Inst tzdata (2025b-0+deb12u1 Debian:12.11/stable [all])\nConf tzdata (2025b-0+deb12u1)\n")
    assert plan.deb_names() == ["qemu-user_1%3a10.0.2+ds-2+deb13u1~bpo12+1_amd64.deb",
                                "tzdata_2025b-0+deb12u1_all.deb"]


def test_status_exits_2_when_the_sandbox_is_not_ready(tmp_path: Path) -> None:
    """Scripts can test it: `mdeploy arm status || mdeploy arm setup` (2, as `check --platform linux-arm64`)."""
    from typer.testing import CliRunner

    from mdeploy.cli import app

    missing = CliRunner().invoke(app, ["arm", "status", "--folder", str(tmp_path / "missing"), "--json"])
    assert missing.exit_code == 2
    assert json.loads(missing.stdout)["ready"] is False
    text = CliRunner().invoke(app, ["arm", "status", "--folder", str(tmp_path / "missing")])
    assert text.exit_code == 2 and "not ready" in text.stdout and "mdeploy arm setup" in text.stdout


def test_remove_deletes_the_sandbox_and_its_caches_only(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mdeploy.cli import app

    paths = sandbox_paths(tmp_path / "arm64-sandbox")
    (paths["sandbox"] / "usr" / "bin").mkdir(parents=True)
    (paths["sandbox"] / STAMP).write_text(json.dumps({"layout": 0}), encoding="utf-8")
    (paths["sandbox"] / "usr" / "bin" / "python3").write_bytes(b"x" * 2_000_000)
    (paths["downloads"] / "apt-arm64").mkdir(parents=True)
    paths["lock"].write_text("", encoding="utf-8")
    leftover = tmp_path / ".arm64-sandbox.staging-123"
    leftover.mkdir()
    neighbour = tmp_path / "keep-me.txt"
    neighbour.write_text("not the sandbox's", encoding="utf-8")

    removed = CliRunner().invoke(app, ["arm", "remove", "--folder", str(paths["sandbox"]), "--json"])
    assert removed.exit_code == 0, removed.output
    report = json.loads(removed.stdout)
    assert report["freed_mb"] == 2.0 and len(report["removed"]) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep-me.txt"]
    again = CliRunner().invoke(app, ["arm", "remove", "--folder", str(paths["sandbox"])])
    assert again.exit_code == 0 and "nothing to remove" in again.stdout

    foreign = tmp_path / "someone-elses"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(BadInputError, match="not an mdeploy sandbox"):
        remove_sandbox(foreign)
    assert (foreign / "precious.txt").is_file()


def test_doctor_lists_every_cache_and_the_host_requirements(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from mdeploy.cli import app

    monkeypatch.setenv("MDEPLOY_ARM_SANDBOX", str(tmp_path / "arm64-sandbox"))
    monkeypatch.setenv("MDEPLOY_CACHE", str(tmp_path / "demo"))
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "weights.pth").write_bytes(b"w" * 3_000_000)
    result = CliRunner().invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    caches = {row["path"]: row["size_mb"] for row in report["caches"]}
    assert caches[str(tmp_path / "arm64-sandbox")] is None  # listed even before it exists
    assert str(tmp_path / "arm64-sandbox-downloads") in caches and str(tmp_path / ".arm64-sandbox.lock") in caches
    assert caches[str(tmp_path / "demo")] == 3.0
    needs = {row["need"]: row for row in report["arm_host"]}
    assert "root (chroot)" in needs and all(row["fix"] for row in needs.values())
    assert needs["dpkg-deb (dpkg)"]["ok"] == (shutil.which("dpkg-deb") is not None)
    text = CliRunner().invoke(app, ["doctor"])
    assert "caches mdeploy writes" in text.stdout and "arm64-sandbox-downloads" in text.stdout
