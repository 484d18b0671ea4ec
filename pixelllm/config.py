"""Model configuration: one dataclass that round-trips to ``config.json``, and the named presets.

The three pretrained parts keep their own Hugging Face configs, stored as plain dicts with their
``model_type`` so that any transformers config class can be rebuilt from them:

- ``sam``: a full ``SamConfig`` (frozen image encoder, prompt encoder, mask decoder);
- ``semantic``: a vision tower config (``pixelllm_eva02_vision``, ``clip_vision_model``,
  ``siglip_vision_model`` or the tiny preset's ``pixelllm_small_vit``);
- ``lm``: a language model config, either T5 (encoder-decoder) or any causal LM.

``heads`` maps each head's name to its config section (``pixelllm.model.heads``: every head owns its
fields, loss weights included); the trunk's own fields are the rest.

Presets: ``tiny`` (the embedded default's size), ``base`` and ``paper`` (SAM ViT-H + EVA02-L/14 +
Flan-T5-XL with LoRA rank 32, as the official configuration).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pixelllm.errors import ConfigError
from pixelllm.files import atomic_write_text

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
    # Also not in the official design: ``box_pixels`` R > 0 appends 4 tokens read by a small CNN
    # from an R x R resampling of the pixels around the prompt box (``pixelllm.model.box_pixels``):
    # at a small canvas a small object's shape is a cell or two of the towers' stride-8 map.
    box_pixels: int = 0
    # In training, each prompt's box-pixel tokens are zeroed with this probability, so that the LM
    # also learns to read a region through the extractor's tokens.
    box_pixel_dropout: float = 0.0
    # False: prompts on the whole image (traced captions, referring expressions) get zeros for the
    # box-pixel tokens, not a thumbnail of the image.
    box_pixels_on_whole_image: bool = True


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
    heads: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> the head's config section, in order
    freeze_sam: bool = True  # SAM image encoder, prompt encoder and mask decoder
    lora_rank: int = 32  # > 0: LM frozen, LoRA on ``lora_targets``; 0: the whole LM trains
    lora_alpha: float | None = None  # None: twice the rank (scale 2, as the official code)
    lora_targets: list[str] | None = None  # None: the family's q and v projections
    label_smoothing: float = 0.1
    max_text_tokens: int = 128
    prompts: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_PROMPTS))

    @property
    def pixel_scale(self) -> int:
        """The semantic tower's input side over the canvas side: 1 in the official design; k > 1 draws
        the image at k times the canvas resolution for that tower alone (SAM gets it averaged back to
        the canvas), while every coordinate stays in canvas pixels."""
        return self.semantic["image_size"] // self.image_size

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(PixelLLMConfig)
        for f in dataclasses.fields(self):  # also where built in Python, not from a dict
            setattr(self, f.name, typed(getattr(self, f.name), hints[f.name], f"config.{f.name}"))
        for part in ("sam", "semantic", "lm"):  # JSON-normal form (e.g. id2label keys become strings)
            setattr(self, part, json.loads(json.dumps(getattr(self, part))))
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
        if self.max_text_tokens <= 0 or not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"max_text_tokens must be positive and label_smoothing in [0, 1), got "
                              f"{self.max_text_tokens} and {self.label_smoothing}")
        if self.lora_alpha is not None and not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ConfigError(f"lora_alpha must be positive, got {self.lora_alpha}")
        ex = self.extractor
        for name in ("depth", "width", "heads", "mlp_dim", "attention_downsample", "num_tokens", "token_dim"):
            if getattr(ex, name) <= 0:
                raise ConfigError(f"extractor.{name} must be positive, got {getattr(ex, name)}")
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
        vision, prompt = (_section(self.sam, key, "sam") for key in ("vision_config", "prompt_encoder_config"))
        for where, section, key in (("vision_config", vision, "patch_size"), ("vision_config", vision, "num_pos_feats"),
                                    ("vision_config", vision, "output_channels"),
                                    ("prompt_encoder_config", prompt, "hidden_size")):
            if not (isinstance(section.get(key), int) and section[key] > 0):
                raise ConfigError(f"sam {where}.{key} must be a positive int, got {section.get(key)!r}")
        if vision.get("image_size") != self.image_size or prompt.get("image_size") != self.image_size:
            raise ConfigError(
                f"sam vision/prompt image_size ({vision.get('image_size')}, {prompt.get('image_size')}) "
                f"must equal image_size {self.image_size}"
            )
        grid = self.image_size // vision["patch_size"]
        if prompt.get("image_embedding_size") != grid:
            raise ConfigError(
                f"sam prompt_encoder_config.image_embedding_size {prompt.get('image_embedding_size')} "
                f"must equal the SAM grid {grid} (image_size // patch_size)"
            )
        widths = (vision["output_channels"], prompt["hidden_size"], 2 * vision["num_pos_feats"])
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
        missing = {"trace", "refer", "region"} - set(self.prompts)
        if missing:
            raise ConfigError(f"prompts lacks {sorted(missing)}")
        if "{expression}" not in self.prompts["refer"]:
            raise ConfigError("prompts['refer'] must contain '{expression}'")
        from pixelllm.model.heads import normalize_heads  # the heads validate their own sections

        self.heads = json.loads(json.dumps(normalize_heads(self)))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` atomically into ``directory``."""
        path = Path(directory) / CONFIG_NAME
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2))  # unsorted: the heads keep their order
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PixelLLMConfig:
        return dataclass_from_dict(cls, data, "config")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> PixelLLMConfig:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise ConfigError(f"{path} not found: a checkpoint directory needs {CONFIG_NAME}")
        try:
            data = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            detail = f"{exc.msg} at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else "not UTF-8 text"
            raise ConfigError(f"{path} is not valid JSON ({detail})") from None
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None


