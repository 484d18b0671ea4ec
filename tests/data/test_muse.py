"""MUSE reader on a fixture in PixelLM's layout around the real objects of COCO image 39769."""

import json
from pathlib import Path

import numpy as np
import pytest

from pixelllm.data.coco import decode_segmentation
from pixelllm.data.images import load_image
from pixelllm.data.muse import MuseReader
from pixelllm.errors import DataError

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "formats" / "muse_sample.json"


def test_questions_targets_and_skips(real_data):
    reader = MuseReader(FIXTURE, real_data / "coco")
    first, second = list(reader)
    assert first.image == real_data / "coco" / "000000039769.png"
    assert load_image(first.image).size == first.image_size == (640, 480)
    assert second.image == first.image  # from coco_url's file name
    assert [r.texts for r in first.regions] == [
        ["tabby cat on the left"],
        ["cat stretched out on the right"],
        ["remote control"],
        ["second remote control"],
    ]
    assert len(first.questions) == 2 and len(second.questions) == 1
    q = first.questions[0]
    assert q.answer.count("{seg}") == len(q.targets) == 2
    assert second.questions[0].answer is None
    assert dict(reader.report.skipped) == {
        "placeholder count differs from targets": 1,
        "questions, answers and text_answers differ in length": 1,
    }


def test_target_boxes_and_masks_are_the_real_ones(real_data):
    annotations = {
        a["id"]: a for a in json.loads((real_data / "coco" / "coco_annotations_39769.json").read_text())
    }
    first = next(iter(MuseReader(FIXTURE, real_data / "coco")))
    for target in first.questions[0].targets:
        ann = annotations[int(target.region_id)]
        x, y, w, h = ann["bbox"]
        np.testing.assert_allclose(target.box, [x, y, x + w, y + h])
        mask = decode_segmentation(target.segmentation, 480, 640)
        assert abs(mask.sum() - ann["area"]) <= 0.01 * ann["area"]


def test_not_a_muse_file(tmp_path):
    (tmp_path / "m.json").write_text('{"questions": []}')
    with pytest.raises(DataError, match="m.json is not a MUSE file"):
        list(MuseReader(tmp_path / "m.json", tmp_path))


def test_a_question_without_targets_is_kept_only_when_its_answer_says_so(tmp_path):
    entry = {"file_name": "a.png", "height": 4, "width": 4, "ann_list": [],
             "questions": ["all the cats", "all the dogs"], "answers": [[], []],
             "text_answers": ["there are no cats.", "the dog {seg}."]}
    without_texts = {**entry, "id": 2, "text_answers": None}
    (tmp_path / "m.json").write_text(json.dumps([entry, without_texts]))
    reader = MuseReader(tmp_path / "m.json", tmp_path)
    (sample,) = list(reader)
    assert [(q.text, q.answer, q.targets) for q in sample.questions] == [("all the cats", "there are no cats.", [])]
    assert dict(reader.report.skipped) == {
        "placeholder count differs from targets": 1,
        "question without targets": 2,
        "image without usable questions": 1,
    }
