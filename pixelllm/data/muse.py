"""MUSE (PixelLM's multi-target reasoning segmentation data) JSON reader.

Layout, as PixelLM's loaders read it (the dataset itself could not be inspected here): a JSON
list, one entry per COCO image::

    {"file_name": "COCO_train2014_....jpg"  (or "coco_url": ".../train2017/000000xxxxxx.jpg"),
     "height": H, "width": W,
     "ann_list": [{"bbox": [x, y, w, h], "segmentation": polygons or RLE, "category_id": int,
                   "category_name": str, "rephrased_name": str (optional)}, ...],
     "questions": [str, ...],
     "answers": [[<ann_list-like dict>, ...], ...],        # the targets of each question
     "text_answers": [str with one "{seg}" per target, ...]}  # optional

Assumptions: ``answers[i]`` are the targets of ``questions[i]`` in the order of the ``{seg}``
placeholders of ``text_answers[i]``; a target's ``bbox`` is COCO ``xywh`` in pixels; the image file
is ``image_dir / basename(file_name or coco_url)``. A question may have no target (the shapes
world asks some: "all the green objects" in a scene without green) when its text answer says so
without a placeholder; the official MUSE has none. A question whose placeholder count differs from
its target count, without targets and without a text answer, or with a broken target, is skipped
and counted.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pixelllm.data.coco import annotation_region, image_header
from pixelllm.data.report import JsonFileReader, SkipRecord, load_json_file, require
from pixelllm.data.samples import Question, Region, Sample
from pixelllm.errors import DataError

PLACEHOLDER = "{seg}"


def _target(ann: dict, size: tuple[int, int]) -> Region:
    name = ann.get("rephrased_name") or ann.get("category_name") if isinstance(ann, dict) else None
    return annotation_region(ann, size, [name] if name else [])


def _question(text, targets, answer, size: tuple[int, int]) -> Question:
    if not isinstance(text, str) or not text.strip():
        raise SkipRecord("empty question")
    if not isinstance(targets, list) or not (targets or isinstance(answer, str)):
        raise SkipRecord("question without targets")
    if answer is not None and (not isinstance(answer, str) or answer.count(PLACEHOLDER) != len(targets)):
        raise SkipRecord("placeholder count differs from targets")
    return Question(text.strip(), answer, [_target(t, size) for t in targets])


class MuseReader(JsonFileReader):
    """Samples (one per image: ``regions`` from ``ann_list``, ``questions`` with their targets)."""

    name = "muse"

    def _samples(self) -> Iterator[Sample]:
        data = load_json_file(self.json_path, "MUSE JSON")
        if not isinstance(data, list):
            raise DataError(f"{self.json_path} is not a MUSE file (expected a JSON list of images)")
        for index, entry in enumerate(data):
            try:
                sample = self._sample(entry, index)
            except SkipRecord as skip:
                self.report.skip(str(skip))
                continue
            if sample is not None:
                yield sample

    def _sample(self, entry: dict, index: int) -> Sample | None:
        name, size = image_header(entry)
        regions = []
        for ann in require(entry, "ann_list") or []:
            try:
                regions.append(_target(ann, size))
            except SkipRecord as skip:
                self.report.skip(str(skip))
        questions = require(entry, "questions")
        answers = require(entry, "answers")
        texts = entry.get("text_answers") or [None] * len(questions)
        if not (
            isinstance(questions, list) and isinstance(answers, list) and isinstance(texts, list)
        ) or not len(questions) == len(answers) == len(texts):
            raise SkipRecord("questions, answers and text_answers differ in length")
        kept = []
        for question, targets, answer in zip(questions, answers, texts, strict=True):
            try:
                kept.append(_question(question, targets, answer, size))
            except SkipRecord as skip:
                self.report.skip(str(skip))
        if not kept:
            self.report.skip("image without usable questions")
            return None
        image_id = str(entry.get("id", Path(name).stem or index))
        return Sample(self.image_dir / name, image_id, size, self.name, regions=regions, questions=kept)
