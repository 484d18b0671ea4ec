"""The mask head (referring segmentation): SAM's mask decoder prompted with the expression's box,
steered by the official mask adapter.

The adapter lets the prompt's visual tokens and the text's hidden states steer SAM: learned tokens
attend to them through a small two-way transformer, and the result, gated by ``tanh(alpha)``
(alpha starts at 0, so training starts from plain SAM), is added to SAM's two box-corner tokens.
The decoder is SAM's (its weights come with the SAM checkpoint), frozen with the rest of SAM.

Loss (SAM's, as the official refseg stage): ``focal_weight`` x focal + ``dice_weight`` x dice +
``iou_weight`` x the IoU prediction's squared error, on the masks the model gives (``mask_logits``:
this head's, or a later head's that refines them), prompted in training with the box at the last
word of the teacher-forced expression: the location head's (``prompt_box: predicted``, official) or
the target's (``target``, which lets a model trained from scratch learn masks before its boxes are good).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import SamMaskDecoderConfig
from transformers.models.sam.modeling_sam import SamTwoWayTransformer

from pixelllm.errors import ConfigError
from pixelllm.model.features import ImageFeatures
from pixelllm.model.frozen import KeepsFrozenInEval
from pixelllm.model.heads.base import BuildContext, Head, HeadLosses, TrainingPass
from pixelllm.model.prompt import PromptEncoder
from pixelllm.model.two_way import two_way


@dataclass
class MaskConfig:
    num_tokens: int = 2  # one per SAM box-corner token it is added to
    depth: int = 2
    heads: int = 8
    mlp_dim: int = 2048
    prompt_box: str = "predicted"  # the box that prompts the decoder in training: "predicted" or "target"
    focal_weight: float = 20.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0


class MaskAdapter(nn.Module):
    """Learned tokens x [visual tokens ; text states] -> a gated offset for SAM's box tokens."""

    def __init__(self, config: MaskConfig, lm_dim: int, prompt_dim: int):
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(config.num_tokens, prompt_dim))
        self.visual_projection = nn.Sequential(nn.LayerNorm(lm_dim, eps=1e-6), nn.Linear(lm_dim, prompt_dim))
        self.text_projection = nn.Sequential(nn.LayerNorm(lm_dim, eps=1e-6), nn.Linear(lm_dim, prompt_dim))
        transformer_config = SamMaskDecoderConfig(
            hidden_size=prompt_dim, num_hidden_layers=config.depth, num_attention_heads=config.heads,
            mlp_dim=config.mlp_dim,
        )
        transformer_config._attn_implementation = "sdpa"
        self.transformer = SamTwoWayTransformer(transformer_config)
        self.gate = nn.Parameter(torch.zeros(config.num_tokens, prompt_dim))

    def forward(self, box_tokens: torch.Tensor, visual: torch.Tensor, text: torch.Tensor,
                text_mask: torch.Tensor) -> torch.Tensor:
        """Adapt SAM's box tokens.

        Args:
            box_tokens: ``(N, 2, C)`` SAM corner tokens. visual: ``(N, V, D)`` the prompt's visual tokens.
            text: ``(N, L, D)`` LM hidden states of the expression; text_mask: ``(N, L)`` bool, True on tokens.

        Returns:
            ``(N, 2, C)``.
        """
        n = box_tokens.shape[0]
        keys = torch.cat([self.visual_projection(visual), self.text_projection(text)], dim=1)  # (N, K, C)
        key_valid = torch.cat([text_mask.new_ones(visual.shape[:2]), text_mask], dim=1)
        # Additive bias that hides padded text from the tokens (heads broadcast).
        bias = torch.zeros(key_valid.shape, dtype=keys.dtype, device=keys.device)
        bias = bias.masked_fill(~key_valid, float("-inf"))[:, None, None]  # (N, heads, tokens, keys)
        tokens = self.tokens.expand(n, -1, -1)  # the queries start as, and are encoded by, the tokens
        no_position = torch.zeros_like(keys)  # the official adapter gives its keys no positional encoding
        out, _ = two_way(self.transformer, tokens, keys, tokens, no_position, bias)
        return box_tokens + torch.tanh(self.gate) * out


