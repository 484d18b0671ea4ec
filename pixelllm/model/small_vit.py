"""A small in-repo ViT with a convolutional stem, the semantic tower of the tiny preset.

No pretrained tower exists at the tiny size, and a plain ViT trained from scratch learns slowly
(one big strided patch convolution); a few stride-2 convolutions before the transformer make it
learn far faster (Xiao et al. 2021, "Early convolutions help transformers see better"). It keeps the
transformers conventions (a ``PretrainedConfig`` with its own ``model_type``, registered with the
Auto classes), so configs and checkpoints treat it like CLIP or SigLIP.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput


class SmallViTConfig(PretrainedConfig):
    model_type = "pixelllm_small_vit"

    def __init__(self, image_size: int = 160, patch_size: int = 8, hidden_size: int = 128, num_hidden_layers: int = 3,
                 num_attention_heads: int = 4, intermediate_size: int = 256, stem_channels: int = 32,
                 stem_depth: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.image_size = image_size
        self.patch_size = patch_size  # the stem's total stride: a power of 2
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.stem_channels = stem_channels
        self.stem_depth = stem_depth  # 3x3 convolutions per stride-2 stage (the first one strided)


class SmallViTModel(PreTrainedModel):
    """Conv stem (stages of 3x3 convolutions, the first of each stride 2, with GroupNorm + GELU) ->
    learned absolute positions -> pre-norm transformer encoder -> LayerNorm.
    ``last_hidden_state``: ``(B, G*G, C)``."""

    config_class = SmallViTConfig
    main_input_name = "pixel_values"

    def __init__(self, config: SmallViTConfig):
        super().__init__(config)
        layers, channels = [], 3
        stages = config.patch_size.bit_length() - 1
        if 2**stages != config.patch_size:
            raise ValueError(f"patch_size must be a power of 2, got {config.patch_size}")
        for i in range(stages):
            out = config.hidden_size if i == stages - 1 else config.stem_channels * 2**i
            for j in range(config.stem_depth):
                layers += [nn.Conv2d(channels, out, 3, stride=2 if j == 0 else 1, padding=1)]
                last = i == stages - 1 and j == config.stem_depth - 1
                layers += [] if last else [nn.GroupNorm(1, out), nn.GELU()]
                channels = out
        self.stem = nn.Sequential(*layers)
        grid = config.image_size // config.patch_size
        self.position = nn.Parameter(torch.zeros(1, grid * grid, config.hidden_size))
        block = nn.TransformerEncoderLayer(
            config.hidden_size, config.num_attention_heads, config.intermediate_size, dropout=0.0,
            activation="gelu", batch_first=True, norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(block, config.num_hidden_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.hidden_size)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, SmallViTModel):
            nn.init.normal_(module.position, std=0.02)

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutput:
        """``(B, 3, S, S)`` normalized images -> ``last_hidden_state (B, (S/patch)^2, hidden)``."""
        tokens = self.stem(pixel_values).flatten(2).transpose(1, 2) + self.position
        return BaseModelOutput(last_hidden_state=self.norm(self.encoder(tokens)))


AutoConfig.register(SmallViTConfig.model_type, SmallViTConfig)
AutoModel.register(SmallViTConfig, SmallViTModel)