def _section(config: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    """``config[key]``, a mapping (empty where absent)."""
    section = config.get(key, {})
    if not isinstance(section, dict):
        raise ConfigError(f"{where}.{key} must be a mapping, got {type(section).__name__}")
    return section


def dataclass_from_dict(cls, data: dict[str, Any], where: str):
    """``cls(**data)``, every value checked against its field's declared type (``typed``), with a
    ``ConfigError`` naming ``where`` for a non-mapping, an unknown field or a value of the wrong type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(map(repr, set(data) - set(names)))
    if unknown:
        raise ConfigError(f"unknown {where} field(s): {', '.join(unknown)}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in data]
    if missing:
        raise ConfigError(f"{where} lacks the field(s) {', '.join(missing)}")
    return cls(**{key: typed(value, hints[key], f"{where}.{key}") for key, value in data.items()})


_SCALARS = {int: "int", float: "float", bool: "bool", str: "str", type(None): "None"}


def typed(value: Any, hint: Any, where: str) -> Any:
    """``value`` as a field declared ``hint`` takes it: an int for a float becomes a float, a list
    for a tuple a tuple, a mapping for a dataclass that dataclass (``dataclass_from_dict``); any
    other value of the wrong type is a ``ConfigError`` naming ``where``. Annotations other than
    scalars, unions, lists, tuples, mappings and dataclasses take any value."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return typed(value, arg, where)
            except ConfigError:
                continue
    elif dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else dataclass_from_dict(hint, value, where)
    elif hint in _SCALARS:
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
            return value
    elif origin is list and isinstance(value, list):
        return [typed(item, args[0], f"{where}[{i}]") for i, item in enumerate(value)]
    elif origin is tuple and isinstance(value, list | tuple):
        kinds = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        if len(kinds) == len(value):
            pairs = enumerate(zip(value, kinds, strict=True))
            return tuple(typed(item, kind, f"{where}[{i}]") for i, (item, kind) in pairs)
    elif origin is dict and isinstance(value, dict):
        return {typed(key, args[0], f"{where} key"): typed(item, args[1], f"{where}.{key}")
                for key, item in value.items()}
    elif origin not in (list, tuple, dict):
        return value
    raise ConfigError(f"{where} takes {_describe(hint)}, got {value!r}")


def _describe(hint: Any) -> str:
    """A field's type in words: ``int or None``, ``a list of str``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if dataclasses.is_dataclass(hint) or origin is dict:
        return "a mapping"
    if origin in (list, tuple):
        count = "" if origin is list or args[-1] is Ellipsis else f"{len(args)} "
        return f"a list of {count}{_describe(args[0])}"
    return _SCALARS.get(hint, getattr(hint, "__name__", str(hint)))


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


def _eva02_large(image_size: int) -> dict[str, Any]:
    """EVA02-L/14 with the official PixelLLM settings (``pixelllm.model.eva02``: drop path 0.1)."""
    from pixelllm.model.eva02 import eva02_large

    return eva02_large(image_size)


def _small_vit(image_size: int, *, hidden: int, depth: int, heads: int, patch: int, mlp: int) -> dict[str, Any]:
    """The in-repo conv-stem ViT (``pixelllm.model.small_vit``); its other fields take their defaults."""
    return {"model_type": "pixelllm_small_vit", "image_size": image_size, "patch_size": patch, "hidden_size": hidden,
            "num_hidden_layers": depth, "num_attention_heads": heads, "intermediate_size": mlp}


def _t5(*, vocab: int, d_model: int, d_ff: int, layers: int, heads: int, d_kv: int, tied: bool = False,
        pad: int = 0, eos: int = 1, dropout: float = 0.1) -> dict[str, Any]:
    from transformers import T5Config

    return T5Config(
        vocab_size=vocab, d_model=d_model, d_ff=d_ff, num_layers=layers, num_decoder_layers=layers,
        num_heads=heads, d_kv=d_kv, feed_forward_proj="gated-gelu", tie_word_embeddings=tied,
        pad_token_id=pad, eos_token_id=eos, decoder_start_token_id=pad, dropout_rate=dropout,
    ).to_diff_dict()


def _heads(**sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The PixelLLM heads (location, mask, proposals) with their defaults, fields overridden by ``sections``."""
    return {name: dict(sections.get(name, {})) for name in ("location", "mask", "proposals")}


def _tiny() -> PixelLLMConfig:
    size = 160
    return PixelLLMConfig(
        image_size=size,
        sam=_sam(size, hidden=64, depth=2, heads=2, patch=8, window=5, global_attn=[1],
                 out_channels=64, decoder_layers=2, decoder_heads=4, decoder_mlp=256),
        semantic=_small_vit(size, hidden=128, depth=3, heads=4, patch=8, mlp=256),
        lm=_t5(vocab=1024, d_model=128, d_ff=256, layers=2, heads=4, d_kv=32, tied=True, dropout=0.0),
        extractor=ExtractorConfig(depth=2, width=128, heads=4, mlp_dim=256, num_tokens=16, token_dim=128,
                                  box_attention=True, token_grid=4),
        heads=_heads(
            # Trained from scratch in a CPU hour, box regression from hidden states alone does not learn
            # which object a phrase names; pointing at feature cells does. The loss
            # weight is the official 0.1 at a 384-px canvas, rescaled to the same weight per image fraction.
            location={"kind": "pointer", "hidden": 128, "depth": 3, "loss_weight": 0.24, "average": "prompt"},
            mask={"depth": 1, "heads": 4, "mlp_dim": 256, "prompt_box": "target"},
            proposals={"width": 64, "scales": [1.0, 0.5], "top_blocks": 1},
        ),
        freeze_sam=False,  # no pretrained SAM exists at this size: the tiny model learns it all
        lora_rank=0,
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
        heads=_heads(),
        lora_rank=16,
    )


def _paper() -> PixelLLMConfig:
    size = 384
    return PixelLLMConfig(
        image_size=size,
        sam=_sam(size, hidden=1280, depth=32, heads=16, patch=16, window=14,
                 global_attn=[7, 15, 23, 31], out_channels=256),
        semantic=_eva02_large(size),
        lm=_t5(vocab=32128, d_model=2048, d_ff=5120, layers=24, heads=32, d_kv=64),
        extractor=ExtractorConfig(depth=6, width=512, heads=8, mlp_dim=2048),
        heads=_heads(),
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
