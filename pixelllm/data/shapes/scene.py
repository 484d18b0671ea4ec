"""Sampling and drawing one scene: image size, background, objects with exact masks.

Frame: pixels of the image, x right, y down, pixel ``i`` spanning ``[i, i + 1)``; boxes are
``(x0, y0, x1, y1)`` tight around the object's mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from pixelllm.data.shapes.geometry import Box, box_area, intersection, unit_outline
from pixelllm.data.shapes.vocab import (
    ASPECT,
    BACKGROUNDS,
    COLOR_JITTER,
    COLORS,
    IMAGE_SIDE,
    MAX_OBJECTS,
    SHAPES,
    SIZES,
)

TWIN_PROBABILITY = 0.3
"""Chance that an object repeats an earlier object's color and shape, so that size or a relation
is needed to tell them apart."""
MAX_BOX_OVERLAP = 0.2
"""Largest share of the smaller of two boxes that may lie inside the other box."""
MASK_GAP = 2
"""Least number of background pixels between two objects' masks: objects never hide each other."""
PLACEMENT_TRIES = 60
BACKGROUND_MIN_DISTANCE = 70.0
"""Least RGB distance between a background color and any object color."""


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object. ``polygon`` is the outline as stored in the annotations (vertices rounded
    to 0.01 px); ``box`` and ``area`` are those of its rasterized mask."""

    color: str
    shape: str
    size: str
    rgb: tuple[int, int, int]
    polygon: tuple[float, ...]
    box: tuple[int, int, int, int]
    area: int

    @property
    def phrase(self) -> str:
        """The object's region description: "{size} {color} {shape}"."""
        return f"{self.size} {self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """An image's content: its size, its background kind and its objects in drawing order."""

    width: int
    height: int
    background: str
    objects: tuple[ShapeObject, ...]


def sample_image_size(rng: np.random.Generator) -> tuple[int, int]:
    """Width and height within ``IMAGE_SIDE`` with width / height within ``ASPECT``."""
    low, high = IMAGE_SIDE
    while True:
        aspect = float(np.exp(rng.uniform(np.log(ASPECT[0]), np.log(ASPECT[1]))))
        width = int(rng.integers(max(low, int(np.ceil(low * aspect))), min(high, int(high * aspect)) + 1))
        height = round(width / aspect)
        if low <= height <= high and ASPECT[0] <= width / height <= ASPECT[1]:
            return width, height


def _sample_attributes(rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """(color, shape, size) for 1 to ``MAX_OBJECTS`` objects, some repeating an earlier color and
    shape (with the other size, or the same)."""
    chosen: list[tuple[str, str, str]] = []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        if chosen and rng.random() < TWIN_PROBABILITY:
            color, shape, size = chosen[int(rng.integers(len(chosen)))]
            if rng.random() < 0.6:
                size = "large" if size == "small" else "small"
        else:
            color = str(rng.choice(list(COLORS)))
            shape = str(rng.choice(SHAPES))
            size = str(rng.choice(list(SIZES)))
        chosen.append((color, shape, size))
    return chosen


def _jittered_rgb(color: str, rng: np.random.Generator) -> tuple[int, int, int]:
    """The color's reference RGB with each channel moved by up to ``COLOR_JITTER``."""
    base = np.array(COLORS[color])
    rgb = np.clip(base + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3), 0, 255)
    return int(rgb[0]), int(rgb[1]), int(rgb[2])


