"""Builders: the parts of a PixelLLM from a config (random weights), or from real checkpoints.

``build_parts(config)`` makes every part from its config; under ``torch.device("meta")`` it builds
the paper preset without memory, for counting. ``pretrained_parts`` loads a SAM checkpoint
(``facebook/sam-vit-*`` layout), a CLIP, SigLIP or EVA02 (timm layout) vision tower and a T5 or
causal LM from local directories or Hugging Face repository ids (``checkpoint.resolve``), and resizes
the position tables of both vision towers to the canvas. ``PixelLLM`` composes the parts.
"""

from __future__ import annotations

import copy
import json
import os

import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    CLIPVisionModel,
    PretrainedConfig,
    SamModel,
    SiglipVisionModel,
)

from pixelllm.config import PixelLLMConfig, preset
from pixelllm.errors import CheckpointError, ConfigError
from pixelllm.model.box_pixels import BOX_PIXEL_TOKENS
from pixelllm.model.checkpoint import resolve
from pixelllm.model.eva02 import load_eva02_tower
from pixelllm.model.extractor import PromptFeatureExtractor
from pixelllm.model.heads import BuildContext, head_configs
from pixelllm.model.language import language_model
from pixelllm.model.prompt import PromptEncoder
from pixelllm.model.vision import DualImageEncoder

VISION_TOWERS = {"clip": CLIPVisionModel, "clip_vision_model": CLIPVisionModel,
                 "siglip": SiglipVisionModel, "siglip_vision_model": SiglipVisionModel}


def hf_config(data: dict) -> PretrainedConfig:
    """Rebuild a transformers config from its ``to_dict()``."""
    data = dict(data)
    model_type = data.pop("model_type")
    for key in ("transformers_version", "architectures"):
        data.pop(key, None)
    try:
        return AutoConfig.for_model(model_type, **data)
    except ValueError as exc:
        raise ConfigError(f"unknown model_type {model_type!r}: {exc}") from None


def build_parts(config: PixelLLMConfig, tokenizer=None, *, sam: SamModel | None = None,
                semantic: torch.nn.Module | None = None, lm: torch.nn.Module | None = None) -> dict:
    """The parts of a PixelLLM (``vision``, ``prompt_encoder``, ``extractor``, ``language``,
    ``heads``): from the transformers models given, or new ones built from ``config``. The
    tokenizer gains the heads' special tokens that it lacks."""
    sam = sam or new_sam(config)
    semantic = semantic or AutoModel.from_config(hf_config(config.semantic))
    if lm is None:
        lm_config = hf_config(config.lm)
        lm = (AutoModelForSeq2SeqLM if lm_config.is_encoder_decoder else AutoModelForCausalLM).from_config(lm_config)
    heads = head_configs(config)
    _add_special_tokens(tokenizer, [token for cls, head_config in heads.values()
                                    for token in cls.special_tokens(head_config)])
    _check_tokenizer(tokenizer, lm.config)
    vision = DualImageEncoder(sam.vision_encoder, semantic, freeze_sam=config.freeze_sam)
    prompt_encoder = PromptEncoder(sam.prompt_encoder, frozen=config.freeze_sam)
    language = language_model(lm, config.lora_rank, config.lora_alpha, config.lora_targets)
    extractor = PromptFeatureExtractor(config.extractor, vision.out_channels, prompt_encoder.dim,
                                       language.hidden_size, config.image_size)
    context = BuildContext(config, language.hidden_size, vision.out_channels, vision.sam_channels, prompt_encoder.dim,
                           BOX_PIXEL_TOKENS * config.extractor.width if config.extractor.box_pixels else 0,
                           lm.config.get_text_config().vocab_size, sam=sam, language=language)
    return {"vision": vision, "prompt_encoder": prompt_encoder, "extractor": extractor, "language": language,
            "heads": {name: cls(head_config, context) for name, (cls, head_config) in heads.items()}}


def pretrained_parts(config: PixelLLMConfig | str = "paper", *, sam: str | os.PathLike | None = None,
                     semantic: str | os.PathLike | None = None, lm: str | os.PathLike | None = None,
                     tokenizer: str | os.PathLike | None = None) -> tuple[PixelLLMConfig, dict, object]:
    """``(config, parts, tokenizer)`` of a PixelLLM whose SAM branch, semantic tower and LM come from
    checkpoints (local directories or Hugging Face repository ids).

    Parts not given are built from ``config`` with random weights. The SAM tower is resized to
    ``config.image_size`` and the semantic tower to ``pixel_scale`` times it (absolute and relative
    position tables interpolated); the extractor and the heads are new. The tokenizer defaults to
    the LM checkpoint's.
    """
    config = preset(config) if isinstance(config, str) else copy.deepcopy(config)
    models = {}
    if sam is not None:
        models["sam"] = load_sam(sam, config.image_size)
        config.sam = models["sam"].config.to_diff_dict()
    if semantic is not None:
        models["semantic"] = load_vision_tower(semantic, config.image_size * config.pixel_scale, config.semantic)
        config.semantic = models["semantic"].config.to_diff_dict()
    if lm is not None:
        models["lm"] = load_language_model(lm)
        config.lm = models["lm"].config.to_diff_dict()
    config = PixelLLMConfig.from_dict(config.to_dict())  # validate the combination
    text = tokenizer or lm
    loaded_tokenizer = AutoTokenizer.from_pretrained(resolve(text)) if text is not None else None
    return config, build_parts(config, loaded_tokenizer, **models), loaded_tokenizer


