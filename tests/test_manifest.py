"""The typed manifest (mdeploy/manifest.py) and its JSON Schema (mdeploy/data/manifest.schema.json) agree: every
property of every schema object is a dataclass field and every field a property, required exactly when the field is
always written, nullable exactly when the field may be None. A real manifest of a tiny conversion reads back equal,
writes back byte for byte, and validates against the schema; a damaged one is a one-line error naming the field."""

from __future__ import annotations

import json
import types
import typing
from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mdeploy.cli import app
from mdeploy.errors import BadInputError
from mdeploy.manifest import Manifest, Record
from mdeploy.zoo import Arch, ModelConfig, build_model
from tests.test_graph import randomize_batch_norm

SCHEMA = json.loads(resources.files("mdeploy").joinpath("data", "manifest.schema.json").read_text(encoding="utf-8"))
# Schema objects whose properties the dataclasses keep as free-form dicts (per tensor, per target).
FREE_FORM = {"artifacts[].io.inputs[]", "artifacts[].io.outputs[]"}
# Required by the schema of a finished bundle, absent while it is being written (and in folders from before bundles).
WRITTEN_LAST = {"bundle"}


def _strip_none(hint: Any) -> tuple[Any, bool]:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return hint, False


def _record_in(hint: Any) -> tuple[type[Record] | None, str]:
    """The Record a hint holds and how: "" (itself), "[]" (list items), "{}" (dict values)."""
    if isinstance(hint, type) and issubclass(hint, Record):
        return hint, ""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list and isinstance(args[0], type) and issubclass(args[0], Record):
        return args[0], "[]"
    if origin is dict and isinstance(args[1], type) and issubclass(args[1], Record):
        return args[1], "{}"
    return None, ""


def _nullable(schema: dict[str, Any]) -> bool:
    kind = schema.get("type")
    return kind == "null" or (isinstance(kind, list) and "null" in kind)


def walk(schema: dict[str, Any], cls: type[Record], where: str, seen: list[str]) -> None:
    seen.append(where)
    properties, required = schema.get("properties", {}), set(schema.get("required", []))
    by_key = {cls.key(f.name): f for f in fields(cls)}  # type: ignore[arg-type]
    # the same names (the fields keep the order the file is written in, the schema may list them otherwise)
    assert set(by_key) == set(properties), f"{where or 'manifest'}: fields {sorted(by_key)} != schema {sorted(properties)}"
    hints = typing.get_type_hints(cls)
    for key, f in by_key.items():
        at = f"{where}.{key}" if where else key
        omitted = bool(f.metadata.get("omit_none"))
        assert (key in required) != omitted or at in WRITTEN_LAST, f"{at}: required in schema != always written"
        hint, none_allowed = _strip_none(hints[f.name])
        if not omitted:
            assert none_allowed == _nullable(properties[key]), f"{at}: None allowed != schema nullable"
        record, how = _record_in(hint)
        prop = properties[key]
        if record is None:
            inner = prop.get("items", {}) if typing.get_origin(hint) is list else prop
            assert "properties" not in inner or f"{at}[]" in FREE_FORM, f"{at}: the schema describes an object here"
            if "properties" in inner:
                seen.append(f"{at}[]")
            continue
        inner = prop if how == "" else prop["items"] if how == "[]" else prop["additionalProperties"]
        walk(inner, record, at + how, seen)


def test_schema_and_dataclasses_agree() -> None:
    seen: list[str] = []
    walk(SCHEMA, Manifest, "", seen)
    assert set(FREE_FORM) <= set(seen)
    objects = []  # every object with properties in the schema was walked

    def collect(node: Any, at: str) -> None:
        if isinstance(node, dict):
            if "properties" in node:
                objects.append(at)
                for key, sub in node["properties"].items():
                    collect(sub, f"{at}.{key}" if at else key)
            for part, suffix in (("items", "[]"), ("additionalProperties", "{}")):
                if isinstance(node.get(part), dict):
                    collect(node[part], at + suffix)

    collect(SCHEMA, "")
    assert sorted(objects) == sorted(seen)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("manifest")
    torch.manual_seed(0)
    model = randomize_batch_norm(build_model(ModelConfig(Arch.mobilenet_v2, 0.5, 10, 0.2)))
    torch.save(model.state_dict(), root / "small_v2.pt")
    (root / "calib").mkdir()
    np.save(root / "calib" / "batch.npy", np.random.default_rng(0).standard_normal((16, 3, 64, 64)).astype(np.float32))
    (root / "labels.txt").write_text("".join(f"class {i}\n" for i in range(10)))
    result = CliRunner().invoke(app, [
        "convert", str(root / "small_v2.pt"), "--arch", "mobilenet_v2", "--to", "onnx", "--int8", "--calib",
        str(root / "calib"), "--input-size", "64", "--labels", str(root / "labels.txt"), "--out", str(root / "out"),
        "--min-snr", "5", "--min-top1", "0",
    ])
    assert result.exit_code == 0, result.output
    return root / "out"


def test_a_real_manifest_round_trips_and_validates(converted: Path, tmp_path: Path) -> None:
    text = (converted / "manifest.json").read_text(encoding="utf-8")
    manifest = Manifest.read(converted / "manifest.json")
    assert manifest.quantization is not None and manifest.bundle is not None and manifest.golden.artifacts
    assert manifest.to_json() == text  # the same keys, order and values as written
    assert Manifest.read(manifest.write(tmp_path)) == manifest
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.parametrize(("edit", "field"), [
    (lambda m: m["artifacts"][0].pop("file"), "artifacts[0].file"),
    (lambda m: m["artifacts"][0]["parity"]["metrics"].update(snr_db=None), "artifacts[0].parity.metrics.snr_db"),
    (lambda m: m["model"].update(num_classes="ten"), "model.num_classes"),
    (lambda m: m.update(golden=[]), "golden"),
])
def test_a_damaged_manifest_is_one_line_naming_the_field(converted: Path, tmp_path: Path, edit: Any,
                                                         field: str) -> None:
    data = json.loads((converted / "manifest.json").read_text(encoding="utf-8"))
    edit(data)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(BadInputError) as caught:
        Manifest.read(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and f"field {field} " in message


def test_not_json_is_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    path.write_text("{", encoding="utf-8")
    with pytest.raises(BadInputError, match="not a valid mdeploy manifest"):
        Manifest.read(path)