def rasterize(polygon: tuple[float, ...], width: int, height: int) -> np.ndarray:
    """The (height, width) bool mask of a flat ``[x0, y0, x1, y1, ...]`` polygon, as pycocotools
    decodes it from the annotations."""
    rle = mask_utils.frPyObjects([list(polygon)], height, width)
    return mask_utils.decode(rle)[:, :, 0].astype(bool)


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """``mask`` grown by ``radius`` pixels (square neighbourhood), same shape."""
    height, width = mask.shape
    padded = np.pad(mask, radius)
    span = 2 * radius + 1
    rows = np.zeros((height + 2 * radius, width), dtype=bool)
    for shift in range(span):
        rows |= padded[:, shift : shift + width]
    grown = np.zeros((height, width), dtype=bool)
    for shift in range(span):
        grown |= rows[shift : shift + height]
    return grown


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight box of a non-empty mask, in pixel edges."""
    columns = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    return int(columns[0]), int(rows[0]), int(columns[-1]) + 1, int(rows[-1]) + 1


def _fits(box: Box, placed: list[ShapeObject]) -> bool:
    """Whether ``box`` overlaps every placed object's box by at most ``MAX_BOX_OVERLAP`` of the
    smaller one."""
    return all(
        intersection(box, other.box) <= MAX_BOX_OVERLAP * min(box_area(box), box_area(other.box))
        for other in placed
    )


def _place(
    attributes: tuple[str, str, str],
    scene_size: tuple[int, int],
    placed: list[ShapeObject],
    blocked: np.ndarray,
    rng: np.random.Generator,
) -> tuple[ShapeObject, np.ndarray] | None:
    """Try to put one object where it stays inside the image, keeps ``MASK_GAP`` pixels from the
    masks in ``blocked``, overlaps other boxes little and has its size's extent once rasterized;
    returns it and its mask, or None."""
    color, shape, size = attributes
    width, height = scene_size
    low, high = (share * min(width, height) for share in SIZES[size])
    for _ in range(PLACEMENT_TRIES):
        # A pixel inside the limits: rasterizing moves the box's sides by about a pixel.
        outline = unit_outline(shape, rng.uniform(low + 1, high - 1), rng)
        half = outline.max(axis=0)
        center = rng.uniform(half + 1, np.array([width, height]) - half - 1)
        polygon = tuple(float(v) for v in np.round(outline + center, 2).ravel())
        xs, ys = polygon[0::2], polygon[1::2]
        if not _fits((min(xs), min(ys), max(xs), max(ys)), placed):
            continue
        mask = rasterize(polygon, width, height)
        if blocked[mask].any():
            continue
        box = _mask_box(mask)
        if not low <= max(box[2] - box[0], box[3] - box[1]) <= high or not _fits(box, placed):
            continue
        obj = ShapeObject(color, shape, size, _jittered_rgb(color, rng), polygon, box, int(mask.sum()))
        return obj, mask
    return None


def sample_objects(
    width: int, height: int, rng: np.random.Generator
) -> tuple[tuple[ShapeObject, ...], np.ndarray]:
    """Objects for a ``width`` x ``height`` image and the (H, W) index map of their masks
    (-1 on background). Large objects are placed first; one that does not fit is tried once
    small, then left out."""
    attributes = sorted(_sample_attributes(rng), key=lambda a: a[2] != "large")
    placed: list[ShapeObject] = []
    labels = np.full((height, width), -1, dtype=np.int8)
    blocked = np.zeros((height, width), dtype=bool)
    for color, shape, size in attributes:
        result = _place((color, shape, size), (width, height), placed, blocked, rng)
        if result is None and size == "large":
            result = _place((color, shape, "small"), (width, height), placed, blocked, rng)
        if result is not None:
            obj, mask = result
            labels[mask] = len(placed)
            placed.append(obj)
            x0, y0, x1, y1 = obj.box
            near = np.s_[max(0, y0 - MASK_GAP) : y1 + MASK_GAP, max(0, x0 - MASK_GAP) : x1 + MASK_GAP]
            blocked[near] |= _dilate(mask[near], MASK_GAP)
    return tuple(placed), labels


_REFERENCES = np.array(list(COLORS.values()), dtype=np.float64)


def _far_from_objects(rgb: np.ndarray) -> bool:
    """Whether ``rgb`` is at least ``BACKGROUND_MIN_DISTANCE`` from every object color."""
    return bool(np.linalg.norm(_REFERENCES - rgb, axis=1).min() >= BACKGROUND_MIN_DISTANCE)


def _midtone(rng: np.random.Generator) -> np.ndarray:
    """A muted mid-tone RGB far from every object color."""
    for _ in range(100):
        rgb = rng.uniform(85, 170) + rng.uniform(-30, 30, size=3)
        if _far_from_objects(rgb):
            return rgb
    return np.full(3, 128.0)


def _gradient(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A linear blend between two mid-tones along a random direction, as float32 (H, W, 3)."""
    start, end = _midtone(rng), _midtone(rng)
    # Halfway between two colors far from the objects' can still come near one: then stay flat.
    if not _far_from_objects((start + end) / 2):
        end = start
    angle = rng.uniform(0, 2 * np.pi)
    along = np.arange(width, dtype=np.float32)[None, :] * np.float32(np.cos(angle)) + np.arange(
        height, dtype=np.float32
    )[:, None] * np.float32(np.sin(angle))
    along = (along - along.min()) / max(float(np.ptp(along)), 1e-6)
    return start.astype(np.float32) + along[..., None] * (end - start).astype(np.float32)


def _noisy(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A mid-tone with low-frequency blotches and per-pixel grain, as float32 (H, W, 3)."""
    grid = rng.normal(0, rng.uniform(8, 16), size=(int(rng.integers(3, 9)), int(rng.integers(3, 9))))
    blotches = np.asarray(
        Image.fromarray(grid.astype(np.float32)).resize((width, height), Image.Resampling.BILINEAR)
    )
    grain = rng.standard_normal((height, width, 3), dtype=np.float32) * np.float32(rng.uniform(3, 9))
    return _midtone(rng).astype(np.float32) + blotches[..., None] + grain


def render_background(kind: str, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A (H, W, 3) uint8 background of ``kind`` (flat, gradient or noisy)."""
    if kind == "flat":
        pixels = np.broadcast_to(_midtone(rng).astype(np.float32), (height, width, 3))
    elif kind == "gradient":
        pixels = _gradient(width, height, rng)
    else:
        pixels = _noisy(width, height, rng)
    return np.clip(np.rint(pixels), 40, 215).astype(np.uint8)


def sample_scene(rng: np.random.Generator) -> tuple[Scene, np.ndarray]:
    """A random scene and its (H, W, 3) uint8 RGB picture."""
    width, height = sample_image_size(rng)
    kind = str(rng.choice(BACKGROUNDS))
    objects, labels = sample_objects(width, height, rng)
    pixels = render_background(kind, width, height, rng)
    for index, obj in enumerate(objects):
        pixels[labels == index] = obj.rgb
    return Scene(width, height, kind, objects), pixels
