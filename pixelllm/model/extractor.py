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


class PromptFeatureExtractor(nn.Module):
    """Image features + location prompt -> ``num_tokens`` visual tokens in the LM's width."""

    def __init__(self, config: ExtractorConfig, feature_dim: int, prompt_dim: int, lm_dim: int):
        super().__init__()
        width = config.width
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

    def forward(
        self,
        features: torch.Tensor,
        image_index: torch.Tensor,
        prompt_tokens: torch.Tensor,
        dense_prompt: torch.Tensor,
        positional_encoding: torch.Tensor,
    ) -> torch.Tensor:
        """Extract the visual tokens of each prompt.

        Args:
            features: ``(B, C, G, G)`` image features.
            image_index: ``(N,)`` image of each prompt.
            prompt_tokens: ``(N, P, C_prompt)`` sparse prompt embeddings.
            dense_prompt: ``(C_prompt, G, G)`` dense prompt (SAM's no-mask embedding).
            positional_encoding: ``(C_prompt, G, G)`` Fourier encoding of the grid.

        Returns:
            ``(N, num_tokens, lm_dim)``.
        """
        n = image_index.shape[0]
        image = self.image_projection(features.permute(0, 2, 3, 1))  # (B, G, G, W)
        image = image + self.prompt_projection(dense_prompt.permute(1, 2, 0))
        position = self.position_projection(positional_encoding.permute(1, 2, 0))
        queries = torch.cat(
            [self.output_tokens.expand(n, -1, -1), self.prompt_projection(prompt_tokens)], dim=1
        )
        keys = image[image_index].permute(0, 3, 1, 2)  # (N, W, G, G)
        position = position.permute(2, 0, 1)[None].expand(n, -1, -1, -1)
        tokens, _ = self.transformer(
            point_embeddings=queries[:, None], image_embeddings=keys,
            image_positional_embeddings=position, attention_similarity=None,
        )
        tokens = tokens[:, 0, : self.num_tokens]  # (N, T, W)
        tokens = torch.einsum("ntw,twd->ntd", tokens, self.token_weight) + self.token_bias
        return self.norm(self.lm_projection(tokens))
