"""How the bundle's ``verify_bundle.py`` runs an ExecuTorch program: this function's source is copied into the
verifier, so it imports inside its body and uses nothing of mdeploy (``PteConverter.bundle_runner``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def run_pte_in_bundle(path: Path, inputs: Any) -> Any:
    """The program's outputs for ``inputs`` (N, C, H, W) float32, one image at a time (the program's batch is 1),
    on ExecuTorch's runtime: every output by the name its ``metadata`` method gives, in the model's order."""
    import json
    import logging
    import os
    import tempfile
    import warnings

    import numpy as np

    # torchao and ExecuTorch log at import (libraries for other GPUs, deprecations) and the runtime prints CPU
    # detection lines to stderr when its first method loads: none of it concerns the check, so both are silenced
    logging.disable(logging.WARNING)
    saved, sink = os.dup(2), tempfile.TemporaryFile()
    os.dup2(sink.fileno(), 2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torch
            from executorch.runtime import Runtime

            program = Runtime.get().load_program(str(path))
            io = json.loads(json.loads(program.load_method("metadata").execute([])[0])["mdeploy.io"])
            names = [o["name"] for o in io["outputs"]] if "outputs" in io else [io["output"]["name"]]
            forward = program.load_method("forward")
            found: list[list[Any]] = [[] for _ in names]
            for image in np.asarray(inputs, dtype=np.float32):
                batch = [torch.from_numpy(np.ascontiguousarray(image[None]))]
                for collected, value in zip(found, forward.execute(batch)):
                    collected.append(value.numpy())
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        sink.close()
        logging.disable(logging.NOTSET)
    return {name: np.concatenate(collected) for name, collected in zip(names, found)}
