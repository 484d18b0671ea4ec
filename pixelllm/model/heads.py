"""Localization heads: a box for every token, read from the LM's final hidden state.

Two interchangeable heads share two calls: ``cells(features)``, what the head reads from each image
(computed once per image, decoding reuses it every step), and ``locate(hidden, cells, image_index,
valid_size)``:

- ``LocationHead`` (``kind: mlp``, the paper's): an MLP on the hidden state alone.
- ``PointerLocationHead`` (``kind: pointer``): the hidden state points at a cell of the image
  feature grid (attention whose keys carry each cell's position), and an MLP refines the box around
  that cell. A small model trained from scratch learns *which* object far faster by classifying
  cells than by regressing coordinates through attention (see docs/model_card.md).

Neither feeds locations back into the text path.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _mlp(in_dim: int, hidden: int, depth: int, out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(in_dim if i == 0 else hidden, hidden), nn.GELU()]
    layers.append(nn.Linear(hidden, out_dim))
    return nn.Sequential(*layers)


class LocationHead(nn.Module):
    """LayerNorm -> ``depth`` x (Linear + GELU) -> Linear to 4 (two corners ``x0, y0, x1, y1``).

    The raw output ``r`` maps to canvas pixels of the resized image as the official code does:
    ``(r + 1) / 2 * (valid width, valid height)``; no sigmoid, no clipping. A point is a box's center.
    """

    def __init__(self, in_dim: int, hidden: int = 512, depth: int = 3):
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(in_dim, eps=1e-6), *_mlp(in_dim, hidden, depth, 4))

    def cells(self, features: torch.Tensor) -> None:
        """Nothing: this head does not read the image."""
        return None

    def locate(self, hidden: torch.Tensor, cells: None, image_index: torch.Tensor,
               valid_size: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Boxes ``(N, ..., 4)`` in canvas pixels from ``hidden (N, ..., D)``; no cell logits.

        ``valid_size``: ``(N, 2)`` width and height of each row's resized image on the canvas.
        ``cells`` and ``image_index`` are the pointer head's inputs, unused here.
        """
        raw = self.mlp(hidden.to(self.mlp[0].weight.dtype))
        scale = valid_size.repeat(1, 2).view(valid_size.shape[0], *([1] * (raw.dim() - 2)), 4)
        return (raw + 1) / 2 * scale, None


