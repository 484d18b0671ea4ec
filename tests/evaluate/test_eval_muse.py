"""MUSE metrics, worked by hand: both matchings of ``MultiTargetSegmentation`` (IoU and PixelLM's
official BCE + Dice on sampled points with its per-image gIoU denominator), no-target questions,
more and fewer predictions than targets, and ``TargetCounts``."""

import math

import numpy as np
import pytest
import torch

from pixelllm.evaluate.refseg import (
    BINARY_LOGIT,
    MultiTargetSegmentation,
    TargetCounts,
    official_cost,
    sample_points,
)


def columns(start, stop, height=8, width=40):
    """A ``height x width`` mask covering columns [start, stop) on every row."""
    mask = np.zeros((height, width), dtype=bool)
    mask[:, start:stop] = True
    return mask


def test_point_samples_are_grid_samples():
    rng = np.random.default_rng(1)
    maps = rng.normal(size=(3, 5, 7))
    points = rng.random((50, 2))
    expected = torch.nn.functional.grid_sample(
        torch.tensor(maps)[:, None], 2 * torch.tensor(points)[None, :, None].expand(3, -1, -1, -1) - 1,
        align_corners=False,
    )[:, 0, :, 0]
    np.testing.assert_allclose(sample_points(maps.reshape(3, -1), (5, 7), points), expected.numpy(), atol=1e-12)


def test_official_cost_by_hand():
    # One point, logit 0 (p = 0.5) against target 1: BCE = log 2; Dice = 1 - (2 * 0.5 + 1) / (0.5 + 1 + 1) = 0.2.
    assert official_cost(np.zeros((1, 1)), np.ones((1, 1)))[0, 0] == pytest.approx(math.log(2) + 0.2)
    # Logit +5 against target 0: BCE = log(1 + e^5); Dice = 1 - 1 / (sigmoid(5) + 1).
    sigmoid = 1 / (1 + math.exp(-5))
    assert official_cost(np.full((1, 1), 5.0), np.zeros((1, 1)))[0, 0] == pytest.approx(
        math.log(1 + math.exp(5)) + 1 - 1 / (sigmoid + 1))


# Targets A = columns [14, 15) (8 px) and B = [16, 25) (72 px); predictions P0 = [19, 24) (40 px)
# and P1 = the whole 8 x 40 image (320 px).
# IoU: P0-B 40/72, P1-A 8/320 (sum 0.58) beats P0-A 0 + P1-B 72/320 (sum 0.225).
# Official cost (about 5 per mismatched pixel share + Dice): P0-A + P1-B mismatch 48 + 248 pixels,
# P0-B + P1-A 32 + 312: the official matching takes P0-A, P1-B.
A, B, P0, P1 = columns(14, 15), columns(16, 25), columns(19, 24), columns(0, 40)


def test_iou_matching_maximizes_iou():
    metric = MultiTargetSegmentation("iou")
    metric.update([[P0, P1]], [[A, B]])
    result = metric.compute()
    assert result["gIoU"] == pytest.approx(100 * (40 / 72 + 8 / 320) / 2)
    assert result["cIoU"] == pytest.approx(100 * (40 + 8) / (72 + 320))


def test_official_matching_minimizes_bce_and_dice():
    metric = MultiTargetSegmentation("official")
    metric.update([[P0, P1]], [[A, B]])
    result = metric.compute()
    # Pairs (P0, A): I 0, U 48; (P1, B): I 72, U 320; max(2 predicted, 2 targets) = 2.
    assert result["gIoU"] == pytest.approx(100 * (72 / (320 + 1e-5)) / 2)
    assert result["cIoU"] == pytest.approx(100 * 72 / (48 + 320))
    exact = official_cost(BINARY_LOGIT * (2 * np.stack([P0, P1]).reshape(2, -1) - 1.0),
                          np.stack([A, B]).reshape(2, -1).astype(float))
    assert exact[0, 0] + exact[1, 1] < exact[0, 1] + exact[1, 0]  # the sampled points agree with all pixels


def test_official_matching_is_the_same_every_run_and_depends_on_the_seed():
    def points(seed):
        return MultiTargetSegmentation("official", seed=seed).points

    np.testing.assert_array_equal(points(0), points(0))
    assert points(0).shape == (12544, 2) and not np.array_equal(points(0), points(1))


