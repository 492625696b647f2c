"""README_android.md and README_ios.md render byte for byte as the golden files in tests/data/readmes/, and every
template placeholder is filled.

The ``*.manifest.json`` files are real manifests of a tiny MobileNetV2 converted four ways: fp32 only without
labels; int8 with --tflite-io int8 / uint8 / float, Core ML tensor and image input, with and without labels (what the
READMEs read is real; the rest are placeholders that make them full manifests :class:`mdeploy.manifest.Manifest`
reads). CASES adds edits a CLI run cannot make (BGR, no resize, no golden vectors, one platform only). The bundle
renders the shared sections; each converter's ``app_readme`` its platform's README.
After an intended change to the README text, regenerate the goldens with ``python -m tests.test_readmes`` and review
the diff.
"""

from __future__ import annotations

import copy
import json
import re
import string
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from mdeploy.bundle import readmes
from mdeploy.converters import REGISTRY, base
from mdeploy.converters.base import AppReadme, ConverterBase, ReadmeParts
from mdeploy.manifest import Manifest
from mdeploy.types import Target

DATA = Path(__file__).parent / "data" / "readmes"
Data = dict[str, Any]  # a manifest's JSON form, which the CASES edit


def _bgr(m: Data) -> None:
    p = m["preprocess"]
    p["channel_order"], p["mean"], p["std"] = "BGR", p["mean"][::-1], p["std"][::-1]


def _bgr_no_resize_other_scale(m: Data) -> None:
    _bgr(m)
    m["preprocess"].update(resize=None, scale=1 / 127.5, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])


def _no_golden_no_classifier(m: Data) -> None:
    m["golden"].update(samples=0, images=[], artifacts={})
    m["model"]["name"] = "mobilenet_v3-small_pets"
    for a in m["artifacts"]:
        a["settings"].pop("classifier", None)


def _only(target: str) -> Callable[[Data], None]:
    def edit(m: Data) -> None:
        m["artifacts"] = [a for a in m["artifacts"] if a["target"] == target]
    return edit


def _pte_only(m: Data) -> None:
    """The ONNX artifacts' records as the ExecuTorch programs of the same model (float32 NCHW I/O, batch 1)."""
    programs = []
    for a in m["artifacts"]:
        if a["target"] == "onnx":
            b = copy.deepcopy(a)
            b.update(target="pte", file=a["file"].replace(".onnx", ".pte"),
                     runtime="ExecuTorch runtime (XNNPACK delegate, CPU)",
                     settings={"delegate": "XNNPACK", "batch": 1, "layout": "NCHW", "executorch": "1.5.1"})
            for tensor in (*b["io"]["inputs"], *b["io"]["outputs"]):
                tensor["shape"][0] = 1
            programs.append(b)
    m["artifacts"] = programs


# case name -> (base manifest, edit)
CASES: dict[str, tuple[str, Callable[[Data], None] | None]] = {
    "fp32_nolabels": ("fp32_nolabels", None),
    "int8_io_int8_tensor_labels": ("int8_io_int8_tensor_labels", None),
    "int8_io_uint8_image_labels": ("int8_io_uint8_image_labels", None),
    "int8_io_float_image_nolabels": ("int8_io_float_image_nolabels", None),
    "bgr_tensor": ("int8_io_int8_tensor_labels", _bgr),
    "bgr_image_no_resize": ("int8_io_uint8_image_labels", _bgr_no_resize_other_scale),
    "no_golden_no_classifier": ("fp32_nolabels", _no_golden_no_classifier),
    "tflite_only": ("int8_io_int8_tensor_labels", _only("tflite")),
    "coreml_only": ("int8_io_uint8_image_labels", _only("coreml")),
    "pte_only": ("int8_io_int8_tensor_labels", _pte_only),
    "pte_fp32_bgr_no_resize": ("int8_io_int8_tensor_labels", lambda m: (
        _bgr_no_resize_other_scale(m), _pte_only(m), m.update(artifacts=m["artifacts"][:1]))),
}
READMES = ("README_android.md", "README_ios.md", "README_executorch.md")


def data(case: str) -> Data:
    name, edit = CASES[case]
    m = json.loads((DATA / f"{name}.manifest.json").read_text(encoding="utf-8"))
    if edit:
        edit(m)
    return m


def manifest(case: str) -> Manifest:
    return Manifest.from_dict(data(case))


def golden(case: str, readme: str) -> Path:
    return DATA / f"{case}.{readme}"


@pytest.mark.parametrize("readme", READMES)
@pytest.mark.parametrize("case", CASES)
def test_readme_is_byte_identical_to_its_golden_file(case: str, readme: str) -> None:
    path = golden(case, readme)
    rendered = readmes.render_readmes(manifest(case))
    if not path.exists():  # no golden file: no such README for this manifest
        assert readme not in rendered
    else:
        assert rendered[readme].encode("utf-8") == path.read_bytes()


