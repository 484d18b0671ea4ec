"""PixelLM's segmentation codebook: the LM writes ``L x N`` codebook tokens after every target, and a
light pixel decoder turns each group's states into the target's mask.

The head owns

- its **special tokens** ``[SEG0] .. [SEG{L*N-1}]`` (scale ``l`` holds tokens ``l*N .. l*N+N-1``); an
  answer writes the whole group, in order, after each target ("the red circle[SEG0]...[SEG5] and ...");
- **which state**: the state that *predicts* each codebook token (PixelLM's shift, after LISA). In
  this codebase position ``j`` of the LM's states predicts ``labels[:, j]`` for both families (T5:
  the decoder's state whose input is ``labels[:, j-1]``; causal LMs: the adapter aligns the state at
  the previous token with ``labels[:, j]``), so the state of a codebook token at ``labels[:, j]`` is
  ``hidden[:, j]`` with no shift of ours; in decoding it is the state read *before* the token is
  written (``GenerationOutput.reads[name][i][j]``);
- the **projection** Linear(D, D) - ReLU - Linear(D, C) and the **fusion** per scale: the weighted
  sum of the scale's ``N`` projected states with ``token_weights (L, N)`` (init ``1 / N``), registered
  parameters when ``fusion_learnable`` (the paper), fixed buffers otherwise (PixelLM's released code,
  whose weights live in a plain list and never train); the scales' weights likewise (in the decoder);
- the **pixel decoder** (``pixelllm.model.pixel_decoder``) over the scale maps named in
  ``scale_maps``: ``fused`` (``ImageFeatures.features``, the SAM || semantic map) or ``semantic``
  (its semantic channels: the tower's final map). The trunk exposes no earlier layer of the
  semantic tower, so PixelLM's layers -2 and -11 are stood in for by the fused and the semantic map;
- its **losses**, on the prompts with ``codebook_weight > 0``: ``text_weight`` x the answer's
  cross-entropy (no smoothing, as PixelLM's LM loss; codebook tokens are ordinary targets),
  ``bce_weight`` x BCE + ``dice_weight`` x Dice of each target's canvas logits over the valid area,
  and the target refinement loss in the paper's form: the BCE of pixels claimed (logit > 0) by two or
  more of a prompt's masks weighs ``1 + refine_weight`` (0: off, as the released code); a prompt with
  no target trains on its text only;
- its **entry points** ``codebook_answers(model, questions)`` (prompt texts, the decoding hooks that
  complete every started group, the reader of the states) and ``codebook_masks(model, images,
  image_index, sequences, states)`` (each row's masks and scores); ``pixelllm.multi_segment``
  decodes with them.

Batch fields it reads (the training task muse: ``pixelllm.data.targets``, ``pixelllm.data.collate``):
``codebook_weight (N,)``, ``seg_masks (T, S, S)`` bool canvas masks of every target in label order,
``seg_prompt_index (T,)`` the prompt of each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pixelllm.errors import ConfigError
from pixelllm.model.decoding import NEG_INF, ForcedRuns
from pixelllm.model.features import ImageFeatures
from pixelllm.model.heads.base import BuildContext, Head, HeadLosses, TrainingPass
from pixelllm.model.losses import smoothed_cross_entropy
from pixelllm.model.pixel_decoder import PixelDecoder

SCALE_MAPS = ("fused", "semantic")
DICE_EPS = 1e-6  # PixelLM's


@dataclass
class CodebookConfig:
    """``scales`` L x ``tokens_per_scale`` N codebook tokens; ``scale_maps`` the image map of each scale
    (coarse to fine); the decoder's width ``dim`` and transformers; loss weights; the question's
    ``prompt`` (``{question}`` is replaced) and the answer's ``max_new_tokens`` (EOS included)."""

    scales: int = 2
    tokens_per_scale: int = 3
    scale_maps: list[str] = field(default_factory=lambda: list(SCALE_MAPS))
    dim: int = 128
    depth: int = 2
    heads: int = 4
    mlp_dim: int = 512
    fusion_learnable: bool = True
    text_weight: float = 1.0
    bce_weight: float = 2.0
    dice_weight: float = 0.5
    refine_weight: float = 0.0
    prompt: str = "{question} Please respond with segmentation mask."
    max_new_tokens: int = 96

    @property
    def group_size(self) -> int:
        return self.scales * self.tokens_per_scale