def test_more_and_fewer_predictions_than_targets_and_the_per_image_denominator():
    # Question 1: target [0, 10); predictions exactly [0, 10) and an extra [30, 35) (one too many).
    # Question 2, same image: target [10, 15); no prediction (one too few).
    # Pairs: (exact) I 80 U 80; (extra, none) I 0 U 40; (none, missed) I 0 U 40: cIoU 80 / 160.
    preds, gts = [[columns(0, 10), columns(30, 35)], []], [[columns(0, 10)], [columns(10, 15)]]
    iou = MultiTargetSegmentation("iou")
    iou.update(preds, gts)
    per_question = MultiTargetSegmentation("official")
    per_question.update(preds, gts)
    per_image = MultiTargetSegmentation("official")
    per_image.update(preds, gts, image_ids=["image", "image"])
    assert iou.compute()["gIoU"] == pytest.approx(100 / 3)  # 3 pairs
    # official: per question max(2, 1) + max(0, 1) = 3; per image max(2 predicted, 2 targets) = 2
    assert per_question.compute()["gIoU"] == pytest.approx(100 * (80 / (80 + 1e-5)) / 3)
    assert per_image.compute()["gIoU"] == pytest.approx(100 * (80 / (80 + 1e-5)) / 2)
    for metric in (iou, per_question, per_image):
        result = metric.compute()
        assert result["cIoU"] == pytest.approx(50.0)
        assert result["num_unmatched_predictions"] == result["num_unmatched_targets"] == 1.0


def test_image_ids_group_questions_fed_in_any_order_and_batches():
    # Image x: question (1 prediction, 2 targets), later (2 predictions, 0 targets): max(3, 2) = 3.
    # Image y: question (1 exact prediction, 1 target): max(1, 1) = 1.
    metric = MultiTargetSegmentation("official")
    metric.update([[columns(0, 10)], [columns(0, 4)]], [[columns(0, 10), columns(20, 30)], [columns(0, 4)]], ["x", "y"])
    metric.update([[columns(30, 32), columns(34, 36)]], [[]], ["x"])
    # IoU sum: 80 / (80 + eps) + 32 / (32 + eps), over 3 + 1 masks
    assert metric.compute()["gIoU"] == pytest.approx(100 * 2 / 4, rel=1e-6)


def test_no_target_questions_in_both_modes():
    # Question 1: target [0, 10), predicted exactly. Question 2: no target; predictions [20, 25)
    # and an empty mask. Question 3: no target, no prediction. All of one image.
    empty = np.zeros((8, 40), dtype=bool)
    preds = [[columns(0, 10)], [columns(20, 25), empty], []]
    gts = [[columns(0, 10)], [], []]
    iou = MultiTargetSegmentation("iou")
    iou.update(preds, gts)
    official = MultiTargetSegmentation("official")
    official.update(preds, gts, ["image"] * 3)
    iou_result, official_result = iou.compute(), official.compute()
    # IoU mode: the empty mask predicts nothing; pairs 1 and (extra, none) I 0 U 40.
    assert iou_result["gIoU"] == pytest.approx(50.0)
    # Official: the empty mask is a prediction; unmatched, its pair has U = 0 and scores 1;
    # denominator max(3 predicted, 1 target) = 3.
    assert official_result["gIoU"] == pytest.approx(100 * (80 / (80 + 1e-5) + 0 + 1) / 3)
    for result in (iou_result, official_result):
        assert result["cIoU"] == pytest.approx(100 * 80 / 120)
        assert result["num_samples"] == 3.0 and result["num_skipped"] == 0.0


def test_targets_that_are_all_unreadable_skip_the_question_rather_than_make_it_a_no_target_one():
    for matching in ("iou", "official"):
        metric = MultiTargetSegmentation(matching)
        metric.update([[columns(0, 4)]], [[np.zeros((8, 40), dtype=bool)]])
        result = metric.compute()
        assert result["num_skipped"] == 1.0 and result["num_samples"] == 0.0 and math.isnan(result["gIoU"])


def test_unknown_matching_is_refused():
    with pytest.raises(ValueError, match="matching must be one of"):
        MultiTargetSegmentation("greedy")


def test_target_counts():
    metric = TargetCounts()
    metric.update([1, 2, 0, 3], [1, 0, 0, 2])
    result = metric.compute()
    assert result["count_accuracy"] == 50.0
    assert result["no_target_accuracy"] == 50.0
    assert result["num_no_target_questions"] == 2.0 and result["num_samples"] == 4.0
    only_targets = TargetCounts()
    only_targets.update([2], [2])
    assert only_targets.compute()["count_accuracy"] == 100.0
    assert math.isnan(only_targets.compute()["no_target_accuracy"])
