"""Box pixel pretraining: the box pixel encoder learns what regions hold before the main loop.

Not in the official design (nor is ``extractor.box_pixels``). Inside the main loop the encoder's
small CNN sees a few crops per step, under the whole model's learning-rate schedule and gradient
clipping, and learns the shapes slowly; trained first on its own, the language model reads it at
once. The signal is the pixel word head's (``heads.pixel_words``): the bag of
each region caption's words, no shape labels; 6 epochs over 14,000 crops take 30 s on 2 CPU cores."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from pixelllm.data.pipeline import ExampleBuilder
from pixelllm.errors import ConfigError
from pixelllm.model import PixelLLM
from pixelllm.model.box_pixels import box_crops
from pixelllm.model.heads.pixel_words import box_word_loss


@dataclass
class BoxPixelPretrainConfig:
    """``epochs`` > 0 pretrains on the crops of the first ``images`` of the first region dataset."""

    epochs: int = 0
    images: int = 4000
    batch_size: int = 128
    lr: float = 2e-3

    def __post_init__(self):
        if not (self.epochs >= 0 and self.images >= 1 and self.batch_size >= 1 and self.lr > 0):
            raise ConfigError(f"box_pixel_pretrain needs epochs >= 0, images >= 1, batch_size >= 1 and lr > 0, "
                              f"got {self}")


def region_crops(samples: Iterable, builder: ExampleBuilder, limit: int,
                 resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The crops of the region prompts of the first ``limit`` samples (a list, or the reader of tar
    shards), as the main loop builds them without augmentation: ``(N, 3, R, R)``, and their caption
    ids ``(N, L)`` (-100 after each EOS). Samples the builder skips (unreadable images, malformed
    annotations) are counted in its report."""
    crops, labels = [], []
    for sample in itertools.islice(samples, limit):
        example = builder(sample)
        if example is None:
            continue
        prompts = [p for p in example.targets.prompts if not p.prompt_is_point]
        if not prompts:
            continue
        boxes = torch.as_tensor(np.stack([p.prompt_box for p in prompts]), dtype=torch.float32)
        crops.append(box_crops(example.pixel_values[None], torch.zeros(len(boxes), dtype=torch.long), boxes,
                               builder.config.canvas_size, resolution))
        labels += [torch.tensor(p.label_ids) for p in prompts]
    if not crops:
        raise ConfigError(f"box_pixel_pretrain: no region crop in the data ({builder.report.summary()})")
    return torch.cat(crops), torch.nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=-100)


def pretrain_box_pixels(model: PixelLLM, samples: Iterable, builder: ExampleBuilder, config: BoxPixelPretrainConfig,
                        seed: int, progress: bool = True) -> list[float]:
    """Train the box pixel CNN and the pixel word head on region crops with Adam; returns the mean
    loss of each epoch. Every process draws the same batches (``seed``), so all end alike."""
    encoder, head = model.extractor.box_pixels, dict(model.heads).get("pixel_words")
    if encoder is None or head is None:
        raise ConfigError("box_pixel_pretrain needs extractor.box_pixels and the head pixel_words")
    crops, labels = region_crops(samples, builder, config.images, encoder.resolution)
    device, eos = model.device, model.language.eos_token_id
    optimizer = torch.optim.Adam([*encoder.cnn.parameters(), *head.parameters()], lr=config.lr)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in tqdm(range(config.epochs), desc=f"box pixel pretraining ({len(crops)} crops)", unit="epoch",
                  disable=not progress):
        total = 0.0
        for batch in torch.randperm(len(crops), generator=generator).split(config.batch_size):
            logits = head.logits(model, crops[batch].to(device))
            loss = box_word_loss(logits, labels[batch].to(device), torch.ones(len(batch), device=device), eos)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        losses.append(total / len(crops))
    optimizer.zero_grad(set_to_none=True)  # the main loop's first step starts from no gradient
    return losses