class MaskHead(Head, KeepsFrozenInEval):
    """SAM mask decoder (``transformers``' ``SamMaskDecoder``) + ``MaskAdapter``: one mask per prompt."""

    name = "mask"
    Config = MaskConfig
    loss_names = ("mask_focal", "mask_dice", "mask_iou")
    provides = ("mask_logits",)

    def __init__(self, config: MaskConfig, context: BuildContext):
        super().__init__(config, context)
        self.decoder = context.sam.mask_decoder
        self.adapter = MaskAdapter(config, context.lm_dim, context.prompt_dim)
        if context.config.freeze_sam:
            self.decoder.requires_grad_(False)
            self.frozen = ("decoder",)

    @classmethod
    def check(cls, config: MaskConfig, model_config) -> None:
        if config.prompt_box not in ("predicted", "target"):
            raise ConfigError(f"heads.mask.prompt_box must be 'predicted' or 'target', got {config.prompt_box!r}")

    @classmethod
    def required(cls, config: MaskConfig) -> tuple[str, ...]:
        return ("token_boxes",) if config.prompt_box == "predicted" else ()

    def forward(self, prompt_encoder: PromptEncoder, sam_embeddings: torch.Tensor, boxes: torch.Tensor,
                visual: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor):
        """Predict a mask per box.

        Args:
            prompt_encoder: the model's SAM prompt encoder (boxes, dense prompt, positional encoding).
            sam_embeddings: ``(N, C, g, g)`` SAM's map of each prompt's image.
            boxes: ``(N, 4)`` canvas pixels. visual, text, text_mask: as ``MaskAdapter.forward``.

        Returns:
            mask logits ``(N, 4g, 4g)`` covering the canvas, and predicted IoU ``(N,)``.
        """
        n, _, grid, _ = sam_embeddings.shape
        box_tokens = prompt_encoder(boxes, torch.zeros(n, dtype=torch.bool, device=boxes.device))[:, :2]
        sparse = self.adapter(box_tokens, visual, text, text_mask)
        dense = prompt_encoder.no_mask_embedding(grid)[None].to(sam_embeddings.dtype)
        position = prompt_encoder.dense_positional_encoding(grid)[None].expand(n, -1, -1, -1)
        masks, iou = self.decoder(
            image_embeddings=sam_embeddings, image_positional_embeddings=position,
            sparse_prompt_embeddings=sparse[:, None], dense_prompt_embeddings=dense, multimask_output=False,
        )
        return masks[:, 0, 0], iou[:, 0, 0]

    def mask_logits(self, model, images: ImageFeatures, image_index: torch.Tensor, boxes: torch.Tensor,
                    visual: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor):
        """Canvas-size mask logits ``(N, S, S)`` and predicted IoU ``(N,)`` for ``N`` boxes.

        Args:
            images: the encoded images; image_index: ``(N,)`` the image of each box.
            boxes: ``(N, 4)`` canvas pixels (the box at the expression's last word).
            visual: ``(N, V, D)`` the prompts' visual tokens. text: ``(N, L, D)`` the LM's hidden
            states whose inputs are the expression's tokens; text_mask: ``(N, L)`` bool.
        """
        low_res, iou = self(model.prompt_encoder, images.sam_embeddings[image_index], boxes, visual, text, text_mask)
        return upsample_masks(low_res, model.config.image_size), iou

    def losses(self, model, step: TrainingPass, all_heads: bool) -> HeadLosses | None:
        """The mask loss of the prompts that have a mask target; without any, one prompt passes with
        zero weight (for ``all_heads``)."""
        batch = step.batch
        weight = batch.get("mask_weight", torch.zeros(len(batch["labels"]), device=step.hidden.device))
        has_masks = "gt_masks" in batch and bool((weight > 0).any())
        if not (has_masks or all_heads):
            return None
        rows = (weight > 0).nonzero()[:, 0]
        if len(rows) == 0:
            rows = rows.new_zeros(1)
        labels = batch["labels"][rows]
        last_word = (labels >= 0).sum(1) - 2  # the token just before EOS
        if self.config.prompt_box == "target":
            boxes = batch["label_boxes"][rows, last_word]
        else:
            boxes = step.outputs["token_boxes"][rows, last_word].detach()
        inputs = labels[:, :-1]
        text_mask = (inputs >= 0) & (inputs != model.language.eos_token_id)
        index = step.prompts.image_index[rows]
        logits, iou = model.capability("mask_logits")(step.images, index, boxes, step.visual[rows],
                                                      step.hidden[rows, 1:], text_mask)
        valid = batch["pixel_mask"][index]
        targets = batch["gt_masks"][rows] if "gt_masks" in batch else torch.zeros_like(valid)
        terms = mask_loss(logits, iou, targets, valid, weight[rows])
        total = (self.config.focal_weight * terms["focal"] + self.config.dice_weight * terms["dice"]
                 + self.config.iou_weight * terms["iou"])
        return HeadLosses(total, {f"mask_{name}": value for name, value in terms.items()} if has_masks else {})


def upsample_masks(logits: torch.Tensor, size: int) -> torch.Tensor:
    """``(N, h, w)`` low-resolution logits -> ``(N, size, size)`` canvas logits (bilinear)."""
    return F.interpolate(logits[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def mask_loss(logits: torch.Tensor, iou_pred: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor,
              weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """SAM's loss on canvas-size masks: focal (alpha 0.5, gamma 2) over valid pixels, dice, IoU MSE.

    Args:
        logits: ``(N, S, S)`` mask logits on the canvas. iou_pred: ``(N,)``.
        targets: ``(N, S, S)`` bool. valid: ``(N, S, S)`` bool, the image area (padding excluded).
        weight: ``(N,)`` per-prompt gate.

    Returns:
        ``focal``, ``dice`` and ``iou`` terms (unweighted), each averaged over gated prompts.
    """
    target = targets.float()
    logits = logits.float()
    prob = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    focal = 0.5 * ce * (1 - p_t) ** 2 * valid
    focal = focal.sum((1, 2)) / valid.sum((1, 2)).clamp(min=1)
    dice = 1 - (2 * (prob * target).sum((1, 2)) + 1) / (prob.sum((1, 2)) + target.sum((1, 2)) + 1)
    predicted = logits > 0
    intersection = (predicted & targets).sum((1, 2))
    union = (predicted | targets).sum((1, 2)).clamp(min=1)
    iou = (iou_pred.float() - intersection / union) ** 2
    denominator = weight.sum().clamp(min=1)
    return {name: (term * weight).sum() / denominator for name, term in
            (("focal", focal), ("dice", dice), ("iou", iou))}
