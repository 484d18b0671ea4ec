"""The pointer locator: a token's box from the cell of the image features its hidden state points at.

The location head's ``kind: pointer`` (not in the official design, which regresses the box from the
hidden state alone). A small model trained from scratch learns *which* object a phrase names far
faster by classifying cells than by regressing coordinates.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pixelllm.model.features import cell_centers


def mlp(in_dim: int, hidden: int, depth: int, out_dim: int) -> nn.Sequential:
    """``depth`` x (Linear + GELU), then a Linear to ``out_dim``."""
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(in_dim if i == 0 else hidden, hidden), nn.GELU()]
    layers.append(nn.Linear(hidden, out_dim))
    return nn.Sequential(*layers)


class PointerLocator(nn.Module):
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
        self.mlp = mlp(in_dim + hidden, hidden, depth, 4)

    def cell_centers(self, grid: int, device=None, dtype=None) -> torch.Tensor:
        """``(G*G, 2)`` cell centers ``(x, y)`` in canvas pixels, row-major (row = y)."""
        axis = cell_centers(grid, self.canvas_size, device, dtype)
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
        """The boxes the locator would give at its ``k`` highest distinct peaks, best first: each next
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
        # that stalled the MLP head.
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
