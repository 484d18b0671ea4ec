"""Mask refiner: a small CNN that corrects the mask decoder's logits from the pixels around the box.

Not in the official design (``PixelLLMConfig.mask_refiner``). SAM's decoder predicts a mask at a
quarter of the canvas' resolution, from features of stride 8; upsampled to the canvas, its edges
are blurred by several pixels, which at the tiny canvas is much of a small object, and a decoder
trained from scratch also spills onto other objects far from its box. The refiner keeps the mask
inside a square around the box (``box_pixels.box_squares`` with a margin, since the predicted box
may be off) and reads that square at ``R x R`` samples: the canvas pixels and the decoder's mask
probability. Its dilated convolutions see past the blurred edge on both sides, and it returns a
correction that is pasted back onto the canvas and added to the decoder's logits. The last
convolution starts at zero, so a new refiner only cuts the mask to the square.
"""

from __future__ import annotations

import torch
from torch import nn

from pixelllm.config import MaskRefinerConfig
from pixelllm.model.box_pixels import box_squares, paste_squares, square_crops, square_frame

OUTSIDE_LOGIT = -20.0  # the logit of every canvas pixel outside the box's square (probability 2e-9)
GROUPS = 8  # GroupNorm after every convolution: without it, training sat at the new refiner's
# masks for 300 steps before it improved them (docs/model_card.md, stop 22)


class MaskRefiner(nn.Module):
    """``(pixels, boxes, coarse canvas logits)`` -> refined canvas logits; see the module docstring."""

    def __init__(self, config: MaskRefinerConfig):
        super().__init__()
        self.config = config
        width = config.width
        layers = [nn.Conv2d(4, width, 3, padding=1), nn.GroupNorm(GROUPS, width), nn.GELU()]
        for dilation in config.dilations:
            layers += [nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation), nn.GroupNorm(GROUPS, width),
                       nn.GELU()]
        self.cnn = nn.Sequential(*layers)
        self.correction = nn.Conv2d(config.width, 1, 1)
        nn.init.zeros_(self.correction.weight)
        nn.init.zeros_(self.correction.bias)

    def forward(self, pixels: torch.Tensor, image_index: torch.Tensor, boxes: torch.Tensor,
                coarse: torch.Tensor) -> torch.Tensor:
        """Refine ``N`` masks.

        Args:
            pixels: ``(B, 3, kS, kS)`` canvas images in [0, 1] (any whole multiple ``k`` of the canvas).
            image_index: ``(N,)`` image of each mask. boxes: ``(N, 4)`` canvas pixels ``x0, y0, x1, y1``.
            coarse: ``(N, S, S)`` the decoder's logits upsampled to the canvas.

        Returns:
            ``(N, S, S)`` logits: ``coarse`` plus the correction inside each box's square,
            ``OUTSIDE_LOGIT`` outside it.
        """
        size, resolution = coarse.shape[-1], self.config.resolution
        center, side = box_squares(boxes, resolution, self.config.margin)
        rgb = square_crops(pixels, image_index, center, side, size, resolution)
        own = torch.arange(len(coarse), device=coarse.device)
        prior = square_crops(coarse[:, None], own, center, side, size, resolution)
        correction = self.correction(self.cnn(torch.cat([rgb - 0.5, torch.sigmoid(prior) - 0.5], dim=1)))
        x, y = square_frame(center, side, size)
        inside = (y.abs() <= 1)[:, :, None] & (x.abs() <= 1)[:, None, :]  # (N, S, S)
        refined = coarse + paste_squares(correction, center, side, size)[:, 0]
        return refined.masked_fill(~inside, OUTSIDE_LOGIT)