class PointerLocationHead(nn.Module):
    """Point at a feature cell, then refine: a box per token from the hidden state and the image.

    Cell logits ``q(h) . k(f_c + pos_c)`` over the ``G x G`` cells ``c`` inside the resized image;
    their softmax ``p`` over the 3 x 3 cells around the highest logit gives an anchor
    ``sum_c p_c center_c`` (no gradient: the cell cross-entropy over all cells trains the logits)
    and attended features ``sum_c p_c v(f_c + pos_c)``. An MLP on ``[h ; attended]``
    gives the center's offset from the anchor (in cells) and the log box size (in cells). All in
    canvas pixels.
    """

    def __init__(self, in_dim: int, feature_dim: int, canvas_size: int, hidden: int = 512, depth: int = 3,
                 frequencies: int = 16):
        super().__init__()
        self.canvas_size, self.frequencies = canvas_size, frequencies
        self.query = nn.Sequential(nn.LayerNorm(in_dim, eps=1e-6), nn.Linear(in_dim, hidden))
        self.feature = nn.Linear(feature_dim, hidden)
        self.position = nn.Linear(4 * frequencies, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(in_dim, eps=1e-6)
        self.mlp = _mlp(in_dim + hidden, hidden, depth, 4)

    def cell_centers(self, grid: int, device=None, dtype=None) -> torch.Tensor:
        """``(G*G, 2)`` cell centers ``(x, y)`` in canvas pixels, row-major (row = y)."""
        step = self.canvas_size / grid
        axis = (torch.arange(grid, device=device, dtype=dtype) + 0.5) * step
        y, x = torch.meshgrid(axis, axis, indexing="ij")
        return torch.stack([x.flatten(), y.flatten()], dim=-1)

    def _encode_position(self, centers: torch.Tensor) -> torch.Tensor:
        """Sinusoids of the cell centers ``(G*G, 2)`` -> ``(G*G, 4 * frequencies)``."""
        scales = 2.0 ** torch.linspace(0, math.log2(self.canvas_size / 2), self.frequencies, device=centers.device)
        angles = centers[..., None] / self.canvas_size * scales * math.pi  # (GG, 2, F)
        return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(1).to(centers.dtype)

    def cells(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys and values ``(B, G*G, H)`` of the cells of image features ``(B, C, G, G)``, and the
        cell centers ``(G*G, 2)`` (``cell_centers``)."""
        centers = self.cell_centers(features.shape[-1], features.device, self.feature.weight.dtype)
        cells = self.feature(features.flatten(2).transpose(1, 2).to(centers.dtype)) + self.position(
            self._encode_position(centers))
        return self.key(cells), self.value(cells), centers

    def locate(self, hidden: torch.Tensor, cells: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
               image_index: torch.Tensor, valid_size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Boxes and cell logits of ``N`` rows.

        Args:
            hidden: ``(N, ..., D)`` final hidden states. cells: ``self.cells(features)`` of the
                ``B`` images. image_index: ``(N,)`` image of each row. valid_size: ``(N, 2)`` the
                resized image's width and height on the canvas.

        Returns:
            boxes ``(N, ..., 4)`` canvas pixels; logits ``(N, ..., G*G)`` (-inf on cells wholly in the padding).
        """
        logits, flat, values, centers = self._cell_logits(hidden, cells, image_index, valid_size)
        boxes = self._boxes_at(flat, logits, logits.argmax(-1), values, centers)
        grid = math.isqrt(len(centers))
        return boxes.view(*hidden.shape[:-1], 4), logits.view(*hidden.shape[:-1], grid * grid)

    def candidates(self, hidden: torch.Tensor, cells: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                   image_index: torch.Tensor, valid_size: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The boxes the head would give at its ``k`` highest distinct peaks, best first: each next
        peak is the highest cell outside the 3 x 3 cells around the ones before (the first is
        ``locate``'s box).

        Args:
            hidden: ``(N, D)`` final hidden states; cells, image_index, valid_size: as ``locate``.

        Returns:
            boxes ``(N, k, 4)`` canvas pixels and the peaks' logits ``(N, k)``; a row whose image
            has fewer than ``k`` distinct peaks repeats its first (with its logit).
        """
        logits, flat, values, centers = self._cell_logits(hidden[:, None], cells, image_index, valid_size)
        logits = logits[:, 0]  # (N, GG)
        peaks = distinct_peaks(logits, centers, self.canvas_size / math.isqrt(len(centers)), k)
        boxes = self._boxes_at(flat.expand(-1, k, -1), logits[:, None].expand(-1, k, -1), peaks, values, centers)
        return boxes, logits.gather(1, peaks)

    def _cell_logits(self, hidden, cells, image_index, valid_size):
        """Cell logits ``(N, L', G*G)`` of hidden states ``(N, ..., D)`` flattened to ``(N, L', D)``
        (-inf on cells wholly in the padding), with the flattened states, each row's values and the
        cell centers."""
        keys, values, centers = cells[0][image_index], cells[1][image_index], cells[2]  # (N, GG, H), (GG, 2)
        grid = math.isqrt(len(centers))
        dtype = keys.dtype
        flat = hidden.to(dtype).reshape(hidden.shape[0], -1, hidden.shape[-1])  # (N, L', D)
        logits = torch.einsum("nlh,ngh->nlg", self.query(flat), keys) / math.sqrt(keys.shape[-1])
        cell = self.canvas_size / grid
        inside = (centers[None] - cell / 2 < valid_size[:, None].to(dtype)).all(-1)  # (N, GG) overlaps the image
        return logits.masked_fill(~inside[:, None], float("-inf")), flat, values, centers

    def _boxes_at(self, flat, logits, peak, values, centers):
        """Boxes ``(N, L', 4)`` of states ``flat (N, L', D)`` with cell logits ``(N, L', G*G)``
        around the cells ``peak (N, L')``."""
        cell = self.canvas_size / math.isqrt(len(centers))
        # Attend within the 3 x 3 cells around the peak: a softmax split between two objects would
        # otherwise average them into a box on neither.
        weights = logits.masked_fill(~_around(centers, peak, cell), float("-inf")).softmax(-1)
        # The cross-entropy alone trains where to point: an L1 gradient through the anchor is scaled
        # by pixel coordinates, dwarfs every other loss under gradient clipping, and is the plateau
        # that stalled the MLP head (docs/model_card.md).
        anchor = weights.detach() @ centers  # (N, L', 2)
        raw = self.mlp(torch.cat([self.norm(flat), weights @ values], dim=-1))
        center = anchor + raw[..., :2] * cell
        half = raw[..., 2:].clamp(-6, 6).exp() * cell / 2
        return torch.cat([center - half, center + half], dim=-1)


def distinct_peaks(logits: torch.Tensor, centers: torch.Tensor, cell: float, k: int) -> torch.Tensor:
    """The ``k`` highest cells of each row of ``logits (N, G*G)``, best first, each outside the 3 x 3
    cells around the ones before: ``(N, k)`` indices. ``centers (G*G, 2)``: the cells' centers,
    ``cell`` their side. A row with fewer than ``k`` such cells (the rest -inf) repeats its first."""
    remaining, peaks = logits, []
    for _ in range(k):
        peak = remaining.argmax(-1)  # (N,)
        exhausted = ~torch.isfinite(remaining.gather(1, peak[:, None]))[:, 0]
        peaks.append(torch.where(exhausted, peaks[0], peak) if peaks else peak)
        remaining = remaining.masked_fill(_around(centers, peak, cell), float("-inf"))
    return torch.stack(peaks, dim=1)


def _around(centers: torch.Tensor, peak: torch.Tensor, cell: float) -> torch.Tensor:
    """``(..., G*G)`` bool: the 3 x 3 cells around each cell index of ``peak (...)``."""
    return ((centers - centers[peak][..., None, :]).abs() <= 1.5 * cell).all(-1)


def box_center(boxes: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` boxes -> ``(..., 2)`` centers."""
    return (boxes[..., :2] + boxes[..., 2:]) / 2
