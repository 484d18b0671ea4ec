"""Box arithmetic in canvas pixels, ``[x0, y0, x1, y1]``: areas, IoU, GIoU, clipping, NMS (no torchvision)."""

from __future__ import annotations

import torch

_EPS = 1e-6


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` boxes -> ``(...)`` areas (0 for empty boxes)."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def _intersection_union(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Intersection and union areas of boxes that broadcast against each other."""
    wh = (torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter, box_area(a) + box_area(b) - inter


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU: ``(N, 4)`` and ``(M, 4)`` -> ``(N, M)``."""
    return elementwise_box_iou(a[:, None], b[None])


def elementwise_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise IoU of broadcastable ``(..., 4)`` boxes."""
    inter, union = _intersection_union(a, b)
    return inter / (union + _EPS)


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise GIoU of ``(..., 4)`` boxes: IoU minus the enclosing box's share not in the union."""
    inter, union = _intersection_union(a, b)
    enclosing = box_area(torch.cat([torch.minimum(a[..., :2], b[..., :2]), torch.maximum(a[..., 2:], b[..., 2:])], -1))
    return inter / (union + _EPS) - (enclosing - union) / (enclosing + _EPS)


def clip_boxes(boxes: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Clip ``(N, 4)`` boxes to the image ``(0, 0, width, height)``; ``size (2,)`` is ``(width, height)``."""
    upper = size.to(boxes).repeat(2)
    return torch.minimum(boxes.clamp(min=0), upper)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy class-agnostic non-maximum suppression, without torchvision.

    A box is kept unless a kept box with a higher score (ties: the lower index) overlaps it with
    IoU > ``iou_threshold``. Instead of one box at a time, every pass re-decides all boxes against
    the current set of kept ones: after pass ``t`` the first ``t`` boxes in score order are final
    (each depends only on those before it), so the loop reaches the greedy answer, in practice in a
    few passes of one ``(K, K)`` operation each.

    Args:
        boxes: ``(K, 4)``. scores: ``(K,)``.

    Returns:
        ``(K',)`` long indices of the kept boxes, by decreasing score.
    """
    order = torch.sort(scores, descending=True, stable=True).indices
    suppresses = (box_iou(boxes[order], boxes[order]) > iou_threshold).triu(diagonal=1)
    keep = torch.ones(len(order), dtype=torch.bool, device=boxes.device)
    for _ in range(len(order)):
        updated = ~(suppresses & keep[:, None]).any(0)
        if torch.equal(updated, keep):
            break
        keep = updated
    return order[keep]
