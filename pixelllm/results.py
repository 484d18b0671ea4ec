"""What the tasks return, in original-image pixels, and the JSON form of INTERFACE.md."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pixelllm.data.words import Word


def rounded(values) -> list[float]:
    """Coordinates as JSON wants them: plain floats, to the hundredth of a pixel."""
    return [round(float(v), 2) for v in values]


def word_json(word: Word) -> dict:
    return {"text": word.text, "box": rounded(word.box), "point": rounded(word.point)}


@dataclass
class Caption:
    """A caption and, for every word, a box ``[x0, y0, x1, y1]`` and point ``[x, y]``."""

    text: str
    words: list[Word]
    image_size: tuple[int, int]  # (W, H)
    score: float = 0.0

    def to_dict(self) -> dict:
        return {"caption": self.text, "words": [word_json(w) for w in self.words],
                "image_size": list(self.image_size)}


@dataclass
class Segmentation:
    """Referring segmentation: the box and an ``(H, W)`` bool mask of the original image."""

    expression: str
    box: list[float]
    mask: np.ndarray
    image_size: tuple[int, int]
    score: float = 0.0  # SAM's predicted IoU

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    def to_dict(self) -> dict:
        from pycocotools import mask as mask_utils

        rle = mask_utils.encode(np.asfortranarray(self.mask.astype(np.uint8)))
        return {"expression": self.expression, "box": rounded(self.box),
                "mask": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
                "area": self.area, "image_size": list(self.image_size)}


@dataclass
class Region:
    """A dense-captioning region: proposal box, detection score, caption."""

    box: list[float]
    score: float
    caption: str
    words: list[Word] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"box": rounded(self.box), "score": round(float(self.score), 4), "caption": self.caption}



def location_json(expression: str, box, image_size: tuple[int, int]) -> dict:
    """The ``locate`` JSON of INTERFACE.md."""
    return {"expression": expression, "box": rounded(box), "image_size": list(image_size)}


def dense_captions_json(regions: list[Region], image_size: tuple[int, int]) -> dict:
    """The ``densecap`` JSON of INTERFACE.md."""
    return {"regions": [r.to_dict() for r in regions], "image_size": list(image_size)}
