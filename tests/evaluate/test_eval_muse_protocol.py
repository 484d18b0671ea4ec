"""The ``muse`` evaluation protocol on a shapes-world split: the ground-truth oracle scores the
maximum through the runner, and a predictor's ``segment_all_batch`` is asked once per question,
with its answers cut back per image and scored."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pixelllm.data.report import SkipReport
from pixelllm.data.sources import open_source
from pixelllm.data.synthetic import generate
from pixelllm.errors import InputError
from pixelllm.evaluate.protocols import PROTOCOLS
from pixelllm.evaluate.runner import GroundTruthOracle, _images, _load, evaluate
from pixelllm.results import Segment


@pytest.fixture(scope="module")
def muse_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes") / "val"
    summary = generate(out, num_images=8, seed=3, split="val", workers=1, progress=False)
    return out / summary.files["muse"]


def test_the_oracle_scores_the_maximum(muse_file: Path, tmp_path: Path) -> None:
    result = evaluate(GroundTruthOracle(), "muse", muse_file, progress=False,
                      per_sample_path=tmp_path / "muse.jsonl", report_path=tmp_path / "muse.md")
    questions = sum(len(entry["questions"]) for entry in json.loads(muse_file.read_text()))
    assert result.num_samples == questions and result.num_skipped == 0
    metrics = result.metrics
    assert metrics["gIoU"] == metrics["cIoU"] == metrics["cIoU_official"] == 100.0
    assert metrics["gIoU_official"] == pytest.approx(100.0)  # each pair I / (I + 1e-5)
    assert metrics["count_accuracy"] == metrics["no_target_accuracy"] == 100.0
    records = [json.loads(line) for line in (tmp_path / "muse.jsonl").read_text().splitlines()]
    assert len(records) == questions
    assert all(r["prediction"]["count"] == r["ground_truth"]["count"] for r in records)
    assert "| count_accuracy | 100.00 |" in (tmp_path / "muse.md").read_text()


class _ShiftedPredictor:
    """Answers a question with its targets' masks moved one column right, and a no-target question
    with one empty segment; records what it was asked. Its "encoded images" are (id, (W, H))."""

    def __init__(self, images: list) -> None:
        self.truth = {(image.sample.image_id, unit.question): unit.targets for image in images for unit in image.units}
        self.asked: list[tuple[str, str]] = []

    def segment_all_batch(self, encoded: list, queries: list[str]) -> list[list[Segment]]:
        answers = []
        for (image_id, (width, height)), query in zip(encoded, queries, strict=True):
            self.asked.append((image_id, query))
            targets = self.truth[image_id, query]
            answers.append([Segment(t.box, np.roll(t.mask, 1, axis=1), 0.9) for t in targets]
                           or [Segment([0.0, 0.0, 1.0, 1.0], np.zeros((height, width), bool), 0.1)])
        return answers


def test_a_predictor_is_asked_every_question_once_with_its_image(muse_file: Path) -> None:
    report = SkipReport("test")
    protocol = PROTOCOLS["muse"](report)
    images = [_load(sample, protocol, report) for sample in _images(open_source("muse", muse_file).reader, None)]
    predictor = _ShiftedPredictor(images)
    answers = protocol.predict(predictor, [(image.sample.image_id, image.size) for image in images], images)
    assert predictor.asked == [(image.sample.image_id, unit.question) for image in images for unit in image.units]
    assert [len(a) for a in answers] == [len(image.units) for image in images]
    records = protocol.update(images, answers)
    values, counts = protocol.compute()
    assert counts["num_samples"] == len(records) == len(predictor.asked)
    assert 50 < values["gIoU"] < 100 and 50 < values["cIoU"] < 100
    no_target = sum(r["ground_truth"]["count"] == 0 for r in records)
    assert no_target and values["no_target_accuracy"] == 0.0
    assert values["count_accuracy"] == pytest.approx(100 * (len(records) - no_target) / len(records))
    # official: the unmatched empty segments score IoU 1, so its gIoU is above the IoU mode's
    assert values["gIoU_official"] > values["gIoU"]


def test_a_predictor_without_multi_target_segmentation_is_a_one_line_input_error(muse_file: Path) -> None:
    report = SkipReport("test")
    protocol = PROTOCOLS["muse"](report)
    images = [_load(sample, protocol, report) for sample in _images(open_source("muse", muse_file).reader, 1)]
    with pytest.raises(InputError, match="segment_all_batch"):
        protocol.predict(object(), [None], images)
