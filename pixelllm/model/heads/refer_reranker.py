"""Referring re-ranker: a second look at the pointer's best candidates, through their pixels.

Not in the official design (``PixelLLMConfig.refer_reranker``). The pointer localization head
scores the image features' cells; on the shapes world its misses are mostly an object of the named
color and another shape, while the right object is nearly always among its first few distinct
peaks (docs/model_card.md). The re-ranker takes the boxes the head gives at its ``k`` highest
distinct peaks (``PointerLocationHead.candidates``), reads each box's pixels with the box pixel
encoder's CNN (which names the shapes; ``box_pixels.box_crops``), and scores each candidate as
``scale * pointer logit + MLP(text * pixels)``: the expression's last hidden state and the box's
pixel map, each projected, multiplied, and mapped to a correction. The correction's last layer
starts at zero, so a new re-ranker keeps the pointer's choice.
"""

from __future__ import annotations

import torch
from torch import nn

from pixelllm.config import RerankerConfig


class ReferReranker(nn.Module):
    """Scores ``(N, k)`` of ``k`` candidate boxes per expression; see the module docstring."""

    def __init__(self, config: RerankerConfig, lm_dim: int, pixel_dim: int):
        super().__init__()
        self.config = config
        self.text = nn.Sequential(nn.LayerNorm(lm_dim, eps=1e-6), nn.Linear(lm_dim, config.hidden))
        self.pixels = nn.Sequential(nn.LayerNorm(pixel_dim, eps=1e-6), nn.Linear(pixel_dim, config.hidden))
        self.correction = nn.Sequential(nn.GELU(), nn.Linear(config.hidden, config.hidden), nn.GELU(),
                                        nn.Linear(config.hidden, 1))
        nn.init.zeros_(self.correction[-1].weight)
        nn.init.zeros_(self.correction[-1].bias)
        self.pointer_scale = nn.Parameter(torch.ones(()))

    def forward(self, hidden: torch.Tensor, pixel_features: torch.Tensor, pointer_logits: torch.Tensor) -> torch.Tensor:
        """``hidden (N, D)`` the expression's last state, ``pixel_features (N, k, P)`` each candidate
        box's flattened box pixel map, ``pointer_logits (N, k)`` -> scores ``(N, k)``."""
        match = self.text(hidden)[:, None] * self.pixels(pixel_features)  # (N, k, H)
        return self.pointer_scale * pointer_logits + self.correction(match)[..., 0]
