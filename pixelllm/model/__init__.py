"""The model: one file per component, composed by ``PixelLLM``."""

from pixelllm.model.build import build_from_pretrained_parts, build_model
from pixelllm.model.pixelllm import ImageFeatures, PixelLLM, PixelLLMOutput

__all__ = ["ImageFeatures", "PixelLLM", "PixelLLMOutput", "build_from_pretrained_parts", "build_model"]
