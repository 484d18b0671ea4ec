"""PixelLLM, the pixel-aligned language model, in PyTorch.

    import pixelllm
    predictor = pixelllm.load()            # the embedded default; pixelllm.load(path) for a checkpoint
    image = predictor.encode("photo.jpg")
    image.caption().words                  # every word with a box and a point, in image pixels

Heavy modules load on first use, so ``import pixelllm`` stays cheap.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "load": "pixelllm.tasks",
    "Predictor": "pixelllm.tasks",
    "EncodedImage": "pixelllm.tasks",
    "PixelLLM": "pixelllm.model",
    "PixelLLMConfig": "pixelllm.config",
    "preset": "pixelllm.config",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pixelllm' has no attribute {name!r}")
