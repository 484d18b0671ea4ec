"""Prompt feature extractor: the part of PixelLLM that replaces ROIAlign.

Learnable output tokens and the prompt tokens attend to the image features through a SAM-style
two-way transformer (``transformers``' ``SamTwoWayTransformer``); the output tokens then each
pass their own linear projection, and a shared projection + LayerNorm moves them to the LM width.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import SamMaskDecoderConfig
from transformers.models.sam.modeling_sam import SamTwoWayTransformer

from pixelllm.config import ExtractorConfig
from pixelllm.model.box_pixels import BoxPixelEncoder
from pixelllm.model.features import ImageFeatures, Prompts, cell_centers
from pixelllm.model.prompt import PromptEncoder
from pixelllm.model.two_way import two_way


class PromptFeatureExtractor(nn.Module):
    """Image features + location prompt -> ``num_tokens`` visual tokens in the LM's width."""

    def __init__(self, config: ExtractorConfig, feature_dim: int, prompt_dim: int, lm_dim: int, canvas_size: int):
        super().__init__()
        width = config.width
        self.config, self.canvas_size = config, canvas_size
        self.num_tokens = config.num_tokens
        self.output_tokens = nn.Parameter(torch.randn(config.num_tokens, width))
        self.image_projection = nn.Linear(feature_dim, width)
        # SAM's prompt width (256) differs from the transformer's (512 in the paper): project both
        # the prompt tokens and the positional encoding.
        same = prompt_dim == width
        self.prompt_projection = nn.Identity() if same else nn.Linear(prompt_dim, width)
        self.position_projection = nn.Identity() if same else nn.Linear(prompt_dim, width)
        transformer_config = SamMaskDecoderConfig(
            hidden_size=width, num_hidden_layers=config.depth, num_attention_heads=config.heads,
            mlp_dim=config.mlp_dim, attention_downsample_rate=config.attention_downsample,
        )
        transformer_config._attn_implementation = "sdpa"
        self.transformer = SamTwoWayTransformer(transformer_config)
        # One Linear(width -> token_dim) per output token, stored as one batched weight.
        bound = width**-0.5
        token_shape = (config.num_tokens, width, config.token_dim)
        self.token_weight = nn.Parameter(torch.empty(token_shape).uniform_(-bound, bound))
        self.token_bias = nn.Parameter(torch.empty(config.num_tokens, config.token_dim).uniform_(-bound, bound))
        self.lm_projection = nn.Linear(config.token_dim, lm_dim)
        self.norm = nn.LayerNorm(lm_dim)
        self.box_pixels = (BoxPixelEncoder(config.box_pixels, width, lm_dim, config.box_pixel_dropout)
                           if config.box_pixels else None)

    def forward(self, images: ImageFeatures, prompts: Prompts, prompt_encoder: PromptEncoder) -> torch.Tensor:
        """Extract the visual tokens of each prompt.

        Args:
            images: the encoded images (``features (B, C, G, G)``, and the canvas ``pixels`` for box pixels).
            prompts: ``N`` location prompts on them.
            prompt_encoder: the model's SAM prompt encoder (sparse prompt tokens, the dense no-mask
                prompt and the grid's Fourier encoding).

        Returns:
            ``(N, num_tokens, lm_dim)``, with ``box_pixels`` ``(N, num_tokens + 4, lm_dim)``.
        """
        features, image_index = images.features, prompts.image_index
        n, grid, spans = len(prompts), features.shape[-1], prompts.spans
        image = self.image_projection(features.permute(0, 2, 3, 1))  # (B, G, G, W)
        image = image + self.prompt_projection(prompt_encoder.no_mask_embedding(grid).permute(1, 2, 0))
        keys = image[image_index].flatten(1, 2)  # (N, G*G, W)
        position = self.position_projection(prompt_encoder.dense_positional_encoding(grid).permute(1, 2, 0))
        outputs = self.output_tokens.expand(n, -1, -1)
        queries = torch.cat([outputs, self.prompt_projection(prompt_encoder(prompts.boxes, prompts.is_point))], dim=1)
        bias = self._box_bias(spans, grid, queries.shape[1]) if self.config.box_attention else None
        tokens, _ = two_way(self.transformer, queries, keys, queries, position.flatten(0, 1).expand(n, -1, -1), bias)
        tokens = tokens[:, : self.num_tokens]  # (N, T, W)
        tokens = torch.einsum("ntw,twd->ntd", tokens, self.token_weight) + self.token_bias
        tokens = self.norm(self.lm_projection(tokens))
        if self.box_pixels is None:
            return tokens
        box_tokens = self.box_pixels(images.pixels, image_index, spans, self.canvas_size)
        if not self.config.box_pixels_on_whole_image:
            box_tokens = box_tokens * ~prompts.covers_image(images)[:, None, None]
        return torch.cat([tokens, box_tokens], dim=1)

    def _box_bias(self, boxes: torch.Tensor, grid: int, num_queries: int) -> torch.Tensor:
        """Attention bias ``(N, 1, T + P, G*G)``: 0 where a token may look, -inf elsewhere.

        A token sees the grid cells that overlap its region: the prompt box, or with ``token_grid``
        g, output token ``k`` the cell ``(k // g, k % g)`` (row, column) of a g x g grid over the box.
        Every region overlaps at least one cell, so no token is left blind.
        """
        regions = boxes[:, None].expand(-1, num_queries, -1).clone()  # (N, T + P, 4)
        g = self.config.token_grid
        if g:
            k = torch.arange(g * g, device=boxes.device)
            row, col = (k // g).to(boxes.dtype), (k % g).to(boxes.dtype)
            x0, y0, x1, y1 = boxes[:, None].unbind(-1)
            w, h = (x1 - x0) / g, (y1 - y0) / g
            cells = [x0 + col * w, y0 + row * h, x0 + (col + 1) * w, y0 + (row + 1) * h]
            regions[:, : g * g] = torch.stack(cells, -1)
        centers = cell_centers(grid, self.canvas_size, boxes.device, boxes.dtype)
        half = self.canvas_size / grid / 2
        over_x = (centers + half > regions[..., 0:1]) & (centers - half < regions[..., 2:3])  # (N, T+P, G)
        over_y = (centers + half > regions[..., 1:2]) & (centers - half < regions[..., 3:4])
        visible = (over_y[..., :, None] & over_x[..., None, :]).flatten(-2)  # (N, T+P, G*G)
        bias = torch.zeros(visible.shape, dtype=boxes.dtype, device=boxes.device)
        return bias.masked_fill(~visible, float("-inf"))[:, None]
