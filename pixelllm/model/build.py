"""Builders: a PixelLLM from a config (random weights), or from real Hugging Face checkpoints.

``build_model(config)`` makes every part from its config; under ``torch.device("meta")`` it builds
the paper preset without memory, for counting. ``build_from_pretrained_parts`` loads a SAM
checkpoint (``facebook/sam-vit-*`` layout), a CLIP or SigLIP vision tower and a T5 or causal LM
from local directories, and resizes the position tables of both vision towers to the canvas.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
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
from pixelllm.model.extractor import PromptFeatureExtractor
from pixelllm.model.heads import LocationHead, PointerLocationHead
from pixelllm.model.language import language_model
from pixelllm.model.mask_refiner import MaskRefiner
from pixelllm.model.masks import MaskAdapter, MaskHead
from pixelllm.model.pixelllm import PixelLLM
from pixelllm.model.prompt import PromptEncoder
from pixelllm.model.proposals import ProposalHead
from pixelllm.model.reranker import ReferReranker
from pixelllm.model.scene import SceneCaptioner
from pixelllm.model.vision import DualImageEncoder
from pixelllm.model.words import BoxWordHead

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


def build_model(config: PixelLLMConfig, tokenizer=None) -> PixelLLM:
    """A PixelLLM with freshly initialized weights."""
    sam = new_sam(config)
    semantic = AutoModel.from_config(hf_config(config.semantic))
    lm_config = hf_config(config.lm)
    lm_class = AutoModelForSeq2SeqLM if lm_config.is_encoder_decoder else AutoModelForCausalLM
    return assemble(config, sam, semantic, lm_class.from_config(lm_config), tokenizer)


def assemble(config: PixelLLMConfig, sam: SamModel, semantic: torch.nn.Module, lm: torch.nn.Module,
             tokenizer=None) -> PixelLLM:
    """Compose a PixelLLM from transformers parts whose configs ``config`` records."""
    _check_tokenizer(tokenizer, lm.config)
    vision = DualImageEncoder(sam.vision_encoder, semantic, freeze_sam=config.freeze_sam)
    prompt_encoder = PromptEncoder(sam.prompt_encoder, frozen=config.freeze_sam)
    language = language_model(lm, config.lora_rank, config.lora_alpha, config.lora_targets)
    extractor = PromptFeatureExtractor(config.extractor, vision.out_channels, prompt_encoder.dim,
                                       language.hidden_size)
    head = location_head(config, language.hidden_size, vision.out_channels)
    adapter = MaskAdapter(config.mask_head, language.hidden_size, prompt_encoder.dim)
    masks = MaskHead(sam.mask_decoder, adapter, frozen=config.freeze_sam)
    proposals = ProposalHead(config.proposal_head, vision.out_channels, config.image_size)
    semantic_channels = vision.out_channels - vision.sam_channels
    words = BoxWordHead(semantic_channels, lm.config.vocab_size) if config.word_loss_weight > 0 else None
    pixel_words = (nn.Linear(BOX_PIXEL_TOKENS * config.extractor.width, lm.config.vocab_size)
                   if config.box_pixel_word_loss_weight > 0 else None)
    refiner = MaskRefiner(config.mask_refiner) if config.mask_refiner is not None else None
    reranker = (ReferReranker(config.refer_reranker, language.hidden_size, BOX_PIXEL_TOKENS * config.extractor.width)
                if config.refer_reranker is not None else None)
    scene = (SceneCaptioner(config.scene_captioner, copy.deepcopy(language), language.hidden_size, BOX_PIXEL_TOKENS)
             if config.scene_captioner is not None else None)
    return PixelLLM(config, vision, prompt_encoder, extractor, language, head, masks, proposals, words,
                    pixel_words, mask_refiner=refiner, refer_reranker=reranker, scene_captioner=scene,
                    tokenizer=tokenizer)


def location_head(config: PixelLLMConfig, lm_dim: int, feature_dim: int) -> LocationHead | PointerLocationHead:
    """The localization head that ``config.location_head.kind`` names."""
    head = config.location_head
    if head.kind == "pointer":
        return PointerLocationHead(lm_dim, feature_dim, config.image_size, head.hidden, head.depth)
    return LocationHead(lm_dim, head.hidden, head.depth)


def build_from_pretrained_parts(config: PixelLLMConfig | str = "paper", *, sam: str | os.PathLike | None = None,
                                semantic: str | os.PathLike | None = None, lm: str | os.PathLike | None = None,
                                tokenizer: str | os.PathLike | None = None) -> PixelLLM:
    """Build a PixelLLM whose SAM branch, semantic tower and LM come from checkpoint directories.

    Parts not given are built from ``config`` with random weights. The SAM tower is resized to
    ``config.image_size`` and the semantic tower to ``pixel_scale`` times it (absolute and relative
    position tables interpolated); the extractor, projections and heads are new. The tokenizer
    defaults to the LM directory's.
    """
    config = preset(config) if isinstance(config, str) else copy.deepcopy(config)
    parts = {}
    if sam is not None:
        parts["sam"] = load_sam(sam, config.image_size)
        config.sam = parts["sam"].config.to_diff_dict()
    if semantic is not None:
        parts["semantic"] = load_vision_tower(semantic, config.image_size * config.pixel_scale)
        config.semantic = parts["semantic"].config.to_diff_dict()
    if lm is not None:
        parts["lm"] = load_language_model(lm)
        config.lm = parts["lm"].config.to_diff_dict()
    config = PixelLLMConfig.from_dict(config.to_dict())  # validate the combination
    text = tokenizer or lm
    loaded_tokenizer = AutoTokenizer.from_pretrained(_checkpoint_dir(text)) if text is not None else None
    sam_model = parts.get("sam") or new_sam(config)
    semantic_model = parts.get("semantic") or AutoModel.from_config(hf_config(config.semantic))
    lm_model = parts.get("lm")
    if lm_model is None:
        lm_config = hf_config(config.lm)
        lm_class = AutoModelForSeq2SeqLM if lm_config.is_encoder_decoder else AutoModelForCausalLM
        lm_model = lm_class.from_config(lm_config)
    return assemble(config, sam_model, semantic_model, lm_model, loaded_tokenizer)


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


def load_vision_tower(path: str | os.PathLike, image_size: int) -> torch.nn.Module:
    """A CLIP or SigLIP vision tower (from a full CLIP/SigLIP checkpoint or a vision-only one).

    The patch part of the absolute position table is resized bicubically to the new grid (CLIP's
    class-token entry is kept); SigLIP's pooling head is dropped (PixelLLM uses every token).
    """
    path = _checkpoint_dir(path)
    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type not in VISION_TOWERS:
        raise ConfigError(f"{path}: semantic tower must be CLIP or SigLIP, got model_type {model_type!r}")
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


def _checkpoint_dir(path: str | os.PathLike) -> str:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist (no downloads: give a local directory)")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} lacks config.json: not a Hugging Face checkpoint directory")
    return str(path)


def _resize_2d(table: torch.Tensor, size: int) -> torch.Tensor:
    """``(1, C, G, G)`` -> ``(1, C, size, size)``, bicubic, computed in float32."""
    resized = F.interpolate(table.float(), size=(size, size), mode="bicubic", align_corners=False)
    return resized.to(table.dtype)


def _resize_1d(table: torch.Tensor, length: int) -> torch.Tensor:
    """``(L, C)`` -> ``(length, C)``, linear."""
    resized = F.interpolate(table.float().T[None], size=length, mode="linear", align_corners=False)
    return resized[0].T.to(table.dtype)


def _check_tokenizer(tokenizer, lm_config) -> None:
    if tokenizer is None:
        return
    vocab = lm_config.get_text_config().vocab_size
    if len(tokenizer) > vocab:
        raise ConfigError(f"tokenizer has {len(tokenizer)} tokens but the LM's vocabulary has {vocab}")
