"""README_android.md and README_ios.md render byte for byte as the golden files in tests/data/readmes/, and every
template placeholder is filled.

The ``*.manifest.json`` files are real manifests (trimmed to what the READMEs read) of a tiny MobileNetV2 converted
four ways: fp32 only without labels; int8 with --tflite-io int8 / uint8 / float, Core ML tensor and image input, with
and without labels. CASES adds edits a CLI run cannot make (BGR, no resize, no golden vectors, one platform only).
After an intended change to the README text, regenerate the goldens with ``python -m tests.test_readmes`` and review
the diff.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from mdeploy.bundle import readmes

DATA = Path(__file__).parent / "data" / "readmes"
Manifest = dict[str, Any]


def _bgr(m: Manifest) -> None:
    p = m["preprocess"]
    p["channel_order"], p["mean"], p["std"] = "BGR", p["mean"][::-1], p["std"][::-1]


def _bgr_no_resize_other_scale(m: Manifest) -> None:
    _bgr(m)
    m["preprocess"].update(resize=None, scale=1 / 127.5, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])


def _no_golden_no_classifier(m: Manifest) -> None:
    del m["golden"]
    m["model"]["name"] = "mobilenet_v3-small_pets"
    for a in m["artifacts"]:
        a["settings"].pop("classifier", None)


def _only(target: str) -> Callable[[Manifest], None]:
    def edit(m: Manifest) -> None:
        m["artifacts"] = [a for a in m["artifacts"] if a["target"] == target]
    return edit


# case name -> (base manifest, edit)
CASES: dict[str, tuple[str, Callable[[Manifest], None] | None]] = {
    "fp32_nolabels": ("fp32_nolabels", None),
    "int8_io_int8_tensor_labels": ("int8_io_int8_tensor_labels", None),
    "int8_io_uint8_image_labels": ("int8_io_uint8_image_labels", None),
    "int8_io_float_image_nolabels": ("int8_io_float_image_nolabels", None),
    "bgr_tensor": ("int8_io_int8_tensor_labels", _bgr),
    "bgr_image_no_resize": ("int8_io_uint8_image_labels", _bgr_no_resize_other_scale),
    "no_golden_no_classifier": ("fp32_nolabels", _no_golden_no_classifier),
    "tflite_only": ("int8_io_int8_tensor_labels", _only("tflite")),
    "coreml_only": ("int8_io_uint8_image_labels", _only("coreml")),
}
RENDERERS = {"README_android.md": readmes.android_readme, "README_ios.md": readmes.ios_readme}


def manifest(case: str) -> Manifest:
    base, edit = CASES[case]
    m = json.loads((DATA / f"{base}.manifest.json").read_text(encoding="utf-8"))
    if edit:
        edit(m)
    return m


def golden(case: str, readme: str) -> Path:
    return DATA / f"{case}.{readme}"


@pytest.mark.parametrize("readme", RENDERERS)
@pytest.mark.parametrize("case", CASES)
def test_readme_is_byte_identical_to_its_golden_file(case: str, readme: str) -> None:
    path = golden(case, readme)
    expected = path.read_bytes() if path.exists() else b""  # no golden file: no such README for this manifest
    assert RENDERERS[readme](manifest(case)).encode("utf-8") == expected


def test_every_case_renders_at_least_one_readme_and_both_platforms_are_covered() -> None:
    for case in CASES:
        assert any(golden(case, readme).exists() for readme in RENDERERS), case
    assert not golden("tflite_only", "README_ios.md").exists()
    assert not golden("coreml_only", "README_android.md").exists()


def test_write_readmes_writes_only_the_platforms_present(tmp_path: Path) -> None:
    assert readmes.write_readmes(tmp_path, manifest("tflite_only")) == ["README_android.md"]
    assert (tmp_path / "README_android.md").read_bytes() == golden("tflite_only", "README_android.md").read_bytes()
    assert not (tmp_path / "README_ios.md").exists()


def _templates() -> dict[str, str]:
    folder = resources.files("mdeploy.bundle") / "templates"
    return {t.name: t.read_text(encoding="utf-8") for t in folder.iterdir() if t.name.endswith(".tmpl")}


def test_templates_ship_with_the_package_and_each_is_used() -> None:
    templates = _templates()
    assert templates, "no templates found as package data of mdeploy.bundle"
    source = Path(readmes.__file__).read_text(encoding="utf-8")
    for name in templates:
        assert f'"{name}"' in source, f"{name} is not rendered by readmes.py"


@pytest.mark.parametrize("case", CASES)
def test_no_placeholder_survives_and_every_placeholder_is_provided(case: str) -> None:
    """``readmes`` renders with ``Template.substitute`` (a missing value raises KeyError); here also the converse:
    no value is passed that no template uses, and no ``$name`` is left in the text."""
    used: set[str] = set()
    real_render = readmes._render

    def spy(template: str, /, **values: object) -> str:
        placeholders = set(readmes._template(template).get_identifiers())
        assert placeholders == set(values), (template, placeholders ^ set(values))
        used.add(template)
        return real_render(template, **values)

    m = manifest(case)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(readmes, "_render", spy)
        texts = [render(m) for render in RENDERERS.values()]
    assert used
    for text in texts:
        assert not re.search(r"\$\{?[A-Za-z_]", text), re.search(r".*\$.*", text)


def test_templates_are_valid() -> None:
    for name, text in _templates().items():
        assert string.Template(text).is_valid(), name


def regenerate() -> None:
    """Write the golden READMEs from the current code (only after an intended change to the README text)."""
    for case in CASES:
        for readme, render in RENDERERS.items():
            path, text = golden(case, readme), render(manifest(case))
            path.unlink(missing_ok=True)
            if text:
                path.write_bytes(text.encode("utf-8"))
                print("wrote", path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path)


if __name__ == "__main__":
    regenerate()
