"""The README's and ``convert --help``'s list of supported families and ops is generated from the code."""

from __future__ import annotations

from typer.testing import CliRunner

from mdeploy.cli import app
from mdeploy.families import FAMILIES, accepted_torch_ops, readme_section
from tests.conftest import REPO_ROOT


def test_the_readme_section_is_current() -> None:
    assert readme_section() in (REPO_ROOT / "README.md").read_text(encoding="utf-8"), (
        "README.md's 'Supported models and ops' is stale: paste the output of `python -m mdeploy.families`")


def test_convert_help_names_every_family_and_the_accepted_ops() -> None:
    shown = CliRunner().invoke(app, ["convert", "--help"], env={"TERMINAL_WIDTH": "4000", "COLUMNS": "4000"}).output
    flat = " ".join(shown.replace("│", " ").split())
    for family in FAMILIES:
        assert family.title in flat
    assert all(name in flat for name in accepted_torch_ops()) and "conv2d" in accepted_torch_ops()
