"""The fixed vocabulary and numeric ranges of the shapes world (docs/shapes_world.md).

Scenes drawn by other code are checked against the same tables, so nothing here may grow.
"""

from __future__ import annotations

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 47),
    "green": (60, 170, 60),
    "blue": (40, 90, 220),
    "yellow": (240, 200, 40),
    "purple": (140, 70, 170),
    "orange": (245, 130, 30),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
COLOR_JITTER = 12
"""Each RGB channel of an object may differ from its color's reference by up to this much."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "hexagon")

SIZES: dict[str, tuple[float, float]] = {"small": (0.08, 0.15), "large": (0.22, 0.35)}
"""Longest side of an object's tight box, as a fraction of the image's shorter side."""

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

IMAGE_SIDE = (160, 512)
"""Smallest and largest image side in pixels."""

ASPECT = (0.6, 1.7)
"""Smallest and largest width / height."""

MAX_OBJECTS = 6

SPLITS: tuple[str, ...] = ("train", "val", "test")

BACKGROUNDS: tuple[str, ...] = ("flat", "gradient", "noisy")
