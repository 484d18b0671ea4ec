"""The head protocol: what a head owns and how the composing model calls it.

A head is one file with one ``Head`` subclass. It owns

- its **config section**: ``Config``, a dataclass whose fields (loss weights included) are the
  entry ``PixelLLMConfig.heads[name]``; ``check`` tells a config that cannot carry it;
- its **parameters**, built from a ``BuildContext`` (the trunk's sizes and the pretrained parts);
- its **loss terms**: ``losses(model, step, all_heads)`` on a ``TrainingPass``, weighted by its config;
- the **special tokens** it adds to the vocabulary (``special_tokens``);
- its **inference entry points**: one method per name in ``provides`` (``model.capability(name)``
  finds the head), decoding hooks for the trunk's LM (``decode_hooks``), or a language model of its
  own for some prompts (``language_inputs``, with ``claims`` / ``claimed_losses`` in training).

The composing model, decoding and the tasks call these and never name a head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from pixelllm.model.decoding import DecodeHook, LanguageInputs
from pixelllm.model.features import ImageFeatures, Prompts

if TYPE_CHECKING:
    from pixelllm.config import PixelLLMConfig


@dataclass
class BuildContext:
    """What a head is built from: the model's ``config``, the trunk's widths (``lm_dim`` of the LM's
    states, ``feature_dim`` of ``ImageFeatures.features`` of which the first ``sam_channels`` are
    SAM's, ``prompt_dim`` of SAM's prompt tokens, ``pixel_dim`` of a box pixel map or 0 without box
    pixels), the LM's ``vocab_size``, and the pretrained parts some heads take over: ``sam`` (a
    transformers ``SamModel``: its mask decoder) and ``language`` (the LM adapter)."""

    config: PixelLLMConfig
    lm_dim: int
    feature_dim: int
    sam_channels: int
    prompt_dim: int
    pixel_dim: int
    vocab_size: int
    sam: nn.Module | None = None
    language: nn.Module | None = None


@dataclass
class TrainingPass:
    """One training batch through the trunk, as the heads read it.

    ``batch``: the collated batch (docs/architecture.md, "The batch contract"). ``images``: its
    encoded images. ``prompts``: its location prompts. ``visual (N, T, D)``: their visual tokens.
    ``hidden (N, L, D)`` and ``logits (N, L, V)``: the LM's teacher-forced pass (position ``j`` reads
    the start, ``j = 0``, or ``labels[:, j - 1]``, and predicts ``labels[:, j]``). ``outputs``: what
    heads give later heads and the caller (the location head's ``token_boxes (N, L - 1, 4)``).
    """

    batch: dict
    images: ImageFeatures
    prompts: Prompts
    visual: torch.Tensor
    hidden: torch.Tensor
    logits: torch.Tensor
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class HeadLosses:
    """A head's ``total`` loss (weighted as its config says) and the unweighted ``terms`` to log."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


class Head(nn.Module):
    """Base of every head; see the module docstring.

    Class attributes: ``name`` (its key in ``PixelLLMConfig.heads``), ``Config``, ``loss_names`` (the
    terms ``losses`` may log), ``provides`` (the capabilities it implements, each a method of that
    name taking the model first), ``requires`` (capabilities of the heads before it, or trunk options:
    ``"box_pixels"``).
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type]
    loss_names: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ()
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config, context: BuildContext | None = None):
        super().__init__()
        self.config = config

    @classmethod
    def check(cls, config, model_config: PixelLLMConfig) -> None:
        """Raise ``ConfigError`` if ``config`` (a ``Config``) cannot work in ``model_config``."""

    @classmethod
    def provided(cls, config) -> tuple[str, ...]:
        """The capabilities this head gives with ``config`` (``provides`` unless a field changes them)."""
        return cls.provides

    @classmethod
    def required(cls, config) -> tuple[str, ...]:
        """What it needs with ``config`` from the trunk or the heads before it (``requires`` unless a
        field changes it)."""
        return cls.requires

    @classmethod
    def special_tokens(cls, config) -> list[str]:
        """Tokens this head adds to the vocabulary (the tokenizer gains those it lacks)."""
        return []

    def start_from(self, model, missing: list[str]) -> None:
        """Called when a checkpoint has no weights for ``missing`` (names within this head): the head
        was just added to a trained model, and keeps its fresh weights unless it says otherwise."""

    def losses(self, model, step: TrainingPass, all_heads: bool) -> HeadLosses | None:
        """This head's losses on ``step``; None when the batch has nothing for it. With ``all_heads``
        a head whose targets are absent still runs, with zero weight (FSDP: every parameter takes
        part in every step)."""
        return None

    def decode_hooks(self, model, images: ImageFeatures, prompts: Prompts) -> list[DecodeHook]:
        """Hooks into decoding (or teacher-forced reading) of ``prompts`` with the trunk's LM."""
        return []

    def claims(self, batch: dict) -> torch.Tensor | None:
        """``(N,)`` bool: the prompts of a training batch this head answers with its own language model
        (the rest of the model sees them with zero weight); None: none."""
        return None

    def claimed_losses(self, model, batch: dict, images: ImageFeatures, rows: torch.Tensor) -> HeadLosses:
        """Losses on the prompts ``rows`` it claims (``rows`` may hold one unclaimed prompt, weighted 0,
        when ``all_heads`` needs it to run)."""
        raise NotImplementedError

    def language_inputs(self, model, images: ImageFeatures, prompts: Prompts,
                        whole_image: bool) -> LanguageInputs | None:
        """Its own ``LanguageInputs`` for ``prompts`` (``whole_image``: they caption their whole image), or
        None to leave them to the trunk's LM."""
        return None
