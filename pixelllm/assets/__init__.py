"""Files that ship inside the package: the embedded default checkpoint and the sample images."""

from __future__ import annotations

import os
from pathlib import Path

from pixelllm.errors import CheckpointError

ASSETS = Path(__file__).resolve().parent
DEFAULT_CHECKPOINT = ASSETS / "default"
SAMPLES = ASSETS / "samples"
SHAPES_WORLD = ("The embedded model (the default) knows only a synthetic shapes world: flat circles, squares, "
                "triangles, diamonds, stars and hexagons in 8 colors on plain backgrounds, the data it was trained "
                "on. On photos its answers are confident and wrong: they are not meaningful.")
"""What to tell wherever the embedded model's answers are shown."""


COMING = {"pixellm": 29, "visionllm-v1": 28, "visionllm-v2": 30}
"""The systems of INTERFACE.md that are not embedded yet, with the issue that builds each."""


def system_checkpoint(name_or_path: str | os.PathLike | None) -> str | os.PathLike:
    """The checkpoint of ``name_or_path``: an embedded system's directory for its name (a name wins
    over a local directory of that name: write ``./pixelllm`` for the directory), the default for
    None, anything else as given (a directory or a Hugging Face repository id)."""
    if name_or_path is None:
        return default_checkpoint()
    name = str(name_or_path).lower()
    if name in COMING:
        shipped = ", ".join(SYSTEMS)
        raise CheckpointError(f"the system {name!r} is not embedded yet (issue {COMING[name]}); embedded: {shipped}; "
                              "or pass a checkpoint directory")
    if name in SYSTEMS:
        return SYSTEMS[name]()
    return name_or_path


def default_checkpoint() -> Path:
    """The embedded default model's directory (``configs/shapes_tiny.yaml`` reproduces it)."""
    if not (DEFAULT_CHECKPOINT / "model.safetensors").is_file():
        raise CheckpointError(
            f"the embedded default checkpoint is missing from {DEFAULT_CHECKPOINT}; "
            "train it with: pixelllm train --config configs/shapes_tiny.yaml, or pass --model PATH"
        )
    return DEFAULT_CHECKPOINT


SYSTEMS = {"pixelllm": default_checkpoint}
"""The embedded systems by their names of INTERFACE.md: the function giving each one's checkpoint directory."""
