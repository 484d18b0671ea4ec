"""Referring segmentation: cIoU and gIoU, one target per expression (RefCOCO) or several per
question with Hungarian matching (PixelLM's MUSE).

Masks are ``(H, W)`` in original-image pixels: bool (or 0/1) numpy arrays or torch tensors, or
COCO RLE dicts (``{"size": [H, W], "counts": ...}``, compressed or not).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from scipy.optimize import linear_sum_assignment

from pixelllm.evaluate.base import Metric, as_array, check_same_length


def _decode_rle(rle: dict) -> np.ndarray:
    height, width = rle["size"]
    if isinstance(rle["counts"], list):
        rle = mask_utils.frPyObjects(rle, height, width)
    elif isinstance(rle["counts"], str):
        rle = {"size": rle["size"], "counts": rle["counts"].encode()}
    return mask_utils.decode(rle)


def as_mask(mask: Any) -> np.ndarray | None:
    """A bool ``(H, W)`` array, or None when ``mask`` is not a readable binary 2-D mask."""
    try:
        array = _decode_rle(mask) if isinstance(mask, dict) else as_array(mask, dtype=None)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    if array.ndim != 2 or (array.dtype != bool and not np.isin(array, (0, 1)).all()):
        return None
    return array.astype(bool)


def _flatten(masks: list[np.ndarray], num_pixels: int) -> np.ndarray:
    """``(N, H*W)`` float64, so a matrix product counts pixels exactly; N may be 0."""
    return np.array(masks, dtype=np.float64).reshape(len(masks), num_pixels)


class MultiTargetSegmentation(Metric):
    """cIoU and gIoU over (prediction, target) mask pairs made by Hungarian matching per question.

    Per question the predicted masks and the ground-truth masks are matched one-to-one to maximize
    the summed IoU (``scipy.optimize.linear_sum_assignment``). Every matched pair is one pair; every
    unmatched prediction is paired with an empty target and every unmatched target with an empty
    prediction, so both count against (intersection 0, union = the mask's area). Over all pairs
    of the split:

    - ``cIoU`` = sum of intersections / sum of unions (percent);
    - ``gIoU`` = mean of the per-pair IoU (percent).

    Ground-truth masks that are unreadable or empty are dropped (``num_skipped_targets``); a
    question left with none is skipped (``num_skipped``), so a union is never empty. Predicted masks
    that are unreadable or of another shape than the targets are dropped and counted as invalid;
    empty predicted masks are dropped too (they predict nothing).
    """

    def _clear(self) -> None:
        self._intersection = 0
        self._union = 0
        self._iou_sum = 0.0
        self._num_pairs = 0
        for name in ("num_skipped_targets", "num_unmatched_predictions", "num_unmatched_targets"):
            self.counts[name] = 0

    def update(self, pred_masks: Sequence[Sequence[Any]], gt_masks: Sequence[Sequence[Any]]) -> None:
        """Add a batch of questions: for each, a list of predicted and a list of target masks."""
        check_same_length(pred_masks=pred_masks, gt_masks=gt_masks)
        for preds, targets in zip(pred_masks, gt_masks, strict=True):
            self._add_question(preds, targets)

    def _readable_targets(self, gt_masks: Sequence[Any]) -> list[np.ndarray]:
        usable = [mask for mask in map(as_mask, gt_masks) if mask is not None and mask.any()]
        targets = [mask for mask in usable if mask.shape == usable[0].shape]
        self.counts["num_skipped_targets"] += len(gt_masks) - len(targets)
        return targets

    def _readable_predictions(self, pred_masks: Sequence[Any], shape: tuple[int, ...]) -> list[np.ndarray]:
        decoded = [as_mask(mask) for mask in pred_masks]
        readable = [mask for mask in decoded if mask is not None and mask.shape == shape]
        self.counts["num_invalid_predictions"] += len(decoded) - len(readable)
        return [mask for mask in readable if mask.any()]

    def _add_question(self, pred_masks: Sequence[Any], gt_masks: Sequence[Any]) -> None:
        targets = self._readable_targets(gt_masks)
        if not targets:
            self.counts["num_skipped"] += 1
            return
        preds = self._readable_predictions(pred_masks, targets[0].shape)
        self.counts["num_samples"] += 1
        num_pixels = targets[0].size
        intersection, union = self._matched_pairs(_flatten(preds, num_pixels), _flatten(targets, num_pixels))
        self._intersection += int(intersection.sum())
        self._union += int(union.sum())
        self._iou_sum += float((intersection / union).sum())
        self._num_pairs += len(union)

    def _matched_pairs(self, preds: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Intersection and union of every pair after matching ``(P, HW)`` with ``(G, HW)``.

        Returns two ``(max(P, G),)`` arrays: the matched pairs, then each unmatched mask against
        an empty one (intersection 0, union = its area).
        """
        pred_area, gt_area = preds.sum(axis=1), targets.sum(axis=1)
        intersection = preds @ targets.T
        union = pred_area[:, None] + gt_area[None, :] - intersection
        rows, cols = linear_sum_assignment(intersection / union, maximize=True)
        unmatched_area = np.concatenate([np.delete(pred_area, rows), np.delete(gt_area, cols)])
        self.counts["num_unmatched_predictions"] += len(preds) - len(rows)
        self.counts["num_unmatched_targets"] += len(targets) - len(cols)
        return (
            np.concatenate([intersection[rows, cols], np.zeros_like(unmatched_area)]),
            np.concatenate([union[rows, cols], unmatched_area]),
        )

    def _values(self) -> dict[str, float]:
        if not self._num_pairs:
            return {"cIoU": float("nan"), "gIoU": float("nan")}
        return {
            "cIoU": 100.0 * self._intersection / self._union,
            "gIoU": 100.0 * self._iou_sum / self._num_pairs,
        }


class ReferringSegmentation(MultiTargetSegmentation):
    """cIoU and gIoU with one predicted and one target mask per expression (RefCOCO/+/g).

    The single-target case of ``MultiTargetSegmentation``: an empty or unreadable prediction
    scores IoU 0 with union = the target's area, exactly as a pixel-wise IoU would.
    """

    def update(self, pred_masks: Sequence[Any], gt_masks: Sequence[Any]) -> None:  # type: ignore[override]
        """Add a batch of expressions: ``pred_masks[i]`` and ``gt_masks[i]`` are ``(H, W)`` masks."""
        super().update([[mask] for mask in pred_masks], [[mask] for mask in gt_masks])
