"""Box helpers shared by the metrics: IoU, validity, clipping.

Boxes are ``[x0, y0, x1, y1]`` in pixels of the original image (continuous coordinates: a box's
width is ``x1 - x0``, no "+1" pixel convention, as in the official JAX evaluator).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pixelllm.evaluate.base import as_array


def as_boxes(boxes: Any) -> np.ndarray:
    """``boxes`` as a float64 ``(N, 4)`` array; an empty input gives ``(0, 4)``."""
    array = as_array(boxes)
    if array.size == 0:
        return array.reshape(0, 4)
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4), got {array.shape}")
    return array


def _iou(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """IoU of broadcastable ``(..., 4)`` box arrays; 0 where the union is not positive."""
    width = np.minimum(boxes1[..., 2], boxes2[..., 2]) - np.maximum(boxes1[..., 0], boxes2[..., 0])
    height = np.minimum(boxes1[..., 3], boxes2[..., 3]) - np.maximum(boxes1[..., 1], boxes2[..., 1])
    intersection = width.clip(min=0.0) * height.clip(min=0.0)
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    union = area1 + area2 - intersection
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, intersection / union, 0.0)


def box_iou(boxes1: Any, boxes2: Any) -> np.ndarray:
    """Pairwise IoU: ``(N, 4)`` x ``(M, 4)`` -> ``(N, M)``."""
    return _iou(as_boxes(boxes1)[:, None, :], as_boxes(boxes2)[None, :, :])


def paired_box_iou(boxes1: Any, boxes2: Any) -> np.ndarray:
    """IoU of corresponding boxes: ``(N, 4)`` and ``(N, 4)`` -> ``(N,)``."""
    return _iou(as_boxes(boxes1), as_boxes(boxes2))


def well_formed(boxes: np.ndarray) -> np.ndarray:
    """``(N,)`` bool: finite and not inverted (``x1 >= x0``, ``y1 >= y0``); zero area allowed."""
    finite = np.isfinite(boxes).all(axis=-1)
    with np.errstate(invalid="ignore"):
        return finite & (boxes[:, 2] >= boxes[:, 0]) & (boxes[:, 3] >= boxes[:, 1])


def has_area(boxes: np.ndarray) -> np.ndarray:
    """``(N,)`` bool: finite with positive width and height (what a ground-truth box must be)."""
    finite = np.isfinite(boxes).all(axis=-1)
    with np.errstate(invalid="ignore"):
        return finite & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def clip_boxes(boxes: np.ndarray, image_sizes: Any) -> np.ndarray:
    """Boxes clipped to their image: ``(N, 4)`` with sizes ``(N, 2)`` or ``(2,)`` as ``(W, H)``."""
    sizes = np.broadcast_to(as_array(image_sizes), (len(boxes), 2))
    upper = np.concatenate([sizes, sizes], axis=1)
    return np.minimum(np.maximum(boxes, 0.0), upper)
