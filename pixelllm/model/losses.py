"""Losses of the language and localization outputs, with per-prompt task gating."""

from __future__ import annotations

import math

import torch


def smoothed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                           smoothing: float = 0.1) -> torch.Tensor:
    """Label-smoothed cross-entropy averaged over the valid tokens of gated prompts.

    Smoothing as the official code (after GRiT): the true class gets ``1 - smoothing`` and every
    other class ``smoothing / (V - 1)``.

    Args:
        logits: ``(N, L, V)``. labels: ``(N, L)``, -100 where there is no target.
        weight: ``(N,)`` per-prompt gate (0 switches the term off for that prompt).
    """
    valid = (labels >= 0) & (weight[:, None] > 0)
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    target = labels.clamp(min=0)
    true_log_prob = log_probs.gather(-1, target[..., None])[..., 0]
    vocab = logits.shape[-1]
    other_log_probs = log_probs.sum(-1) - true_log_prob
    loss = -(1 - smoothing) * true_log_prob - smoothing / (vocab - 1) * other_log_probs
    token_weight = valid * weight[:, None]
    return (loss * token_weight).sum() / token_weight.sum().clamp(min=1)


def location_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                per_prompt: bool = False) -> torch.Tensor:
    """L1 in pixels, averaged over the 4 coordinates and over tokens that have a target.

    Args:
        pred, target: ``(N, L, 4)`` canvas pixels. mask: ``(N, L)`` bool, True where target is set.
        weight: ``(N,)`` per-prompt gate.
        per_prompt: average within each prompt first, then over prompts (else over all tokens).
    """
    return _located_mean((pred.float() - target.float()).abs().mean(-1), mask, weight, per_prompt)


def cell_cross_entropy(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                       canvas_size: int, per_prompt: bool = False) -> torch.Tensor:
    """Cross-entropy of the pointer head's cell logits against the cell holding each target box's center.

    Args:
        logits: ``(N, L, G*G)`` over a row-major ``G x G`` grid of the canvas. target: ``(N, L, 4)``
            canvas pixels. mask, weight, per_prompt: as ``location_l1``.
    """
    grid = math.isqrt(logits.shape[-1])
    cell = ((target[..., :2] + target[..., 2:]) / 2 * grid / canvas_size).long().clamp(0, grid - 1)
    index = cell[..., 1] * grid + cell[..., 0]
    log_probs = torch.log_softmax(logits.float(), dim=-1).gather(-1, index[..., None])[..., 0]
    return _located_mean(-log_probs.masked_fill(~mask, 0.0), mask, weight, per_prompt)


def _located_mean(values: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, per_prompt: bool) -> torch.Tensor:
    """Weighted mean of ``values (N, L)`` over the tokens in ``mask``; see ``location_l1``."""
    token_weight = mask * weight[:, None]
    if per_prompt:
        token_weight = token_weight / mask.sum(1, keepdim=True).clamp(min=1)
    return (values * token_weight).sum() / token_weight.sum().clamp(min=1)
