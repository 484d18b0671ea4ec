"""Heads, found by name: ``PixelLLMConfig.heads`` maps each head's name to its config section.

The built-in heads are listed in ``BUILT_IN``. A head from elsewhere (a new file anywhere on the
import path) is named by its class in its entry: ``{"area": {"class": "my_heads:AreaHead", ...}}``.
The entries' order is the order in which the heads are built, compute their losses and hook into
decoding; a capability that several heads provide is the last one's.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import TYPE_CHECKING, Any

from pixelllm.errors import ConfigError
from pixelllm.model.heads.base import BuildContext, Head, HeadLosses, TrainingPass

if TYPE_CHECKING:
    from pixelllm.config import PixelLLMConfig

BUILT_IN = {
    "location": "pixelllm.model.heads.location:LocationHead",
    "mask": "pixelllm.model.heads.masks:MaskHead",
    "proposals": "pixelllm.model.heads.proposals:ProposalHead",
    "pixel_words": "pixelllm.model.heads.pixel_words:PixelWordHead",
    "mask_refiner": "pixelllm.model.heads.mask_refiner:MaskRefiner",
    "refer_reranker": "pixelllm.model.heads.refer_reranker:ReferReranker",
    "scene": "pixelllm.model.heads.scene:SceneCaptioner",
    "location_tokens": "pixelllm.model.heads.location_tokens:LocationTokensHead",
    "codebook": "pixelllm.model.heads.codebook:CodebookHead",
}
CLASS_KEY = "class"
TRUNK_OPTIONS = {"box_pixels": lambda config: config.extractor.box_pixels > 0}

__all__ = ["BUILT_IN", "BuildContext", "Head", "HeadLosses", "TrainingPass", "head_class", "head_configs",
           "normalize_heads"]


def head_class(name: str, entry: dict[str, Any]) -> type[Head]:
    """The class of the head ``name`` whose config entry is ``entry``."""
    path = entry.get(CLASS_KEY) or BUILT_IN.get(name)
    if path is None:
        raise ConfigError(f"unknown head {name!r}: the built-in heads are {', '.join(BUILT_IN)}; a head from "
                          f"another file needs '{CLASS_KEY}': 'module:Class' in its entry")
    module, _, attribute = str(path).partition(":")
    try:
        cls = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"head {name!r}: cannot import {path!r} ({exc})") from None
    if not (isinstance(cls, type) and issubclass(cls, Head)):
        raise ConfigError(f"head {name!r}: {path!r} is not a pixelllm.model.heads.Head")
    return cls


def head_configs(config: PixelLLMConfig) -> dict[str, tuple[type[Head], Any]]:
    """Each head's class and parsed ``Config``, in order, after checking that every head's
    requirements are met by the trunk or by the heads before it."""
    from pixelllm.config import dataclass_from_dict

    parsed, provided = {}, {option for option, present in TRUNK_OPTIONS.items() if present(config)}
    for name, entry in config.heads.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"heads.{name} must be a mapping, got {type(entry).__name__}")
        cls = head_class(name, entry)
        fields = {key: value for key, value in entry.items() if key != CLASS_KEY}
        head_config = dataclass_from_dict(cls.Config, fields, f"heads.{name}")
        missing = [need for need in cls.required(head_config) if need not in provided]
        if missing:
            raise ConfigError(f"head {name!r} needs {', '.join(missing)} from the trunk or a head before it")
        cls.check(head_config, config)
        parsed[name] = (cls, head_config)
        provided.update(cls.provided(head_config))
    return parsed


def normalize_heads(config: PixelLLMConfig) -> dict[str, dict[str, Any]]:
    """``config.heads`` validated, with every field of every head's config written out."""
    out = {}
    for name, (_, head_config) in head_configs(config).items():
        entry = dataclasses.asdict(head_config)
        if CLASS_KEY in config.heads[name]:
            entry[CLASS_KEY] = config.heads[name][CLASS_KEY]
        out[name] = entry
    return out
