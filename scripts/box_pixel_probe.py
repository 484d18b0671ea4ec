"""Do the canvas pixels hold an object's shape? A box pixel encoder trained on them alone.

For every object of a shapes-world split (its Visual Genome region), the image is put on the tiny
preset's canvas and the square around the object's box is resampled to R x R
(``pixelllm.model.box_pixels.box_crops``, what ``extractor.box_pixels`` reads). A
``BoxPixelEncoder`` with a linear readout of its 4 tokens is trained to name the shape on the
objects of TRAIN_DIR (cross-entropy, Adam) and scored on those of TEST_DIR, split by the object's
longest side on the canvas. Set beside ``scripts/shape_probe.py``: what the pixels hold against
what the image towers' features hold.

Usage: python scripts/box_pixel_probe.py TRAIN_DIR TEST_DIR [TRAIN_IMAGES] [RESOLUTION]
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from pixelllm.config import preset
from pixelllm.data.images import load_image
from pixelllm.data.shapes.vocab import SHAPES
from pixelllm.data.sources import open_source
from pixelllm.data.transforms import prepare_image
from pixelllm.evaluate.shapes import shape_word
from pixelllm.model.box_pixels import BOX_PIXEL_TOKENS, BoxPixelEncoder, box_crops

SIZE_BINS = (0.0, 16.0, 25.0, float("inf"))  # longest side on the canvas, in pixels
EPOCHS, BATCH = 6, 128


def object_crops(data: str, limit: int, canvas_size: int, resolution: int):
    """Crops ``(N, 3, R, R)``, shape indices ``(N,)`` and canvas sizes ``(N,)`` of the named objects
    of the first ``limit`` images of ``data``."""
    crops, labels, sizes = [], [], []
    for sample in list(open_source("regioncap", data).reader)[:limit]:
        named = [(r, shape_word(" ".join(r.texts))) for r in sample.regions]
        named = [(r, shape) for r, shape in named if shape]
        if not named:
            continue
        pixels, _, transform = prepare_image(load_image(sample.image), canvas_size)
        boxes = torch.as_tensor(transform.boxes_to_canvas([r.box for r, _ in named]), dtype=torch.float32)
        crops.append(box_crops(pixels[None], torch.zeros(len(boxes), dtype=torch.long), boxes, canvas_size,
                               resolution))
        labels += [SHAPES.index(shape) for _, shape in named]
        sizes.append((boxes[:, 2:] - boxes[:, :2]).amax(1))
    return torch.cat(crops), torch.tensor(labels), torch.cat(sizes)


def train_and_score(train: tuple, test: tuple, resolution: int, width: int) -> list[tuple[int, torch.Tensor]]:
    """Per epoch: ``(epoch, right (N_test,) as 1.0 / 0.0)``."""
    torch.manual_seed(0)
    encoder = BoxPixelEncoder(resolution, width, width)
    readout = nn.Linear(BOX_PIXEL_TOKENS * width, len(SHAPES))
    optimizer = torch.optim.Adam([*encoder.parameters(), *readout.parameters()], lr=2e-3)
    scores = []
    for epoch in range(1, EPOCHS + 1):
        encoder.train()
        for batch in torch.randperm(len(train[1])).split(BATCH):
            loss = nn.functional.cross_entropy(readout(encoder.encode(train[0][batch]).flatten(1)), train[1][batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        encoder.eval()
        with torch.no_grad():
            logits = torch.cat([readout(encoder.encode(chunk).flatten(1)) for chunk in test[0].split(512)])
        scores.append((epoch, (logits.argmax(1) == test[1]).float()))
    return scores


def report(train: tuple, test: tuple, scores: list, resolution: int) -> str:
    bins = list(zip(SIZE_BINS[:-1], SIZE_BINS[1:], strict=True))
    header = " | ".join(f"{low:.0f}-{high:.0f} px ({int(((test[2] >= low) & (test[2] < high)).sum())})"
                        for low, high in bins)
    lines = [f"{len(train[1])} training objects, {len(test[1])} test objects, {resolution} x {resolution} "
             f"samples, chance {100 / len(SHAPES):.1f} %", "",
             f"| epoch | shape right | {header} |", "| --- | ---: |" + " ---: |" * len(bins)]
    for epoch, right in scores:
        cells = " | ".join(f"{100 * right[(test[2] >= low) & (test[2] < high)].mean():.1f} %" for low, high in bins)
        lines.append(f"| {epoch} | {100 * right.mean():.1f} % | {cells} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3, 4):
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    limit = int(argv[2]) if len(argv) > 2 else 4000
    resolution = int(argv[3]) if len(argv) > 3 else 16
    config = preset("tiny")
    train = object_crops(argv[0], limit, config.image_size, resolution)
    test = object_crops(argv[1], 10**9, config.image_size, resolution)
    scores = train_and_score(train, test, resolution, config.extractor.width)
    print(report(train, test, scores, resolution))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
