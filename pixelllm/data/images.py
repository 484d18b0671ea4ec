"""Loading any image a user or a dataset gives into an 8-bit RGB ``PIL.Image``.

Conversions (documented behaviour):

- EXIF orientation is applied, so "original pixels" are the pixels as a viewer shows them.
- Transparency (RGBA, LA, palette with a transparent color) is composited **on white**: a
  transparent logo then looks as it does on a web page instead of turning black.
- 16-bit images (``I;16*`` modes, or ``I`` holding 16-bit values, or uint16 arrays) are scaled
  ``0..65535 -> 0..255`` (divide by 257); 32-bit float images (``F``) are taken as ``0..1``.
- Grayscale, palette, CMYK and other modes go through Pillow's own conversion to RGB.

Images over ``MAX_PIXELS`` (64 megapixels) are refused before they are decoded (decompression
bombs), as are images with a side under ``MIN_SIDE`` (8) pixels (``ImageTooSmall``: nothing in
them survives the resize to the canvas but a smear, which the model captions as noise) and
missing, corrupt and truncated files: each raises ``InputError`` with one line that names the file.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pixelllm.data.samples import ImageSource
from pixelllm.errors import InputError

MAX_PIXELS = 64_000_000
MIN_SIDE = 8

_TRANSPARENT_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


class ImageTooSmall(InputError):
    """An image with a side under ``MIN_SIDE`` pixels."""


def load_image(src: ImageSource, *, name: str | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Return ``src`` as an RGB ``PIL.Image`` in original orientation.

    ``src``: a path, encoded bytes, a ``PIL.Image``, or a numpy array (``H x W`` or
    ``H x W x {1, 3, 4}``, uint8 or uint16). ``name`` names the image in error messages
    (default: the path, or a description).
    """
    if isinstance(src, np.ndarray):
        return _from_array(src, name or "image array", max_pixels)
    if isinstance(src, Image.Image):
        label = name or "image"
        _check_pixels(src.size, label, max_pixels)
        return _to_rgb(ImageOps.exif_transpose(src), label)
    if isinstance(src, bytes | bytearray):
        return _open(io.BytesIO(src), name or "image bytes", max_pixels)
    if isinstance(src, str | Path):
        path = Path(src)
        if path.is_dir():
            raise InputError(f"{path} is a directory, not an image file")
        if not path.is_file():
            raise InputError(f"image not found: {path}")
        return _open(path, name or str(path), max_pixels)
    raise InputError(
        f"cannot use {type(src).__name__} as an image: give a path, bytes, a PIL image or an array"
    )


def _open(fp, label: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Our own limit (below Pillow's) applies; Pillow's warning would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp) as image:
                _check_pixels(image.size, label, max_pixels)
                image.load()
                image = ImageOps.exif_transpose(image)
    except InputError:
        raise
    except Image.DecompressionBombError:
        raise InputError(
            f"image {label} is too large to decode safely (over {max_pixels:,} pixels)"
        ) from None
    except UnidentifiedImageError:
        raise InputError(f"cannot read image {label}: not an image file, or an unsupported format") from None
    except (OSError, SyntaxError, ValueError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise InputError(f"cannot read image {label}: the file is truncated or corrupt ({detail})") from None
    return _to_rgb(image, label)


def _check_pixels(size: tuple[int, int], label: str, max_pixels: int) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise InputError(f"image {label} is empty ({w}x{h})")
    if min(w, h) < MIN_SIDE:
        raise ImageTooSmall(f"image {label} is {w}x{h} pixels: a side under {MIN_SIDE} pixels is too small to read")
    if w * h > max_pixels:
        raise InputError(
            f"image {label} is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}: "
            "downscale it first"
        )


def _to_rgb(image: Image.Image, label: str) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8)).convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64) * 255.0
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8)).convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in _TRANSPARENT_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise InputError(f"cannot convert image {label} (mode {mode}) to RGB: {exc}") from None


def _from_array(array: np.ndarray, label: str, max_pixels: int) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise InputError(f"{label} must be H x W or H x W x 3 (or x 4), got shape {array.shape}")
    if array.dtype == np.uint16:
        array = np.clip(np.rint(array / 257.0), 0, 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise InputError(f"{label} must be uint8 or uint16, got {array.dtype}")
    _check_pixels((array.shape[1], array.shape[0]), label, max_pixels)
    return _to_rgb(Image.fromarray(np.ascontiguousarray(array)), label)
