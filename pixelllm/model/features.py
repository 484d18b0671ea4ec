"""What the trunk's parts and the heads pass each other: encoded images, location prompts, grid cells."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class ImageFeatures:
    """An encoded batch of ``B`` images, reusable for any number of prompts.

    ``features (B, C, G, G)``: the concatenated SAM + semantic map. ``sam_embeddings (B, 256, g, g)``:
    SAM's own map, for the mask decoder. ``valid_size (B, 2)``: width and height of the resized
    image on the canvas, in pixels. ``pixels (B, 3, kS, kS)``: the canvas images themselves (for the
    extractor's box pixels and the heads that read pixels).
    """

    features: torch.Tensor
    sam_embeddings: torch.Tensor
    valid_size: torch.Tensor
    pixels: torch.Tensor

    def select(self, index: torch.Tensor) -> ImageFeatures:
        return ImageFeatures(*(getattr(self, f.name)[index] for f in fields(self)))

    @staticmethod
    def concat(batches: list[ImageFeatures]) -> ImageFeatures:
        """One batch of the images of ``batches``, in order."""
        return ImageFeatures(*(torch.cat([getattr(b, f.name) for b in batches]) for f in fields(ImageFeatures)))


@dataclass
class Prompts:
    """``N`` location prompts: ``image_index (N,)`` the image of each, ``boxes (N, 4)`` canvas pixels
    ``x0, y0, x1, y1`` (a point prompt is ``boxes[:, :2]``), ``is_point (N,)`` bool."""

    image_index: torch.Tensor
    boxes: torch.Tensor
    is_point: torch.Tensor

    def __len__(self) -> int:
        return len(self.image_index)

    @property
    def spans(self) -> torch.Tensor:
        """``(N, 4)`` the boxes with each point prompt ``(x0, y0)`` as the empty box ``(x0, y0, x0, y0)``."""
        return torch.where(self.is_point[:, None], self.boxes[:, :2].repeat(1, 2), self.boxes)

    def covers_image(self, images: ImageFeatures) -> torch.Tensor:
        """``(N,)`` bool: the prompts whose span covers their image's whole resized area, within a
        pixel: the prompt of traced captions and referring expressions."""
        spans, valid = self.spans, images.valid_size[self.image_index]
        return (spans[:, :2] <= 1).all(1) & (spans[:, 2:] >= valid - 1).all(1)

    def select(self, index: torch.Tensor) -> Prompts:
        return Prompts(self.image_index[index], self.boxes[index], self.is_point[index])


def cell_centers(grid: int, extent: float, device=None, dtype=None) -> torch.Tensor:
    """``(G,)`` the centers ``(i + 0.5) * (extent / G)`` of the ``G`` equal cells that divide ``[0, extent)``
    (``extent = G``: in cell units)."""
    return (torch.arange(grid, device=device, dtype=dtype) + 0.5) * (extent / grid)
