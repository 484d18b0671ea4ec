"""Losses of the language and localization outputs, with per-prompt task gating."""

from __future__ import annotations

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


def location_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """L1 in pixels, averaged over the 4 coordinates and over tokens that have a target.

    Args:
        pred, target: ``(N, L, 4)`` canvas pixels. mask: ``(N, L)`` bool, True where target is set.
        weight: ``(N,)`` per-prompt gate.
    """
    token_weight = mask * weight[:, None]
    l1 = (pred.float() - target.float()).abs().mean(-1)
    return (l1 * token_weight).sum() / token_weight.sum().clamp(min=1)
