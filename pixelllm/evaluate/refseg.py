"""Referring segmentation: cIoU and gIoU, one target per expression (RefCOCO) or several per
question with Hungarian matching (PixelLM's MUSE), and the MUSE target counts.

Masks are ``(H, W)`` in original-image pixels: bool (or 0/1) numpy arrays or torch tensors, or
COCO RLE dicts (``{"size": [H, W], "counts": ...}``, compressed or not).
"""

from __future__ import annotations

import itertools
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


MATCHINGS = ("iou", "official")
OFFICIAL_POINTS = 12544
"""Points PixelLM's ``match_pred`` samples per question (112 x 112)."""
BINARY_LOGIT = 5.0
"""The logit given to a binary mask's pixels in the official cost: +5 inside, -5 outside."""
OFFICIAL_EPS = 1e-5
"""PixelLM adds it to each pair's union (``I / (U + 1e-5)``)."""


def sample_points(values: np.ndarray, shape: tuple[int, int], points: np.ndarray) -> np.ndarray:
    """Bilinear samples of ``(N, H*W)`` maps of ``shape`` ``(H, W)`` at ``(K, 2)`` points ``(x, y)``
    in [0, 1] of the image, as ``torch.nn.functional.grid_sample(align_corners=False)`` with zero
    padding reads them: point ``u`` is at pixel coordinate ``u * W - 0.5``. Returns ``(N, K)``."""
    height, width = shape
    x, y = points[:, 0] * width - 0.5, points[:, 1] * height - 0.5
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    samples = np.zeros((len(values), len(points)))
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        cx, cy = x0 + dx, y0 + dy
        weight = (1 - np.abs(x - cx)) * (1 - np.abs(y - cy))
        inside = (cx >= 0) & (cx < width) & (cy >= 0) & (cy < height)
        index = np.where(inside, cy * width + cx, 0)
        samples += values[:, index] * np.where(inside, weight, 0.0)
    return samples


