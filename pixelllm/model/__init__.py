"""The model: the trunk's parts one file each, the heads in ``heads/``, composed by ``PixelLLM``."""

from pixelllm.model import eva02, small_vit  # noqa: F401  (register the in-repo towers with the Auto classes)
from pixelllm.model.build import pretrained_parts
from pixelllm.model.features import ImageFeatures, Prompts
from pixelllm.model.pixelllm import PixelLLM, PixelLLMOutput


def build_model(config, tokenizer=None) -> PixelLLM:
    """A PixelLLM with freshly initialized weights (``PixelLLM.from_config``)."""
    return PixelLLM.from_config(config, tokenizer)


def build_from_pretrained_parts(config="paper", *, sam=None, semantic=None, lm=None, tokenizer=None) -> PixelLLM:
    """A PixelLLM whose SAM branch, semantic tower and LM come from checkpoints (local directories or
    Hugging Face repository ids; ``build.pretrained_parts``), the rest newly initialized."""
    config, parts, loaded_tokenizer = pretrained_parts(config, sam=sam, semantic=semantic, lm=lm, tokenizer=tokenizer)
    return PixelLLM(config, **parts, tokenizer=loaded_tokenizer)


__all__ = ["ImageFeatures", "PixelLLM", "PixelLLMOutput", "Prompts", "build_from_pretrained_parts", "build_model"]
