"""How well the task scores tell right from wrong on a shapes-world split, to choose their thresholds.

Locate (``Predictor.find_batch``): per image, up to 3 of the split's own referring expressions
(the object is there) and 4 made up for objects that are not: "the {color} {shape}" whose color
and shape are both in the scene but not together ("crossed": the hard case), one whose color or
shape is not in the scene at all ("absent"), one of those with a size ("sized"), and one related
to an object that is there ("related"). Prints the score's AUC and, for each threshold, the share
of expressions found, by kind.

Densecap (``Predictor.dense_caption_batch``): every proposal the head gives, captioned, repeats left
out, matched one to one to the objects at IoU 0.5; for each least score: precision, recall, F1,
regions per image, and the precision with the repeats kept.

The images are drawn in memory exactly as ``pixelllm synth`` writes them (``draw_image``).

Usage: python scripts/score_thresholds.py [--split val] [--seed 0] [--images 300] [--model DIR]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
import torch

import pixelllm
from pixelllm.data.shapes.vocab import COLORS, RELATIONS, SHAPES, SIZES
from pixelllm.data.synthetic import draw_image
from pixelllm.evaluate.boxes import box_iou

LOCATE_THRESHOLDS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04)
DENSECAP_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
POSITIVES = 3
KINDS = ("there", "crossed", "absent", "sized", "related")


def expressions(records: dict, rng: np.random.Generator) -> list[tuple[str, str]]:
    """``(expression, kind)`` for one image: its own expressions (kind "there") and made-up ones."""
    there = [sentence["sent"] for ref in records["refs"] for sentence in ref["sentences"]]
    chosen = [(there[i], "there") for i in rng.permutation(len(there))[:POSITIVES]]
    kinds = {(a["color"], SHAPES[a["category_id"] - 1]) for a in records["annotations"]}
    colors, shapes = {c for c, _ in kinds}, {s for _, s in kinds}
    missing = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in kinds]
    crossed = [(c, s) for c, s in missing if c in colors and s in shapes]
    absent = [(c, s) for c, s in missing if not (c in colors and s in shapes)]
    if crossed:
        chosen.append(("the {} {}".format(*crossed[rng.integers(len(crossed))]), "crossed"))
    color, shape = absent[rng.integers(len(absent))]
    chosen.append((f"the {color} {shape}", "absent"))
    color, shape = absent[rng.integers(len(absent))]
    chosen.append((f"the {rng.choice(list(SIZES))} {color} {shape}", "sized"))
    anchor = sorted(kinds)[rng.integers(len(kinds))]
    chosen.append((f"the {color} {shape} {rng.choice(RELATIONS)} the {anchor[0]} {anchor[1]}", "related"))
    return chosen


def auc(positive: list[float], negative: list[float]) -> float:
    """The chance that a positive scores above a negative (ties count half)."""
    p, n = np.asarray(positive)[:, None], np.asarray(negative)[None, :]
    return float((p > n).mean() + 0.5 * (p == n).mean())


def locate_table(predictor, images: list[tuple[np.ndarray, dict]], seed: int) -> str:
    rng = np.random.default_rng(seed)
    scores = defaultdict(list)
    for pixels, records in images:
        asked = expressions(records, rng)
        found = predictor.find_batch([predictor.encode(pixels)], [[text for text, _ in asked]])[0]
        for (_, kind), location in zip(asked, found, strict=True):
            scores[kind].append(location.score)
    there, negatives = scores["there"], [s for kind in KINDS[1:] for s in scores[kind]]
    by_kind = ", ".join(f"{kind} {auc(there, scores[kind]):.3f}" for kind in KINDS[1:])
    lines = [f"locate: {len(there)} expressions of objects there, {len(negatives)} of objects not there; "
             f"AUC {auc(there, negatives):.3f} ({by_kind})",
             "", "| min score | " + " | ".join(f"found: {k} ({len(scores[k])})" for k in KINDS) + " |",
             "| --- |" + " --- |" * len(KINDS)]
    for threshold in LOCATE_THRESHOLDS:
        shares = [100 * np.mean(np.asarray(scores[k]) >= threshold) for k in KINDS]
        lines.append(f"| {threshold:g} | " + " | ".join(f"{s:.1f} %" for s in shares) + " |")
    return "\n".join(lines)


def densecap_table(predictor, images: list[tuple[np.ndarray, dict]]) -> str:
    found = []
    for pixels, records in images:
        objects = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in records["annotations"])]
        encoded = predictor.encode(pixels)
        answers = [predictor.dense_caption_batch([encoded], min_score=None, deduplicate=repeats)[0]
                   for repeats in (True, False)]
        found.append((objects, *([(r.box, r.score) for r in regions] for regions in answers)))
    lines = ["| min score | precision | recall | F1 | regions per image | precision with repeats |",
             "| --- | --- | --- | --- | --- | --- |"]
    total = sum(len(objects) for objects, _, _ in found)
    for threshold in DENSECAP_THRESHOLDS:
        (hits, kept), (repeated_hits, repeated) = (
            np.sum([_hits_and_kept(objects, regions[column], threshold) for objects, *regions in found], axis=0)
            for column in (0, 1))
        precision, recall = hits / max(kept, 1), hits / max(total, 1)
        f1 = 2 * precision * recall / max(precision + recall, 1e-9)
        lines.append(f"| {threshold:g} | {precision:.3f} | {recall:.3f} | {f1:.3f} | {kept / len(found):.2f} | "
                     f"{repeated_hits / max(repeated, 1):.3f} |")
    return f"densecap: {len(found)} images, {total} objects\n\n" + "\n".join(lines)


def _hits_and_kept(objects: list, regions: list, threshold: float) -> tuple[int, int]:
    boxes = [box for box, score in regions if score >= threshold]
    return _matches(boxes, objects), len(boxes)


def _matches(boxes: list, objects: list) -> int:
    """Regions (best first) matched one to one to objects at IoU 0.5, greedily."""
    if not boxes:
        return 0
    iou, free, hits = box_iou(boxes, objects), np.ones(len(objects), dtype=bool), 0
    for row in iou:
        candidates = np.where(free, row, -1.0)
        best = int(candidates.argmax())
        if candidates[best] >= 0.5:
            free[best], hits = False, hits + 1
    return hits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="val", choices=["train", "val", "test"])
    parser.add_argument("--seed", type=int, default=0, help="the synth seed of the split (default 0)")
    parser.add_argument("--images", type=int, default=300, help="images of the split (default 300)")
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the embedded model)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    predictor = pixelllm.load(args.model)
    images = [draw_image(args.split, args.seed, index) for index in range(args.images)]
    print(f"{args.split} split, seed {args.seed}, {args.images} images\n")
    print(locate_table(predictor, images, args.seed) + "\n")
    print(densecap_table(predictor, images))


if __name__ == "__main__":
    main()
