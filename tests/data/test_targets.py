"""Targets per task, their mapping onto the canvas, and the example pipeline."""

import dataclasses
import json

import numpy as np
import pytest

from pixelllm.data.ln import align_official
from pixelllm.data.pipeline import DEFAULT_AUGMENT, Augment, ExampleBuilder, ExampleDataset, TaskConfig
from pixelllm.data.samples import Narrative, Region, Sample, Utterance
from pixelllm.data.targets import build_targets, to_canvas
from pixelllm.data.transforms import CanvasTransform, jitter_boxes
from pixelllm.errors import ConfigError
from pixelllm.tokenization import encode_prompt, encode_target, train_tokenizer

CAT_LEFT = (17.5, 54.38, 17.5 + 301.25, 54.38 + 415.0)  # real COCO boxes of image 39769
CAT_RIGHT = (347.5, 25.63, 347.5 + 292.5, 25.63 + 343.75)
ELBOW = np.array([[0.1, 0.2, 0.0], [0.5, 0.2, 1.0], [0.5, 0.6, 2.0]])


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(
        [
            "where is the cat on the left",
            "an object of a cat lying on the right",
            "A long image caption: a cat sits on a couch.",
        ],
        vocab_size=300,
    )


@pytest.fixture
def cats(real_data):
    anns = {a["id"]: a for a in json.loads((real_data / "coco" / "coco_annotations_39769.json").read_text())}
    regions = [
        Region(CAT_LEFT, ["cat on the left", "left cat"], anns[2190839]["segmentation"], 17, "L"),
        Region(CAT_RIGHT, ["cat on the right"], anns[2190842]["segmentation"], 17, "R"),
    ]
    return Sample(real_data / "coco" / "000000039769.png", "39769", (640, 480), "test", regions=regions)


def test_refer_targets(tokenizer, cats):
    t = build_targets(cats, "refer", tokenizer, (640, 480))
    assert [p.text for p in t.prompts] == ["cat on the left", "left cat", "cat on the right"]
    p = t.prompts[0]
    assert p.prompt_ids == encode_prompt(tokenizer, "where is cat on the left")
    assert p.label_ids == encode_target(tokenizer, "cat on the left").ids
    last = len(p.label_ids) - 2  # the token before EOS
    assert p.label_box_mask.tolist() == [i == last for i in range(len(p.label_ids))]
    np.testing.assert_allclose(p.label_boxes[last], CAT_LEFT)
    np.testing.assert_allclose(p.prompt_box, [0, 0, 640, 480])
    assert (p.caption_weight, p.location_weight, p.mask) == (0.0, 1.0, None)
    assert t.gt_boxes.shape == (0, 4) and t.detection_weight == 0


def test_refer_on_the_canvas(tokenizer, cats):
    t = build_targets(cats, "refer", tokenizer, (640, 480))
    canvas, dropped = to_canvas(t, CanvasTransform.fit((640, 480), 160))  # scale 160/640 = 1/4
    assert not dropped
    p = canvas.prompts[0]
    np.testing.assert_allclose(p.prompt_box, [0, 0, 160, 120])
    np.testing.assert_allclose(p.label_boxes[len(p.label_ids) - 2], np.array(CAT_LEFT) / 4)
    np.testing.assert_allclose(p.target_box, CAT_LEFT)  # kept in original pixels for evaluation


def test_refseg_masks(tokenizer, cats):
    t = build_targets(cats, "refseg", tokenizer, (640, 480), max_prompts=1)
    [p] = t.prompts
    assert p.mask.shape == (480, 640) and p.mask_weight == 1
    assert abs(p.mask.sum() - 53301.6) < 0.01 * 53301.6  # the annotation's own area
    canvas, _ = to_canvas(t, CanvasTransform.fit((640, 480), 160))
    [c] = canvas.prompts
    assert c.mask.shape == (160, 160) and not c.mask[120:].any()
    assert abs(c.mask.sum() - p.mask.sum() / 16) < 0.05 * p.mask.sum() / 16


def test_region_and_densecap(tokenizer, cats):
    t = build_targets(cats, "region", tokenizer, (640, 480))
    p = t.prompts[2]
    np.testing.assert_allclose(p.prompt_box, CAT_RIGHT)
    assert p.prompt_ids == encode_prompt(tokenizer, "an object of")
    assert p.label_ids == encode_target(tokenizer, "cat on the right").ids
    assert not p.label_box_mask.any() and (p.caption_weight, p.location_weight) == (1.0, 0.0)
    d = build_targets(cats, "densecap", tokenizer, (640, 480), max_prompts=2)
    np.testing.assert_allclose(d.gt_boxes, [CAT_LEFT, CAT_RIGHT])
    assert d.detection_weight == 1 and len(d.prompts) == 2


