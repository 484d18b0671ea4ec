"""What the tasks return, in original-image pixels, and the JSON form of INTERFACE.md.

No number that is not finite leaves through them: a result built with one (a NaN box, an infinite
score) is a ``CheckpointError`` instead, since a model only computes those from weights that are
corrupt or diverged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from pixelllm.data.words import Word
from pixelllm.errors import CheckpointError


def finite(values, what: str) -> list[float]:
    """``values`` as plain floats, or a ``CheckpointError`` naming ``what`` if one is not finite."""
    numbers = [float(v) for v in values]
    if not all(math.isfinite(v) for v in numbers):
        raise CheckpointError(f"the model gave {what} that is not a finite number ({numbers}): its weights are "
                              "likely corrupt or diverged in training; load another checkpoint")
    return numbers


def rounded(values, what: str = "a coordinate") -> list[float]:
    """Coordinates as JSON wants them: plain, finite floats, to the hundredth of a pixel."""
    return [round(v, 2) for v in finite(values, what)]


def _finite_words(words: list[Word]) -> None:
    for word in words:
        finite([*word.box, *word.point], f"the box or point of the word {word.text!r}")


def word_json(word: Word) -> dict:
    return {"text": word.text, "box": rounded(word.box), "point": rounded(word.point)}


@dataclass
class Caption:
    """A caption and, for every word, a box ``[x0, y0, x1, y1]`` and point ``[x, y]``."""

    text: str
    words: list[Word]
    image_size: tuple[int, int]  # (W, H)
    score: float = 0.0

    def __post_init__(self) -> None:
        _finite_words(self.words)
        finite([self.score], "a caption score")

    def to_dict(self) -> dict:
        return {"caption": self.text, "words": [word_json(w) for w in self.words],
                "image_size": list(self.image_size)}


@dataclass
class Location:
    """Referring localization: the box of an expression, its ``score`` (``Predictor.find_batch``)
    and whether that score reached the threshold asked for (``found``; the box is given either way)."""

    expression: str
    box: list[float]
    score: float
    found: bool
    image_size: tuple[int, int]  # (W, H)

    def __post_init__(self) -> None:
        finite([*self.box, self.score], "a location's box or score")

    def to_dict(self) -> dict:
        """The ``locate`` JSON of INTERFACE.md."""
        return {"expression": self.expression, "box": rounded(self.box, "a box"), "score": round(float(self.score), 4),
                "found": bool(self.found), "image_size": list(self.image_size)}


@dataclass
class Segmentation:
    """Referring segmentation: the box and an ``(H, W)`` bool mask of the original image, with the
    expression's ``score`` and ``found`` as ``Location`` has them and the mask decoder's own
    ``mask_score`` (its predicted IoU of the mask with the object)."""

    expression: str
    box: list[float]
    mask: np.ndarray
    image_size: tuple[int, int]
    score: float = 0.0
    found: bool = True
    mask_score: float = 0.0

    def __post_init__(self) -> None:
        finite([*self.box, self.score, self.mask_score], "a segmentation's box or score")

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    def to_dict(self) -> dict:
        """The ``segment`` JSON of INTERFACE.md; ``mask`` is COCO's compressed RLE (``mask_rle``)."""
        return {"expression": self.expression, "box": rounded(self.box), "mask": mask_rle(self.mask),
                "area": self.area, "score": round(float(self.score), 4), "found": bool(self.found),
                "mask_score": round(float(self.mask_score), 4), "image_size": list(self.image_size)}


def mask_rle(mask: np.ndarray) -> dict:
    """An ``(H, W)`` bool mask as COCO's compressed RLE: ``{"size": [H, W], "counts": str}``, the
    run lengths of the mask read column by column (Fortran order), starting with a run of 0s,
    compressed into text as pycocotools writes it. ``pycocotools.mask.decode({"size": size,
    "counts": counts.encode()})`` gives the ``H x W`` uint8 mask back."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


@dataclass
class Region:
    """A dense-captioning region: proposal box, detection score, caption."""

    box: list[float]
    score: float
    caption: str
    words: list[Word] = field(default_factory=list)

    def __post_init__(self) -> None:
        finite([*self.box, self.score], "a region's box or score")
        _finite_words(self.words)

    def to_dict(self) -> dict:
        return {"box": rounded(self.box), "score": round(float(self.score), 4), "caption": self.caption}


@dataclass
class Detection:
    """A detected object: the ``label`` it was asked for, its ``box``, a ``score`` in (0, 1] and its
    ``mask`` (``(H, W)`` bool) when the model gives one."""

    label: str
    box: list[float]
    score: float
    mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        finite([*self.box, self.score], f"the box or score of a detected {self.label!r}")

    def to_dict(self) -> dict:
        return {"label": self.label, "box": rounded(self.box), "score": round(float(self.score), 4),
                "mask": None if self.mask is None else mask_rle(self.mask)}


@dataclass
class Segment:
    """One target of a multi-target question (``segment_all``): its box ``[x0, y0, x1, y1]`` (the
    mask's extent; ``[0, 0, 0, 0]`` for an empty mask), its ``(H, W)`` bool mask of the original
    image and its score."""

    box: list[float]
    mask: np.ndarray
    score: float

    def __post_init__(self) -> None:
        finite([*self.box, self.score], "a segment's box or score")

    def to_dict(self) -> dict:
        return {"box": rounded(self.box), "mask": mask_rle(self.mask), "score": round(float(self.score), 4)}


def segment_all_json(query: str, segments: list[Segment], image_size: tuple[int, int]) -> dict:
    """The ``segment --all`` JSON of INTERFACE.md."""
    return {"query": query, "targets": [s.to_dict() for s in segments], "image_size": list(image_size)}


def dense_captions_json(regions: list[Region], image_size: tuple[int, int]) -> dict:
    """The ``densecap`` JSON of INTERFACE.md."""
    return {"regions": [r.to_dict() for r in regions], "image_size": list(image_size)}
