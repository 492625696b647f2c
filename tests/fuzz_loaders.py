"""Fuzz the model loader (``mdeploy.loading.load_model``) and the sample loader (``SampleSet.from_folder``).

Valid files (a state dict, a legacy state dict, TorchScript, a .pt2 ExportedProgram; PNG, JPEG, WebP, BMP, .npy and
.npz samples) are mutated with a fixed seed: bit flips, truncation, random bytes, inserted and deleted bytes, and,
for zip archives, a corrupted, truncated, dropped or swapped member repacked with a valid CRC so that the damage
reaches torch's and NumPy's parsers instead of stopping at the zip layer. Each mutant goes through the loader in a
worker process, under a per-case timeout and a memory limit. The only acceptable outcomes are success or an
``MdeployError``: any other exception, a crash of the worker (a signal) or a hang is a finding.

    python -m tests.fuzz_loaders --seconds 300 [--min-cases 22] [--seed 1] [--target model|samples|both]

The regressions in ``REGRESSIONS`` (cases that once failed, found by this harness and fixed) are replayed first,
outside the time budget; then at least ``--min-cases`` new mutants run whatever the machine's speed (the same ones
for a given seed), and the time budget only adds more. ``tests/test_fuzz.py`` runs it with a fixed minimum and
``MDEPLOY_FUZZ_SECONDS`` (default 20) of budget, so that it tests the same cases on a busy machine as on an idle one.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import select
import subprocess
import sys
import time
import traceback
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# A hang is judged on the worker's CPU time, not on the clock, so that a busy machine (which only slows the worker
# down) does not turn a slow case into a finding: loading a mutant took at most 1.5 s of CPU (a .pt2, in a fresh
# worker; measured over 300 cases).
CASE_TIMEOUT = 20.0  # seconds of CPU per mutant
START_TIMEOUT = 120.0  # seconds of CPU for the worker to import torch and the loaders
WALL_FACTOR = 15  # a worker that uses no CPU at all (blocked) is a hang after 15 times the CPU limit on the clock
MEMORY_LIMIT = 6 << 30  # bytes of address space per worker: a damaged size field must fail, not swap

# (seed file, mutator, rng seed) of mutants that once broke a loader: replayed first by tests/test_fuzz.py.
REGRESSIONS: list[tuple[str, str, int]] = [
    ("script.pt", "zip_member", 868638817),  # a tensor file emptied: torch.jit.load accepted it, reading it SIGSEGV
    ("script.pt", "zip_member", 273419368),  # the same, another tensor
    ("program.pt2", "random_bytes", 245265942),  # a member name that is not UTF-8: UnicodeDecodeError in zipfile
    ("state_dict.pt", "random_bytes", 828679319),  # the same in a state dict
    ("script.pt", "bit_flips", 1018775015),  # header and directory names differ: BadZipFile in the code scan
    ("script.pt", "bit_flips", 1044293149),  # a damaged deflate stream: zlib.error in the code scan
    ("script.pt", "bit_flips", 124515831),  # UnicodeDecodeError reading a code member
    ("script.pt", "numbers", 78218653),  # Bad CRC-32 in the code scan
    ("samples.npz", "zip_member", 222050026),  # a .npz member that is not .npy: NpzFile gave bytes, AttributeError
]


@dataclass
class Outcome:
    seed_file: str
    mutator: str
    rng_seed: int
    status: str  # "ok", "mdeploy_error", "crash" (another exception), "killed" (a signal), "hang"
    detail: str = ""


@dataclass
class FuzzReport:
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def findings(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status not in ("ok", "mdeploy_error")]

    def summary(self) -> str:
        counts = Counter(o.status for o in self.outcomes)
        per_seed = Counter(o.seed_file for o in self.outcomes)
        return (f"{len(self.outcomes)} cases in {self.seconds:.0f} s: " + ", ".join(f"{k} {v}" for k, v in
                sorted(counts.items())) + " | per seed: " + ", ".join(f"{k} {v}" for k, v in sorted(per_seed.items())))


# --------------------------------------------------------------------------------------------------- seeds


def write_seeds(folder: Path) -> dict[str, Path]:
    """Small valid files of every kind the loaders read."""
    import numpy as np
    import torch
    from PIL import Image

    from mdeploy.zoo import Arch, ModelConfig, build_model

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = build_model(ModelConfig(Arch.mobilenet_v3_small, 0.25, 10)).eval()
    x = torch.zeros(1, 3, 32, 32)
    seeds = {
        "state_dict.pt": folder / "state_dict.pt",
        "legacy.pt": folder / "legacy.pt",
        "script.pt": folder / "script.pt",
        "program.pt2": folder / "program.pt2",
    }
    torch.save(model.state_dict(), seeds["state_dict.pt"])
    torch.save(model.state_dict(), seeds["legacy.pt"], _use_new_zipfile_serialization=False)
    torch.jit.save(torch.jit.trace(model, x), seeds["script.pt"])
    torch.export.save(torch.export.export(model, (x,)), seeds["program.pt2"])
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8))
    for name, options in {"image.png": {}, "image.jpg": {"quality": 90}, "image.webp": {"lossless": True},
                          "image.bmp": {}}.items():
        seeds[name] = folder / name
        image.save(seeds[name], **options)
    exif = Image.Exif()
    exif[0x0112] = 6
    seeds["rotated.jpg"] = folder / "rotated.jpg"
    image.save(seeds["rotated.jpg"], exif=exif)
    seeds["samples.npy"] = folder / "samples.npy"
    np.save(seeds["samples.npy"], rng.standard_normal((2, 3, 16, 16)).astype(np.float32))
    seeds["samples.npz"] = folder / "samples.npz"
    np.savez(seeds["samples.npz"], a=rng.standard_normal((3, 16, 16)).astype(np.float32))
    return seeds


MODEL_SEEDS = ("state_dict.pt", "legacy.pt", "script.pt", "program.pt2")
SAMPLE_SEEDS = ("image.png", "image.jpg", "image.webp", "image.bmp", "rotated.jpg", "samples.npy", "samples.npz")


# ------------------------------------------------------------------------------------------------ mutators


def _bit_flips(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice((1, 2, 4, 8, 32))):
        position = rng.randrange(len(out))
        out[position] ^= 1 << rng.randrange(8)
    return bytes(out)


def _truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(len(data))]


def _random_bytes(data: bytes, rng: random.Random) -> bytes:
    start = rng.randrange(len(data))
    length = min(rng.choice((1, 4, 16, 256, 4096)), len(data) - start)
    return data[:start] + rng.randbytes(length) + data[start + length:]


def _insert_delete(data: bytes, rng: random.Random) -> bytes:
    start = rng.randrange(len(data))
    if rng.random() < 0.5:
        return data[:start] + rng.randbytes(rng.choice((1, 3, 64))) + data[start:]
    return data[:start] + data[start + rng.choice((1, 3, 64)):]


def _interesting_numbers(data: bytes, rng: random.Random) -> bytes:
    """Overwrite 4 or 8 bytes with a boundary value (0, -1, 2^31, 2^63, ...): length and size fields."""
    width = rng.choice((4, 8))
    value = rng.choice((0, 1, 0x7F, 0xFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 2**63 - 1, 2**64 - 1))
    start = rng.randrange(max(len(data) - width, 1))
    return data[:start] + (value % (1 << (8 * width))).to_bytes(width, "little") + data[start + width:]


def _zip_members(data: bytes) -> list[zipfile.ZipInfo] | None:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            return zf.infolist()
    except Exception:  # noqa: BLE001 - not a zip
        return None


def _repack(data: bytes, edit) -> bytes:
    """Rebuild zip ``data`` with members edited by ``edit(index, info, bytes)`` (None drops the member); CRCs are
    recomputed, so the damage reaches the parser of the member."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as zin, zipfile.ZipFile(out, "w") as zout:
        for index, info in enumerate(zin.infolist()):
            new = edit(index, info, zin.read(info.filename))
            if new is not None:
                zout.writestr(info, new)
    return out.getvalue()


