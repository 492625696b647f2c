"""``mdeploy inspect``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from mdeploy.converters import REGISTRY
from mdeploy.cli.app import app, run_guarded, stdout
from mdeploy.cli.options import DebugOpt, JsonOpt
from mdeploy.errors import BadInputError, MdeployError, first_line
from mdeploy.cli.output import dump_json


@app.command()
def inspect(
    artifact: Annotated[Path, typer.Argument(help="an artifact file (.onnx, ...)")],
    json_output: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Show an artifact's inputs, outputs, op histogram, size and quantisation parameters."""
    from mdeploy.artifacts import target_of

    def action() -> dict[str, Any]:
        if not artifact.exists():
            raise BadInputError(f"{artifact} does not exist: pass an artifact file")
        converter = REGISTRY[target_of(artifact)]
        try:
            return converter.inspect(artifact)
        except MdeployError:  # already names the problem and the fix
            raise
        except Exception as err:  # the format library's own parse errors
            raise BadInputError(f"{artifact} cannot be read as {converter.target.value} ({first_line(err)}): is it "
                                "corrupt?") from err

    report = run_guarded(debug, action)
    if json_output:
        print(dump_json(report))
        return
    quant = report.pop("activation_quantization", [])
    metadata = report.pop("metadata", {})
    for key, value in report.items():
        stdout.print(f"[bold]{key}[/bold]: {json.dumps(value) if not isinstance(value, str) else value}",
                     highlight=False, soft_wrap=True)
    if quant:
        stdout.print(f"[bold]int8 activations[/bold]: {len(quant)} tensors, e.g. "
                     + ", ".join(f"{q['tensor']} (scale {q['scale']}, zp {q['zero_point']})" for q in quant[:3]),
                     highlight=False, soft_wrap=True)
    for key, value in metadata.items():
        shown = value if len(value) < 200 else value[:200] + "…"
        stdout.print(f"[bold]metadata {key}[/bold]: {shown}", highlight=False, soft_wrap=True)
