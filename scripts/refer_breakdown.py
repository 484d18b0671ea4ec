"""Referring localization on the shapes world, broken down: by expression form, by object size,
and, for the misses, by what the predicted box landed on.

Reads the per-sample records of ``pixelllm eval --task refer --per-sample FILE`` and the scene's
objects (the Visual Genome regions of the same data directory, through the project's reader), and
prints a markdown report:

- Precision@1 (IoU >= 0.5) by form: "the {color} {shape}" (plain), "the {size} {color} {shape}"
  (size), "the {color} {shape} {relation} the {color} {shape}" (relational; split by whether the
  first color + shape alone already names one object of the scene);
- Precision@1 by the size of the object referred to (its region phrase's size word);
- each miss by the object its box overlaps most (IoU >= 0.5): the relation's anchor (the second
  object named), another object (named by the attributes of the expression's first object that it
  does not share: "other shape", "other color and shape", ..., or "same description"), or no object.

Usage: python scripts/refer_breakdown.py PER_SAMPLE_JSONL DATA_DIR
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from pixelllm.data.shapes.vocab import RELATIONS, SIZES
from pixelllm.data.sources import open_source
from pixelllm.evaluate.boxes import box_iou
from pixelllm.evaluate.shapes import lower_words, matches, mentions


def scene_objects(data: Path) -> dict[str, list[tuple[str, list[float]]]]:
    """Image id -> its objects as ``(phrase, [x0, y0, x1, y1])`` in original pixels."""
    return {str(sample.image_id): [(" ".join(r.texts), list(r.box)) for r in sample.regions]
            for sample in open_source("regioncap", data).reader}


def form(query: str, objects: list[tuple[str, list[float]]]) -> str:
    said = mentions(lower_words(query))
    if any(f" {relation} " in query for relation in RELATIONS):
        subject = {k: v for k, v in said[0][1].items() if k != "size"}
        unique = sum(matches(subject, phrase) for phrase, _ in objects) == 1
        return "relational, first object unique" if unique else "relational, first object ambiguous"
    return "size" if "size" in said[0][1] else "plain"


def landed_on(record: dict, objects: list[tuple[str, list[float]]]) -> str:
    """What a missed box overlaps most: the anchor of a relation, another object (with the
    attributes it does not share with the expression's first object), or nothing."""
    ious = box_iou(np.array([record["prediction"]]), np.array([box for _, box in objects]))[0]
    best = int(ious.argmax())
    if ious[best] < 0.5:
        return "no object"
    said = mentions(lower_words(record["query"]))
    phrase = objects[best][0]
    if len(said) > 1 and matches(said[1][1], phrase):
        return "the relation's anchor"
    differ = [kind for kind, value in said[0][1].items() if not matches({kind: value}, phrase)]
    return f"another object, other {' and '.join(differ)}" if differ else "another object, same description"


def breakdown(records: list[dict], objects: dict[str, list[tuple[str, list[float]]]]) -> dict[str, Counter]:
    tables = {"form": Counter(), "size": Counter(), "misses": Counter()}
    for record in records:
        scene = objects[str(record["image_id"])]
        hit = record["scores"]["box_iou"] >= 0.5
        target = scene[int(box_iou(np.array([record["ground_truth"]]), np.array([b for _, b in scene]))[0].argmax())]
        size = next((s for s in SIZES if s in lower_words(target[0])), "unknown")
        for table, key in (("form", form(record["query"], scene)), ("size", size), ("form", "all")):
            tables[table][key, "n"] += 1
            tables[table][key, "hit"] += hit
        if not hit:
            tables["misses"][landed_on(record, scene)] += 1
    return tables


def report(tables: dict[str, Counter]) -> str:
    lines = []
    for table, title in (("form", "expression form"), ("size", "object size")):
        lines += [f"| {title} | expressions | Precision@1 |", "| --- | ---: | ---: |"]
        for key in sorted({k for k, _ in tables[table]}, key=lambda k: (k == "all", k)):
            n, hit = tables[table][key, "n"], tables[table][key, "hit"]
            lines.append(f"| {key} | {n} | {100.0 * hit / n:.1f} % |")
        lines.append("")
    misses = sum(tables["misses"].values())
    lines += ["| a miss's box lands on | misses | share |", "| --- | ---: | ---: |"]
    for key, n in tables["misses"].most_common():
        lines.append(f"| {key} | {n} | {100.0 * n / misses:.1f} % |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    records = [json.loads(line) for line in Path(argv[0]).read_text().splitlines() if line.strip()]
    print(report(breakdown(records, scene_objects(Path(argv[1])))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
