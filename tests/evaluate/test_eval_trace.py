"""Trace point L1."""

import math

import numpy as np
import pytest

from pixelllm.evaluate import TracePointL1

NAN = float("nan")


def test_points_on_the_trace_give_zero():
    gt = np.array([[[10, 10], [20, 20]], [[30, 5], [40, 5]]], dtype=float)
    metric = TracePointL1()
    metric.update([gt[:, 1]], [gt], [[True, True]], [[100, 50]])
    assert metric.compute()["point_l1"] == 0.0


def test_hand_worked_value_uses_the_mean_over_x_and_y():
    # Image 100 x 50. Sample 1: token 0 predicts (10, 10); its trace points (20, 10) and (10, 30) are
    # (0.1 + 0) / 2 = 0.05 and (0 + 0.4) / 2 = 0.2 away -> closest 0.05. Token 1 predicts (50, 25)
    # against (60, 35): (0.1 + 0.2) / 2 = 0.15. Token 2 is masked. Sample error (0.05 + 0.15) / 2 = 0.1.
    # Sample 2: one token, (0, 0) against (30, 15): (0.3 + 0.3) / 2 = 0.3. Mean over samples: 0.2.
    pred = [[[10, 10], [50, 25], [99, 0]], [[0, 0], [0, 0], [0, 0]]]
    gt = [
        [[[20, 10], [10, 30]], [[60, 35], [60, 35]], [[0, 0], [0, 0]]],
        [[[30, 15], [30, 15]], [[1, 1], [1, 1]], [[1, 1], [1, 1]]],
    ]
    metric = TracePointL1()
    metric.update(pred, gt, [[True, True, False], [True, False, False]], [[100, 50], [100, 50]])
    assert metric.compute()["point_l1"] == pytest.approx(0.2)


def test_several_predicted_points_per_token_are_averaged_and_nan_padding_is_ignored():
    # Image 10 x 10, one token: predicted points (0, 0) and (2, 0); trace points (0, 0) and padding.
    # Distances 0 and (0.2 + 0) / 2 = 0.1 -> mean 0.05.
    metric = TracePointL1()
    metric.update([[[[0, 0], [2, 0]]]], [[[[0, 0], [NAN, NAN]]]], [[True]], [[10, 10]])
    assert metric.compute()["point_l1"] == pytest.approx(0.05)


def test_unscorable_samples_are_skipped_and_bad_predictions_count_against():
    metric = TracePointL1()
    gt = [[[5, 5]]]
    metric.update(
        [[[5, 5]], [[5, 5]], [[5, 5]], [[NAN, 5]]],
        [gt, gt, [[[NAN, NAN]]], gt],
        [[False], [True], [True], [True]],
        [[10, 10], [0, 10], [10, 10], [10, 10]],
    )
    result = metric.compute()
    # Skipped: no valid token, zero image width, no finite trace point. Scored: the NaN prediction,
    # at the worst distance 1.
    assert result["num_skipped"] == 3.0
    assert result["num_samples"] == 1.0
    assert result["num_invalid_predictions"] == 1.0
    assert result["point_l1"] == 1.0


def test_nothing_seen_gives_nan_and_wrong_shapes_raise():
    metric = TracePointL1()
    assert math.isnan(metric.compute()["point_l1"])
    with pytest.raises(ValueError):
        metric.update([[[1, 1]]], [[[1, 1]]], [[True]], [[10, 10]])
