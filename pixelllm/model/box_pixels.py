"""Box pixel encoder: a small CNN over the pixels of each prompt box, resampled to a fixed size.

Not in the official design (an option of the prompt feature extractor, ``extractor.box_pixels``).
The image towers see a small object as one or two cells of a stride-8 map; this reads it at a
common scale instead, as ROIAlign on the pixels would: a square around the box, ``R x R`` samples,
so a 10-pixel star and a 50-pixel star look alike. Its tokens are appended to the extractor's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BOX_PIXEL_TOKENS = 4  # a 2 x 2 grid over the crop


def box_squares(boxes: torch.Tensor, min_side: float, margin: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The square read around each box: its ``center (N, 2)`` and ``side (N,)`` in canvas pixels.

    Centered on the box ``(N, 4)`` (canvas pixels ``x0, y0, x1, y1``), its side the box's longer side
    times ``1 + 2 * margin`` and at least ``min_side``, so a box's proportions survive.
    """
    center = (boxes[:, :2] + boxes[:, 2:]) / 2
    side = (boxes[:, 2:] - boxes[:, :2]).amax(dim=1) * (1 + 2 * margin)
    return center, side.clamp(min=min_side)


def square_crops(images: torch.Tensor, image_index: torch.Tensor, center: torch.Tensor, side: torch.Tensor,
                 canvas_size: int, resolution: int) -> torch.Tensor:
    """``R x R`` bilinear samples of squares ``(center (N, 2), side (N,))``: ``(N, C, R, R)``.

    Args:
        images: ``(B, C, kS, kS)`` maps over the canvas (any whole multiple ``k`` of the canvas size
            ``S``). image_index: ``(N,)`` the map of each square. canvas_size: ``S``. resolution: ``R``.

    Samples outside the canvas read 0.
    """
    steps = (torch.arange(resolution, device=side.device, dtype=side.dtype) + 0.5) / resolution - 0.5
    x = center[:, 0, None] + steps * side[:, None]  # (N, R)
    y = center[:, 1, None] + steps * side[:, None]
    # grid_sample's frame (align_corners=False): -1 and 1 are the canvas' outer edges.
    grid = torch.stack(torch.broadcast_tensors(x[:, None, :], y[:, :, None]), dim=-1) / canvas_size * 2 - 1
    return F.grid_sample(images[image_index], grid.to(images.dtype), mode="bilinear", align_corners=False)


def square_frame(center: torch.Tensor, side: torch.Tensor, canvas_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The canvas pixel centers' columns and rows in each square's frame, ``x (N, S)`` and
    ``y (N, S)``: -1 and 1 are the square's edges."""
    pixel = torch.arange(canvas_size, device=side.device, dtype=side.dtype) + 0.5
    return (pixel - center[:, 0, None]) / side[:, None] * 2, (pixel - center[:, 1, None]) / side[:, None] * 2


def paste_squares(crops: torch.Tensor, center: torch.Tensor, side: torch.Tensor, canvas_size: int) -> torch.Tensor:
    """The inverse of ``square_crops``: ``(N, C, R, R)`` crops -> ``(N, C, S, S)`` canvas maps, each
    crop bilinearly resampled onto the canvas pixels its square covers and 0 elsewhere."""
    x, y = square_frame(center, side, canvas_size)
    grid = torch.stack(torch.broadcast_tensors(x[:, None, :], y[:, :, None]), dim=-1)
    return F.grid_sample(crops, grid.to(crops.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)


def box_crops(pixels: torch.Tensor, image_index: torch.Tensor, boxes: torch.Tensor, canvas_size: int,
              resolution: int) -> torch.Tensor:
    """Square crops around boxes, bilinearly sampled: ``(N, 3, R, R)``.

    Args:
        pixels: ``(B, 3, kS, kS)`` canvas images (any whole multiple ``k`` of the canvas size ``S``).
        image_index: ``(N,)`` image of each box. boxes: ``(N, 4)`` canvas pixels ``x0, y0, x1, y1``.
        canvas_size: ``S``. resolution: ``R``.

    The square (``box_squares``) is at least ``R`` canvas pixels wide: a point prompt, a zero-size
    box, reads the ``R x R`` pixels around it.
    """
    return square_crops(pixels, image_index, *box_squares(boxes, resolution), canvas_size, resolution)


class BoxPixelEncoder(nn.Module):
    """Crops ``(N, 3, R, R)`` -> ``BOX_PIXEL_TOKENS`` tokens ``(N, 4, lm_dim)``: two stages of two
    3 x 3 convolutions, each followed by 2 x 2 max pooling, a last convolution, then average pooling
    to 2 x 2 (row-major) and a projection with LayerNorm to the LM width. In training, a prompt's
    tokens are all zeroed with probability ``dropout``."""

    def __init__(self, resolution: int, width: int, lm_dim: int, dropout: float = 0.0):
        super().__init__()
        self.resolution, self.dropout = resolution, dropout
        quarter, half = width // 4, width // 2
        self.cnn = nn.Sequential(
            nn.Conv2d(3, quarter, 3, padding=1), nn.GELU(), nn.Conv2d(quarter, quarter, 3, padding=1), nn.GELU(),
            nn.MaxPool2d(2),
            nn.Conv2d(quarter, half, 3, padding=1), nn.GELU(), nn.Conv2d(half, half, 3, padding=1), nn.GELU(),
            nn.MaxPool2d(2),
            nn.Conv2d(half, width, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(2),
        )
        self.projection = nn.Linear(width, lm_dim)
        self.norm = nn.LayerNorm(lm_dim)

    def forward(self, pixels: torch.Tensor, image_index: torch.Tensor, boxes: torch.Tensor,
                canvas_size: int) -> torch.Tensor:
        """``pixels (B, 3, kS, kS)``, ``image_index (N,)``, ``boxes (N, 4)`` canvas pixels ->
        ``(N, 4, lm_dim)``."""
        return self.encode(box_crops(pixels, image_index, boxes, canvas_size, self.resolution))

    def features(self, crops: torch.Tensor) -> torch.Tensor:
        """``box_crops``' output ``(N, 3, R, R)`` -> the CNN's map ``(N, width, 2, 2)``."""
        return self.cnn(crops - 0.5)

    def encode(self, crops: torch.Tensor) -> torch.Tensor:
        """``box_crops``' output ``(N, 3, R, R)`` -> ``(N, 4, lm_dim)``."""
        grid = self.features(crops)
        tokens = self.norm(self.projection(grid.flatten(2).transpose(1, 2)))
        if self.training and self.dropout:
            keep = torch.rand(len(tokens), 1, 1, device=tokens.device) >= self.dropout
            tokens = tokens * keep
        return tokens
