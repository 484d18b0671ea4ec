"""Trace point L1: how far each word's predicted point is from the human trace (Localized
Narratives), in coordinates normalized by the image size."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pixelllm.evaluate.base import Metric, as_array, check_same_length

# Penalty for a token whose predicted point is not finite: the largest distance between two
# points inside the image (the distance is the mean of |dx| and |dy|, each at most 1).
INVALID_POINT_DISTANCE = 1.0


def token_distances(pred: np.ndarray, gt: np.ndarray, gt_ok: np.ndarray) -> np.ndarray:
    """Per token: the mean over its predicted points of the distance to the closest valid ground-truth
    point, the distance being ``(|dx| + |dy|) / 2`` (the mean over x and y, as the official evaluator).

    Args:
        pred: ``(T, P, 2)`` normalized predicted points.
        gt: ``(T, G, 2)`` normalized ground-truth trace points.
        gt_ok: ``(T, G)`` bool, which ground-truth points to use.

    Returns:
        ``(T,)``; inf for a token without a valid ground-truth point.
    """
    distance = np.abs(pred[:, :, None, :] - gt[:, None, :, :]).mean(axis=-1)  # (T, P, G)
    distance = np.where(gt_ok[:, None, :], distance, np.inf)
    return distance.min(axis=-1).mean(axis=-1)


class TracePointL1(Metric):
    """``point_l1``: per sample, the mean over valid tokens of ``token_distances``; then the mean
    over samples. Coordinates are divided by the image width and height, so the value is in image
    fractions (not percent; lower is better, 0 is perfect).

    A sample is one caption with its tokens (to average several captions of one image together,
    as the official evaluator does per image, concatenate their tokens). A token is valid where
    ``token_masks`` is True and it has at least one finite ground-truth point; non-finite
    ground-truth points are ignored (so ground truth may be NaN-padded to a common G). A sample
    without a valid token or with an unusable image size is skipped. A non-finite predicted
    point on a valid token scores ``INVALID_POINT_DISTANCE`` (the sample counts as invalid).
    """

    def _clear(self) -> None:
        self._sum = 0.0

    def update(
        self,
        pred_points: Sequence[Any],
        gt_points: Sequence[Any],
        token_masks: Sequence[Any],
        image_sizes: Any,
    ) -> None:
        """Add a batch of captions (padded arrays or lists of per-caption arrays).

        Args:
            pred_points: per caption ``(T, 2)`` or ``(T, P, 2)`` predicted points ``(x, y)``,
                original-image pixels (a box's point is its center).
            gt_points: per caption ``(T, G, 2)`` ground-truth trace points of each token, same frame.
            token_masks: per caption ``(T,)`` bool, True on tokens to score.
            image_sizes: ``(B, 2)`` or ``(2,)`` original ``(W, H)``.
        """
        num = check_same_length(pred_points=pred_points, gt_points=gt_points, token_masks=token_masks)
        sizes = np.broadcast_to(as_array(image_sizes), (num, 2))
        for i in range(num):
            pred = as_array(pred_points[i])
            pred = pred[:, None, :] if pred.ndim == 2 else pred
            self._add(pred, as_array(gt_points[i]), as_array(token_masks[i], bool), sizes[i])

    def _add(self, pred: np.ndarray, gt: np.ndarray, mask: np.ndarray, size: np.ndarray) -> None:
        num_tokens = len(mask)
        shapes_ok = pred.ndim == gt.ndim == 3 and pred.shape[::2] == gt.shape[::2] == (num_tokens, 2)
        if not shapes_ok:
            raise ValueError(f"points must be (T, P, 2) and (T, G, 2) with T = {num_tokens}")
        gt_ok = np.isfinite(gt).all(axis=-1)
        valid = mask & gt_ok.any(axis=-1)
        if not (valid.any() and np.isfinite(size).all() and (size > 0).all()):
            self.counts["num_skipped"] += 1
            return
        pred_ok = np.isfinite(pred).all(axis=(1, 2))
        distance = token_distances(pred / size, gt / size, gt_ok)
        distance = np.where(pred_ok, distance, INVALID_POINT_DISTANCE)
        self.counts["num_invalid_predictions"] += int((valid & ~pred_ok).any())
        self.counts["num_samples"] += 1
        self._sum += float(distance[valid].mean())

    def _values(self) -> dict[str, float]:
        scored = self.counts["num_samples"]
        return {"point_l1": self._sum / scored if scored else float("nan")}