def test_trace_targets(tokenizer):
    n = Narrative("a cat sits on a couch.", [Utterance("a cat sits on a couch", 0.0, 1.0)], ELBOW)
    sample = Sample(None, "x", narratives=[n])
    [p] = build_targets(sample, "trace", tokenizer, (100, 50)).prompts
    assert p.prompt_ids == encode_prompt(tokenizer, "A long image caption:")
    # one utterance over [0, 1]: x 0.1 -> 0.5 at y 0.2; in a 100 x 50 image (10, 10, 50, 10) for every
    # token but EOS
    assert p.label_box_mask.tolist() == [True] * (len(p.label_ids) - 1) + [False]
    np.testing.assert_array_equal(p.label_boxes[:-1], [[10, 10, 50, 10]] * (len(p.label_ids) - 1))
    assert (p.caption_weight, p.location_weight) == (1.0, 1.0)
    timed = build_targets(sample, "trace", tokenizer, (100, 50), alignment="time").prompts[0]
    assert timed.label_box_mask[:-1].all()  # the whole caption is spoken in the trace's span
    expected = align_official(n, encode_target(tokenizer, n.caption)).to_pixels((100, 50))
    np.testing.assert_array_equal(p.label_boxes, expected)


def test_crop_drops_objects_and_trace_locations(tokenizer, cats):
    # scale 1, window x in [400, 560]: the left cat (x1 = 318.75) is gone, the right one stays
    crop = CanvasTransform((640, 480), 160, 1.0, offset=(400, 0))
    canvas, dropped = to_canvas(build_targets(cats, "region", tokenizer, (640, 480)), crop)
    assert dict(dropped) == {"object left the crop": 2}
    np.testing.assert_allclose(canvas.prompts[0].prompt_box, [0, 25.63, 160, 160])
    n = Narrative("a cat", [Utterance("a cat", 0.0, 1.0)], ELBOW)
    trace = build_targets(Sample(None, "x", narratives=[n]), "trace", tokenizer, (640, 480))
    canvas, _ = to_canvas(trace, crop)
    [p] = canvas.prompts
    assert not p.label_box_mask.any()  # the trace (x 64..320 px) is outside the window


def test_flip_mirrors_prompt_boxes(tokenizer, cats):
    flip = CanvasTransform((640, 480), 160, 0.25, flip=True)
    canvas, _ = to_canvas(build_targets(cats, "region", tokenizer, (640, 480)), flip)
    # right cat (347.5, 25.63, 640, 369.38) -> (640 - 640, 25.63, 640 - 347.5, 369.38), then / 4
    np.testing.assert_allclose(canvas.prompts[2].prompt_box, np.array([0, 25.63, 292.5, 369.38]) / 4)


def test_prompt_sampling(tokenizer, cats):
    first = build_targets(cats, "refer", tokenizer, (640, 480), max_prompts=2)
    assert [p.text for p in first.prompts] == ["cat on the left", "left cat"]
    rng = np.random.default_rng(0)
    assert len(build_targets(cats, "refer", tokenizer, (640, 480), max_prompts=2, rng=rng).prompts) == 2
    with pytest.raises(ConfigError, match="unknown task"):
        build_targets(cats, "vqa", tokenizer, (640, 480))
    with pytest.raises(ConfigError, match="unknown LN alignment"):
        build_targets(cats, "trace", tokenizer, (640, 480), alignment="dtw")


def test_builder_loads_augments_and_counts(tokenizer, cats, tmp_path):
    builder = ExampleBuilder(tokenizer, TaskConfig("refseg", 160, augment=DEFAULT_AUGMENT["refseg"]))
    example = builder(cats, np.random.default_rng(3))
    assert example.pixel_values.shape == (3, 160, 160) and example.pixel_mask.any()
    assert 0.75 * 160 / 640 <= example.transform.scale <= 1.25 * 160 / 640
    assert example.meta["original_size"] == (640, 480) and example.meta["image_id"] == "39769"
    missing = Sample(tmp_path / "absent.jpg", "a", (640, 480), regions=cats.regions)
    wrong_size = Sample(cats.image, "b", (641, 480), regions=cats.regions)
    nothing = Sample(cats.image, "c", (640, 480))
    no_image = Sample(None, "d", regions=cats.regions)
    broken_mask = Sample(cats.image, "e", (640, 480), regions=[Region(CAT_LEFT, ["cat"], [[1, 2]])])
    for sample in (missing, wrong_size, nothing, no_image, broken_mask):
        assert builder(sample) is None
    assert builder.report.kept == 1
    assert dict(builder.report.skipped) == {
        "unreadable image": 1,
        "image size differs from its annotation": 1,
        "no refseg target in the sample": 1,
        "no image": 1,
        "malformed annotation": 1,
    }


