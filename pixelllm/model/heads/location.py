"""The location head: a box for every token, read from the LM's final hidden state.

Two locators, by ``kind``:

- ``mlp`` (the paper's): LayerNorm -> ``depth`` x (Linear + GELU) -> Linear to the two corners; the
  raw output ``r`` maps to canvas pixels of the resized image as the official code does,
  ``(r + 1) / 2 * (valid width, valid height)``: no sigmoid, no clipping;
- ``pointer`` (``pixelllm.model.pointer``): the state points at a cell of the image features and
  refines the box there; trained by an extra cross-entropy on the cell that holds the target box's
  center (``selection_weight``).

Loss: ``loss_weight`` x L1 in canvas pixels over the tokens with a target, averaged over all of
them (``average: token``, official) or within each prompt first (``prompt``). The state whose input
is ``labels[:, j]`` (position ``j + 1``) locates ``labels[:, j]``. Locations never feed back into
the text. In decoding the head reads every step's state (``token_boxes``); a referring expression's
box is the one at its last word (``refer_boxes``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pixelllm.errors import ConfigError
from pixelllm.model.decoding import DecodeHook
from pixelllm.model.features import ImageFeatures, Prompts
from pixelllm.model.heads.base import BuildContext, Head, HeadLosses, TrainingPass
from pixelllm.model.losses import cell_cross_entropy, location_l1
from pixelllm.model.pointer import PointerLocator, mlp

TOKEN_BOXES = "token_boxes"


@dataclass
class LocationConfig:
    kind: str = "mlp"  # "mlp" (the paper's) or "pointer"
    hidden: int = 512
    depth: int = 3
    loss_weight: float = 0.1  # x L1 in canvas pixels (the official 0.1 at a 384-px canvas)
    average: str = "token"  # "token" (official) or "prompt": a one-word expression weighs as much as a trace
    selection_weight: float = 1.0  # the pointer's cell cross-entropy


class MLPLocator(nn.Module):
    """The paper's locator; see the module docstring."""

    def __init__(self, in_dim: int, hidden: int = 512, depth: int = 3):
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(in_dim, eps=1e-6), *mlp(in_dim, hidden, depth, 4))

    def cells(self, features: torch.Tensor) -> None:
        """Nothing: this locator does not read the image."""
        return None

    def locate(self, hidden: torch.Tensor, cells: None, image_index: torch.Tensor,
               valid_size: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Boxes ``(N, ..., 4)`` in canvas pixels from ``hidden (N, ..., D)``; no cell logits.
        ``valid_size (N, 2)``: each row's resized image on the canvas."""
        raw = self.mlp(hidden.to(self.mlp[0].weight.dtype))
        scale = valid_size.repeat(1, 2).view(valid_size.shape[0], *([1] * (raw.dim() - 2)), 4)
        return (raw + 1) / 2 * scale, None


class LocationHead(Head):
    """A box for every token; see the module docstring."""

    name = "location"
    Config = LocationConfig
    loss_names = ("location", "selection")
    provides = (TOKEN_BOXES, "refer_boxes")

    def __init__(self, config: LocationConfig, context: BuildContext):
        super().__init__(config, context)
        if config.kind == "pointer":
            self.locator = PointerLocator(context.lm_dim, context.feature_dim, context.config.image_size,
                                          config.hidden, config.depth)
        else:
            self.locator = MLPLocator(context.lm_dim, config.hidden, config.depth)

    @classmethod
    def check(cls, config: LocationConfig, model_config) -> None:
        if config.kind not in ("mlp", "pointer"):
            raise ConfigError(f"heads.location.kind must be 'mlp' or 'pointer', got {config.kind!r}")
        if config.average not in ("token", "prompt"):
            raise ConfigError(f"heads.location.average must be 'token' or 'prompt', got {config.average!r}")

    @classmethod
    def provided(cls, config: LocationConfig) -> tuple[str, ...]:
        return (*cls.provides, "candidates") if config.kind == "pointer" else cls.provides

    # -- inference --------------------------------------------------------------------------------

    def cells(self, images: ImageFeatures):
        """What the locator reads from each image (``None`` for the MLP): computed once, then
        passed to every call that locates on the same images."""
        return self.locator.cells(images.features)

    def token_boxes(self, model, hidden: torch.Tensor, images: ImageFeatures, image_index: torch.Tensor,
                    cells=None) -> torch.Tensor:
        """Boxes ``(N, ..., 4)`` canvas pixels of the tokens read by hidden states ``(N, ..., D)`` of
        prompts on the images ``image_index (N,)``."""
        cells = self.cells(images) if cells is None else cells
        return self.locator.locate(hidden, cells, image_index, images.valid_size[image_index])[0]

    def refer_boxes(self, model, hidden: torch.Tensor, images: ImageFeatures,
                    image_index: torch.Tensor) -> torch.Tensor:
        """The box ``(N, 4)`` canvas pixels of referring expressions from the state ``(N, D)`` that
        read each one's last word."""
        return self.token_boxes(model, hidden, images, image_index)

    def candidates(self, model, hidden: torch.Tensor, images: ImageFeatures, image_index: torch.Tensor, k: int,
                   cells=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The pointer's boxes ``(N, k, 4)`` at its ``k`` best distinct peaks and their logits ``(N, k)``
        (``PointerLocator.candidates``) for hidden states ``(N, D)``."""
        cells = self.cells(images) if cells is None else cells
        return self.locator.candidates(hidden, cells, image_index, images.valid_size[image_index], k)

    def decode_hooks(self, model, images: ImageFeatures, prompts: Prompts) -> list[DecodeHook]:
        return [_TokenBoxes(self, model, images, prompts.image_index)]

    # -- training ---------------------------------------------------------------------------------

    def losses(self, model, step: TrainingPass, all_heads: bool) -> HeadLosses:
        """L1 (and for the pointer the cell cross-entropy) over the tokens with a target; leaves the
        boxes as ``step.outputs["token_boxes"] (N, L - 1, 4)`` and the locator's cells as
        ``step.outputs["location_cells"]``."""
        batch = step.batch
        cells = self.cells(step.images)
        boxes, cell_logits = self.locator.locate(step.hidden[:, 1:], cells, step.prompts.image_index,
                                                 step.images.valid_size[step.prompts.image_index])
        step.outputs.update({TOKEN_BOXES: boxes, "location_cells": cells})
        located = (batch["label_boxes"][:, :-1], batch["label_box_mask"][:, :-1], batch["location_weight"])
        per_prompt = self.config.average == "prompt"
        terms = {"location": location_l1(boxes, *located, per_prompt=per_prompt)}
        total = self.config.loss_weight * terms["location"]
        if cell_logits is not None:
            terms["selection"] = cell_cross_entropy(cell_logits, *located, model.config.image_size, per_prompt)
            total = total + self.config.selection_weight * terms["selection"]
        return HeadLosses(total, terms)


class _TokenBoxes(DecodeHook):
    """Decoding's reader of every step's state: the box of the token it read."""

    name = TOKEN_BOXES

    def __init__(self, head: LocationHead, model, images: ImageFeatures, image_index: torch.Tensor):
        self.head, self.model, self.images, self.image_index = head, model, images, image_index
        self.cells = None  # computed on the first step, then reused at every step

    def read(self, states: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if self.cells is None:
            self.cells = self.head.cells(self.images)
        return self.head.token_boxes(self.model, states, self.images, self.image_index[rows], self.cells)
