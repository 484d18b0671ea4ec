"""Referring localization Precision@1."""

import math

import numpy as np
import pytest
import torch

from pixelllm.evaluate import ReferringLocalization

GT = [0.0, 0.0, 4.0, 4.0]


def test_perfect_predictions_give_100():
    metric = ReferringLocalization()
    metric.update([GT, [10, 20, 30, 60]], [GT, [10, 20, 30, 60]])
    result = metric.compute()
    assert result["precision@1"] == 100.0
    assert result["num_samples"] == 2.0
    assert result["num_skipped"] == result["num_invalid_predictions"] == 0.0


def test_iou_0_6_is_a_hit_and_iou_0_5_is_not():
    metric = ReferringLocalization()
    # IoU 0.6 (4-wide box shifted by 1) and IoU exactly 0.5 (3-wide box shifted by 1).
    metric.update([[1, 0, 5, 4], [1, 0, 4, 3]], [GT, [0, 0, 3, 3]])
    assert metric.compute()["precision@1"] == 50.0


def test_batches_accumulate_and_torch_tensors_are_accepted():
    metric = ReferringLocalization()
    metric.update(torch.tensor([GT]), torch.tensor([GT]))
    metric.update(np.array([[100, 100, 104, 104]]), np.array([GT]))
    metric.update([[1, 0, 5, 4]], [GT])
    result = metric.compute()
    assert result["precision@1"] == pytest.approx(200 / 3)
    assert result["num_samples"] == 3.0


def test_malformed_ground_truth_is_skipped_and_bad_prediction_is_a_miss():
    metric = ReferringLocalization()
    preds = [GT, GT, GT, [np.nan, 0, 4, 4], [4, 0, 0, 4], GT]
    gts = [GT, [np.nan, 0, 4, 4], [4, 0, 0, 4], GT, GT, [1, 1, 1, 5]]
    metric.update(preds, gts)
    result = metric.compute()
    # Scored: samples 0, 3, 4 (GT 1 is NaN, GT 2 inverted, GT 5 has no width); only 0 is a hit.
    assert result["num_samples"] == 3.0
    assert result["num_skipped"] == 3.0
    assert result["num_invalid_predictions"] == 2.0
    assert result["precision@1"] == pytest.approx(100 / 3)


def test_boxes_are_clipped_to_the_image_when_its_size_is_given():
    # Unclipped IoU is 100 / 200 = 0.5 (a miss); clipped to the 20x20 image the boxes coincide.
    pred, gt = [[-10, 0, 10, 10]], [[0, 0, 10, 10]]
    unclipped, clipped = ReferringLocalization(), ReferringLocalization()
    unclipped.update(pred, gt)
    clipped.update(pred, gt, image_sizes=[[20, 20]])
    assert unclipped.compute()["precision@1"] == 0.0
    assert clipped.compute()["precision@1"] == 100.0


def test_nothing_seen_gives_nan_and_reset_forgets():
    metric = ReferringLocalization()
    assert math.isnan(metric.compute()["precision@1"])
    metric.update([GT], [GT])
    metric.reset()
    assert metric.compute()["num_samples"] == 0.0


def test_wrong_structure_raises():
    with pytest.raises(ValueError):
        ReferringLocalization().update([GT, GT], [GT])
    with pytest.raises(ValueError):
        ReferringLocalization().update([[0, 0, 1]], [[0, 0, 1]])
