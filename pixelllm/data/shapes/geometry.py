"""Shape outlines, boxes and spatial words.

Frame: pixels of the image, x to the right, y down, with pixel ``i`` spanning ``[i, i + 1)``
(the convention pycocotools uses to rasterize polygons). A box is ``(x0, y0, x1, y1)``.
"""

from __future__ import annotations

import numpy as np

Box = tuple[float, float, float, float]


def _regular_polygon(count: int, start_angle: float, radii: tuple[float, ...] = (1.0,)) -> np.ndarray:
    """``count`` vertices around the origin, the first at ``start_angle`` radians (y down),
    cycling through ``radii`` (two radii give a star)."""
    angles = start_angle + 2 * np.pi * np.arange(count) / count
    r = np.resize(np.asarray(radii, dtype=np.float64), count)
    return np.stack([r * np.cos(angles), r * np.sin(angles)], axis=1)


def unit_outline(shape: str, extent: float, rng: np.random.Generator) -> np.ndarray:
    """The outline of ``shape`` as (K, 2) vertices, its tight box centered on the origin and its
    longest side ``extent`` pixels.

    Proportions the vocabulary leaves open vary a little, so the model does not learn one
    drawing: the triangle's height (0.8 to 1.0 of its base), the star's inner radius (0.38 to 0.5
    of the outer) and whether the hexagon has a flat or a pointed top.
    """
    up = -np.pi / 2
    if shape == "circle":
        count = int(np.clip(round(np.pi * extent / 3), 24, 96))
        points = _regular_polygon(count, 0.0)
    elif shape == "square":
        points = np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    elif shape == "diamond":
        points = _regular_polygon(4, up)
    elif shape == "triangle":
        height = rng.uniform(0.8, 1.0)
        points = np.array([[0.0, -height], [1.0, height], [-1.0, height]])
    elif shape == "star":
        points = _regular_polygon(10, up, (1.0, rng.uniform(0.38, 0.5)))
    elif shape == "hexagon":
        points = _regular_polygon(6, 0.0 if rng.random() < 0.5 else up)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    low, high = points.min(axis=0), points.max(axis=0)
    return (points - (low + high) / 2) * (extent / (high - low).max())


def box_area(box: Box) -> float:
    """Area of a box, 0 when empty."""
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def intersection(a: Box, b: Box) -> float:
    """Area shared by two boxes."""
    return box_area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))


def relation_holds(relation: str, a: Box, b: Box) -> bool:
    """Whether box ``a`` is ``relation`` box ``b``; true only when the boxes are apart on that
    axis (``a`` left of ``b``: ``a`` ends where or before ``b`` starts)."""
    if relation == "left of":
        return a[2] <= b[0]
    if relation == "right of":
        return a[0] >= b[2]
    if relation == "above":
        return a[3] <= b[1]
    if relation == "below":
        return a[1] >= b[3]
    raise ValueError(f"unknown relation {relation!r}")


def _third(center: float, length: float) -> int | None:
    """-1, 0 or 1 for the first, middle or last third of ``length``; None near the borders
    between thirds, where a position word could be argued either way."""
    fraction = center / length
    if fraction < 0.33:
        return -1
    if fraction > 0.67:
        return 1
    if 0.4 < fraction < 0.6:
        return 0
    return None


_CORNERS = {
    (-1, -1): ("at the top left", "in the top left corner"),
    (1, -1): ("at the top right", "in the top right corner"),
    (-1, 1): ("at the bottom left", "in the bottom left corner"),
    (1, 1): ("at the bottom right", "in the bottom right corner"),
}
_SIDES = {-1: ("on the left", "on the left side"), 1: ("on the right", "on the right side")}
_ENDS = {-1: ("at the top", "at the top of the image"), 1: ("at the bottom", "at the bottom of the image")}


def position_phrases(box: Box, width: int, height: int) -> tuple[str, ...]:
    """Ways to say where ``box`` lies in a ``width`` x ``height`` image ("on the left", "in the
    top right corner", "in the middle"); empty when no position word is clearly true."""
    column = _third((box[0] + box[2]) / 2, width)
    row = _third((box[1] + box[3]) / 2, height)
    if column in (-1, 1) and row in (-1, 1):
        return _CORNERS[column, row]
    if column in (-1, 1):
        return _SIDES[column]
    if row in (-1, 1):
        return _ENDS[row]
    if column == 0 and row == 0:
        return ("in the middle", "in the center")
    return ()
