"""scripts/refer_breakdown.py on a small shapes split: per-sample records of the ground-truth oracle,
some of them turned into misses whose landing place is known (the relation's anchor, nothing, an object
of the same color and another shape), give the counts it reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import tokenizer

from pixelllm.data.shapes.vocab import RELATIONS
from pixelllm.data.synthetic import generate
from pixelllm.evaluate.runner import GroundTruthOracle, evaluate

ROOT = Path(__file__).resolve().parents[2]


def _box(region: dict) -> list[float]:
    """A Visual Genome region's ``[x0, y0, x1, y1]``."""
    return [region["x"], region["y"], region["x"] + region["width"], region["y"] + region["height"]]


def _anchor_box(query: str, regions: list[dict]) -> list[float]:
    """The box of the object named after the relation (its color and shape words)."""
    relation = next(r for r in RELATIONS if f" {r} " in query)
    color, shape = query.split(f" {relation} ")[1].split()[-2:]
    return _box(next(r for r in regions if {color, shape} <= set(r["phrase"].split())))


def _same_color_other_shape(query: str, regions: list[dict]) -> list[float] | None:
    """The box of an object with the color of a plain "the {color} {shape}" but another shape."""
    color, shape = query.split()[-2:]
    region = next((r for r in regions if color in r["phrase"].split() and shape not in r["phrase"].split()), None)
    return region and _box(region)


def test_breakdown_counts_forms_and_where_misses_land(tmp_path):
    split = tmp_path / "val"
    generate(split, num_images=12, seed=4, split="val", workers=1, progress=False)
    samples = tmp_path / "refer.jsonl"
    evaluate(GroundTruthOracle(tokenizer()), "refer", split, progress=False, per_sample_path=samples)
    regions = {str(image["id"]): image["regions"]
               for image in json.loads((split / "visual_genome" / "region_descriptions.json").read_text())}
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    relational = [r for r in records if any(f" {rel} " in r["query"] for rel in RELATIONS)]
    plain = [r for r in records if r not in relational]
    assert relational and len(plain) >= 2
    for record in relational:  # every relational expression boxes its anchor instead
        record["prediction"] = _anchor_box(record["query"], regions[str(record["image_id"])])
        record["scores"]["box_iou"] = 0.0
    for record in plain[:2]:  # two others box a 1-pixel speck
        record["prediction"], record["scores"]["box_iou"] = [0.0, 0.0, 1.0, 1.0], 0.0
    look_alikes = ((r, _same_color_other_shape(r["query"], regions[str(r["image_id"])])) for r in plain[2:])
    record, box = next((r, box) for r, box in look_alikes if box and len(r["query"].split()) == 3)
    record["prediction"], record["scores"]["box_iou"] = box, 0.0  # and one boxes a look-alike
    samples.write_text("".join(json.dumps(r) + "\n" for r in records))

    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "refer_breakdown.py"), str(samples), str(split)],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in result.stdout.splitlines()}
    hits = len(plain) - 3
    assert rows["all"] == [str(len(records)), f"{100.0 * hits / len(records):.1f} % |"]
    assert rows["the relation's anchor"][0] == str(len(relational))
    assert rows["no object"][0] == "2"
    assert rows["another object, other shape"][0] == "1"
    assert [key for key in rows if key.startswith("another object")] == ["another object, other shape"]
