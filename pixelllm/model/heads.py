"""The localization head: a box for every token, read from the LM's final hidden state."""

from __future__ import annotations

import torch
from torch import nn


class LocationHead(nn.Module):
    """LayerNorm -> ``depth`` x (Linear + GELU) -> Linear to 4 (two corners ``x0, y0, x1, y1``).

    The raw output ``r`` maps to canvas pixels of the resized image as the official code does:
    ``(r + 1) / 2 * (valid width, valid height)``; no sigmoid, no clipping. A point is a box's center.
    It only reads hidden states: locations never feed back into the text path.
    """

    def __init__(self, in_dim: int, hidden: int = 512, depth: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.LayerNorm(in_dim, eps=1e-6)]
        for i in range(depth):
            layers += [nn.Linear(in_dim if i == 0 else hidden, hidden), nn.GELU()]
        layers.append(nn.Linear(hidden, 4))
        self.mlp = nn.Sequential(*layers)

    def forward(self, hidden: torch.Tensor, valid_size: torch.Tensor) -> torch.Tensor:
        """Boxes in canvas pixels.

        Args:
            hidden: ``(N, ..., D)`` final hidden states.
            valid_size: ``(N, 2)`` width and height of the resized image on the canvas.

        Returns:
            ``(N, ..., 4)``.
        """
        raw = self.mlp(hidden.to(self.mlp[0].weight.dtype))
        scale = valid_size.repeat(1, 2).view(valid_size.shape[0], *([1] * (raw.dim() - 2)), 4)
        return (raw + 1) / 2 * scale


def box_center(boxes: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` boxes -> ``(..., 2)`` centers."""
    return (boxes[..., :2] + boxes[..., 2:]) / 2
