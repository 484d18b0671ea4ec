"""Locations as tokens (VisionLLM v1's row): boxes written by the LM itself, as bin tokens or as text.

The head owns the location format (``pixelllm.locations``: ``format`` bins | text, ``num_bins``,
``coords`` absolute | relative, ``num_class_tokens``), the special tokens it needs (``<bin_j>`` in
the bins format, and the class tokens ``<c0>..``), the answer's text cross-entropy (``weight``, on
the prompts whose answer is written in these tokens: the batch's ``answer_weight``, tasks locate
and detect), and two entry points:

- ``locate(model, expressions)`` and ``detect(model, labels)``: ``Answers`` for a batch of prompts,
  the prompt texts, the decoding hooks of the answer's grammar and its reader. The caller decodes
  (``generate(..., hooks=answers.hooks)``, greedy, batched, with the cache) and gives each row's
  tokens to ``answers.read``, which returns ``(label, box)`` in canvas pixels.

In the bins format the hooks type the slots (``TypedSlots``): a referring answer is exactly four
location tokens then EOS; a detection answer is groups of a class token bound by its prompt then four
location tokens, then EOS. Equal neighbouring bins are legal, so the hooks turn the repeat rule off.
The text format is decoded freely and parsed (a group that does not parse is left out).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pixelllm.errors import ConfigError, InputError
from pixelllm.locations import BOX_VALUES, LocationFormat, locate_prompt
from pixelllm.model.decoding import NEG_INF, DecodeHook
from pixelllm.model.heads.base import Head, HeadLosses, TrainingPass
from pixelllm.model.losses import smoothed_cross_entropy

GROUP = 1 + BOX_VALUES  # a detection group: the class token, then the box


@dataclass
class LocationTokensConfig:
    """The ``LocationFormat`` fields; ``weight`` of the answer's cross-entropy; ``max_objects`` a
    detection answer may hold."""

    format: str = "bins"
    num_bins: int = 64
    coords: str = "absolute"
    num_class_tokens: int = 16
    weight: float = 1.0
    max_objects: int = 16

    @property
    def locations(self) -> LocationFormat:
        return LocationFormat(self.format, self.num_bins, self.coords, self.num_class_tokens)


class TypedSlots(DecodeHook):
    """The grammar of an answer in bin tokens, for ``N`` prompts decoded in step (every row has written
    ``t`` tokens at step ``t``).

    ``bins (V,)`` bool: the location tokens. ``classes (N, V)`` bool: the class tokens each prompt
    binds (None: referring answers, one box). ``eos``: its id. ``max_objects``: groups before EOS.
    """

    block_repeats = False  # equal neighbouring bins are legal

    def __init__(self, bins: torch.Tensor, classes: torch.Tensor | None, eos: int, max_objects: int = 1):
        self.bins, self.classes, self.eos, self.max_objects = bins, classes, eos, max_objects

    def constrain(self, logits: torch.Tensor, history: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        t = history.shape[1]
        box_slot = t < BOX_VALUES if self.classes is None else t % GROUP > 0
        if box_slot:
            allowed = self.bins.to(logits.device).expand_as(logits)
        else:
            allowed = torch.zeros_like(logits, dtype=torch.bool)
            allowed[:, self.eos] = True
            if self.classes is not None and t // GROUP < self.max_objects:
                allowed = allowed | self.classes.to(logits.device)[rows]
        return logits.masked_fill(~allowed, NEG_INF)


class FreeText(DecodeHook):
    """Numbers written as text may repeat: only turns the repeat rule off."""

    block_repeats = False


@dataclass
class Answers:
    """Prompts answered in location tokens: ``prompts[i]`` the text prompt of row ``i``, ``labels[i]``
    the names its class tokens are bound to (empty: a referring answer, one box), the ``hooks`` to
    decode them with, and ``max_new_tokens`` (EOS included)."""

    prompts: list[str]
    labels: list[list[str]]
    hooks: list[DecodeHook]
    max_new_tokens: int
    locations: LocationFormat
    tokenizer: object

    def read(self, row: int, sequence: list[int], valid_size) -> list[tuple[str | None, np.ndarray]]:
        """The ``(label, box)`` pairs of row ``row``'s answer ``sequence`` (EOS excluded): boxes
        ``(4,)`` float64 in the canvas pixels of an image whose valid part is ``valid_size = (W, H)``;
        the label None for a referring answer, and groups whose class token is not bound left out."""
        text = self.tokenizer.decode(sequence, skip_special_tokens=False)
        labels = self.labels[row]
        groups = self.locations.parse(text, with_class=bool(labels))
        return [(labels[slot] if labels else None, self.locations.dequantize(bins, valid_size))
                for slot, bins in groups if not labels or slot < len(labels)]


class LocationTokensHead(Head):
    name = "location_tokens"
    Config = LocationTokensConfig
    loss_names = ("location_tokens",)
    provides = ("locate", "detect")

    @classmethod
    def check(cls, config: LocationTokensConfig, model_config) -> None:
        problem = config.locations.problem()
        if problem:
            raise ConfigError(f"heads.{cls.name}: {problem}")
        if config.weight < 0 or config.max_objects < 1:
            raise ConfigError(f"heads.{cls.name}: weight must be >= 0 and max_objects >= 1, got "
                              f"{config.weight} and {config.max_objects}")

    @classmethod
    def special_tokens(cls, config: LocationTokensConfig) -> list[str]:
        return config.locations.special_tokens()

    def losses(self, model, step: TrainingPass, all_heads: bool) -> HeadLosses | None:
        """The answer's cross-entropy (no smoothing) over the prompts with ``answer_weight``."""
        weight = step.batch.get("answer_weight")
        if weight is None:
            return None
        loss = smoothed_cross_entropy(step.logits, step.batch["labels"], weight, smoothing=0.0)
        return HeadLosses(self.config.weight * loss, {"location_tokens": loss})

    # -- entry points ----------------------------------------------------------------------------

    def locate(self, model, expressions: list[str]) -> Answers:
        """The answers of referring ``expressions`` (one box each)."""
        prompts = [locate_prompt(text) for text in expressions]
        return self._answers(model, prompts, [[] for _ in expressions], BOX_VALUES + 1)

    def detect(self, model, labels: list[list[str]]) -> Answers:
        """The answers that detect ``labels[i]`` (names, bound to ``<c0>..`` in order) on prompt ``i``."""
        locations = self.config.locations
        for names in labels:
            if not names or len(names) > locations.num_class_tokens:
                raise InputError(f"detection takes 1 to {locations.num_class_tokens} labels, got {len(names)}")
            if len(set(names)) < len(names):
                raise InputError(f"detection labels repeat: {names}")
        prompts = [locations.detect_prompt(names) for names in labels]
        return self._answers(model, prompts, labels, GROUP * self.config.max_objects + 1)

    def _answers(self, model, prompts: list[str], labels: list[list[str]], max_tokens: int) -> Answers:
        locations, tokenizer = self.config.locations, model.tokenizer
        if locations.format == "text":  # a number takes a few tokens
            hooks = [FreeText()]
            max_tokens = max_tokens * 4
        else:
            vocab = model.language.vocab_size
            bins = _token_mask(tokenizer, locations.bin_tokens(), vocab)
            classes = torch.stack([_token_mask(tokenizer, locations.class_tokens()[: len(names)], vocab)
                                   for names in labels]) if any(labels) else None
            hooks = [TypedSlots(bins, classes, model.language.eos_token_id, self.config.max_objects)]
        return Answers(prompts, labels, hooks, max_tokens, locations, tokenizer)


def _token_mask(tokenizer, tokens: list[str], vocab: int) -> torch.Tensor:
    """``(V,)`` bool: True at the ids of ``tokens``."""
    mask = torch.zeros(vocab, dtype=torch.bool)
    mask[tokenizer.convert_tokens_to_ids(tokens)] = True
    return mask
