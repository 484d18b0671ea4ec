"""PixelLM's light pixel decoder: masks from fused codebook vectors and multi-scale image maps.

Scale ``l`` (of ``L``) has its own neck (Conv1x1 - LN - Conv3x3 - LN, as PixelLM's
``image_feature_neck``, one per scale since our maps differ in channels), ``l`` ConvTranspose 2x
blocks (PixelLM's ``upsample_2x``; the grid ``G`` becomes ``G * 2^l``), its own two-way transformer
(SAM's layout, ``pixelllm.model.two_way``) between the tokens ``[IoU ; 4 mask tokens]`` (shared by the
scales) + the scale's fused codebook vector, all plus ``level_embed[l]``, and the scale's map; a
shared output upscaling (ConvTranspose 2x) and hypernetwork MLP turn the first mask token into mask
logits at ``G * 2^(l+1)``. The map of every scale after the first is multiplied by
``sigmoid(mask of the scale before) + 1`` (not detached, as PixelLM). The scales' masks, resized to
the finest, are summed with the weights ``scale_weights`` (init ``1 / L``; learnable, or fixed as
PixelLM's released code behaves, whose weights are never registered).

Departures: the positional encoding is a fixed random Fourier code of the cell centers per scale
(PixelLM takes SAM's prompt encoder's); PixelLM's dense "no mask" prompt, a constant added to the
map that never trains there, is left out (the neck's last LayerNorm has a bias). No SAM weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import SamMaskDecoderConfig
from transformers.models.sam.modeling_sam import SamLayerNorm, SamTwoWayTransformer

from pixelllm.model.features import cell_centers
from pixelllm.model.two_way import two_way

OUTPUT_TOKENS = 5  # SAM's IoU token and its four mask tokens; the first mask token gives the mask


def _neck(in_channels: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, dim, 1, bias=False), SamLayerNorm(dim, data_format="channels_first"),
                         nn.Conv2d(dim, dim, 3, padding=1, bias=False), SamLayerNorm(dim, data_format="channels_first"))


def _upsample(dim: int, out: int) -> nn.Sequential:
    """``(B, dim, h, w) -> (B, out, 2h, 2w)``."""
    return nn.Sequential(nn.ConvTranspose2d(dim, out, 2, stride=2), SamLayerNorm(out, data_format="channels_first"),
                         nn.GELU())


class FourierPositions(nn.Module):
    """A fixed random Fourier code of the cell centers of an ``h x w`` grid (SAM's form): ``(h * w, dim)``,
    row-major, from the centers in ``[-1, 1]``."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("gaussian", torch.randn(2, dim // 2))

    def forward(self, h: int, w: int) -> torch.Tensor:
        device, dtype = self.gaussian.device, self.gaussian.dtype
        y, x = cell_centers(h, 2.0, device, dtype) - 1, cell_centers(w, 2.0, device, dtype) - 1
        grid = torch.stack(torch.meshgrid(x, y, indexing="xy"), dim=-1).reshape(h * w, 2)
        angles = 2 * math.pi * grid @ self.gaussian
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class PixelDecoder(nn.Module):
    """See the module docstring.

    Args:
        in_channels: the channels of each scale's image map, coarse to fine (``L = len``).
        dim: the decoder's width ``C`` (the codebook vectors' too). depth, heads, mlp_dim: each
            scale's two-way transformer.
        learnable_scale_weights: the scales' weights train (the paper) or stay ``1 / L`` (the code).
    """

    def __init__(self, in_channels: Sequence[int], dim: int, depth: int, heads: int, mlp_dim: int,
                 learnable_scale_weights: bool = True):
        super().__init__()
        scales = len(in_channels)
        config = SamMaskDecoderConfig(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads,
                                      mlp_dim=mlp_dim)
        config._attn_implementation = "sdpa"
        self.necks = nn.ModuleList(_neck(c, dim) for c in in_channels)
        self.upsamples = nn.ModuleList(nn.Sequential(*(_upsample(dim, dim) for _ in range(level)))
                                       for level in range(scales))
        self.transformers = nn.ModuleList(SamTwoWayTransformer(config) for _ in range(scales))
        self.positions = nn.ModuleList(FourierPositions(dim) for _ in range(scales))
        self.output_tokens = nn.Parameter(torch.randn(OUTPUT_TOKENS, dim))
        self.level_embed = nn.Parameter(torch.randn(scales, dim))
        self.upscale = _upsample(dim, dim // 8)
        self.hypernetwork = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(),
                                          nn.Linear(dim, dim // 8))
        weights = torch.full((scales,), 1.0 / scales)
        if learnable_scale_weights:
            self.scale_weights = nn.Parameter(weights)
        else:
            self.register_buffer("scale_weights", weights)

    def forward(self, maps: Sequence[torch.Tensor], image_index: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Mask logits of ``T`` targets.

        Args:
            maps: per scale ``(B, C_l, G, G)``, the image maps of ``B`` images (canvas-aligned grids).
            image_index: ``(T,)`` the image of each target.
            codes: ``(T, L, C)`` each target's fused codebook vector of each scale.

        Returns:
            ``(T, R, R)`` logits over the whole canvas, ``R = G * 2^L`` (the finest scale's grid).
        """
        masks, previous = [], None
        for level in range(len(self.necks)):
            src = self.upsamples[level](self.necks[level](maps[level]))[image_index]
            if previous is not None:
                src = src * (torch.sigmoid(_resized(previous, src.shape[-1])) + 1)[:, None]
            previous = self._scale(level, src, codes[:, level])
            masks.append(previous)
        finest = masks[-1].shape[-1]
        return sum(w * _resized(m, finest) for w, m in zip(self.scale_weights, masks, strict=True))

    def _scale(self, level: int, src: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """One scale: ``src (T, C, h, w)`` and ``code (T, C)`` -> logits ``(T, 2h, 2w)``."""
        t, c, h, w = src.shape
        tokens = torch.cat([self.output_tokens.expand(t, -1, -1), code[:, None]], dim=1) + self.level_embed[level]
        keys = src.flatten(2).transpose(1, 2)
        position = self.positions[level](h, w).to(keys.dtype).expand(t, -1, -1)
        tokens, keys = two_way(self.transformers[level], tokens, keys, tokens, position, None)
        image = self.upscale(keys.transpose(1, 2).reshape(t, c, h, w))
        return torch.einsum("tc,tchw->thw", self.hypernetwork(tokens[:, 1]), image)


def _resized(logits: torch.Tensor, size: int) -> torch.Tensor:
    """``(T, h, w)`` -> ``(T, size, size)`` (bilinear; unchanged when already that size)."""
    if logits.shape[-1] == size:
        return logits
    return F.interpolate(logits[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
