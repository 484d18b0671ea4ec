"""Does a checkpoint name a region's shape from the object, or from the box it is given?

Every object of a shapes-world split (its Visual Genome region) is captioned four times, with its
box changed in four ways: as given (tight), enlarged by 15 % of its size on every side (the aspect
ratio kept), squared around its center (the longest side kept), and cut to a flat hexagon's
proportions (as tall as 0.87 of its width, around its center). The report gives how often the
caption's shape word is right for each, overall and per shape. A model that reads the object keeps
its accuracy; one that reads the box's aspect ratio calls a hexagon in a square box a circle, and a
circle in a flat box a hexagon.

Usage: python scripts/region_boxes.py MODEL DATA_DIR [IMAGES]
"""

from __future__ import annotations

import sys
from collections import Counter

import numpy as np

import pixelllm
from pixelllm.data.shapes.vocab import SHAPES
from pixelllm.data.sources import open_source
from pixelllm.data.transforms import clip_boxes
from pixelllm.evaluate.shapes import shape_word

HEXAGON_HEIGHT = 3**0.5 / 2  # a flat-topped regular hexagon's height over its width


def enlarged(boxes: np.ndarray, fraction: float = 0.15) -> np.ndarray:
    """``(K, 4)`` boxes grown by ``fraction`` of their width and height on every side."""
    size = boxes[:, 2:] - boxes[:, :2]
    return np.concatenate([boxes[:, :2] - fraction * size, boxes[:, 2:] + fraction * size], axis=1)


def squared(boxes: np.ndarray) -> np.ndarray:
    """``(K, 4)`` boxes made square around their centers, with their longest side."""
    center = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).max(1, keepdims=True) / 2
    return np.concatenate([center - half, center + half], axis=1)


def flattened(boxes: np.ndarray) -> np.ndarray:
    """``(K, 4)`` boxes with their width kept and their height ``HEXAGON_HEIGHT`` of it, around
    their centers."""
    middle = (boxes[:, 1] + boxes[:, 3]) / 2
    half = HEXAGON_HEIGHT * (boxes[:, 2] - boxes[:, 0]) / 2
    return np.stack([boxes[:, 0], middle - half, boxes[:, 2], middle + half], axis=1)


CHANGES = {"as given": lambda boxes: boxes, "enlarged 15 %": enlarged, "squared": squared,
           "flat (0.87 tall)": flattened}


def shape_right(predictor, data: str, limit: int) -> dict[str, tuple[Counter, Counter]]:
    """For each box change: (right, total) counts per true shape."""
    counts = {name: (Counter(), Counter()) for name in CHANGES}
    for sample in list(open_source("regioncap", data).reader)[:limit]:
        named = [(r, shape_word(" ".join(r.texts))) for r in sample.regions]
        named = [(r, shape) for r, shape in named if shape]
        if not named:
            continue
        encoded = predictor.encode(sample.image)
        width, height = encoded.image_size
        boxes = np.array([r.box for r, _ in named], dtype=np.float64)
        changed = np.concatenate([change(boxes) for change in CHANGES.values()])  # (len(CHANGES) * K, 4)
        changed = clip_boxes(changed, np.array([0.0, 0.0, width, height]))[0]
        captions = encoded.caption_regions(changed.tolist())  # every change decoded in one batch
        for i, (right, total) in enumerate(counts.values()):
            for (_, truth), caption in zip(named, captions[i * len(named):(i + 1) * len(named)], strict=True):
                total[truth] += 1
                right[truth] += shape_word(caption.text) == truth
    return counts


def report(counts: dict[str, tuple[Counter, Counter]]) -> str:
    lines = ["| box | shape right | " + " | ".join(SHAPES) + " |", "| --- | ---: |" + " ---: |" * len(SHAPES)]
    for name, (right, total) in counts.items():
        cells = [f"{100 * right[s] / total[s]:.0f}" if total[s] else "-" for s in SHAPES]
        overall = 100 * sum(right.values()) / max(1, sum(total.values()))
        lines.append(f"| {name} | {overall:.1f} % of {sum(total.values())} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    predictor = pixelllm.load(argv[0])
    print(report(shape_right(predictor, argv[1], int(argv[2]) if len(argv) == 3 else 150)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