def test_only_these_readmes_are_rendered() -> None:
    for case in CASES:
        assert set(readmes.render_readmes(manifest(case))) <= set(READMES), case


def test_every_case_renders_at_least_one_readme_and_both_platforms_are_covered() -> None:
    for case in CASES:
        assert any(golden(case, readme).exists() for readme in READMES), case
    assert not golden("tflite_only", "README_ios.md").exists()
    assert not golden("coreml_only", "README_android.md").exists()


def test_write_readmes_writes_only_the_platforms_present(tmp_path: Path) -> None:
    assert readmes.write_readmes(tmp_path, manifest("tflite_only")) == ["README_android.md"]
    assert (tmp_path / "README_android.md").read_bytes() == golden("tflite_only", "README_android.md").read_bytes()
    assert not (tmp_path / "README_ios.md").exists()


# The shared sections' templates are the bundle's; each target's README and code snippets are its converter's.
PACKAGES = ("mdeploy.bundle", "mdeploy.converters")


def _templates(package: str) -> dict[str, str]:
    folder = resources.files(package) / "templates"
    return {t.name: t.read_text(encoding="utf-8") for t in folder.iterdir() if t.name.endswith(".tmpl")}


@pytest.mark.parametrize("package", PACKAGES)
def test_templates_ship_with_the_package_and_each_is_used(package: str) -> None:
    templates = _templates(package)
    assert templates, f"no templates found as package data of {package}"
    sources = "\n".join(p.read_text(encoding="utf-8") for p in resources.files(package).iterdir()
                        if p.name.endswith(".py"))
    for name in templates:
        assert f'"{name}"' in sources, f"{name} is not rendered by any module of {package}"


@pytest.mark.parametrize("case", CASES)
def test_no_placeholder_survives_and_every_placeholder_is_provided(case: str) -> None:
    """Every README renders through ``base.render_template``, with ``Template.substitute`` (a missing value raises
    KeyError); here also the converse: no value is passed that no template uses, and no ``$name`` is left in the
    text."""
    used: set[str] = set()
    real_template = base.template

    class Checked(string.Template):
        def substitute(self, mapping: Any = {}, /, **values: object) -> str:  # noqa: B006 - string.Template's own
            placeholders = set(self.get_identifiers())
            assert placeholders == set(mapping), (self.name, placeholders ^ set(mapping))
            used.add(self.name)
            return super().substitute(mapping, **values)

    def spy(package: str, name: str) -> string.Template:
        checked = Checked(real_template(package, name).template)
        checked.name = name
        return checked

    m = manifest(case)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(base, "template", spy)
        texts = list(readmes.render_readmes(m).values())
    assert used and texts
    for text in texts:
        assert not re.search(r"\$\{?[A-Za-z_]", text), re.search(r".*\$.*", text)


@pytest.mark.parametrize("package", PACKAGES)
def test_templates_are_valid(package: str) -> None:
    for name, text in _templates(package).items():
        assert string.Template(text).is_valid(), name


class _DummyConverter(ConverterBase):
    target = Target("dummy")
    runtime_name = "dummy runtime"

    def app_readme(self, manifest: Manifest, parts: ReadmeParts) -> AppReadme | None:
        (artifact,) = [a for a in manifest.artifacts if a.target == self.target]
        return AppReadme("README_dummy.md", f"# {artifact.file}\n{parts.contract}{parts.golden}{parts.files}\n")


def test_a_registered_target_writes_its_own_readme_with_the_shared_parts(tmp_path: Path) -> None:
    m = data("tflite_only")
    m["artifacts"] = [dict(m["artifacts"][-1], target="dummy", file="mobilenet_v2.int8.dummy")]
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(REGISTRY, Target("dummy"), _DummyConverter())
        written = readmes.write_readmes(tmp_path, Manifest.from_dict(m))
    assert written == ["README_dummy.md"]  # tflite's converter is not asked: no tflite artifact is left
    text = (tmp_path / "README_dummy.md").read_text(encoding="utf-8")
    android = golden("tflite_only", "README_android.md").read_text(encoding="utf-8")
    contract = android.split("## Preprocessing (the contract the model was calibrated and checked with)\n")[1]
    assert text.startswith("# mobilenet_v2.int8.dummy\n" + contract.split("\n## Kotlin")[0])
    assert "## Golden vectors" in text and "`mobilenet_v2.int8.dummy` (dummy int8" in text


def regenerate() -> None:
    """Write the golden READMEs from the current code (only after an intended change to the README text)."""
    for case in CASES:
        rendered = readmes.render_readmes(manifest(case))
        for readme in READMES:
            path, text = golden(case, readme), rendered.get(readme)
            path.unlink(missing_ok=True)
            if text:
                path.write_bytes(text.encode("utf-8"))
                print("wrote", path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path)


if __name__ == "__main__":
    regenerate()