def official_cost(pred_logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """PixelLM's matching cost ``(P, G)`` from point samples ``(P, K)`` of predicted logits and
    ``(G, K)`` of target masks: sigmoid cross-entropy averaged over the points plus Dice with +1
    smoothing, ``1 - (2 p.t + 1) / (sum p + sum t + 1)`` (``utils/matcher.py``, weights 1:1)."""
    positive, negative = np.logaddexp(0.0, -pred_logits), np.logaddexp(0.0, pred_logits)
    cross_entropy = (positive @ targets.T + negative @ (1.0 - targets).T) / pred_logits.shape[1]
    probabilities = 1.0 / (1.0 + np.exp(-pred_logits))
    dice = 1.0 - (2.0 * probabilities @ targets.T + 1.0) / (
        probabilities.sum(axis=1)[:, None] + targets.sum(axis=1)[None, :] + 1.0
    )
    return cross_entropy + dice


class MultiTargetSegmentation(Metric):
    """cIoU and gIoU over (prediction, target) mask pairs made by Hungarian matching per question.

    Per question the predicted and the ground-truth masks are matched one-to-one
    (``scipy.optimize.linear_sum_assignment``). Every matched pair is one pair; every unmatched
    prediction is paired with an empty target and every unmatched target with an empty
    prediction, so both count against (intersection 0, union = the mask's area). A question may
    have no target (``gt_masks[i] == []``): its predictions are all unmatched. Over the split:

    - ``cIoU`` = sum of intersections / sum of unions (percent), in both modes;
    - ``matching="iou"`` (default, deterministic): pairs maximize the summed IoU of the binary
      masks; ``gIoU`` = mean of the per-pair IoU (percent). Empty predicted masks are dropped
      (they predict nothing);
    - ``matching="official"`` (PixelLM's ``ar_validate``): pairs minimize sigmoid cross-entropy +
      Dice on ``OFFICIAL_POINTS`` points drawn with ``seed`` (the same points for every question;
      a binary prediction counts as logits +-``BINARY_LOGIT``); a pair's IoU is
      ``I / (U + 1e-5)``, and 1 where ``U = 0`` (an empty prediction left unmatched); empty
      predictions are kept; ``gIoU`` = summed pair IoU / the sum over images of
      max(#predicted, #target masks) of the image (``image_ids`` groups questions into images;
      without them each question is its own image, which makes the denominator the pairs').

    Ground-truth masks that are unreadable or empty are dropped (``num_skipped_targets``); a
    question that had targets and is left with none is skipped (``num_skipped``). Predicted masks
    that are unreadable or of another shape than the targets (than each other, without targets)
    are dropped and counted as invalid.
    """

    def __init__(self, matching: str = "iou", seed: int = 0) -> None:
        if matching not in MATCHINGS:
            raise ValueError(f"matching must be one of {MATCHINGS}, got {matching!r}")
        self.matching = matching
        self.points = np.random.default_rng(seed).random((OFFICIAL_POINTS, 2))
        super().__init__()

    def _clear(self) -> None:
        self._intersection = 0
        self._union = 0
        self._iou_sum = 0.0
        self._num_pairs = 0
        self._image_masks: dict = {}  # image id -> [predicted, target] mask counts (official gIoU)
        self._questions = itertools.count()  # the image ids of questions fed without one
        for name in ("num_skipped_targets", "num_unmatched_predictions", "num_unmatched_targets"):
            self.counts[name] = 0

    def update(
        self,
        pred_masks: Sequence[Sequence[Any]],
        gt_masks: Sequence[Sequence[Any]],
        image_ids: Sequence[Any] | None = None,
    ) -> None:
        """Add a batch of questions: for each, a list of predicted and a list of target masks, and
        (official gIoU) the id of its image."""
        images = list(image_ids) if image_ids is not None else [("question", next(self._questions)) for _ in pred_masks]
        check_same_length(pred_masks=pred_masks, gt_masks=gt_masks, image_ids=images)
        for preds, targets, image in zip(pred_masks, gt_masks, images, strict=True):
            self._add_question(preds, targets, image)

    def _readable_targets(self, gt_masks: Sequence[Any]) -> list[np.ndarray]:
        usable = [mask for mask in map(as_mask, gt_masks) if mask is not None and mask.any()]
        targets = [mask for mask in usable if mask.shape == usable[0].shape]
        self.counts["num_skipped_targets"] += len(gt_masks) - len(targets)
        return targets

    def _readable_predictions(self, pred_masks: Sequence[Any], shape: tuple[int, ...] | None) -> list[np.ndarray]:
        """The predictions of ``shape`` (the first readable one's without targets); empty ones only in
        official mode."""
        decoded = [mask for mask in map(as_mask, pred_masks) if mask is not None]
        shape = shape or (decoded[0].shape if decoded else None)
        readable = [mask for mask in decoded if mask.shape == shape]
        self.counts["num_invalid_predictions"] += len(pred_masks) - len(readable)
        return readable if self.matching == "official" else [mask for mask in readable if mask.any()]

    def _add_question(self, pred_masks: Sequence[Any], gt_masks: Sequence[Any], image: Any) -> None:
        targets = self._readable_targets(gt_masks)
        if gt_masks and not targets:
            self.counts["num_skipped"] += 1
            return
        preds = self._readable_predictions(pred_masks, targets[0].shape if targets else None)
        self.counts["num_samples"] += 1
        counted = self._image_masks.setdefault(image, [0, 0])
        counted[0] += len(preds)
        counted[1] += len(targets)
        if not (preds or targets):
            return
        shape = (targets or preds)[0].shape
        num_pixels = int(np.prod(shape))
        intersection, union = self._matched_pairs(_flatten(preds, num_pixels), _flatten(targets, num_pixels), shape)
        self._intersection += int(intersection.sum())
        self._union += int(union.sum())
        self._iou_sum += float(self._pair_iou(intersection, union).sum())
        self._num_pairs += len(union)

    def _pair_iou(self, intersection: np.ndarray, union: np.ndarray) -> np.ndarray:
        """Each pair's IoU: ``I / U`` (``iou``; U is never 0), or PixelLM's (``official``)."""
        if self.matching == "iou":
            return intersection / union
        return intersection / (union + OFFICIAL_EPS) + (union == 0)

    def _assign(self, preds: np.ndarray, targets: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Matched (prediction, target) index arrays for ``(P, HW)`` and ``(G, HW)`` masks."""
        if self.matching == "iou":
            intersection = preds @ targets.T
            union = preds.sum(axis=1)[:, None] + targets.sum(axis=1)[None, :] - intersection
            return linear_sum_assignment(intersection / union, maximize=True)
        logits = sample_points(BINARY_LOGIT * (2.0 * preds - 1.0), shape, self.points)
        return linear_sum_assignment(official_cost(logits, sample_points(targets, shape, self.points)))

    def _matched_pairs(
        self, preds: np.ndarray, targets: np.ndarray, shape: tuple[int, ...]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Intersection and union of every pair after matching ``(P, HW)`` with ``(G, HW)``.

        Returns two ``(max(P, G),)`` arrays: the matched pairs, then each unmatched mask against
        an empty one (intersection 0, union = its area).
        """
        rows, cols = self._assign(preds, targets, shape)
        pred_area, gt_area = preds.sum(axis=1), targets.sum(axis=1)
        matched = (preds[rows] * targets[cols]).sum(axis=1)
        unmatched_area = np.concatenate([np.delete(pred_area, rows), np.delete(gt_area, cols)])
        self.counts["num_unmatched_predictions"] += len(preds) - len(rows)
        self.counts["num_unmatched_targets"] += len(targets) - len(cols)
        return (
            np.concatenate([matched, np.zeros_like(unmatched_area)]),
            np.concatenate([pred_area[rows] + gt_area[cols] - matched, unmatched_area]),
        )

    def _values(self) -> dict[str, float]:
        if not self._num_pairs:
            return {"cIoU": float("nan"), "gIoU": float("nan")}
        denominator = (sum(max(counts) for counts in self._image_masks.values())
                       if self.matching == "official" else self._num_pairs)
        return {
            "cIoU": 100.0 * self._intersection / self._union if self._union else float("nan"),
            "gIoU": 100.0 * self._iou_sum / denominator,
        }


class TargetCounts(Metric):
    """Whether a model answers each question with as many masks as it has targets.

    ``update(pred_counts, gt_counts)``: per question the number of masks answered (every segment
    the model gave, empty or not) and of targets. ``count_accuracy``: percent of questions with
    exactly the number of targets; ``no_target_accuracy``: percent of the questions without a
    target answered with no mask (NaN when there is none; ``num_no_target_questions``).
    """

    def _clear(self) -> None:
        self._exact = 0
        self._no_target_right = 0
        self.counts["num_no_target_questions"] = 0

    def update(self, pred_counts: Sequence[int], gt_counts: Sequence[int]) -> None:
        """Add a batch of questions' predicted and target counts."""
        check_same_length(pred_counts=pred_counts, gt_counts=gt_counts)
        for predicted, expected in zip(pred_counts, gt_counts, strict=True):
            self.counts["num_samples"] += 1
            self._exact += int(predicted == expected)
            if expected == 0:
                self.counts["num_no_target_questions"] += 1
                self._no_target_right += int(predicted == 0)

    def _values(self) -> dict[str, float]:
        questions, no_target = self.counts["num_samples"], self.counts["num_no_target_questions"]
        return {
            "count_accuracy": 100.0 * self._exact / questions if questions else float("nan"),
            "no_target_accuracy": 100.0 * self._no_target_right / no_target if no_target else float("nan"),
        }


class ReferringSegmentation(MultiTargetSegmentation):
    """cIoU and gIoU with one predicted and one target mask per expression (RefCOCO/+/g).

    The single-target case of ``MultiTargetSegmentation``: an empty or unreadable prediction
    scores IoU 0 with union = the target's area, exactly as a pixel-wise IoU would.
    """

    def update(self, pred_masks: Sequence[Any], gt_masks: Sequence[Any]) -> None:  # type: ignore[override]
        """Add a batch of expressions: ``pred_masks[i]`` and ``gt_masks[i]`` are ``(H, W)`` masks."""
        super().update([[mask] for mask in pred_masks], [[mask] for mask in gt_masks])
