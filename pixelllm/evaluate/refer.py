"""Referring localization (REC: RefCOCO, RefCOCO+, RefCOCOg): Precision@1 at IoU > 0.5."""

from __future__ import annotations

from typing import Any

import numpy as np

from pixelllm.evaluate.base import Metric, check_same_length
from pixelllm.evaluate.boxes import as_boxes, clip_boxes, has_area, paired_box_iou, well_formed


class ReferringLocalization(Metric):
    """Precision@1: the percentage of expressions whose one predicted box has IoU **strictly**
    greater than ``iou_threshold`` (0.5) with the referred object's box.

    Output keys: ``precision@1`` (percent, 0-100) and the counts. A ground-truth box that is not
    finite or has no area is skipped; a predicted box that is not finite or is inverted counts
    as a miss (``num_invalid_predictions``).
    """

    def __init__(self, iou_threshold: float = 0.5) -> None:
        self.iou_threshold = iou_threshold
        super().__init__()

    def _clear(self) -> None:
        self._hits = 0

    def update(self, pred_boxes: Any, gt_boxes: Any, image_sizes: Any = None) -> None:
        """Add a batch of expressions.

        Args:
            pred_boxes: ``(N, 4)`` predicted boxes, original-image pixels ``[x0, y0, x1, y1]``.
            gt_boxes: ``(N, 4)`` ground-truth boxes, same frame.
            image_sizes: optional ``(N, 2)`` or ``(2,)`` original ``(W, H)``; when given, both boxes
                are clipped to the image first, as the official evaluator does.
        """
        pred, gt = as_boxes(pred_boxes), as_boxes(gt_boxes)
        check_same_length(pred_boxes=pred, gt_boxes=gt)
        pred_ok = well_formed(pred)
        if image_sizes is not None:
            pred, gt = clip_boxes(pred, image_sizes), clip_boxes(gt, image_sizes)
        gt_ok = has_area(gt)
        hits = pred_ok & (paired_box_iou(pred, gt) > self.iou_threshold)
        self._hits += int(np.sum(hits & gt_ok))
        self.counts["num_samples"] += int(gt_ok.sum())
        self.counts["num_skipped"] += int((~gt_ok).sum())
        self.counts["num_invalid_predictions"] += int((gt_ok & ~pred_ok).sum())

    def _values(self) -> dict[str, float]:
        scored = self.counts["num_samples"]
        return {"precision@1": 100.0 * self._hits / scored if scored else float("nan")}