class CodebookGroups(ForcedRuns):
    """Decoding with codebook groups: after ``[SEG0]`` the rest of the group follows (``ForcedRuns``);
    no other codebook token starts anything; a group is not started when it could not end within
    ``max_new_tokens``. Reads every state (``name``), for ``codebook_masks``."""

    name = "codebook_states"

    def __init__(self, token_ids: list[int], max_new_tokens: int):
        super().__init__({token_ids[0]: token_ids[1:]})
        self.ids, self.max_new_tokens = token_ids, max_new_tokens

    def read(self, states: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return states

    def constrain(self, logits: torch.Tensor, history: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        forced = super().constrain(logits, history, rows)
        free = (forced > NEG_INF).sum(-1) > 1  # rows left a choice
        banned = self.ids[1:] if history.shape[1] + len(self.ids) <= self.max_new_tokens else self.ids
        blocked = forced.clone()
        blocked[:, banned] = NEG_INF
        return torch.where(free[:, None], blocked, forced)


@dataclass
class CodebookAnswers:
    """Questions to answer with codebook groups: ``prompts[i]`` the text prompt of row ``i``, the
    ``hooks`` to decode them with (greedy or beams, cached or not), ``reader`` the name of the states
    in ``GenerationOutput.reads``, ``max_new_tokens`` (EOS included)."""

    prompts: list[str]
    hooks: list
    reader: str
    max_new_tokens: int


class CodebookHead(Head):
    name = "codebook"
    Config = CodebookConfig
    loss_names = ("codebook_text", "codebook_bce", "codebook_dice", "codebook_refine")
    provides = ("codebook_answers", "codebook_masks")

    def __init__(self, config: CodebookConfig, context: BuildContext):
        super().__init__(config, context)
        d, c = context.lm_dim, config.dim
        self.projection = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, c))
        weights = torch.full((config.scales, config.tokens_per_scale), 1.0 / config.tokens_per_scale)
        if config.fusion_learnable:
            self.token_weights = nn.Parameter(weights)
        else:
            self.register_buffer("token_weights", weights)
        self.sam_channels = context.sam_channels
        channels = {"fused": context.feature_dim, "semantic": context.feature_dim - context.sam_channels}
        self.decoder = PixelDecoder([channels[m] for m in config.scale_maps], c, config.depth, config.heads,
                                    config.mlp_dim, config.fusion_learnable)

    @classmethod
    def check(cls, config: CodebookConfig, model_config) -> None:
        if config.scales < 1 or config.tokens_per_scale < 1:
            raise ConfigError(f"heads.codebook needs scales and tokens_per_scale >= 1, got {config.scales} "
                              f"and {config.tokens_per_scale}")
        if len(config.scale_maps) != config.scales or not set(config.scale_maps) <= set(SCALE_MAPS):
            raise ConfigError(f"heads.codebook.scale_maps must name {config.scales} maps out of "
                              f"{', '.join(SCALE_MAPS)}, got {config.scale_maps}")
        if config.dim % 8 or config.dim % config.heads:
            raise ConfigError(f"heads.codebook.dim must be a multiple of 8 and of heads, got {config.dim}")
        if config.max_new_tokens <= config.group_size:
            raise ConfigError(f"heads.codebook.max_new_tokens must exceed a group ({config.group_size})")

    @classmethod
    def special_tokens(cls, config: CodebookConfig) -> list[str]:
        return [f"[SEG{i}]" for i in range(config.group_size)]

    def token_ids(self, model) -> list[int]:
        """The ids of the group's tokens, in order."""
        return model.tokenizer.convert_tokens_to_ids(self.special_tokens(self.config))

    # ------------------------------------------------------------------------------------------
    # Masks from states

    def codes(self, states: torch.Tensor) -> torch.Tensor:
        """``(T, L*N, D)`` the states that predict each target's group -> ``(T, L, C)`` fused per scale."""
        projected = self.projection(states).unflatten(1, (self.config.scales, self.config.tokens_per_scale))
        return (projected * self.token_weights[..., None]).sum(2)

    def masks(self, model, images: ImageFeatures, image_index: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Canvas logits ``(T, S, S)`` of ``T`` targets on ``images[image_index]`` from their group states
        ``(T, L*N, D)``."""
        maps = {"fused": images.features, "semantic": images.features[:, self.sam_channels:]}
        logits = self.decoder([maps[m] for m in self.config.scale_maps], image_index, self.codes(states))
        size = model.config.image_size
        return F.interpolate(logits[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]

    # ------------------------------------------------------------------------------------------
    # Inference

    def codebook_answers(self, model, questions: list[str]) -> CodebookAnswers:
        """How to decode the answers of ``questions`` (one row each, on its whole image)."""
        hook = CodebookGroups(self.token_ids(model), self.config.max_new_tokens)
        return CodebookAnswers([self.config.prompt.format(question=q) for q in questions], [hook], hook.name,
                               self.config.max_new_tokens)

    def codebook_masks(self, model, images: ImageFeatures, image_index: torch.Tensor, sequences: list[list[int]],
                       states: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each row's target masks, all rows in one decoder pass.

        Args:
            images: the encoded images; image_index: ``(N,)`` the image of each row.
            sequences: each row's tokens (EOS excluded). states: each row's ``(len + 1, D)`` reads of
                ``CodebookGroups`` (state ``j`` predicts token ``j``).

        Returns:
            per row ``(g, S, S)`` canvas logits, one per complete group, in the order written.
        """
        ids, size = self.token_ids(model), model.config.image_size
        padded = torch.full((len(sequences), max(map(len, sequences), default=0)), -1, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            padded[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        rows, starts = group_starts(padded, ids)
        if len(rows) == 0:
            empty = images.features.new_zeros(0, size, size)
            return [empty for _ in sequences]
        gathered = torch.stack([states[r][s : s + len(ids)] for r, s in zip(rows.tolist(), starts.tolist(),
                                                                                strict=True)])
        logits = self.masks(model, images, image_index[rows.to(image_index.device)], gathered)
        return [logits[(rows == row).to(logits.device)] for row in range(len(sequences))]

    # ------------------------------------------------------------------------------------------
    # Training

    def losses(self, model, step: TrainingPass, all_heads: bool) -> HeadLosses | None:
        """The answer's text loss and every target's mask losses on the prompts with ``codebook_weight``;
        without any, one zero-weighted pass (``all_heads``)."""
        batch = step.batch
        weight = batch.get("codebook_weight")
        active = weight is not None and bool((weight > 0).any())
        if not (active or all_heads):
            return None
        if weight is None:
            weight = torch.zeros(len(batch["labels"]), device=step.hidden.device)
        text = smoothed_cross_entropy(step.logits, batch["labels"], weight, smoothing=0.0)
        rows, starts, targets = self._groups(model, batch, weight)
        if len(rows) == 0:
            blank = step.hidden.new_zeros(1, self.config.group_size, step.hidden.shape[-1])
            unused = self.masks(model, step.images, rows.new_zeros(1), blank)
            terms = {"codebook_text": text} if active else {}
            return HeadLosses(self.config.text_weight * text + 0.0 * unused.sum(), terms)
        positions = starts[:, None] + torch.arange(self.config.group_size, device=starts.device)
        states = step.hidden[rows[:, None], positions]
        logits = self.masks(model, step.images, step.prompts.image_index[rows], states)
        masks = mask_terms(logits, targets, batch["pixel_mask"][step.prompts.image_index[rows]], rows)
        total = (self.config.text_weight * text + self.config.dice_weight * masks["dice"]
                 + self.config.bce_weight * (masks["bce"] + self.config.refine_weight * masks["refine"]))
        return HeadLosses(total, {"codebook_text": text, **{f"codebook_{k}": v for k, v in masks.items()}})

    def _groups(self, model, batch: dict, weight: torch.Tensor):
        """The complete groups in the labels of the weighted prompts: their rows ``(T,)``, first
        positions ``(T,)`` and target masks ``(T, S, S)`` (``seg_masks`` in the same order)."""
        rows, starts = group_starts(batch["labels"], self.token_ids(model))
        keep = weight[rows] > 0
        rows, starts = rows[keep], starts[keep]
        size = batch["pixel_mask"].shape[-1]
        targets = batch.get("seg_masks", torch.zeros(0, size, size, dtype=torch.bool, device=rows.device))
        prompt_index = batch.get("seg_prompt_index", rows.new_zeros(0))
        wanted = weight[prompt_index] > 0
        if not torch.equal(prompt_index[wanted], rows):
            raise ValueError(f"the labels hold codebook groups on the prompts {rows.tolist()}, but seg_prompt_index "
                             f"has targets on {prompt_index[wanted].tolist()}")
        return rows, starts, targets[wanted]


def group_starts(ids: torch.Tensor, group: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every complete ``group`` of tokens in ``ids (N, L)``: its row ``(T,)`` and first position ``(T,)``,
    row by row, left to right."""
    k = len(group)
    if ids.shape[1] < k:
        empty = ids.new_zeros(0, dtype=torch.long)
        return empty, empty
    hit = (ids.unfold(1, k, 1) == torch.tensor(group, device=ids.device)).all(-1)
    rows, starts = hit.nonzero(as_tuple=True)
    return rows, starts


def mask_terms(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor,
               prompt_of: torch.Tensor) -> dict[str, torch.Tensor]:
    """PixelLM's mask losses of ``T`` targets, each averaged over the targets.

    Args:
        logits: ``(T, S, S)`` canvas logits. targets: ``(T, S, S)`` bool. valid: ``(T, S, S)`` bool, the
            image area (padding excluded). prompt_of: ``(T,)`` the prompt (question) of each target.

    Returns:
        ``bce``: BCE-with-logits averaged over valid pixels. ``dice``: ``1 - (2 p.t + eps) / (p + t + eps)``
        with ``p`` the sigmoid on valid pixels. ``refine``: the BCE of the valid pixels that two or more of
        the prompt's masks claim (logit > 0), over all valid pixels (the paper's extra weight on them).
    """
    logits, target, inside = logits.float(), targets.float(), valid.float()
    area = inside.sum((1, 2)).clamp(min=1)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * inside
    claimed = (logits.detach() > 0).float()
    claims = torch.zeros(int(prompt_of.max()) + 1, *claimed.shape[1:], device=claimed.device)
    overlap = claims.index_add_(0, prompt_of, claimed)[prompt_of] >= 2
    prob = torch.sigmoid(logits) * inside
    dice = 1 - (2 * (prob * target).sum((1, 2)) + DICE_EPS) / (prob.sum((1, 2)) + target.sum((1, 2)) + DICE_EPS)
    return {"bce": (bce.sum((1, 2)) / area).mean(), "dice": dice.mean(),
            "refine": ((bce * overlap).sum((1, 2)) / area).mean()}
