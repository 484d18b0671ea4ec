"""How often is the referred object among the pointer's first K peaks?

The pointer localization head scores every cell of the image features at the expression's last
word and boxes the object around the highest one. This takes its K highest distinct peaks instead
(each next peak is the highest cell outside the 3 x 3 cells around the ones before) and counts the
expressions whose object's box center lies within one cell of one of them: what a second look at a
few candidates (a re-ranker) could at most recover. K = 1 is close to Precision@1.

Reads the per-sample records of ``pixelllm eval --task refer --per-sample FILE`` (image, query,
ground-truth box) and prints a markdown table.

Usage: python scripts/pointer_recall.py MODEL PER_SAMPLE_JSONL [K]
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

import pixelllm
from pixelllm.model.pointer import distinct_peaks as pointer_peaks


def distinct_peaks(logits: torch.Tensor, grid: int, k: int) -> list[tuple[int, int]]:
    """The ``k`` highest cells ``(column, row)`` of ``logits (G*G,)`` (row-major), each outside the
    3 x 3 cells around every earlier one (``pointer.distinct_peaks``, as the re-ranker takes its
    candidates); fewer if the grid runs out."""
    rows, columns = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    centers = torch.stack([columns.flatten(), rows.flatten()], dim=-1).float()  # unit cells
    peaks = pointer_peaks(logits[None].float(), centers, 1.0, k)[0].tolist()
    return [(index % grid, index // grid) for index in dict.fromkeys(peaks)]  # a repeat means exhausted


def found_at(peaks: list[tuple[int, int]], cell: tuple[int, int]) -> int | None:
    """The rank (0-based) of the first peak within one cell of ``cell``, or None."""
    return next((rank for rank, (x, y) in enumerate(peaks) if max(abs(x - cell[0]), abs(y - cell[1])) <= 1), None)


def pointer_recall(model_dir: str, records: list[dict], k: int) -> list[float]:
    """Percent of ``records`` whose object is within one cell of one of the first 1, ..., k peaks."""
    predictor = pixelllm.load(model_dir)
    model = predictor.model
    by_image = defaultdict(list)
    for record in records:
        by_image[record["image"]].append(record)
    hits = np.zeros(k)
    with torch.no_grad():
        for path, image_records in by_image.items():
            encoded = predictor.encode(path)
            read = predictor._read_expressions([encoded], [[r["query"] for r in image_records]])
            last = read.hidden[torch.arange(len(image_records)), read.text_mask.sum(1) - 1]
            head = model.heads["location"]  # a pointer location head
            cells = head.cells(read.features)
            _, logits = head.locator.locate(last[:, None], cells, read.index, read.features.valid_size[read.index])
            grid = int(len(cells[2]) ** 0.5)
            step = model.config.image_size / grid
            truth = encoded.transform.boxes_to_canvas(np.array([r["ground_truth"] for r in image_records]))
            centers = ((truth[:, :2] + truth[:, 2:]) / 2 // step).astype(int)
            for row, center in enumerate(centers):
                rank = found_at(distinct_peaks(logits[row, 0], grid, k), tuple(center))
                if rank is not None:
                    hits[rank:] += 1
    return list(100 * hits / len(records))


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    records = [json.loads(line) for line in Path(argv[1]).read_text().splitlines()]
    k = int(argv[2]) if len(argv) == 3 else 5
    print(f"{len(records)} expressions: the object within one cell of one of the pointer's first K peaks\n")
    print("| K | expressions |\n| ---: | ---: |")
    for rank, percent in enumerate(pointer_recall(argv[0], records, k), 1):
        print(f"| {rank} | {percent:.1f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
