"""Location prompts as SAM embeds them: random Fourier features plus corner / point embeddings."""

from __future__ import annotations

import torch
from torch import nn

from pixelllm.model.features import cell_centers
from pixelllm.model.frozen import KeepsFrozenInEval

NUM_PROMPT_TOKENS = 5  # a box's 2 corner tokens (or a point and SAM's "not a point"), then 3 no-mask pads


class PromptEncoder(KeepsFrozenInEval):
    """Wraps ``transformers``' ``SamPromptEncoder`` (frozen in the paper).

    SAM's Fourier encoding maps canvas pixel ``c`` to ``[sin, cos](2*pi*(2*(c + 0.5)/S - 1) @ G)``
    with ``G`` its fixed Gaussian ``(2, C/2)`` matrix; box corners then add learned corner-type
    embeddings, points a foreground-point embedding.
    """

    def __init__(self, sam_prompt_encoder: nn.Module, frozen: bool = True):
        super().__init__()
        self.sam = sam_prompt_encoder
        self.dim = sam_prompt_encoder.hidden_size
        if frozen:
            self.sam.requires_grad_(False)
            self.frozen = ("sam",)

    def forward(self, boxes: torch.Tensor, is_point: torch.Tensor) -> torch.Tensor:
        """Sparse prompt tokens.

        Args:
            boxes: ``(N, 4)`` canvas pixels ``x0, y0, x1, y1``; for a point prompt, ``(x, y)`` is ``boxes[:, :2]``.
            is_point: ``(N,)`` bool.

        Returns:
            ``(N, 5, C)``: two tokens for the box (or the point and SAM's padding "not a point"),
            then three copies of the no-mask embedding.
        """
        n = boxes.shape[0]
        box_tokens, _ = self.sam(input_points=None, input_labels=None, input_boxes=boxes[:, None], input_masks=None)
        points = boxes[:, None, None, :2]
        labels = torch.ones(n, 1, 1, dtype=torch.long, device=boxes.device)
        point_tokens, _ = self.sam(input_points=points, input_labels=labels, input_boxes=None, input_masks=None)
        sparse = torch.where(is_point[:, None, None], point_tokens[:, 0], box_tokens[:, 0])  # (N, 2, C)
        pads = self.sam.no_mask_embed.weight.expand(n, NUM_PROMPT_TOKENS - 2, -1)
        return torch.cat([sparse, pads.to(sparse.dtype)], dim=1)

    def no_mask_embedding(self, grid: int) -> torch.Tensor:
        """The dense prompt when no mask is given: ``(C, grid, grid)``."""
        return self.sam.no_mask_embed.weight.view(-1, 1, 1).expand(-1, grid, grid)

    def dense_positional_encoding(self, grid: int) -> torch.Tensor:
        """Fourier encoding of every cell center of a ``grid x grid`` map: ``(C, grid, grid)``."""
        table = self.sam.shared_embedding.positional_embedding
        centers = cell_centers(grid, grid, table.device, table.dtype) / grid  # cell centers as fractions of the map
        ys, xs = torch.meshgrid(centers, centers, indexing="ij")
        encoding = self.sam.shared_embedding(torch.stack([xs, ys], dim=-1)[None, None])  # (1, 1, g, g, C)
        return encoding[0, 0].permute(2, 0, 1)
