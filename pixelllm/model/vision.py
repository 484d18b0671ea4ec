"""Dual image encoder: a frozen SAM ViT beside a trainable semantic ViT, concatenated on channels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pixelllm.model.frozen import KeepsFrozenInEval

# SAM normalizes with ImageNet statistics, CLIP with its own, SigLIP to [-1, 1].
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
SEMANTIC_STATS = {"clip_vision_model": (CLIP_MEAN, CLIP_STD), "siglip_vision_model": (SIGLIP_MEAN, SIGLIP_STD),
                  "pixelllm_eva02_vision": (CLIP_MEAN, CLIP_STD), "pixelllm_small_vit": (IMAGENET_MEAN, IMAGENET_STD)}


def normalize(pixel_values: torch.Tensor, pixel_mask: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalize ``(B, 3, S, S)`` images in [0, 1]; padding stays exactly 0 (the official habit)."""
    mean = pixel_values.new_tensor(mean).view(1, 3, 1, 1)
    std = pixel_values.new_tensor(std).view(1, 3, 1, 1)
    return (pixel_values - mean) / std * pixel_mask[:, None].to(pixel_values.dtype)


class DualImageEncoder(KeepsFrozenInEval):
    """SAM ViT (``transformers`` ``SamVisionEncoder``) || a CLIP, SigLIP or EVA02 vision tower.

    The semantic tower's final LayerNorm is applied to every token (SigLIP and the in-repo towers do
    so themselves; CLIP only to its class token, which is dropped). A SigLIP tower must have no pooling head
    (``vision_use_head=False``).

    Both maps are resized (bicubic) to the larger of the two grids and concatenated on channels:
    ``out_channels = sam_channels + semantic_channels`` (256 + 1024 = 1280 in the paper preset).
    """

    def __init__(self, sam_encoder: nn.Module, semantic: nn.Module, freeze_sam: bool = True):
        super().__init__()
        self.sam = sam_encoder
        self.semantic = semantic
        self.freeze_sam = freeze_sam
        if freeze_sam:
            self.sam.requires_grad_(False)
            self.frozen = ("sam",)
        sam_cfg, sem_cfg = sam_encoder.config, semantic.config
        self.sam_grid = sam_cfg.image_size // sam_cfg.patch_size
        self.semantic_grid = sem_cfg.image_size // sem_cfg.patch_size
        self.grid = max(self.sam_grid, self.semantic_grid)
        self.sam_channels = sam_cfg.output_channels
        self.out_channels = sam_cfg.output_channels + sem_cfg.hidden_size
        self.semantic_is_clip = sem_cfg.model_type == "clip_vision_model"
        self.semantic_stats = SEMANTIC_STATS[sem_cfg.model_type]

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode canvas images.

        Args:
            pixel_values: ``(B, 3, kS, kS)`` RGB in [0, 1], zero on padding, with ``k`` the semantic
                tower's input side over SAM's (1 unless the semantic tower takes finer pixels).
            pixel_mask: ``(B, S, S)`` bool, True on the image.

        Returns:
            features: ``(B, out_channels, G, G)`` with ``G`` the larger grid.
            sam_embeddings: ``(B, sam_channels, g, g)``, SAM's own map (the mask decoder's input).
        """
        k = pixel_values.shape[-1] // pixel_mask.shape[-1]
        coarse = pixel_values if k == 1 else F.avg_pool2d(pixel_values, k)
        sam_input = normalize(coarse, pixel_mask, IMAGENET_MEAN, IMAGENET_STD)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_sam):
            sam_embeddings = self.sam(sam_input).last_hidden_state
        fine_mask = pixel_mask if k == 1 else pixel_mask.repeat_interleave(k, 1).repeat_interleave(k, 2)
        semantic_input = normalize(pixel_values, fine_mask, *self.semantic_stats)
        tokens = self.semantic(pixel_values=semantic_input).last_hidden_state
        if self.semantic_is_clip:  # CLIP normalizes only its pooled class token: normalize all, drop the class
            tokens = self.semantic.post_layernorm(tokens[:, 1:])
        b, n, c = tokens.shape
        semantic_map = tokens.transpose(1, 2).reshape(b, c, self.semantic_grid, self.semantic_grid)
        maps = [self._to_grid(sam_embeddings), self._to_grid(semantic_map)]
        return torch.cat(maps, dim=1), sam_embeddings

    def _to_grid(self, feature_map: torch.Tensor) -> torch.Tensor:
        if feature_map.shape[-1] == self.grid:
            return feature_map
        return F.interpolate(feature_map, size=(self.grid, self.grid), mode="bicubic", align_corners=False)
