"""PixelLLM: the trunk (image encoder, prompt encoder, prompt feature extractor, LM adapter) and its heads.

The trunk encodes images and location prompts into visual tokens and runs the language model over
them; every other capability is a head's (``pixelllm.model.heads``). ``forward`` is the trunk's
pass, its text loss, and the sum of the heads' losses; inference reaches a head through the
capability it provides (``capability``) or the hooks it adds to decoding (``language_inputs``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn

from pixelllm.config import PixelLLMConfig
from pixelllm.errors import ConfigError, InputError
from pixelllm.model import build, checkpoint
from pixelllm.model.decoding import LanguageInputs
from pixelllm.model.extractor import PromptFeatureExtractor
from pixelllm.model.features import ImageFeatures, Prompts
from pixelllm.model.frozen import KeepsFrozenInEval
from pixelllm.model.heads import Head, TrainingPass
from pixelllm.model.language import LanguageModel
from pixelllm.model.losses import smoothed_cross_entropy
from pixelllm.model.prompt import PromptEncoder
from pixelllm.model.vision import DualImageEncoder


@dataclass
class PixelLLMOutput:
    """Training outputs.

    ``loss``: the weighted total. ``losses``: each term before weighting. ``logits (N, L, V)``:
    ``logits[:, j]`` predicts ``labels[:, j]``. ``outputs``: what the heads computed on the way
    (the location head's ``token_boxes (N, L - 1, 4)``: canvas-pixel box of ``labels[:, j]``).
    """

    loss: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    logits: torch.Tensor | None = None
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)


class PixelLLM(KeepsFrozenInEval):
    """The pixel-aligned language model.

    Receives its parts (``from_config`` builds them): ``vision`` (dual image encoder),
    ``prompt_encoder``, ``extractor`` (prompt feature extractor), ``language`` (LM adapter), the
    ``heads`` by name, in order; and the tokenizer of the LM.
    """

    def __init__(self, config: PixelLLMConfig, vision: DualImageEncoder, prompt_encoder: PromptEncoder,
                 extractor: PromptFeatureExtractor, language: LanguageModel, heads: dict[str, Head],
                 tokenizer=None):
        super().__init__()
        self.config = config
        self.vision = vision
        self.prompt_encoder = prompt_encoder
        self.extractor = extractor
        self.language = language
        self.heads = nn.ModuleDict(heads)
        self.tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        return self.extractor.output_tokens.device

    @property
    def loss_names(self) -> tuple[str, ...]:
        """Every term ``forward`` may log: the trunk's text loss, then each head's."""
        return ("text", *(name for head in self.heads.values() for name in head.loss_names))

    # ------------------------------------------------------------------------------------------
    # The trunk, one piece at a time (encode an image once, prompt it many times)

    def encode_images(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> ImageFeatures:
        """``(B, 3, S, S)`` canvas images in [0, 1] and ``(B, S, S)`` masks -> ``ImageFeatures``."""
        features, sam_embeddings = self.vision(pixel_values, pixel_mask)
        valid_size = torch.stack([pixel_mask.any(1).sum(-1), pixel_mask.any(2).sum(-1)], dim=-1)
        return ImageFeatures(features, sam_embeddings, valid_size.to(features.dtype), pixel_values)

    def visual_tokens(self, images: ImageFeatures, prompts: Prompts) -> torch.Tensor:
        """Visual tokens of ``N`` location prompts: ``(N, T, D_lm)``. Prompts that repeat (every
        referring expression of an image has the whole-image box) are extracted once."""
        boxes = prompts.boxes
        flags = [prompts.image_index[:, None].to(boxes.dtype), prompts.is_point[:, None].to(boxes.dtype)]
        key = torch.cat([flags[0], boxes, flags[1]], dim=1)
        unique, inverse = torch.unique(key, dim=0, return_inverse=True)
        first = torch.zeros(len(unique), dtype=torch.long, device=key.device).scatter_(
            0, inverse, torch.arange(len(key), device=key.device))
        return self.extractor(images, prompts.select(first), self.prompt_encoder)[inverse]

    def language_inputs(self, images: ImageFeatures, prompts: Prompts, whole_image: bool = False) -> LanguageInputs:
        """What a language model needs to read or write the text of ``prompts``: a head's own (the
        last that takes them; ``whole_image``: they caption their whole image), else the trunk's LM,
        the prompts' visual tokens and every head's decoding hooks."""
        for head in reversed(self.heads.values()):
            inputs = head.language_inputs(self, images, prompts, whole_image)
            if inputs is not None:
                return inputs
        hooks = [hook for head in self.heads.values() for hook in head.decode_hooks(self, images, prompts)]
        return LanguageInputs(self.language, self.visual_tokens(images, prompts), hooks)

    def has_capability(self, name: str) -> bool:
        """Whether a head provides the entry point ``name``."""
        return any(name in head.provided(head.config) for head in self.heads.values())

    def capability(self, name: str, before: Head | None = None):
        """The entry point ``name`` of the last head that provides it (of those before ``before``),
        bound to this model; ``InputError`` when no head does."""
        heads = list(self.heads.values())
        if before is not None:
            heads = heads[: heads.index(before)]
        for head in reversed(heads):
            if name in head.provided(head.config):
                return partial(getattr(head, name), self)
        raise InputError(f"this model has no head that gives {name!r} (its heads: {', '.join(self.heads) or 'none'})")

    # ------------------------------------------------------------------------------------------
    # Training

    def forward(self, batch: dict, all_heads: bool = False) -> PixelLLMOutput:
        """Losses of a collated batch (keys as in ``docs/architecture.md``, "The batch contract").

        Heads that answer some prompts with a language model of their own train on them first, and
        the trunk and the other heads see those prompts with zero weight (or not at all when nothing
        else is left). ``all_heads``: every head runs even when the batch has no target for it (with
        zero weight), so that every parameter takes part in every step, as FSDP requires.
        """
        images = self.encode_images(batch["pixel_values"], batch["pixel_mask"])
        total, terms = torch.zeros((), device=self.device), {}
        claimed = torch.zeros(len(batch["labels"]), dtype=torch.bool, device=self.device)
        for head in self.heads.values():
            rows = head.claims(batch)
            if rows is None:
                continue
            if bool(rows.any()):
                out = head.claimed_losses(self, batch, images, rows.nonzero()[:, 0])
                total, terms = total + out.total, {**terms, **out.terms}
            elif all_heads:  # it takes part too, with zero weight
                unused = head.claimed_losses(self, batch, images, rows.new_zeros(1, dtype=torch.long))
                total = total + 0.0 * unused.total
            claimed = claimed | rows
        if bool(claimed.all()) and not all_heads:
            return PixelLLMOutput(total, terms)
        if bool(claimed.any()):
            batch = {**batch, **{key: batch[key] * ~claimed for key in ("caption_weight", "location_weight")}}
        step = self._trunk_pass(batch, images)
        terms["text"] = smoothed_cross_entropy(step.logits, batch["labels"], batch["caption_weight"],
                                               self.config.label_smoothing)
        total = total + terms["text"]
        for head in self.heads.values():
            out = head.losses(self, step, all_heads)
            if out is not None:
                total, terms = total + out.total, {**terms, **out.terms}
        return PixelLLMOutput(total, terms, step.logits, step.outputs)

    def _trunk_pass(self, batch: dict, images: ImageFeatures) -> TrainingPass:
        prompts = Prompts(batch["prompt_image_index"], batch["prompt_boxes"], batch["prompt_is_point"])
        visual = self.visual_tokens(images, prompts)
        hidden, logits = self.language(visual, batch["input_ids"], batch["attention_mask"], batch["labels"])
        return TrainingPass(batch, images, prompts, visual, hidden, logits)

    # ------------------------------------------------------------------------------------------
    # Parameters and checkpoints

    def parts(self) -> dict[str, nn.Module]:
        """The trunk's parts and the heads (``heads.<name>``), in order."""
        trunk = {name: module for name, module in self.named_children() if name != "heads"}
        return {**trunk, **{f"heads.{name}": head for name, head in self.heads.items()}}

    def train_only(self, paths: list[str]) -> None:
        """Train only the named parts (``parts()`` names, or any module path such as
        ``heads.mask.adapter``): every other weight stops taking gradients and every other module
        stays in eval mode (no dropout), so that a new part can learn on top of a trained model."""
        modules = dict(self.named_modules())
        unknown = sorted(path for path in paths if not path or path not in modules)
        if unknown:
            raise ConfigError(f"train_only names no part of the model: {', '.join(unknown)} "
                              f"(parts: {', '.join(self.parts())})")
        self.frozen = tuple(_frozen_paths(self, set(paths)))
        trained = tuple(f"{path}." for path in paths)
        for name, parameter in self.named_parameters():
            if not name.startswith(trained):
                parameter.requires_grad_(False)
        self.train(self.training)

    def parameter_counts(self) -> dict[str, tuple[int, int]]:
        """``(total, trainable)`` parameters of each part (``parts()``) and of ``"all"``."""
        return {name: (sum(p.numel() for p in module.parameters()),
                       sum(p.numel() for p in module.parameters() if p.requires_grad))
                for name, module in {**self.parts(), "all": self}.items()}

    def save_pretrained(self, directory: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write ``config.json``, ``model.safetensors`` and the tokenizer files (``checkpoint.save``)."""
        return checkpoint.save(self, directory, state_dict)

    @classmethod
    def from_config(cls, config: PixelLLMConfig, tokenizer=None) -> PixelLLM:
        """A PixelLLM with freshly initialized weights (the tokenizer gains the heads' special tokens)."""
        return cls(config, **build.build_parts(config, tokenizer), tokenizer=tokenizer)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, device: str | torch.device | None = None,
                        config: PixelLLMConfig | None = None) -> PixelLLM:
        """Load a checkpoint directory or Hugging Face repository id (``checkpoint.load``)."""
        return checkpoint.load(cls, name_or_path, device=device, config=config)


def _frozen_paths(module: nn.Module, trained: set[str], prefix: str = ""):
    """The fewest module paths that cover every module but the ``trained`` ones and what they hold."""
    for name, child in module.named_children():
        path = prefix + name
        if path in trained:
            continue
        if any(t.startswith(path + ".") for t in trained):
            yield from _frozen_paths(child, trained, path + ".")
        else:
            yield path
