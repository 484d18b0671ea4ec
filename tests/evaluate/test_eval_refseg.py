"""cIoU and gIoU, single target (RefCOCO) and Hungarian-matched multi-target (MUSE)."""

import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from pixelllm.evaluate import MultiTargetSegmentation, ReferringSegmentation


def region(shape, rows, cols):
    """A bool mask with ``mask[rows, cols] = True`` (slices)."""
    mask = np.zeros(shape, dtype=bool)
    mask[rows, cols] = True
    return mask


def strip(start, stop, length=20):
    """A 1 x length mask covering columns [start, stop)."""
    return region((1, length), slice(None), slice(start, stop))


def test_perfect_masks_give_100():
    metric = ReferringSegmentation()
    masks = [region((8, 8), slice(1, 5), slice(2, 7)), region((5, 9), slice(0, 5), slice(0, 1))]
    metric.update(masks, masks)
    result = metric.compute()
    assert result["cIoU"] == result["gIoU"] == 100.0
    assert result["num_samples"] == 2.0


def test_ciou_and_giou_differ_for_a_big_good_and_a_small_bad_object():
    # Big object: 30x30 = 900 pixels, predicted exactly. Small object: 2x2 = 4 pixels, predicted
    # 4 pixels elsewhere (intersection 0, union 8).
    big = region((40, 40), slice(0, 30), slice(0, 30))
    small_gt = region((40, 40), slice(35, 37), slice(35, 37))
    small_pred = region((40, 40), slice(37, 39), slice(37, 39))
    metric = ReferringSegmentation()
    metric.update([big, small_pred], [big, small_gt])
    result = metric.compute()
    assert result["cIoU"] == pytest.approx(100 * 900 / 908)
    assert result["gIoU"] == pytest.approx(100 * (1.0 + 0.0) / 2)


def test_rle_and_tensor_masks_read_like_bool_arrays():
    gt = region((6, 7), slice(1, 4), slice(2, 6))  # 12 pixels
    pred = region((6, 7), slice(2, 5), slice(2, 6))  # 12 pixels, 8 shared -> IoU 8 / 16
    compressed = mask_utils.encode(np.asfortranarray(pred.astype(np.uint8)))
    as_text = {"size": compressed["size"], "counts": compressed["counts"].decode()}
    for form in (compressed, as_text, torch.from_numpy(pred), pred.astype(np.uint8)):
        metric = ReferringSegmentation()
        metric.update([form], [mask_utils.encode(np.asfortranarray(gt.astype(np.uint8)))])
        assert metric.compute()["gIoU"] == pytest.approx(50.0)


def test_empty_prediction_scores_zero_with_the_target_as_union():
    gt = region((4, 4), slice(0, 2), slice(0, 2))
    other = region((4, 4), slice(0, 4), slice(0, 4))
    metric = ReferringSegmentation()
    metric.update([np.zeros((4, 4), bool), other], [gt, other])
    result = metric.compute()
    # Pairs: (I 0, U 4) and (I 16, U 16).
    assert result["cIoU"] == pytest.approx(100 * 16 / 20)
    assert result["gIoU"] == pytest.approx(50.0)
    assert result["num_invalid_predictions"] == 0.0


def test_malformed_targets_are_skipped_and_malformed_predictions_count_against():
    gt = region((4, 4), slice(0, 2), slice(0, 2))
    metric = ReferringSegmentation()
    preds = [gt, gt, gt, np.ones((5, 5), bool), {"size": [4, 4]}, gt]
    gts = [np.zeros((4, 4), bool), np.full((4, 4), 0.3), np.ones(4, bool), gt, gt, gt]
    metric.update(preds, gts)
    result = metric.compute()
    # Targets 0-2 are empty, not binary, not 2-D; predictions 3 (wrong shape) and 4 (broken RLE)
    # are invalid and score IoU 0; prediction 5 is perfect.
    assert result["num_skipped"] == 3.0
    assert result["num_samples"] == 3.0
    assert result["num_invalid_predictions"] == 2.0
    assert result["gIoU"] == pytest.approx(100 / 3)
    assert result["cIoU"] == pytest.approx(100 * 4 / 12)


def test_multi_target_extra_prediction_counts_against():
    # Targets A (columns 0-9) and B (10-19). Predictions: exactly B, the first half of A
    # (IoU 0.5 with A), and a mask overlapping neither target (columns 20-24 of a wider strip).
    length = 25
    target_a, target_b = strip(0, 10, length), strip(10, 20, length)
    preds = [strip(10, 20, length), strip(0, 5, length), strip(20, 25, length)]
    metric = MultiTargetSegmentation()
    metric.update([preds], [[target_a, target_b]])
    result = metric.compute()
    # Pairs: (B, B) I 10 U 10; (half A, A) I 5 U 10; (extra, none) I 0 U 5.
    assert result["gIoU"] == pytest.approx(100 * (1.0 + 0.5 + 0.0) / 3)
    assert result["cIoU"] == pytest.approx(100 * 15 / 25)
    assert result["num_unmatched_predictions"] == 1.0
    assert result["num_unmatched_targets"] == 0.0


def test_multi_target_matching_is_optimal_not_greedy():
    # A = [0, 10), B = [10, 20); P0 = [0, 14), P1 = [4, 10).
    # IoU(P0, A) = 10/14, IoU(P0, B) = 4/20, IoU(P1, A) = 6/10, IoU(P1, B) = 0.
    # Greedy would pair P0-A (0.714) then P1-B (0): sum 0.714. Optimal: P0-B + P1-A = 0.8.
    metric = MultiTargetSegmentation()
    metric.update([[strip(0, 14), strip(4, 10)]], [[strip(0, 10), strip(10, 20)]])
    result = metric.compute()
    assert result["gIoU"] == pytest.approx(100 * (4 / 20 + 6 / 10) / 2)
    assert result["cIoU"] == pytest.approx(100 * (4 + 6) / (20 + 10))


def test_multi_target_missing_predictions_and_skipped_questions():
    metric = MultiTargetSegmentation()
    a, b = strip(0, 4), strip(8, 10)
    metric.update(
        [[], [a], [a]],
        [[a, b], [np.zeros((1, 20), bool)], [a, strip(0, 3, length=30)]],
    )
    result = metric.compute()
    # Question 0: two unmatched targets (U 4 and 2). Question 1: no usable target, skipped.
    # Question 2: a perfect pair; its second target has another shape and is dropped.
    assert result["num_samples"] == 2.0
    assert result["num_skipped"] == 1.0
    assert result["num_skipped_targets"] == 2.0
    assert result["num_unmatched_targets"] == 2.0
    assert result["gIoU"] == pytest.approx(100 / 3)
    assert result["cIoU"] == pytest.approx(100 * 4 / 10)


def test_empty_predicted_masks_are_not_extra_predictions():
    metric = MultiTargetSegmentation()
    a = strip(0, 4)
    metric.update([[a, np.zeros((1, 20), bool)]], [[a]])
    assert metric.compute()["gIoU"] == 100.0


def test_nothing_seen_gives_nan():
    assert math.isnan(MultiTargetSegmentation().compute()["cIoU"])
