"""The mask refiner: a small CNN that corrects the mask head's logits from the pixels around the box.

Not in the official design (the head ``mask_refiner``, after the mask head). SAM's decoder predicts a mask at a
quarter of the canvas' resolution, from features of stride 8; upsampled to the canvas, its edges
are blurred by several pixels, which at the tiny canvas is much of a small object, and a decoder
trained from scratch also spills onto other objects far from its box. The refiner keeps the mask
inside a square around the box (``box_pixels.box_squares`` with a margin, since the predicted box
may be off) and reads that square at ``R x R`` samples: the canvas pixels and the decoder's mask
probability. Its dilated convolutions see past the blurred edge on both sides, and it returns a
correction that is pasted back onto the canvas and added to the decoder's logits. The last
convolution starts at zero, so a new refiner only cuts the mask to the square.

It provides ``mask_logits`` in place of the mask head's (those of the head before it, refined), so
the mask head's loss trains both; it has no loss of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pixelllm.errors import ConfigError
from pixelllm.model.box_pixels import box_squares, paste_squares, square_crops, square_frame
from pixelllm.model.features import ImageFeatures
from pixelllm.model.heads.base import BuildContext, Head

OUTSIDE_LOGIT = -20.0  # the logit of every canvas pixel outside the box's square (probability 2e-9)
GROUPS = 8  # GroupNorm after every convolution: without it, training sat at a new refiner's masks
# for 300 steps before it improved them


@dataclass
class MaskRefinerConfig:
    resolution: int = 48  # samples per side of the square
    margin: float = 0.25  # the square's side is the box's longer side times 1 + 2 * margin
    width: int = 32  # a multiple of 8 (GroupNorm's groups)
    dilations: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 1])  # one 3 x 3 convolution each


class MaskRefiner(Head):
    """``(pixels, boxes, coarse canvas logits)`` -> refined canvas logits; see the module docstring."""

    name = "mask_refiner"
    Config = MaskRefinerConfig
    provides = ("mask_logits",)
    requires = ("mask_logits",)

    def __init__(self, config: MaskRefinerConfig, context: BuildContext | None = None):
        super().__init__(config, context)
        width = config.width
        layers = [nn.Conv2d(4, width, 3, padding=1), nn.GroupNorm(GROUPS, width), nn.GELU()]
        for dilation in config.dilations:
            layers += [nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation), nn.GroupNorm(GROUPS, width),
                       nn.GELU()]
        self.cnn = nn.Sequential(*layers)
        self.correction = nn.Conv2d(config.width, 1, 1)
        nn.init.zeros_(self.correction.weight)
        nn.init.zeros_(self.correction.bias)

    @classmethod
    def check(cls, config: MaskRefinerConfig, model_config) -> None:
        if (config.resolution < 8 or config.width < 8 or config.width % GROUPS or config.margin < 0
                or not config.dilations or min(config.dilations) < 1):
            raise ConfigError(f"heads.mask_refiner needs resolution >= 8, a width that is a multiple of {GROUPS}, "
                              f"margin >= 0 and dilations >= 1, got {config}")

    def mask_logits(self, model, images: ImageFeatures, image_index: torch.Tensor, boxes: torch.Tensor,
                    visual: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor):
        """The masks of the head before this one (``MaskHead.mask_logits``: same arguments), refined."""
        coarse, iou = model.capability("mask_logits", before=self)(images, image_index, boxes, visual, text, text_mask)
        return self(images.pixels, image_index, boxes, coarse), iou

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
