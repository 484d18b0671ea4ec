"""Coordinate bookkeeping between the original image and the model's square canvas.

Frames (see docs/architecture.md): **original** pixels (x right, y down) and the **canvas**, the
``S x S`` model input. A ``CanvasTransform`` maps original -> canvas as

1. optional horizontal flip in the original frame: ``x -> W - x``;
2. scale by ``s`` (``S / max(W, H)`` times the jitter ratio ``r``); the image is resized to
   ``round(W * s) x round(H * s)`` pixels (antialiased);
3. crop: subtract the integer offset ``(ox, oy)`` (0 unless the scaled image exceeds the canvas);
4. placement at the top-left corner, zero padding to ``S x S``.

The valid (image) area of the canvas is ``valid_box = (0, 0, min(W*s - ox, S), min(H*s - oy, S))``;
without augmentation it is ``(0, 0, W*s, H*s)``. Boxes are ``(..., 4)`` ``[x0, y0, x1, y1]``,
points and traces ``(..., 2)`` ``[x, y]`` (a trace is a sequence of points), masks ``(H, W)`` bool.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


@dataclass(frozen=True)
class CanvasTransform:
    """Original -> canvas mapping of one image (and its inverse)."""

    original_size: tuple[int, int]  # (W, H)
    canvas_size: int  # S
    scale: float  # s: canvas pixels per original pixel
    offset: tuple[int, int] = (0, 0)  # crop offset (ox, oy) in scaled pixels
    flip: bool = False

    @classmethod
    def fit(cls, original_size: tuple[int, int], canvas_size: int) -> CanvasTransform:
        """No augmentation: long side to ``S``, top-left, no crop, no flip."""
        return cls(tuple(original_size), canvas_size, canvas_size / max(original_size))

    @classmethod
    def random(
        cls,
        original_size: tuple[int, int],
        canvas_size: int,
        rng: np.random.Generator,
        scale_range: tuple[float, float] = (1.0, 1.0),
        flip_prob: float = 0.0,
    ) -> CanvasTransform:
        """Scale jitter + random crop + random flip, as the official LSJ-style pipeline.

        The long side becomes ``S * r`` with ``r ~ U(scale_range)``; when the scaled image exceeds
        the canvas a random ``S x S`` window of it is kept (uniform integer offsets).
        """
        w, h = original_size
        ratio = rng.uniform(*scale_range) if scale_range[0] != scale_range[1] else scale_range[0]
        scale = canvas_size * ratio / max(w, h)
        flip = bool(rng.random() < flip_prob) if flip_prob > 0 else False
        rw, rh = _resized(original_size, scale)
        ox = int(rng.integers(0, rw - min(rw, canvas_size) + 1))
        oy = int(rng.integers(0, rh - min(rh, canvas_size) + 1))
        return cls(tuple(original_size), canvas_size, scale, (ox, oy), flip)

    # -- sizes ---------------------------------------------------------------------------------

    @property
    def resized_size(self) -> tuple[int, int]:
        """``(round(W*s), round(H*s))``: the scaled image before cropping, in pixels."""
        return _resized(self.original_size, self.scale)

    @property
    def content_size(self) -> tuple[int, int]:
        """``(cw, ch)``: pixels of image content on the canvas (the ``pixel_mask`` area)."""
        rw, rh = self.resized_size
        return min(rw - self.offset[0], self.canvas_size), min(rh - self.offset[1], self.canvas_size)

    @property
    def valid_box(self) -> np.ndarray:
        """float64 ``(4,)``: the image's extent on the canvas, ``(0, 0, W*s - ox, H*s - oy)`` clipped to S."""
        w, h = self.original_size
        s, (ox, oy), size = self.scale, self.offset, self.canvas_size
        return np.array([0.0, 0.0, min(w * s - ox, size), min(h * s - oy, size)])

    # -- points and boxes ----------------------------------------------------------------------

    def points_to_canvas(self, points) -> np.ndarray:
        """``(..., 2)`` original pixels -> canvas pixels (not clipped)."""
        p = np.asarray(points, dtype=np.float64)
        if self.flip:
            p = hflip_points(p, self.original_size[0])
        return p * self.scale - np.asarray(self.offset, dtype=np.float64)

    def points_to_original(self, points) -> np.ndarray:
        """``(..., 2)`` canvas pixels -> original pixels."""
        p = (np.asarray(points, dtype=np.float64) + np.asarray(self.offset, dtype=np.float64)) / self.scale
        return hflip_points(p, self.original_size[0]) if self.flip else p

    def boxes_to_canvas(self, boxes) -> np.ndarray:
        """``(..., 4)`` original pixels -> canvas pixels (not clipped; see ``clip_boxes``)."""
        b = np.asarray(boxes, dtype=np.float64)
        if self.flip:
            b = hflip_boxes(b, self.original_size[0])
        shift = np.tile(np.asarray(self.offset, dtype=np.float64), 2)
        return b * self.scale - shift

    def boxes_to_original(self, boxes) -> np.ndarray:
        """``(..., 4)`` canvas pixels -> original pixels."""
        shift = np.tile(np.asarray(self.offset, dtype=np.float64), 2)
        b = (np.asarray(boxes, dtype=np.float64) + shift) / self.scale
        return hflip_boxes(b, self.original_size[0]) if self.flip else b

    # -- images and masks ----------------------------------------------------------------------

    def image_to_canvas(self, image: Image.Image, pixel_scale: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """RGB image -> ``pixel_values`` float32 ``(3, kS, kS)`` in [0, 1] (0 on padding) and
        ``pixel_mask`` bool ``(S, S)`` (True on the image).

        ``k = pixel_scale``: the pixels are drawn at ``k`` times the canvas resolution, with the same
        placement (canvas pixel ``(x, y)`` covers pixels ``[kx, kx + k) x [ky, ky + k)``)."""
        if image.size != tuple(self.original_size):
            raise ValueError(f"image is {image.size}, the transform expects {self.original_size}")
        fine = self if pixel_scale == 1 else replace(
            self, canvas_size=self.canvas_size * pixel_scale, scale=self.scale * pixel_scale,
            offset=(self.offset[0] * pixel_scale, self.offset[1] * pixel_scale),
        )
        content = np.asarray(fine._warp(image, Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
        pixel_values = torch.zeros(3, fine.canvas_size, fine.canvas_size, dtype=torch.float32)
        pixel_values[:, : content.shape[0], : content.shape[1]] = torch.from_numpy(content).permute(2, 0, 1)
        (cw, ch), size = self.content_size, self.canvas_size
        pixel_mask = torch.zeros(size, size, dtype=torch.bool)
        pixel_mask[:ch, :cw] = True
        return pixel_values, pixel_mask

    def mask_to_canvas(self, mask: np.ndarray) -> np.ndarray:
        """bool ``(H, W)`` original -> bool ``(S, S)`` canvas (nearest neighbour, zero padding)."""
        if mask.shape != (self.original_size[1], self.original_size[0]):
            raise ValueError(
                f"mask is {mask.shape}, the image is {self.original_size[1]}x{self.original_size[0]}"
            )
        warped = (
            np.asarray(self._warp(Image.fromarray(mask.astype(np.uint8) * 255), Image.Resampling.NEAREST))
            > 127
        )
        out = np.zeros((self.canvas_size, self.canvas_size), dtype=bool)
        out[: warped.shape[0], : warped.shape[1]] = warped
        return out

    def mask_to_original(self, mask) -> np.ndarray:
        """A canvas mask ``(S, S)`` -> bool ``(H, W)`` original (padding ignored): a bool mask by
        nearest neighbour; logits (a float array or tensor) resized bilinearly, then thresholded at 0,
        so that a prediction's edges stay as smooth as its logits."""
        cw, ch = self.content_size
        rw, rh = self.resized_size
        (ox, oy), (w, h) = self.offset, self.original_size
        if isinstance(mask, torch.Tensor) or np.issubdtype(np.asarray(mask).dtype, np.floating):
            logits = torch.as_tensor(mask, dtype=torch.float32)
            scaled = logits.new_full((rh, rw), -1e4)  # outside the crop: off
            scaled[oy : oy + ch, ox : ox + cw] = logits[:ch, :cw]
            out = (F.interpolate(scaled[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0] > 0)
            out = out.cpu().numpy()
        else:
            scaled = np.zeros((rh, rw), dtype=np.uint8)
            scaled[oy : oy + ch, ox : ox + cw] = np.asarray(mask[:ch, :cw], dtype=np.uint8) * 255
            out = np.asarray(Image.fromarray(scaled).resize((w, h), Image.Resampling.NEAREST)) > 127
        return hflip_mask(out) if self.flip else out

    def _warp(self, image: Image.Image, resample: Image.Resampling) -> Image.Image:
        if self.flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image = image.resize(self.resized_size, resample)
        (ox, oy), (cw, ch) = self.offset, self.content_size
        return image.crop((ox, oy, ox + cw, oy + ch))


def prepare_image(
    image: Image.Image, canvas_size: int, transform: CanvasTransform | None = None, pixel_scale: int = 1
) -> tuple[torch.Tensor, torch.Tensor, CanvasTransform]:
    """Put an RGB image on the canvas.

    Returns ``pixel_values`` float32 ``(3, kS, kS)`` in [0, 1] (``k = pixel_scale``, see
    ``CanvasTransform.image_to_canvas``), ``pixel_mask`` bool ``(S, S)`` and the ``CanvasTransform``.

    Without ``transform``: the long side is resized to ``S``, top-left placement, zero padding.
    """
    transform = transform or CanvasTransform.fit(image.size, canvas_size)
    pixel_values, pixel_mask = transform.image_to_canvas(image, pixel_scale)
    return pixel_values, pixel_mask, transform


def hflip_points(points: np.ndarray, width: float) -> np.ndarray:
    """Mirror ``(..., 2)`` points in an image of ``width``: ``x -> width - x``."""
    out = np.array(points, dtype=np.float64)
    out[..., 0] = width - out[..., 0]
    return out


def hflip_boxes(boxes: np.ndarray, width: float) -> np.ndarray:
    """Mirror ``(..., 4)`` boxes: ``[x0, y0, x1, y1] -> [width - x1, y0, width - x0, y1]``."""
    b = np.asarray(boxes, dtype=np.float64)
    return np.stack([width - b[..., 2], b[..., 1], width - b[..., 0], b[..., 3]], axis=-1)


def hflip_mask(mask: np.ndarray) -> np.ndarray:
    """Mirror a ``(..., H, W)`` mask left-right."""
    return np.ascontiguousarray(mask[..., ::-1])


def clip_boxes(boxes: np.ndarray, limits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Clip ``(..., 4)`` boxes to ``limits = (x0, y0, x1, y1)``; also return ``keep`` (area left)."""
    b = np.asarray(boxes, dtype=np.float64)
    lo, hi = np.tile(limits[:2], 2), np.tile(limits[2:], 2)
    clipped = np.clip(b, lo, hi)
    keep = (clipped[..., 2] > clipped[..., 0]) & (clipped[..., 3] > clipped[..., 1])
    return clipped, keep


def jitter_boxes(boxes: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """Move each side of ``(N, 4)`` boxes by ``U(-amount, amount)`` times the box's width (x sides)
    or height (y sides), independently: a loose or shifted box around the same object, as a hand or
    a proposal draws it. ``amount < 0.5`` keeps every side on its side of the box's center."""
    if not 0 <= amount < 0.5:
        raise ValueError(f"box jitter must be in [0, 0.5), got {amount}")
    b = np.asarray(boxes, dtype=np.float64)
    sides = np.tile(b[..., 2:] - b[..., :2], 2)
    return b + rng.uniform(-amount, amount, size=b.shape) * sides


def touches(boxes: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """bool ``(...)``: the (possibly zero-area) box shares at least a point with ``limits``.

    Used for trace targets, whose boxes may legitimately be a single point.
    """
    b = np.asarray(boxes, dtype=np.float64)
    return (
        (b[..., 2] >= limits[0])
        & (b[..., 0] <= limits[2])
        & (b[..., 3] >= limits[1])
        & (b[..., 1] <= limits[3])
    )


def _resized(original_size: tuple[int, int], scale: float) -> tuple[int, int]:
    w, h = original_size
    return max(1, round(w * scale)), max(1, round(h * scale))
