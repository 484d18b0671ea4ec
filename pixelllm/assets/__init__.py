"""Files that ship inside the package: the embedded default checkpoint and the sample images."""

from __future__ import annotations

from pathlib import Path

from pixelllm.errors import CheckpointError

ASSETS = Path(__file__).resolve().parent
DEFAULT_CHECKPOINT = ASSETS / "default"
SAMPLES = ASSETS / "samples"
SHAPES_WORLD = ("The embedded model (the default) knows only a synthetic shapes world: flat circles, squares, "
                "triangles, diamonds, stars and hexagons in 8 colors on plain backgrounds, the data it was trained "
                "on. On photos its answers are confident and wrong: they are not meaningful.")
"""What to tell wherever the embedded model's answers are shown."""


def default_checkpoint() -> Path:
    """The embedded default model's directory (``configs/shapes_tiny.yaml`` reproduces it)."""
    if not (DEFAULT_CHECKPOINT / "model.safetensors").is_file():
        raise CheckpointError(
            f"the embedded default checkpoint is missing from {DEFAULT_CHECKPOINT}; "
            "train it with: pixelllm train --config configs/shapes_tiny.yaml, or pass --model PATH"
        )
    return DEFAULT_CHECKPOINT
