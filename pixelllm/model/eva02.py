"""EVA02 ViT (Fang et al. 2023, "EVA-02"), the paper's semantic tower, in the public timm layout.

An EVA02 block is a pre-norm ViT block with three changes: 2-D rotary position embedding on the
queries and keys of the patch tokens (the class token is not rotated), a SwiGLU MLP with a
LayerNorm on its hidden units (sub-LN), and biases on q and v only. The learned absolute table
(class entry first) is kept. Stochastic depth rises linearly over the blocks to
``drop_path_rate``.

The official PixelLLM tower (scenic ``projects/pixel_llm/modeling/eva02_vit.py`` and its configs)
is EVA02-L/14 (1024 wide, 24 deep, 16 heads, SwiGLU hidden ``int(1024 * 4 * 2 / 3) = 2730``) at
384 px, a 27 x 27 grid, drop path 0.1, a final LayerNorm on every token (``use_ln_post``) with the
class token dropped after it, the 224 px table (16 x 16 + 1) resized bicubically to the grid, and
rope positions that are the patch indices themselves (``pt_seq_len = image_size // patch``):
``eva02_large`` returns that config.

Checkpoints: the timm layout on the Hugging Face hub, ``config.json`` as timm writes it
(``architecture``, ``num_features``, ``global_pool``, ``pretrained_cfg``, optional ``model_args``)
and ``model.safetensors``, for ``eva02_{base,large}_patch14_*`` (MIM ``timm/eva02_large_patch14_224
.mim_m38m`` / ``.mim_in22k``, fine-tuned ``timm/eva02_large_patch14_448.mim_*_ft_*``) and the EVA02-CLIP
image towers ``eva02_large_patch14_clip_{224,336}`` and ``eva02_base_patch16_clip_224`` (these add a
sub-LN inside attention, ``attn.norm``); not EVA02-Ti/S (fused ``qkv``, no MLP sub-LN). Keys:
``cls_token``, ``pos_embed``, ``patch_embed.proj.{weight,bias}``, per block ``blocks.{i}.norm1``,
``attn.q_proj`` (bias), ``attn.k_proj`` (no bias), ``attn.v_proj`` (bias), [``attn.norm``],
``attn.proj``, ``norm2``, ``mlp.fc1_g``, ``mlp.fc1_x``, ``mlp.norm``, ``mlp.fc2``, then ``norm``
(CLIP towers) or ``fc_norm`` (MIM and fine-tuned: timm moved the MIM pretraining's per-token
``norm`` there), and ``head`` where ``num_classes > 0``. The parameter names below are those keys;
loading drops ``head.*`` and reads ``fc_norm.*`` as the final per-token ``norm.*`` (in the ImageNet
classifiers it normalized the pooled token). Images take the OpenAI CLIP statistics (every EVA02
``pretrained_cfg``, and the official PixelLLM).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput

from pixelllm.errors import CheckpointError


class Eva02VisionConfig(PretrainedConfig):
    """Defaults: the public EVA02-L/14 at 224 px (16 x 16 grid).

    ``rope_ref_grid``: rope positions are ``index * rope_ref_grid / grid`` (timm's ``ref_feat_shape``,
    EVA's ``pt_hw_seq_len``); equal to the grid, they are the patch indices. ``attn_inner_norm``:
    the sub-LN inside attention of the EVA02-CLIP towers (timm's ``scale_attn_inner``).
    """

    model_type = "pixelllm_eva02_vision"

    def __init__(self, image_size: int = 224, patch_size: int = 14, hidden_size: int = 1024,
                 num_hidden_layers: int = 24, num_attention_heads: int = 16, intermediate_size: int = 2730,
                 drop_path_rate: float = 0.0, rope_ref_grid: int = 16, rope_theta: float = 10000.0,
                 attn_inner_norm: bool = False, layer_norm_eps: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.drop_path_rate = drop_path_rate
        self.rope_ref_grid = rope_ref_grid
        self.rope_theta = rope_theta
        self.attn_inner_norm = attn_inner_norm
        self.layer_norm_eps = layer_norm_eps


def eva02_large(image_size: int) -> dict[str, Any]:
    """EVA02-L/14 with the official PixelLLM settings at ``image_size`` (384 -> a 27 x 27 grid)."""
    return {"model_type": Eva02VisionConfig.model_type, "image_size": image_size, "patch_size": 14,
            "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 2730,
            "drop_path_rate": 0.1, "rope_ref_grid": image_size // 14, "rope_theta": 10000.0,
            "attn_inner_norm": False, "layer_norm_eps": 1e-6}


def rope_tables(grid: int, ref_grid: float, head_dim: int, theta: float,
                device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """EVA02's 2-D rope as timm builds it: ``(sin, cos)``, each ``(grid*grid, head_dim)`` float32, tokens
    in row-major order. Channels ``[0, head_dim/2)`` rotate by the row, the rest by the column; each
    half holds ``head_dim/4`` frequencies ``theta ** (-j / (head_dim/4))``, each repeated for its channel pair.
    """
    bands = head_dim // 4
    freqs = 1.0 / theta ** (torch.arange(bands, device=device, dtype=torch.float32) / bands)
    positions = torch.arange(grid, device=device, dtype=torch.float32) / grid * ref_grid
    rows, cols = torch.meshgrid(positions, positions, indexing="ij")
    angles = torch.cat([rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs], dim=1)
    angles = angles.repeat_interleave(2, dim=1)
    return angles.sin(), angles.cos()


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair ``(x[2i], x[2i+1])`` of ``(..., N, D)`` by the angles of ``(N, D)`` tables."""
    pairs = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).reshape(x.shape)
    return (x.float() * cos + pairs.float() * sin).to(x.dtype)


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a residual branch per sample with probability ``rate``
    and scale the kept ones by ``1 / (1 - rate)``; the identity in eval mode."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        return x * x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(keep) / keep


class Eva02PatchEmbed(nn.Module):
    def __init__(self, config: Eva02VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, config.hidden_size, config.patch_size, stride=config.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` -> ``(B, G*G, C)``, row-major."""
        return self.proj(pixel_values.to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)


class Eva02Attention(nn.Module):
    def __init__(self, config: Eva02VisionConfig):
        super().__init__()
        width = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps) if config.attn_inner_norm else nn.Identity()
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        """``(B, 1 + G*G, C)`` (class token first) -> same; rope ``(G*G, C/heads)`` tables."""
        b, n, c = x.shape
        q, k, v = (proj(x).view(b, n, self.num_heads, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q = torch.cat([q[:, :, :1], apply_rope(q[:, :, 1:], sin, cos)], dim=2)
        k = torch.cat([k[:, :, :1], apply_rope(k[:, :, 1:], sin, cos)], dim=2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(self.norm(out.transpose(1, 2).reshape(b, n, c)))


class Eva02SwiGLU(nn.Module):
    """``fc2(norm(silu(fc1_g(x)) * fc1_x(x)))``."""

    def __init__(self, config: Eva02VisionConfig):
        super().__init__()
        width, hidden = config.hidden_size, config.intermediate_size
        self.fc1_g = nn.Linear(width, hidden)
        self.fc1_x = nn.Linear(width, hidden)
        self.norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(F.silu(self.fc1_g(x)) * self.fc1_x(x)))


class Eva02Block(GradientCheckpointingLayer):
    def __init__(self, config: Eva02VisionConfig, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = Eva02Attention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = Eva02SwiGLU(config)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), sin, cos))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Eva02VisionModel(PreTrainedModel):
    """Patch embedding -> class token + absolute positions -> EVA02 blocks -> LayerNorm on every token.
    ``last_hidden_state``: ``(B, G*G, C)``, the patch tokens only (the class token is dropped)."""

    config_class = Eva02VisionConfig
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["Eva02Block"]

    def __init__(self, config: Eva02VisionConfig):
        super().__init__(config)
        head_dim, rest = divmod(config.hidden_size, config.num_attention_heads)
        if rest or head_dim % 4:
            raise ValueError(f"hidden_size / num_attention_heads must be a multiple of 4 (2-D rope), "
                             f"got {config.hidden_size} / {config.num_attention_heads}")
        self.grid = config.image_size // config.patch_size
        self.patch_embed = Eva02PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid * self.grid, config.hidden_size))
        rates = torch.linspace(0, config.drop_path_rate, config.num_hidden_layers, device="cpu").tolist()
        self.blocks = nn.ModuleList(Eva02Block(config, rate) for rate in rates)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, Eva02VisionModel):
            init.trunc_normal_(module.cls_token, std=0.02)
            init.trunc_normal_(module.pos_embed, std=0.02)

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutput:
        """``(B, 3, S, S)`` normalized images -> ``last_hidden_state (B, (S/patch)^2, hidden)``."""
        patches = self.patch_embed(pixel_values)
        tokens = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1) + self.pos_embed
        config = self.config
        sin, cos = rope_tables(self.grid, config.rope_ref_grid, config.hidden_size // config.num_attention_heads,
                               config.rope_theta, tokens.device)
        for block in self.blocks:
            tokens = block(tokens, sin, cos)
        return BaseModelOutput(last_hidden_state=self.norm(tokens)[:, 1:])


AutoConfig.register(Eva02VisionConfig.model_type, Eva02VisionConfig)
AutoModel.register(Eva02VisionConfig, Eva02VisionModel)


# ----------------------------------------------------------------------------------------------
# Loading the public timm checkpoints

_ARCHITECTURE = re.compile(r"eva02_(base|large)_patch(14|16)(_clip)?_\d+")
_SIZES = {"base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
          "large": {"embed_dim": 1024, "depth": 24, "num_heads": 16}}
# timm model_args that can describe a checkpoint; img_size is the checkpoint's own (the table says its grid)
_MODEL_ARGS = {"img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "ref_feat_shape"}


def load_eva02_tower(path: str | Path, image_size: int, *, rope_ref_grid: int | None = None,
                     drop_path_rate: float = 0.0) -> Eva02VisionModel:
    """An EVA02 tower at ``image_size`` from a local timm checkpoint directory (safetensors only).

    The patch part of ``pos_embed`` is resized bicubically (antialiased, as timm) to the grid
    ``image_size // patch_size``, its class entry kept; the rope is rebuilt for that grid. The rope
    reference grid stays the checkpoint's (timm's behaviour: 16 for every public EVA02) unless
    ``rope_ref_grid`` is given (the grid itself is the official PixelLLM setting).
    """
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist (no downloads: give a local directory)")
    config = _config_from_timm(directory / "config.json", image_size)
    config.drop_path_rate = drop_path_rate
    if rope_ref_grid is not None:
        config.rope_ref_grid = rope_ref_grid
    file = directory / "model.safetensors"
    state = _tower_names(_read_safetensors(file))
    model = Eva02VisionModel(config)
    expected = model.state_dict()
    _check_keys(file, config, set(state), set(expected))
    state["pos_embed"] = _resize_positions(file, state["pos_embed"], model.grid)
    wrong = [k for k, v in state.items() if v.shape != expected[k].shape]
    if wrong:
        raise CheckpointError(f"{file}: {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, the config's "
                              f"EVA02 needs {tuple(expected[wrong[0]].shape)} ({len(wrong)} tensors differ)")
    model.load_state_dict(state, strict=True)
    return model


def _config_from_timm(file: Path, image_size: int) -> Eva02VisionConfig:
    """The tower config of a timm ``config.json``: the architecture's sizes, overridden by ``model_args``."""
    if not file.is_file():
        raise CheckpointError(f"{file.parent} lacks config.json: not a timm checkpoint directory")
    try:
        data = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from None
    architecture = data.get("architecture") if isinstance(data, dict) else None
    match = _ARCHITECTURE.fullmatch(architecture) if isinstance(architecture, str) else None
    if match is None:
        raise CheckpointError(f"{file}: architecture {architecture!r} is not a timm EVA02 base/large "
                              "(eva02_base_* or eva02_large_*)")
    args = {**_SIZES[match[1]], "patch_size": int(match[2]), "mlp_ratio": 4 * 2 / 3, "ref_feat_shape": 16}
    model_args = data.get("model_args") or {}
    unknown = sorted(set(model_args) - _MODEL_ARGS) if isinstance(model_args, dict) else ["(not a mapping)"]
    if unknown:
        raise CheckpointError(f"{file}: model_args {unknown} are not supported by the EVA02 tower")
    args.update(model_args)
    ref = args["ref_feat_shape"]
    ref = [ref, ref] if isinstance(ref, int) else list(ref)
    if len(ref) != 2 or ref[0] != ref[1]:
        raise CheckpointError(f"{file}: ref_feat_shape {args['ref_feat_shape']} is not square")
    return Eva02VisionConfig(
        image_size=image_size, patch_size=args["patch_size"], hidden_size=args["embed_dim"],
        num_hidden_layers=args["depth"], num_attention_heads=args["num_heads"],
        intermediate_size=int(args["embed_dim"] * args["mlp_ratio"]), rope_ref_grid=ref[0],
        attn_inner_norm=match[3] is not None,
    )


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file.parent} lacks model.safetensors (only safetensors are read, never pickles)")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from None


def _tower_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the classifier / projection ``head.*``; read ``fc_norm.*`` as the final ``norm.*``."""
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    if "norm.weight" not in state:
        state = {re.sub(r"^fc_norm\.", "norm.", k): v for k, v in state.items()}
    return state


def _check_keys(file: Path, config: Eva02VisionConfig, found: set[str], expected: set[str]) -> None:
    unexpected, missing = sorted(found - expected), sorted(expected - found)
    if unexpected or missing:
        kind = "EVA02-CLIP (attn.norm)" if config.attn_inner_norm else "EVA02 (no attn.norm)"
        raise CheckpointError(
            f"{file}: not the timm {kind} layout of its config.json: "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}, {len(missing)} missing keys {missing[:3]}"
        )


def _resize_positions(file: Path, table: torch.Tensor, grid: int) -> torch.Tensor:
    """``(1, 1 + g*g, C)`` -> ``(1, 1 + grid*grid, C)``, computed in float32."""
    old = math.isqrt(table.shape[1] - 1)
    if old * old != table.shape[1] - 1:
        raise CheckpointError(f"{file}: pos_embed has {table.shape[1]} entries, not 1 + a square grid")
    if old == grid:
        return table
    patches = table[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(table.dtype)
    return torch.cat([table[:, :1], patches], dim=1)
