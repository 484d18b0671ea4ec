"""Box word head: the image features themselves name the words of what a prompt's box holds.

An auxiliary loss for models trained from scratch (off in the official design and the paper
presets). The caption's words reach the vision towers only through the prompt feature extractor
and the language model, and a model trained for an hour on a CPU stops sharpening its features
early (``docs/model_card.md``, "Where the shapes are lost"). This head pools the features inside
each prompt's box and predicts the bag of the caption's tokens with one linear layer, which gives
the towers a direct gradient towards features that tell those words apart.
"""

from __future__ import annotations

import torch
from torch import nn


def pool_boxes(features: torch.Tensor, image_index: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Mean and max of each channel over the cells whose centers lie in each box.

    Args:
        features: ``(B, C, G, G)`` feature maps.
        image_index: ``(N,)`` map of each box.
        boxes: ``(N, 4)`` ``x0, y0, x1, y1`` in cell units (cell ``i`` spans ``[i, i + 1)``). Along
            an axis whose span holds no cell center, the cell of the span's middle is used.

    Returns:
        ``(N, 2C)``: the means, then the maxima.
    """
    grid = features.shape[-1]
    centers = torch.arange(grid, device=features.device, dtype=boxes.dtype) + 0.5
    rows = _inside(centers, boxes[:, 1], boxes[:, 3])
    columns = _inside(centers, boxes[:, 0], boxes[:, 2])
    cells = (rows[:, :, None] & columns[:, None, :]).flatten(1)  # (N, G*G)
    values = features.flatten(2)[image_index]  # (N, C, G*G)
    weights = cells[:, None].to(values.dtype)
    mean = (values * weights).sum(-1) / weights.sum(-1)
    maximum = values.masked_fill(~cells[:, None], float("-inf")).amax(-1)
    return torch.cat([mean, maximum], dim=1)


def _inside(centers: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """``(N, G)`` bool: the centers within ``[low, high]``, or the cell of the middle when none is."""
    keep = (centers >= low[:, None]) & (centers <= high[:, None])
    middle = ((low + high) / 2).long().clamp(0, len(centers) - 1)
    fallback = torch.zeros_like(keep).scatter_(1, middle[:, None], True)
    return torch.where(keep.any(1, keepdim=True), keep, fallback)


class BoxWordHead(nn.Module):
    """Pooled box features ``(N, 2C)`` -> logits ``(N, V)`` over the LM's vocabulary."""

    def __init__(self, feature_dim: int, vocab_size: int):
        super().__init__()
        self.linear = nn.Linear(2 * feature_dim, vocab_size)

    def forward(self, features: torch.Tensor, image_index: torch.Tensor, boxes: torch.Tensor,
                canvas_size: int) -> torch.Tensor:
        """``features (B, C, G, G)``, ``image_index (N,)``, ``boxes (N, 4)`` canvas pixels -> ``(N, V)``."""
        cell = canvas_size / features.shape[-1]
        return self.linear(pool_boxes(features.float(), image_index, boxes.float() / cell))


def box_word_loss(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Cross-entropy of ``logits (N, V)`` against each caption's distinct tokens, equally likely.

    ``labels (N, L)``: target ids, -100 where there is none; EOS is not a word of the box.
    ``weight (N,)``: the captions' gate (0 leaves a prompt out). Averaged over the gated prompts.
    """
    valid = (labels >= 0) & (labels != eos_token_id)
    counts = torch.zeros_like(logits, dtype=torch.float32).scatter_add_(1, labels.clamp(min=0), valid.float())
    words = counts > 0
    target = words.float() / words.sum(1, keepdim=True).clamp(min=1)
    loss = -(target * torch.log_softmax(logits.float(), dim=-1)).sum(1)
    gate = weight * words.any(1)
    return (loss * gate).sum() / gate.sum().clamp(min=1)
