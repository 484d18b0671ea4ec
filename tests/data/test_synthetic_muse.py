"""The shapes world's multi-target questions (MUSE layout): read back with the MUSE reader and
checked against the COCO instances written beside them, re-deriving every target from the
question's words and the annotations' attributes (not from the generator's bookkeeping)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

from pixelllm.data.coco import decode_segmentation
from pixelllm.data.muse import MuseReader
from pixelllm.data.shapes.vocab import COLORS, SHAPES, SIZES
from pixelllm.data.synthetic import generate

SEED = 3
IMAGES = 40
_COLOR, _SHAPE, _SIZE = "|".join(COLORS), "|".join(SHAPES), "|".join(SIZES)
FORMS = {
    "color": re.compile(rf"all the (?P<color>{_COLOR}) objects"),
    "shape": re.compile(rf"all the (?P<shape>{_SHAPE})s"),
    "size": re.compile(rf"all the (?P<size>{_SIZE}) objects"),
    "pair": re.compile(rf"the (?P<c1>{_COLOR}) (?P<s1>{_SHAPE}) and the (?P<c2>{_COLOR}) (?P<s2>{_SHAPE})"),
}
# sha256 of every file but the MUSE file and summary.json of this split as written before the
# MUSE file was added (numpy, Pillow and pycocotools of constraints.txt).
OTHER_FILES_SHA256 = "005a0351c9258db003235d041fd91947b040268b2586966e1d12cc64431a05a5"



def _muse_path(world: Path) -> Path:
    return world / json.loads((world / "summary.json").read_text())["files"]["muse"]


def _expected(question: str, annotations: list[dict], shape_of: dict[int, str]) -> tuple[str, list[dict]]:
    """The form of ``question`` and the annotations it asks for, in reading order."""
    form, match = next((f, m) for f, pattern in FORMS.items() if (m := pattern.fullmatch(question)))
    words = match.groupdict()
    if form == "pair":
        named = [(words["c1"], words["s1"]), (words["c2"], words["s2"])]
        found = [a for a in annotations if (a["color"], shape_of[a["category_id"]]) in named]
        assert len(found) == 2 and named[0] != named[1], "each named object is the only one of its kind"
    else:
        attribute = {"color": lambda a: a["color"], "size": lambda a: a["size"],
                     "shape": lambda a: shape_of[a["category_id"]]}[form]
        found = [a for a in annotations if attribute(a) == words[form]]
    return form, sorted(found, key=lambda a: (a["bbox"][1], a["bbox"][0]))


def test_questions_round_trip_through_the_muse_reader(world: Path, coco: COCO) -> None:
    shape_of = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    reader = MuseReader(_muse_path(world), world / "images")
    samples = list(reader)
    assert len(samples) == IMAGES and not reader.report.skipped
    forms, no_target = set(), 0
    for sample in samples:
        image = coco.loadImgs(int(sample.image_id))[0]
        assert sample.image == world / "images" / image["file_name"] and sample.image.is_file()
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        assert 2 <= len(sample.questions) <= 4
        assert len({q.text for q in sample.questions}) == len(sample.questions)
        for question in sample.questions:
            form, expected = _expected(question.text, annotations, shape_of)
            forms.add(form)
            assert [t.region_id for t in question.targets] == [str(a["id"]) for a in expected]
            names = [f"the {a['size']} {a['color']} {shape_of[a['category_id']]} {{seg}}" for a in expected]
            if expected:
                assert question.answer == ", ".join(names) + "."
            else:
                no_target += 1
                assert question.answer == f"there are no {question.text.removeprefix('all the ')}."
            for target, ann in zip(question.targets, expected, strict=True):
                x, y, w, h = ann["bbox"]
                assert target.box == (x, y, x + w, y + h)
                assert target.texts == [f"{ann['size']} {ann['color']} {shape_of[ann['category_id']]}"]
                mask = decode_segmentation(target.segmentation, image["height"], image["width"])
                np.testing.assert_array_equal(mask, coco.annToMask(ann).astype(bool))
    assert forms == set(FORMS)
    assert 0.05 <= no_target / sum(len(s.questions) for s in samples) <= 0.25


def test_muse_file_is_in_the_summary_and_other_files_are_unchanged(world: Path) -> None:
    summary = json.loads((world / "summary.json").read_text())
    assert summary["files"]["muse"] == "muse/shapes_train.json"
    entries = json.loads(_muse_path(world).read_text())
    assert summary["questions"] == sum(len(e["questions"]) for e in entries)
    others = sorted(p for p in world.rglob("*") if p.is_file() and p.name != "summary.json"
                    and p != _muse_path(world))
    digest = hashlib.sha256()
    for path in others:
        digest.update(str(path.relative_to(world)).encode() + hashlib.sha256(path.read_bytes()).digest())
    assert digest.hexdigest() == OTHER_FILES_SHA256


def test_muse_file_is_the_same_whatever_the_workers(world: Path, tmp_path: Path) -> None:
    generate(tmp_path, IMAGES, SEED, "train", workers=2, progress=False)
    assert _muse_path(tmp_path).read_bytes() == _muse_path(world).read_bytes()