def new_sam(config: PixelLLMConfig) -> SamModel:
    """A randomly initialized SAM that can be trained from scratch.

    transformers initializes a fresh ``SamModel`` only to be overwritten by a checkpoint: its vision
    tower's weights start at std 1e-10 (a dead branch) and its Fourier matrix at std hidden/2 (which
    turns coordinates into noise). This gives them the original SAM's initialization instead: ViT
    weights truncated-normal with std 0.02, the Fourier matrix standard normal.
    """
    sam = SamModel(hf_config(config.sam))
    with torch.no_grad():
        for module in sam.vision_encoder.modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                torch.nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    module.bias.zero_()
        gaussian = torch.randn_like(sam.shared_image_embedding.positional_embedding)
        sam.shared_image_embedding.positional_embedding.copy_(gaussian)
        sam.prompt_encoder.shared_embedding.positional_embedding.copy_(gaussian)
    return sam


# ----------------------------------------------------------------------------------------------
# Loading real checkpoints


def load_sam(path: str | os.PathLike, image_size: int) -> SamModel:
    """A ``SamModel`` checkpoint at a new canvas size, its position tables interpolated.

    The absolute table ``(1, G, G, C)`` is resized bicubically to the new grid; the relative tables
    of global-attention blocks ``(2G - 1, head_dim)`` linearly (windowed blocks keep theirs).
    """
    source = SamModel.from_pretrained(_checkpoint_dir(path))
    config = copy.deepcopy(source.config)
    grid = image_size // config.vision_config.patch_size
    config.vision_config.image_size = image_size
    config.prompt_encoder_config.image_size = image_size
    config.prompt_encoder_config.image_embedding_size = grid
    state = source.state_dict()
    if "vision_encoder.pos_embed" in state:
        table = state["vision_encoder.pos_embed"].permute(0, 3, 1, 2)
        state["vision_encoder.pos_embed"] = _resize_2d(table, grid).permute(0, 2, 3, 1)
    for i in config.vision_config.global_attn_indexes:
        for axis in ("h", "w"):
            key = f"vision_encoder.layers.{i}.attn.rel_pos_{axis}"
            if key in state:
                state[key] = _resize_1d(state[key], 2 * grid - 1)
    target = SamModel(config)
    target.load_state_dict(state, strict=True)
    return target


def load_vision_tower(path: str | os.PathLike, image_size: int, semantic: dict | None = None) -> torch.nn.Module:
    """A CLIP or SigLIP vision tower (from a full CLIP/SigLIP checkpoint or a vision-only one), or an
    EVA02 tower in the timm layout (``pixelllm.model.eva02``).

    The patch part of the absolute position table is resized bicubically to the new grid (CLIP's
    class-token entry is kept); SigLIP's pooling head is dropped (PixelLLM uses every token). An EVA02
    tower takes its rope grid and drop path from ``semantic`` (the config's tower, when it is EVA02).
    """
    path = _checkpoint_dir(path)
    raw = json.loads((path / "config.json").read_text())
    if str(raw.get("architecture", "")).startswith("eva02_"):
        own = semantic if (semantic or {}).get("model_type") == "pixelllm_eva02_vision" else {}
        return load_eva02_tower(path, image_size, rope_ref_grid=own.get("rope_ref_grid"),
                                drop_path_rate=own.get("drop_path_rate", 0.0))
    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type not in VISION_TOWERS:
        raise ConfigError(f"{path}: semantic tower must be CLIP, SigLIP or EVA02, got model_type {model_type!r}")
    source = VISION_TOWERS[model_type].from_pretrained(path)
    config = copy.deepcopy(source.config)
    old_grid, grid = config.image_size // config.patch_size, image_size // config.patch_size
    config.image_size = image_size
    if hasattr(config, "vision_use_head"):
        config.vision_use_head = False
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    key = "embeddings.position_embedding.weight"
    table = state[key]
    n_extra = table.shape[0] - old_grid * old_grid  # CLIP's class token comes first
    patches = table[n_extra:].T.reshape(1, -1, old_grid, old_grid)
    state[key] = torch.cat([table[:n_extra], _resize_2d(patches, grid).reshape(table.shape[1], -1).T])
    target = type(source)(config)
    target.load_state_dict(state, strict=True)
    return target


def load_language_model(path: str | os.PathLike) -> torch.nn.Module:
    path = _checkpoint_dir(path)
    config = AutoConfig.from_pretrained(path)
    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    return cls.from_pretrained(path)


def _checkpoint_dir(path: str | os.PathLike):
    """A Hugging Face checkpoint directory: local, or a repository id in the hub's cache."""
    directory = resolve(path)
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory} lacks config.json: not a Hugging Face checkpoint directory")
    return directory


def _resize_2d(table: torch.Tensor, size: int) -> torch.Tensor:
    """``(1, C, G, G)`` -> ``(1, C, size, size)``, bicubic, computed in float32."""
    resized = F.interpolate(table.float(), size=(size, size), mode="bicubic", align_corners=False)
    return resized.to(table.dtype)


def _resize_1d(table: torch.Tensor, length: int) -> torch.Tensor:
    """``(L, C)`` -> ``(length, C)``, linear."""
    resized = F.interpolate(table.float().T[None], size=length, mode="linear", align_corners=False)
    return resized[0].T.to(table.dtype)


def _add_special_tokens(tokenizer, tokens: list[str]) -> None:
    missing = [token for token in dict.fromkeys(tokens) if tokenizer is not None and token not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)


def _check_tokenizer(tokenizer, lm_config) -> None:
    if tokenizer is None:
        return
    vocab = lm_config.get_text_config().vocab_size
    if len(tokenizer) > vocab:
        raise ConfigError(f"tokenizer has {len(tokenizer)} tokens but the LM's vocabulary has {vocab}")
