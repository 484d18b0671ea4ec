"""Model configuration: one dataclass that round-trips to ``config.json``, and the named presets.

The three pretrained parts keep their own Hugging Face configs, stored as plain dicts with their
``model_type`` so that any transformers config class can be rebuilt from them:

- ``sam``: a full ``SamConfig`` (frozen image encoder, prompt encoder, mask decoder);
- ``semantic``: a vision tower config (``clip_vision_model`` or ``siglip_vision_model``);
- ``lm``: a language model config, either T5 (encoder-decoder) or any causal LM.

Presets: ``tiny`` (the embedded default's size), ``base`` and ``paper`` (SAM ViT-H + ViT-L/14 +
Flan-T5-XL with LoRA rank 32, as the paper).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pixelllm.errors import ConfigError

CONFIG_NAME = "config.json"

DEFAULT_PROMPTS = {
    "trace": "A long image caption:",
    "refer": "where is {expression}",
    "region": "an object of",
}


@dataclass
class ExtractorConfig:
    """Prompt feature extractor: a SAM-style two-way transformer with learnable output tokens."""

    depth: int = 6
    width: int = 512
    heads: int = 8
    mlp_dim: int = 2048
    attention_downsample: int = 2
    num_tokens: int = 32
    token_dim: int = 1024  # width of each token's own output projection, before the LM projection
    # Masked attention for models trained from scratch (off in the official design, where every token
    # attends to the whole image): tokens attend to the image inside the prompt box only, and with
    # ``token_grid`` g the output tokens (g x g of them) each to their own cell of a g x g grid over the
    # box. Learning where to look from the corner tokens alone takes far more data than a CPU hour holds.
    box_attention: bool = False
    token_grid: int = 0
    # Also not in the official design: add a learned embedding of the prompt box's shape (log width,
    # log height, log aspect ratio and its magnitude) to the output tokens. SAM's low-frequency
    # corner encoding blurs a one-pixel difference, and the aspect ratio is what tells a small
    # hexagon's box (0.87 or 1.15) from a circle's, a square's or a diamond's (1.0).
    box_geometry: bool = False
    # Also not in the official design: ``box_pixels`` R > 0 appends 4 tokens read by a small CNN
    # from an R x R resampling of the pixels around the prompt box (``pixelllm.model.box_pixels``).
    # At the tiny canvas a small object's shape is a cell or two of the towers' stride-8 map; read at
    # a common scale, 16 x 16 samples tell the six shapes apart (docs/model_card.md, stop 19).
    box_pixels: int = 0
    # In training, each prompt's box-pixel tokens are zeroed with this probability, so that the LM
    # also learns to read a region through the extractor's tokens (without it, localization learned
    # slower in the full recipe; docs/model_card.md, stop 19).
    box_pixel_dropout: float = 0.0
    # False: prompts on the whole image (traced captions, referring expressions) get zeros for the
    # box-pixel tokens, not a thumbnail of the image (masks gained, traced captions lost; stop 20).
    box_pixels_on_whole_image: bool = True


@dataclass
class LocationHeadConfig:
    """Localization head (``pixelllm.model.heads``): ``mlp`` reads the hidden state alone (the
    paper's); ``pointer`` points at a cell of the image features, trained by an extra cross-entropy
    (weight ``selection_weight``) on the cell that holds the target box's center."""

    kind: str = "mlp"
    hidden: int = 512
    depth: int = 3
    selection_weight: float = 1.0


@dataclass
class MaskHeadConfig:
    """Mask adapter (learned tokens, two-way transformer, tanh gate) in front of SAM's decoder."""

    num_tokens: int = 2  # one per SAM box-corner token it is added to
    depth: int = 2
    heads: int = 8
    mlp_dim: int = 2048


@dataclass
class MaskRefinerConfig:
    """Not in the official design: the mask decoder's canvas logits cut to a square around the box
    and corrected there by a small CNN from the square's canvas pixels (``pixelllm.model.mask_refiner``).
    The decoder's output has a quarter of the canvas' resolution; the refiner reads the pixels."""

    resolution: int = 48  # samples per side of the square
    margin: float = 0.25  # the square's side is the box's longer side times 1 + 2 * margin
    width: int = 32  # a multiple of 8 (GroupNorm's groups)
    dilations: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 1])  # one 3 x 3 convolution each