def test_dataset_is_deterministic_per_epoch(tokenizer, cats):
    builder = ExampleBuilder(tokenizer, TaskConfig("densecap", 96, augment=DEFAULT_AUGMENT["densecap"]))
    dataset = ExampleDataset([cats], builder, seed=5)
    a, b = dataset[0], dataset[0]
    assert a.transform == b.transform
    transforms = set()
    for epoch in range(4):
        dataset.set_epoch(epoch)
        example = dataset[0]
        transforms.add(None if example is None else example.transform)
    assert len(transforms) > 1


def test_box_jitter_moves_region_prompts_only(tokenizer, cats):
    """With the same seed, jitter leaves the transform alone and moves each side of a region's prompt
    box by at most its fraction of the box's side; the box stays on the image and around its center."""
    plain = Augment((0.75, 1.25))
    for task in ("region", "refer"):
        built = [ExampleBuilder(tokenizer, TaskConfig(task, 160, augment=a))(cats, np.random.default_rng(4))
                 for a in (plain, dataclasses.replace(plain, box_jitter=0.2))]
        assert built[0].transform == built[1].transform
        before = np.stack([p.prompt_box for p in built[0].targets.prompts])
        after = np.stack([p.prompt_box for p in built[1].targets.prompts])
        if task == "refer":  # whole-image prompts are never jittered
            np.testing.assert_array_equal(after, before)
            continue
        sides = np.tile(before[:, 2:] - before[:, :2], 2)
        moved = np.abs(after - before)
        assert (moved > 0.01 * sides).any() and (moved <= 0.2 * sides + 1e-9).all()
        centers = (before[:, :2] + before[:, 2:]) / 2
        assert ((after[:, :2] < centers) & (centers < after[:, 2:])).all()
        valid = built[1].transform.valid_box
        assert (after[:, :2] >= valid[:2]).all() and (after[:, 2:] <= valid[2:]).all()


def test_jitter_boxes_bounds():
    rng = np.random.default_rng(0)
    boxes = np.array([[10.0, 20.0, 30.0, 60.0]] * 2000)
    moved = jitter_boxes(boxes, 0.25, rng) - boxes
    limits = np.array([20.0, 40.0, 20.0, 40.0]) * 0.25
    assert (np.abs(moved) <= limits).all() and (np.abs(moved).max(0) > 0.95 * limits).all()
    np.testing.assert_array_equal(jitter_boxes(boxes, 0.0, rng), boxes)
    with pytest.raises(ValueError, match="box jitter must be in"):
        jitter_boxes(boxes, 0.5, rng)


def test_muse_answers_write_a_group_per_target_and_collate_their_masks(tokenizer, cats):
    """Task muse: one prompt per question, the whole group after each target, each target's mask in
    answer order on the canvas (the batch's ``seg_masks``/``seg_prompt_index``), a question with no
    target trains on its text; its augment may only shrink the image."""
    from copy import deepcopy

    from pixelllm.data.collate import collate
    from pixelllm.data.samples import Question
    from pixelllm.data.targets import CodebookFormat

    tok = deepcopy(tokenizer)
    tok.add_tokens(["[SEG0]", "[SEG1]"], special_tokens=True)
    left, right = cats.regions
    sample = dataclasses.replace(cats, questions=[
        Question("all the cats", "the left cat {seg} and the right cat {seg}.", [left, right]),
        Question("the dogs", "there is no dog.", [])])
    codebook = CodebookFormat(("[SEG0]", "[SEG1]"), "{question} Please respond with segmentation mask.")
    task = TaskConfig("muse", 160, augment=DEFAULT_AUGMENT["muse"], codebook=codebook)
    example = ExampleBuilder(tok, task)(sample, np.random.default_rng(0))
    assert [p.text for p in example.targets.prompts] == ["the left cat[SEG0][SEG1] and the right cat[SEG0][SEG1].",
                                                         "there is no dog."]
    assert example.targets.prompts[0].prompt_ids == encode_prompt(tok, "all the cats Please respond with "
                                                                       "segmentation mask.")
    batch = collate([example])
    assert batch["codebook_weight"].tolist() == [1.0, 1.0] and batch["seg_prompt_index"].tolist() == [0, 0]
    assert batch["seg_masks"].shape == (2, 160, 160) and batch["seg_masks"].sum((1, 2)).min() > 100
    assert batch["caption_weight"].tolist() == batch["location_weight"].tolist() == [0.0, 0.0]
    assert "codebook_weight" not in collate([ExampleBuilder(tok, TaskConfig("refseg", 160))(cats)])
    with pytest.raises(ConfigError, match="task muse names every target of the image"):
        TaskConfig("muse", 160, augment=Augment((0.75, 1.25)), codebook=codebook)
