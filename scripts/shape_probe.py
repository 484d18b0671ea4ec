"""How much of an object's shape a checkpoint's image features carry: a linear probe.

For every object of a shapes-world split (its Visual Genome region), the feature map of
``PixelLLM.encode_images`` (``(C, G, G)`` on the canvas) is pooled over the cells whose centers lie
in the object's canvas box (``pool_boxes``: the mean and the max of each
channel, as the box word head pools them). A linear classifier of the shape word is trained on
the objects of TRAIN_DIR and scored on those of TEST_DIR, on all channels and on each tower's own
(SAM, semantic), split by the object's longest side on the canvas. A probe well below the region
captions' target says the towers, not the extractor or the language model, lose the shape.

Usage: python scripts/shape_probe.py MODEL TRAIN_DIR TEST_DIR [IMAGES_PER_SPLIT]
"""

from __future__ import annotations

import sys

import torch
from torch import nn

import pixelllm
from pixelllm.data.shapes.vocab import SHAPES
from pixelllm.data.sources import open_source
from pixelllm.evaluate.shapes import shape_word
from pixelllm.model.features import cell_centers

LARGE_ON_CANVAS = 25.0  # longest side on the canvas, in pixels, that splits the report into large and small


def pool_boxes(features: torch.Tensor, image_index: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Mean and max of each channel of ``features (B, C, G, G)`` over the cells whose centers lie in
    each box ``(N, 4)`` (cell units: cell ``i`` spans ``[i, i + 1)``; along an axis whose span holds no
    cell center, the cell of the span's middle): ``(N, 2C)``, the means then the maxima."""
    centers = cell_centers(features.shape[-1], features.shape[-1], features.device, boxes.dtype)
    rows = _inside(centers, boxes[:, 1], boxes[:, 3])
    columns = _inside(centers, boxes[:, 0], boxes[:, 2])
    cells = (rows[:, :, None] & columns[:, None, :]).flatten(1)  # (N, G*G)
    values = features.flatten(2)[image_index]  # (N, C, G*G)
    weights = cells[:, None].to(values.dtype)
    mean = (values * weights).sum(-1) / weights.sum(-1)
    maximum = values.masked_fill(~cells[:, None], float("-inf")).amax(-1)
    return torch.cat([mean, maximum], dim=1)


def _inside(centers: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """``(N, G)`` bool: the centers within ``[low, high]``, or the cell of the middle when none is."""
    keep = (centers >= low[:, None]) & (centers <= high[:, None])
    middle = ((low + high) / 2).long().clamp(0, len(centers) - 1)
    fallback = torch.zeros_like(keep).scatter_(1, middle[:, None], True)
    return torch.where(keep.any(1, keepdim=True), keep, fallback)


@torch.no_grad()
def object_features(predictor, data: str, limit: int, batch: int = 16):
    """Pooled features ``(N, 2C)``, shape indices ``(N,)`` and canvas sizes ``(N,)`` of the objects
    of the first ``limit`` images of ``data``."""
    samples = list(open_source("regioncap", data).reader)[:limit]
    rows, labels, sizes = [], [], []
    for start in range(0, len(samples), batch):
        chunk = samples[start:start + batch]
        for sample, encoded in zip(chunk, predictor.encode_batch([s.image for s in chunk]), strict=True):
            features = encoded.features.features.float()
            cell = predictor.model.config.image_size / features.shape[-1]
            shapes = [shape_word(" ".join(r.texts)) for r in sample.regions]
            named = [(region, shape) for region, shape in zip(sample.regions, shapes, strict=True) if shape]
            if not named:
                continue
            canvas = encoded.transform.boxes_to_canvas([region.box for region, _ in named])
            boxes = torch.as_tensor(canvas / cell, dtype=torch.float32)  # (K, 4) in cells
            rows.append(pool_boxes(features, torch.zeros(len(boxes), dtype=torch.long), boxes))
            labels += [SHAPES.index(shape) for _, shape in named]
            sizes.append((boxes[:, 2:] - boxes[:, :2]).amax(1) * cell)
    return torch.cat(rows), torch.tensor(labels), torch.cat(sizes)


def probe_accuracy(train: tuple, test: tuple, columns: torch.Tensor, steps: int = 500) -> torch.Tensor:
    """Train a linear shape classifier on ``train[0][:, columns]``; 1.0 / 0.0 per test object."""
    x, y = train[0][:, columns], train[1]
    mean, std = x.mean(0), x.std(0) + 1e-5
    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(x.shape[1], len(SHAPES))
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * 0.01)
        linear.bias.zero_()
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(linear((x - mean) / std), y).backward()
        optimizer.step()
    with torch.no_grad():
        return (linear((test[0][:, columns] - mean) / std).argmax(1) == test[1]).float()


def report(predictor, train: tuple, test: tuple) -> str:
    channels = train[0].shape[1] // 2
    sam = torch.arange(predictor.model.vision.sam_channels)
    towers = {"all": torch.arange(channels), "SAM": sam, "semantic": torch.arange(len(sam), channels)}
    large = test[2] >= LARGE_ON_CANVAS
    lines = [f"{len(train[1])} training objects, {len(test[1])} test objects, chance {100 / len(SHAPES):.1f} %", "",
             "| channels | shape right | longest side >= 25 px | < 25 px |", "| --- | ---: | ---: | ---: |"]
    for name, columns in towers.items():
        right = probe_accuracy(train, test, torch.cat([columns, columns + channels]))
        lines.append(f"| {name} ({len(columns)}) | {100 * right.mean():.1f} % | {100 * right[large].mean():.1f} % "
                     f"| {100 * right[~large].mean():.1f} % |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 4):
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    limit = int(argv[3]) if len(argv) == 4 else 1500
    predictor = pixelllm.load(argv[0])
    train = object_features(predictor, argv[1], limit)
    test = object_features(predictor, argv[2], limit)
    print(report(predictor, train, test))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