@dataclass
class RerankerConfig:
    """Not in the official design: referring expressions' boxes chosen again among the pointer's
    ``candidates`` best distinct peaks from their pixels (``pixelllm.model.reranker``; needs the
    pointer head and ``extractor.box_pixels``)."""

    candidates: int = 3
    hidden: int = 128


@dataclass
class SceneCaptionerConfig:
    """Not in the official design: whole-image captions (traced narratives) written by a copy of
    the LM from the proposal head's best ``objects`` boxes, each read by the box pixel encoder, and
    each word located on the box of the object it was written from (``pixelllm.model.scene``;
    needs ``extractor.box_pixels``)."""

    objects: int = 8
    hidden: int = 128  # width of the matches between the LM's states and the objects


@dataclass
class ProposalHeadConfig:
    """Simple Feature Pyramid + class-agnostic CenterNet head for dense captioning."""

    width: int = 256
    scales: tuple[float, ...] = (2.0, 1.0, 0.5)  # pyramid levels, relative to the fused feature map
    top_blocks: int = 2  # extra stride-2 levels above the coarsest scale (ViTDet's p6, p7)
    tower_depth: int = 4  # conv + GroupNorm + ReLU layers shared by the heatmap and box outputs
    pre_nms_topk: int = 1000  # highest-scoring cells over all levels that enter NMS
    max_proposals: int = 100
    nms_iou: float = 0.5
    score_threshold: float = 0.05


