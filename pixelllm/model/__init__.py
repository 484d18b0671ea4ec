"""The model: one file per component, composed by ``PixelLLM``."""

from pixelllm.model import small_vit  # noqa: F401  (registers the tiny preset's tower with the Auto classes)
from pixelllm.model.build import build_from_pretrained_parts, build_model
from pixelllm.model.pixelllm import ImageFeatures, PixelLLM, PixelLLMOutput

__all__ = ["ImageFeatures", "PixelLLM", "PixelLLMOutput", "build_from_pretrained_parts", "build_model"]