def _zip_member(data: bytes, rng: random.Random) -> bytes:
    members = _zip_members(data)
    if not members:
        return _bit_flips(data, rng)
    # Prefer the members parsers read: pickles, json, code, small files.
    weights = [5 if m.filename.endswith((".pkl", ".json", ".py", "version", "archive_format", "byteorder")) else 1
               for m in members]
    target = rng.choices(range(len(members)), weights)[0]
    how = rng.choice(("flip", "truncate", "random", "drop", "empty", "numbers", "swap"))
    swap_with = rng.randrange(len(members))
    payloads: dict[int, bytes] = {}
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        payloads[swap_with] = zf.read(members[swap_with].filename)

    def edit(index: int, info: zipfile.ZipInfo, content: bytes) -> bytes | None:
        if index != target:
            return content
        if how == "drop":
            return None
        if how == "empty" or not content:
            return b""
        if how == "swap":
            return payloads[swap_with]
        mutate = {"flip": _bit_flips, "truncate": _truncate, "random": _random_bytes,
                  "numbers": _interesting_numbers}[how]
        return mutate(content, rng)

    return _repack(data, edit)


def _zip_structure(data: bytes, rng: random.Random) -> bytes:
    """Damage the zip records themselves: the end-of-central-directory record or a local header."""
    end = data.rfind(b"PK\x05\x06")
    local = [m.start() for m in re.finditer(b"PK\x03\x04", data)][:64]
    anchor = end if (end >= 0 and rng.random() < 0.5) else rng.choice(local or [0])
    span = rng.randrange(4, 30)
    out = bytearray(data)
    for _ in range(rng.choice((1, 2, 4))):
        position = min(anchor + rng.randrange(span), len(out) - 1)
        out[position] = rng.randrange(256)
    return bytes(out)