@dataclass
class PixelLLMConfig:
    """Everything needed to rebuild a PixelLLM (weights aside).

    Sizes: the canvas is ``image_size`` x ``image_size`` pixels; the image is resized so its long
    side fills it and is zero-padded to the square. All model-internal coordinates are canvas pixels.
    """

    image_size: int = 384
    sam: dict[str, Any] = field(default_factory=dict)
    semantic: dict[str, Any] = field(default_factory=dict)
    lm: dict[str, Any] = field(default_factory=dict)
    extractor: ExtractorConfig = field(default_factory=ExtractorConfig)
    location_head: LocationHeadConfig = field(default_factory=LocationHeadConfig)
    mask_head: MaskHeadConfig = field(default_factory=MaskHeadConfig)
    mask_refiner: MaskRefinerConfig | None = None
    refer_reranker: RerankerConfig | None = None
    scene_captioner: SceneCaptionerConfig | None = None
    proposal_head: ProposalHeadConfig = field(default_factory=ProposalHeadConfig)
    freeze_sam: bool = True  # SAM image encoder, prompt encoder and mask decoder
    lora_rank: int = 32  # > 0: LM frozen, LoRA on ``lora_targets``; 0: the whole LM trains
    lora_alpha: float | None = None  # None: equal to the rank (scale 1, as the official code)
    lora_targets: list[str] | None = None  # None: the family's q and v projections
    label_smoothing: float = 0.1
    location_loss_weight: float = 0.1
    # How location losses average: over all located tokens of a batch ("token", the official code)
    # or per prompt first ("prompt"), so that a one-token referring expression weighs as much as a
    # seventy-word trace when tasks share a batch.
    location_average: str = "token"
    # The box that prompts the mask decoder in training: "predicted" at the last word (the official
    # code) or "target" (the ground-truth box, which lets a model trained from scratch learn masks
    # before its boxes are good).
    mask_prompt_box: str = "predicted"
    # > 0: the box word head's loss (model/words.py) at this weight; 0 (the official design): no head.
    word_loss_weight: float = 0.0
    # > 0 (needs extractor.box_pixels): the same loss from a linear layer over the box pixel
    # encoder's own 2 x 2 map, so that its CNN learns the shapes before the LM has to read its tokens.
    box_pixel_word_loss_weight: float = 0.0
    max_text_tokens: int = 128
    prompts: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_PROMPTS))

    @property
    def pixel_scale(self) -> int:
        """The semantic tower's input side over the canvas side: 1 in the official design; k > 1 draws
        the image at k times the canvas resolution for that tower alone (SAM gets it averaged back to
        the canvas), while every coordinate stays in canvas pixels."""
        return self.semantic["image_size"] // self.image_size

    def __post_init__(self) -> None:
        for name, cls in _NESTED.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _dataclass_from_dict(cls, value, name))
        for part in ("sam", "semantic", "lm"):  # JSON-normal form (e.g. id2label keys become strings)
            setattr(self, part, json.loads(json.dumps(getattr(self, part))))
        if isinstance(self.proposal_head.scales, list):
            self.proposal_head.scales = tuple(self.proposal_head.scales)
        self.validate()

    @property
    def lm_family(self) -> str:
        """``"encoder-decoder"`` for T5-like LMs, ``"decoder-only"`` for causal LMs."""
        return "encoder-decoder" if self.lm.get("is_encoder_decoder") else "decoder-only"

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first inconsistency found."""
        for part in ("sam", "semantic", "lm"):
            if not getattr(self, part).get("model_type"):
                raise ConfigError(f"config.{part} needs a 'model_type' (a Hugging Face config dict)")
        if self.image_size <= 0:
            raise ConfigError(f"image_size must be positive, got {self.image_size}")
        ex = self.extractor
        if ex.width % ex.heads or (ex.width // ex.attention_downsample) % ex.heads:
            raise ConfigError(
                f"extractor.width {ex.width} must be divisible by extractor.heads {ex.heads} "
                f"(also after attention_downsample {ex.attention_downsample})"
            )
        if ex.token_grid and (not ex.box_attention or ex.num_tokens != ex.token_grid**2):
            raise ConfigError(
                f"extractor.token_grid {ex.token_grid} needs box_attention and num_tokens = "
                f"{ex.token_grid ** 2} (got {ex.num_tokens})"
            )
        if ex.box_pixels and (ex.box_pixels < 8 or ex.box_pixels % 4):
            raise ConfigError(f"extractor.box_pixels must be 0 or a multiple of 4 from 8, got {ex.box_pixels}")
        if not 0.0 <= ex.box_pixel_dropout < 1.0:
            raise ConfigError(f"extractor.box_pixel_dropout must be in [0, 1), got {ex.box_pixel_dropout}")
        if self.lora_rank < 0:
            raise ConfigError(f"lora_rank must be >= 0, got {self.lora_rank}")
        vision = self.sam.get("vision_config", {})
        prompt = self.sam.get("prompt_encoder_config", {})
        if vision.get("image_size") != self.image_size or prompt.get("image_size") != self.image_size:
            raise ConfigError(
                f"sam vision/prompt image_size ({vision.get('image_size')}, {prompt.get('image_size')}) "
                f"must equal image_size {self.image_size}"
            )
        grid = self.image_size // vision.get("patch_size", 16)
        if prompt.get("image_embedding_size") != grid:
            raise ConfigError(
                f"sam prompt_encoder_config.image_embedding_size {prompt.get('image_embedding_size')} "
                f"must equal the SAM grid {grid} (image_size // patch_size)"
            )
        widths = (vision.get("output_channels"), prompt.get("hidden_size"), 2 * vision.get("num_pos_feats", 0))
        if len(set(widths)) != 1:
            raise ConfigError(
                f"sam widths disagree: vision output_channels {widths[0]}, prompt encoder hidden_size "
                f"{widths[1]}, 2 x num_pos_feats {widths[2]} must be equal"
            )
        semantic_size = self.semantic.get("image_size")
        if not isinstance(semantic_size, int) or semantic_size < self.image_size or semantic_size % self.image_size:
            raise ConfigError(
                f"semantic image_size {semantic_size} must be image_size {self.image_size} or a whole multiple of it"
            )
        if self.location_head.kind not in ("mlp", "pointer"):
            raise ConfigError(f"location_head.kind must be 'mlp' or 'pointer', got {self.location_head.kind!r}")
        if self.location_average not in ("token", "prompt"):
            raise ConfigError(f"location_average must be 'token' or 'prompt', got {self.location_average!r}")
        if self.mask_prompt_box not in ("predicted", "target"):
            raise ConfigError(f"mask_prompt_box must be 'predicted' or 'target', got {self.mask_prompt_box!r}")
        if self.word_loss_weight < 0:
            raise ConfigError(f"word_loss_weight must be >= 0, got {self.word_loss_weight}")
        if self.box_pixel_word_loss_weight < 0:
            raise ConfigError(f"box_pixel_word_loss_weight must be >= 0, got {self.box_pixel_word_loss_weight}")
        if self.box_pixel_word_loss_weight and not ex.box_pixels:
            raise ConfigError("box_pixel_word_loss_weight > 0 needs extractor.box_pixels > 0")
        refiner = self.mask_refiner
        if refiner is not None and (refiner.resolution < 8 or refiner.width < 8 or refiner.width % 8
                                    or refiner.margin < 0 or not refiner.dilations or min(refiner.dilations) < 1):
            raise ConfigError(
                f"mask_refiner needs resolution >= 8, a width that is a multiple of 8, margin >= 0 and "
                f"dilations >= 1, got {refiner}"
            )
        reranker = self.refer_reranker
        if reranker is not None and (reranker.candidates < 2 or reranker.hidden < 1):
            raise ConfigError(f"refer_reranker needs candidates >= 2 and hidden >= 1, got {reranker}")
        if reranker is not None and (self.location_head.kind != "pointer" or not ex.box_pixels):
            raise ConfigError("refer_reranker needs location_head.kind 'pointer' and extractor.box_pixels > 0")
        scene = self.scene_captioner
        if scene is not None and (scene.objects < 1 or scene.hidden < 1 or not ex.box_pixels):
            raise ConfigError(
                f"scene_captioner needs objects >= 1, hidden >= 1 and extractor.box_pixels > 0, got {scene}")
        missing = {"trace", "refer", "region"} - set(self.prompts)
        if missing:
            raise ConfigError(f"prompts lacks {sorted(missing)}")
        if "{expression}" not in self.prompts["refer"]:
            raise ConfigError("prompts['refer'] must contain '{expression}'")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` atomically into ``directory``."""
        path = Path(directory) / CONFIG_NAME
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True))
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PixelLLMConfig:
        return _dataclass_from_dict(cls, data, "config")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> PixelLLMConfig:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise ConfigError(f"{path} not found: a checkpoint directory needs {CONFIG_NAME}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        return cls.from_dict(data)


_NESTED = {
    "extractor": ExtractorConfig,
    "location_head": LocationHeadConfig,
    "mask_head": MaskHeadConfig,
    "mask_refiner": MaskRefinerConfig,
    "refer_reranker": RerankerConfig,
    "scene_captioner": SceneCaptionerConfig,
    "proposal_head": ProposalHeadConfig,
}


def _dataclass_from_dict(cls, data: dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown {where} field(s): {', '.join(unknown)}")
    return cls(**data)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Presets


def _sam(image_size: int, *, hidden: int, depth: int, heads: int, patch: int, window: int,
         global_attn: list[int], out_channels: int, mlp_ratio: float = 4.0,
         decoder_layers: int = 2, decoder_heads: int = 8, decoder_mlp: int = 2048) -> dict[str, Any]:
    from transformers import SamConfig

    grid = image_size // patch
    config = SamConfig(
        vision_config=dict(
            image_size=image_size, patch_size=patch, hidden_size=hidden, num_hidden_layers=depth,
            num_attention_heads=heads, window_size=window, global_attn_indexes=global_attn,
            output_channels=out_channels, mlp_dim=int(hidden * mlp_ratio), num_pos_feats=out_channels // 2,
        ),
        prompt_encoder_config=dict(
            image_size=image_size, image_embedding_size=grid, hidden_size=out_channels,
            mask_input_channels=max(out_channels // 16, 4),
        ),
        mask_decoder_config=dict(
            hidden_size=out_channels, num_hidden_layers=decoder_layers,
            num_attention_heads=decoder_heads, mlp_dim=decoder_mlp,
            iou_head_hidden_dim=out_channels,
        ),
    )
    return config.to_diff_dict()


def _clip(image_size: int, *, hidden: int, depth: int, heads: int, patch: int, mlp: int) -> dict[str, Any]:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        image_size=image_size, patch_size=patch, hidden_size=hidden, num_hidden_layers=depth,
        num_attention_heads=heads, intermediate_size=mlp, projection_dim=hidden,
    ).to_diff_dict()


def _small_vit(image_size: int, *, hidden: int, depth: int, heads: int, patch: int, mlp: int) -> dict[str, Any]:
    """The in-repo conv-stem ViT (``pixelllm.model.small_vit``); its other fields take their defaults."""
    return {"model_type": "pixelllm_small_vit", "image_size": image_size, "patch_size": patch, "hidden_size": hidden,
            "num_hidden_layers": depth, "num_attention_heads": heads, "intermediate_size": mlp}


def _t5(*, vocab: int, d_model: int, d_ff: int, layers: int, heads: int, d_kv: int, tied: bool = False,
        pad: int = 0, eos: int = 1) -> dict[str, Any]:
    from transformers import T5Config

    return T5Config(
        vocab_size=vocab, d_model=d_model, d_ff=d_ff, num_layers=layers, num_decoder_layers=layers,
        num_heads=heads, d_kv=d_kv, feed_forward_proj="gated-gelu", tie_word_embeddings=tied,
        pad_token_id=pad, eos_token_id=eos, decoder_start_token_id=pad, dropout_rate=0.0,
    ).to_diff_dict()


def _tiny() -> PixelLLMConfig:
    size = 160
    return PixelLLMConfig(
        image_size=size,
        sam=_sam(size, hidden=64, depth=2, heads=2, patch=8, window=5, global_attn=[1],
                 out_channels=64, decoder_layers=2, decoder_heads=4, decoder_mlp=256),
        semantic=_small_vit(size, hidden=128, depth=3, heads=4, patch=8, mlp=256),
        lm=_t5(vocab=1024, d_model=128, d_ff=256, layers=2, heads=4, d_kv=32, tied=True),
        extractor=ExtractorConfig(depth=2, width=128, heads=4, mlp_dim=256, num_tokens=16, token_dim=128,
                                  box_attention=True, token_grid=4),
        # Trained from scratch in a CPU hour, box regression from hidden states alone does not learn
        # which object a phrase names; pointing at feature cells does (docs/model_card.md).
        location_head=LocationHeadConfig(kind="pointer", hidden=128, depth=3),
        mask_head=MaskHeadConfig(depth=1, heads=4, mlp_dim=256),
        proposal_head=ProposalHeadConfig(width=64, scales=(1.0, 0.5), top_blocks=1),
        freeze_sam=False,  # no pretrained SAM exists at this size: the tiny model learns it all
        lora_rank=0,
        mask_prompt_box="target",
        location_loss_weight=0.24,  # 0.1 at the paper's 384 px canvas, rescaled to the same weight per image fraction
        location_average="prompt",
        max_text_tokens=96,  # shapes-world narratives run to about 70 tokens
    )


def _base() -> PixelLLMConfig:
    size = 384
    return PixelLLMConfig(
        image_size=size,
        sam=_sam(size, hidden=768, depth=12, heads=12, patch=16, window=14, global_attn=[2, 5, 8, 11],
                 out_channels=256),
        semantic=_clip(size, hidden=768, depth=12, heads=12, patch=16, mlp=3072),
        lm=_t5(vocab=32128, d_model=768, d_ff=2048, layers=12, heads=12, d_kv=64),
        extractor=ExtractorConfig(depth=2, width=512, heads=8, mlp_dim=2048),
        lora_rank=16,
    )


def _paper() -> PixelLLMConfig:
    size = 384
    return PixelLLMConfig(
        image_size=size,
        sam=_sam(size, hidden=1280, depth=32, heads=16, patch=16, window=14,
                 global_attn=[7, 15, 23, 31], out_channels=256),
        semantic=_clip(size, hidden=1024, depth=24, heads=16, patch=14, mlp=4096),
        lm=_t5(vocab=32128, d_model=2048, d_ff=5120, layers=24, heads=32, d_kv=64),
        extractor=ExtractorConfig(depth=6, width=512, heads=8, mlp_dim=2048),
        lora_rank=32,
    )


PRESETS = {"tiny": _tiny, "base": _base, "paper": _paper}


def preset(name: str, **overrides: Any) -> PixelLLMConfig:
    """Return a fresh config of the named preset, with top-level fields overridden."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    config = PRESETS[name]()
    if overrides:
        config = PixelLLMConfig.from_dict({**config.to_dict(), **overrides})
    return config
