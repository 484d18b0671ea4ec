"""Dense captioning mAP (Visual Genome) by the densecap protocol of Johnson et al., as the official
PixelLLM evaluator implements it, plus detection-only mAP.

Per image: ground-truth regions overlapping at IoU >= 0.7 are merged (mean box, pooled captions);
predictions, best score first, each take their best-IoU merged region, which counts only if
that region is still unused. Over the whole split the predictions are ranked by score and an AP
(100-point interpolation) is computed for every IoU threshold in {0.3, 0.4, 0.5, 0.6, 0.7} and
METEOR threshold in {0, 0.05, 0.1, 0.15, 0.2, 0.25}: a prediction is a true positive when it took
a region, its IoU is >= the IoU threshold, and the METEOR of its caption against the region's
pooled captions is > the METEOR threshold. ``mAP`` is the mean of the 30 APs; ``mAP_detection``
drops the METEOR condition (mean of 5 APs).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from pixelllm.evaluate.base import Metric, as_array, check_same_length
from pixelllm.evaluate.boxes import as_boxes, box_iou, clip_boxes, has_area, well_formed
from pixelllm.evaluate.captions import MeteorScorer

IOU_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
METEOR_THRESHOLDS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25)
MERGE_IOU = 0.7
# The official evaluator accumulates in float32 (recall is compared with k/100 in float32);
# doing the same keeps ties at a recall threshold identical.
_RECALL_THRESHOLDS = (np.arange(100) / 100).astype(np.float32)


class PairScorer(Protocol):
    """What the metric needs from a METEOR scorer (``MeteorScorer`` is one)."""

    def pair_scores(self, hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
        """METEOR in [0, 1] of each hypothesis against its references."""
        ...


@dataclass(frozen=True)
class _Detection:
    """One prediction after matching: ``references`` are the pooled captions of the region it took
    (empty when it took none)."""

    score: float
    iou: float
    caption: str
    references: tuple[str, ...]

    @property
    def matched(self) -> bool:
        return bool(self.references)


def merge_regions(
    boxes: np.ndarray, captions: Sequence[str], iou_threshold: float = MERGE_IOU
) -> tuple[np.ndarray, list[tuple[str, ...]]]:
    """Merge overlapping ground-truth regions as densecap does.

    Repeatedly take the region that overlaps (IoU >= ``iou_threshold``, itself included) the most
    regions still unmerged; those regions become one: their mean box and all their captions.

    Args:
        boxes: ``(G, 4)`` boxes with positive area, ``[x0, y0, x1, y1]``.
        captions: G captions.

    Returns:
        ``(K, 4)`` merged boxes and K tuples of pooled captions.
    """
    links = box_iou(boxes, boxes) >= iou_threshold
    remaining = np.ones(len(boxes), dtype=bool)
    merged_boxes, merged_captions = [], []
    while remaining.any():
        live = links & remaining[:, None] & remaining[None, :]
        members = np.flatnonzero(live[np.argmax(live.sum(axis=1))])
        merged_boxes.append(boxes[members].mean(axis=0))
        merged_captions.append(tuple(captions[i] for i in members))
        remaining[members] = False
    return np.array(merged_boxes).reshape(-1, 4), merged_captions


def interpolated_ap(true_positive: np.ndarray, num_positives: int) -> float:
    """Average of the best precision at recall >= k/100, k = 0..99 (0 where that recall is never
    reached), for predictions already ranked best first.

    Args:
        true_positive: ``(P,)`` bool, one entry per ranked prediction.
        num_positives: number of ground-truth regions, > 0.
    """
    if not len(true_positive):
        return 0.0
    tp = np.cumsum(true_positive, dtype=np.float32)
    ranks = np.arange(1, len(tp) + 1, dtype=np.float32)
    recall = tp / np.float32(num_positives)
    best_precision_after = np.maximum.accumulate((tp / ranks)[::-1])[::-1]
    first = np.searchsorted(recall, _RECALL_THRESHOLDS, side="left")
    reached = first < len(tp)
    return float(np.where(reached, best_precision_after[np.minimum(first, len(tp) - 1)], 0.0).mean())


class DenseCaptioning(Metric):
    """Dense captioning mAP and detection mAP (percent, 0-100; the paper's 17.5 on VG).

    Ground-truth regions whose box is not finite or has no area, or whose caption is not a string,
    are dropped (``num_skipped_regions``); an image that had regions but none usable is skipped.
    As in the official evaluator, newlines are deleted from ground-truth captions and a region with
    an empty caption stays: a prediction that takes it counts as a caption match (METEOR 1).

    Predictions with a non-finite or inverted box, a non-finite score, or a caption that is not a
    string are counted as invalid: a bad box is a false positive at its score, a bad score ranks
    last, a bad caption is scored as the empty caption.
    """

    def __init__(self, meteor: PairScorer | None = None, merge_iou: float = MERGE_IOU) -> None:
        """``meteor``: a shared scorer; without one, ``compute`` starts and closes a ``MeteorScorer``."""
        self.meteor = meteor
        self.merge_iou = merge_iou
        super().__init__()

    def _clear(self) -> None:
        self._detections: list[_Detection] = []
        self._num_positives = 0
        for name in ("num_predictions", "num_gt_regions", "num_skipped_regions"):
            self.counts[name] = 0

    def update(
        self,
        pred_boxes: Sequence[Any],
        pred_scores: Sequence[Any],
        pred_captions: Sequence[Sequence[str]],
        gt_boxes: Sequence[Any],
        gt_captions: Sequence[Sequence[str]],
        image_sizes: Any = None,
    ) -> None:
        """Add a batch of images; entry i of each argument belongs to image i.

        Args:
            pred_boxes: per image ``(P_i, 4)``, original-image pixels ``[x0, y0, x1, y1]``.
            pred_scores: per image ``(P_i,)``, higher is more confident.
            pred_captions: per image P_i captions.
            gt_boxes: per image ``(G_i, 4)``, same frame.
            gt_captions: per image G_i captions.
            image_sizes: optional ``(B, 2)`` or ``(2,)`` original ``(W, H)``; when given, predicted boxes are
                clipped to the image first, as the official evaluator does.
        """
        num = check_same_length(
            pred_boxes=pred_boxes,
            pred_scores=pred_scores,
            pred_captions=pred_captions,
            gt_boxes=gt_boxes,
            gt_captions=gt_captions,
        )
        sizes = [None] * num if image_sizes is None else np.broadcast_to(as_array(image_sizes), (num, 2))
        for i in range(num):
            regions = self._ground_truth(as_boxes(gt_boxes[i]), gt_captions[i])
            if regions is None:
                self.counts["num_skipped"] += 1
                continue
            self.counts["num_samples"] += 1
            self._match_image(pred_boxes[i], pred_scores[i], pred_captions[i], *regions, sizes[i])

    def _ground_truth(
        self, boxes: np.ndarray, captions: Sequence[str]
    ) -> tuple[np.ndarray, list[tuple[str, ...]]] | None:
        """The merged regions of one image, or None when it had regions but none usable."""
        check_same_length(gt_boxes=boxes, gt_captions=captions)
        usable = has_area(boxes) & np.array([isinstance(text, str) for text in captions], dtype=bool)
        self.counts["num_skipped_regions"] += int((~usable).sum())
        if len(boxes) and not usable.any():
            return None
        kept_captions = [text.replace("\n", "") for text, ok in zip(captions, usable, strict=True) if ok]
        merged_boxes, merged_captions = merge_regions(boxes[usable], kept_captions, self.merge_iou)
        self._num_positives += len(merged_boxes)
        self.counts["num_gt_regions"] += len(merged_boxes)
        return merged_boxes, merged_captions

    def _match_image(self, boxes, scores, captions, gt_boxes, gt_captions, image_size) -> None:
        """Match one image's predictions, best score first, each to its best-IoU region if unused."""
        boxes, scores = as_boxes(boxes), as_array(scores).reshape(-1)
        check_same_length(pred_boxes=boxes, pred_scores=scores, pred_captions=captions)
        box_ok, score_ok = well_formed(boxes), np.isfinite(scores)
        caption_ok = np.array([isinstance(text, str) for text in captions], dtype=bool)
        self.counts["num_invalid_predictions"] += int((~(box_ok & score_ok & caption_ok)).sum())
        self.counts["num_predictions"] += len(boxes)
        if image_size is not None:
            boxes = clip_boxes(boxes, image_size)
        ious = np.where(box_ok[:, None], box_iou(boxes, gt_boxes), 0.0)
        scores = np.where(score_ok, scores, -np.inf)
        used = np.zeros(len(gt_boxes), dtype=bool)
        for p in np.argsort(-scores, kind="stable"):
            best = int(np.argmax(ious[p])) if len(gt_boxes) else -1
            iou = float(ious[p, best]) if best >= 0 else 0.0
            takes = iou > 0 and not used[best]
            if takes:
                used[best] = True
            caption = captions[p] if caption_ok[p] else ""
            references = gt_captions[best] if takes else ()
            self._detections.append(_Detection(float(scores[p]), iou, caption, references))

    def _meteor_scores(self, detections: list[_Detection]) -> np.ndarray:
        """METEOR of each matched detection (0 for the others); a region with an empty caption
        accepts any caption (official behaviour)."""
        scores = np.zeros(len(detections))
        open_regions = [i for i, d in enumerate(detections) if d.matched and "" in d.references]
        scores[open_regions] = 1.0
        to_score = [i for i, d in enumerate(detections) if d.matched and "" not in d.references]
        if to_score:
            with ExitStack() as stack:
                meteor = self.meteor or stack.enter_context(MeteorScorer())
                hypotheses = [detections[i].caption for i in to_score]
                references = [detections[i].references for i in to_score]
                scores[to_score] = meteor.pair_scores(hypotheses, references)
        return scores

    def _values(self) -> dict[str, float]:
        positives = self._num_positives
        ranked = sorted(self._detections, key=lambda d: -d.score)
        matched = np.array([d.matched for d in ranked], dtype=bool)
        ious = np.array([d.iou for d in ranked])
        meteor = self._meteor_scores(ranked) if positives else np.zeros(len(ranked))

        def ap(hit: np.ndarray) -> float:
            return interpolated_ap(hit, positives) if positives else float("nan")

        captioning, detection = {}, {}
        for iou_threshold in IOU_THRESHOLDS:
            hit = matched & (ious >= iou_threshold)
            detection[f"mAP_detection_iou{iou_threshold:.1f}"] = ap(hit)
            for meteor_threshold in METEOR_THRESHOLDS:
                key = f"mAP_iou{iou_threshold:.1f}_meteor{meteor_threshold:.2f}"
                captioning[key] = ap(hit & (meteor > meteor_threshold))
        values = {
            "mAP": float(np.mean(list(captioning.values()))),
            "mAP_detection": float(np.mean(list(detection.values()))),
            **captioning,
            **detection,
        }
        return {name: 100.0 * value for name, value in values.items()}