MUTATORS = {
    "bit_flips": _bit_flips,
    "truncate": _truncate,
    "random_bytes": _random_bytes,
    "insert_delete": _insert_delete,
    "numbers": _interesting_numbers,
    "zip_member": _zip_member,
    "zip_structure": _zip_structure,
}
ZIP_ONLY = {"zip_member", "zip_structure"}


def mutate(seed_bytes: bytes, seed_name: str, mutator: str, rng_seed: int) -> bytes:
    rng = random.Random(f"{seed_name}/{mutator}/{rng_seed}")
    if not seed_bytes:
        return seed_bytes
    return MUTATORS[mutator](seed_bytes, rng)


def mutators_for(seed_bytes: bytes) -> list[str]:
    is_zip = seed_bytes.startswith(b"PK")
    return [name for name in MUTATORS if is_zip or name not in ZIP_ONLY]


# -------------------------------------------------------------------------------------------------- worker


def _limit_memory() -> None:
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    except (ImportError, ValueError, OSError):  # pragma: no cover - not Linux
        pass


def worker_main() -> None:
    """Reads one JSON case per line on stdin, answers one JSON outcome per line on stdout."""
    import torch

    torch.set_num_threads(1)
    _limit_memory()
    from mdeploy.calibration.dataset import SampleSet
    from mdeploy.calibration.preprocess import Preprocess
    from mdeploy.errors import MdeployError
    from mdeploy.loading import load_model

    preprocess = Preprocess(resize=20, crop=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    answer = sys.stdout
    sys.stdout = sys.stderr  # library chatter must not corrupt the protocol
    print("ready", file=answer, flush=True)
    for line in sys.stdin:
        case = json.loads(line)
        path = Path(case["path"])
        try:
            if case["kind"] == "model":
                load_model(path, arch="mobilenet_v3_small")
            else:
                SampleSet.from_folder(path.parent, preprocess, min_samples=0)
            result = {"status": "ok"}
        except MdeployError as err:
            message = str(err)
            result = {"status": "mdeploy_error", "detail": message[:300]}
            if "\n" in message:
                result = {"status": "crash", "detail": f"multi-line MdeployError: {message[:300]!r}"}
        except BaseException as err:  # noqa: BLE001 - every other outcome is a finding
            tb = traceback.format_exc(limit=-4)
            result = {"status": "crash", "detail": f"{type(err).__name__}: {str(err)[:200]}\n{tb[-1500:]}"}
        print(json.dumps(result), file=answer, flush=True)


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux /proc), or None where that cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()  # after the command name, which may hold spaces
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class Worker:
    """A loader process that survives many cases; killed and restarted on a hang or a crash."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[str] | None = None
        self.last_wait = (0.0, 0.0)  # CPU and clock seconds of the last wait for an answer

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.fuzz_loaders", "--worker"], cwd=REPO, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
        )
        if self._read(START_TIMEOUT) != "ready":
            raise RuntimeError("fuzz worker did not start")

    def _read(self, cpu_limit: float) -> str | None:
        """The worker's next line ("" if it died), or None once it used ``cpu_limit`` seconds of CPU (or, where
        /proc is missing or the worker is blocked, ``WALL_FACTOR`` times that on the clock) without answering."""
        assert self.process is not None and self.process.stdout is not None
        start_cpu, start = _cpu_seconds(self.process.pid), time.monotonic()
        self.last_wait = (0.0, 0.0)
        while True:
            ready, _, _ = select.select([self.process.stdout], [], [], 0.2)
            if ready:
                line = self.process.stdout.readline()
                return line.strip() if line else ""
            cpu, wall = _cpu_seconds(self.process.pid), time.monotonic() - start
            used = cpu - start_cpu if cpu is not None and start_cpu is not None else wall
            self.last_wait = (used, wall)
            if used > cpu_limit or wall > WALL_FACTOR * cpu_limit:
                return None

    def run(self, path: Path, kind: str, timeout: float = CASE_TIMEOUT) -> tuple[str, str]:
        if self.process is None or self.process.poll() is not None:
            self.start()
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(json.dumps({"path": str(path), "kind": kind}) + "\n")
        self.process.stdin.flush()
        line = self._read(timeout)
        if line is None:
            used, wall = self.last_wait
            self.stop()
            return "hang", f"no answer after {used:.0f} s of CPU time ({wall:.0f} s on the clock)"
        if line == "":
            code = self.process.wait()
            self.process = None
            return "killed", f"worker died with exit code {code}"
        answer = json.loads(line)
        return answer["status"], answer.get("detail", "")

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
            self.process.communicate()
            self.process = None


# ------------------------------------------------------------------------------------------------- driver


def case_path(work: Path, seed_name: str, index: int) -> tuple[Path, str]:
    """Each mutant gets its own folder (the sample loader reads a whole folder)."""
    folder = work / f"case{index:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    kind = "model" if seed_name in MODEL_SEEDS else "samples"
    return folder / seed_name, kind


def run_case(worker: Worker, seeds: dict[str, Path], work: Path, index: int, seed_name: str, mutator: str,
             rng_seed: int) -> Outcome:
    data = mutate(seeds[seed_name].read_bytes(), seed_name, mutator, rng_seed)
    path, kind = case_path(work, seed_name, index % 4)
    path.write_bytes(data)
    status, detail = worker.run(path, kind)
    if status not in ("ok", "mdeploy_error"):
        keep = work / "findings" / f"{seed_name}.{mutator}.{rng_seed}"
        keep.parent.mkdir(exist_ok=True)
        keep.write_bytes(data)
    return Outcome(seed_name, mutator, rng_seed, status, detail)


def run_fuzz(seconds: float, work: Path, seed: int = 0, target: str = "both",
             replay: list[tuple[str, str, int]] | None = None, min_cases: int = 0) -> FuzzReport:
    """Replay the regressions in ``replay`` (whatever the time), then mutate and load: at least ``min_cases`` new
    mutants (a count, not a time: the same cases however busy the machine is), and more for the rest of ``seconds``
    (counted from the end of the replay)."""
    start = time.monotonic()
    seeds = write_seeds(work / "seeds")
    names = [n for n in seeds if (target in ("both", "model") and n in MODEL_SEEDS)
             or (target in ("both", "samples") and n in SAMPLE_SEEDS)]
    plan_rng = random.Random(seed)
    report = FuzzReport()
    worker = Worker()
    try:
        for index, (seed_name, mutator, rng_seed) in enumerate(replay or []):
            report.outcomes.append(run_case(worker, seeds, work, index, seed_name, mutator, rng_seed))
        index = len(report.outcomes)
        budget_start = time.monotonic()
        new = 0
        # Models cost ~10x more to load than samples: the seed files take turns so that every one gets cases within
        # any budget (each one at least min_cases // len(names) times).
        while new < min_cases or time.monotonic() - budget_start < seconds:
            seed_name = names[new % len(names)]
            seed_bytes = seeds[seed_name].read_bytes()
            mutator = plan_rng.choice(mutators_for(seed_bytes))
            rng_seed = plan_rng.randrange(1 << 30)
            report.outcomes.append(run_case(worker, seeds, work, index, seed_name, mutator, rng_seed))
            index += 1
            new += 1
    finally:
        worker.stop()
    report.seconds = time.monotonic() - start
    return report


def signature(outcome: Outcome) -> str:
    """Where a finding comes from: its status, exception type and the innermost frame in mdeploy or calibration."""
    lines = outcome.detail.splitlines()
    kind = lines[0].split(":")[0] if lines else ""
    frames = [line.strip() for line in lines if line.strip().startswith("File ") and "/work/" in line]
    return f"{outcome.status} {kind} at {frames[-1] if frames else '?'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("MDEPLOY_FUZZ_SECONDS", "60")))
    parser.add_argument("--min-cases", type=int, default=0, help="new mutants to run whatever the time (default 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", choices=("model", "samples", "both"), default="both")
    parser.add_argument("--work", type=Path, default=None, help="folder for seeds, mutants and findings")
    args = parser.parse_args()
    if args.worker:
        worker_main()
        return
    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="mdeploy-fuzz-"))
    report = run_fuzz(args.seconds, work, args.seed, args.target, replay=REGRESSIONS, min_cases=args.min_cases)
    print(report.summary())
    groups: dict[str, list[Outcome]] = {}
    for finding in report.findings:
        groups.setdefault(signature(finding), []).append(finding)
    for key, findings in groups.items():
        first = findings[0]
        print(f"FINDING x{len(findings)} {key}: e.g. ({first.seed_file!r}, {first.mutator!r}, {first.rng_seed})"
              f"\n    {first.detail.replace(chr(10), chr(10) + '    ')}")
    print(f"mutants that failed are kept in {work / 'findings'}")
    sys.exit(1 if report.findings else 0)


if __name__ == "__main__":
    main()
