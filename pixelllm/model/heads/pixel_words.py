"""The pixel word head: the box pixel encoder's own map names the words of what a prompt's box holds.

Not in the official design (an auxiliary loss for models trained from scratch; needs the extractor's
box pixels). A linear layer over the box pixel encoder's flattened 2 x 2 map of each region or dense
caption's box (a prompt with a text target and no location target) predicts the bag of the
caption's tokens, so that the encoder's CNN learns the shapes before the LM has to read its tokens
(pooled over the 4 cells, the shapes were learned far slower). Loss ``pixel_words`` x ``weight``.
Inference does not use it; ``pixelllm.box_pixel_pretrain`` trains it with the encoder before the
main loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pixelllm.errors import ConfigError
from pixelllm.model.box_pixels import BOX_PIXEL_TOKENS, box_crops
from pixelllm.model.heads.base import BuildContext, Head, HeadLosses, TrainingPass


@dataclass
class PixelWordConfig:
    weight: float = 1.0


class PixelWordHead(Head):
    """Box pixel maps ``(N, 4 x width)`` -> logits ``(N, V)`` over the LM's vocabulary."""

    name = "pixel_words"
    Config = PixelWordConfig
    loss_names = ("pixel_words",)
    requires = ("box_pixels",)

    def __init__(self, config: PixelWordConfig, context: BuildContext):
        super().__init__(config, context)
        self.linear = nn.Linear(BOX_PIXEL_TOKENS * context.config.extractor.width, context.vocab_size)

    @classmethod
    def check(cls, config: PixelWordConfig, model_config) -> None:
        if config.weight < 0:
            raise ConfigError(f"heads.pixel_words.weight must be >= 0, got {config.weight}")

    def logits(self, model, crops: torch.Tensor) -> torch.Tensor:
        """Word logits ``(N, V)`` of ``box_crops``' output ``(N, 3, R, R)``."""
        return self.linear(model.extractor.box_pixels.features(crops).flatten(1))

    def losses(self, model, step: TrainingPass, all_heads: bool) -> HeadLosses:
        batch = step.batch
        gate = batch["caption_weight"] * (batch["location_weight"] == 0)
        rows = (gate > 0).nonzero()[:, 0]  # read only the prompts the loss counts
        prompts = step.prompts.select(rows)
        crops = box_crops(step.images.pixels, prompts.image_index, prompts.spans, model.config.image_size,
                          model.extractor.box_pixels.resolution)
        loss = box_word_loss(self.logits(model, crops), batch["labels"][rows], gate[rows], model.language.eos_token_id)
        return HeadLosses(self.config.weight * loss, {"pixel_words": loss})


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
