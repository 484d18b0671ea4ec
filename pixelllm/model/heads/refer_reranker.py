"""The referring re-ranker: a second look at the pointer's best candidates, through their pixels.

Not in the official design (the head ``refer_reranker``, after a pointer location head; needs the
extractor's box pixels). The pointer scores the image features' cells; on the shapes world its
misses are mostly an object of the named color and another shape, while the right object is
nearly always among its first few distinct peaks. The re-ranker takes the
boxes the pointer gives at its ``candidates`` highest distinct peaks, reads each box's pixels with
the box pixel encoder's CNN (which names the shapes; ``box_pixels.box_crops``), and scores each as
``scale * pointer logit + MLP(text * pixels)``: the expression's last hidden state and the box's
pixel map, each projected, multiplied, and mapped to a correction. The correction's last layer
starts at zero, so a new re-ranker keeps the pointer's choice.

Loss ``rerank``: the cross-entropy of the scores over the candidates of each prompt located at one
token (a referring expression) toward the candidate that overlaps the target most, if one reaches
IoU 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pixelllm.errors import ConfigError
from pixelllm.model.box_pixels import box_crops
from pixelllm.model.boxes import elementwise_box_iou
from pixelllm.model.features import ImageFeatures
from pixelllm.model.heads.base import BuildContext, Head, HeadLosses, TrainingPass


@dataclass
class RerankerConfig:
    candidates: int = 3
    hidden: int = 128
    weight: float = 1.0  # x the rerank cross-entropy


class ReferReranker(Head):
    """Scores of ``k`` candidate boxes per expression; see the module docstring."""

    name = "refer_reranker"
    Config = RerankerConfig
    loss_names = ("rerank",)
    provides = ("refer_boxes",)
    requires = ("candidates", "box_pixels")

    def __init__(self, config: RerankerConfig, context: BuildContext):
        super().__init__(config, context)
        lm_dim, pixel_dim = context.lm_dim, context.pixel_dim
        self.text = nn.Sequential(nn.LayerNorm(lm_dim, eps=1e-6), nn.Linear(lm_dim, config.hidden))
        self.pixels = nn.Sequential(nn.LayerNorm(pixel_dim, eps=1e-6), nn.Linear(pixel_dim, config.hidden))
        self.correction = nn.Sequential(nn.GELU(), nn.Linear(config.hidden, config.hidden), nn.GELU(),
                                        nn.Linear(config.hidden, 1))
        nn.init.zeros_(self.correction[-1].weight)
        nn.init.zeros_(self.correction[-1].bias)
        self.pointer_scale = nn.Parameter(torch.ones(()))

    @classmethod
    def check(cls, config: RerankerConfig, model_config) -> None:
        if config.candidates < 2 or config.hidden < 1:
            raise ConfigError(f"heads.refer_reranker needs candidates >= 2 and hidden >= 1, got {config}")

    def forward(self, hidden: torch.Tensor, pixel_features: torch.Tensor, pointer_logits: torch.Tensor) -> torch.Tensor:
        """``hidden (N, D)`` the expression's last state, ``pixel_features (N, k, P)`` each candidate
        box's flattened box pixel map, ``pointer_logits (N, k)`` -> scores ``(N, k)``."""
        match = self.text(hidden)[:, None] * self.pixels(pixel_features)  # (N, k, H)
        return self.pointer_scale * pointer_logits + self.correction(match)[..., 0]

    def refer_boxes(self, model, hidden: torch.Tensor, images: ImageFeatures,
                    image_index: torch.Tensor) -> torch.Tensor:
        """The best scored candidate box ``(N, 4)`` canvas pixels of each expression's last state ``(N, D)``."""
        boxes, scores = self.rerank(model, hidden, images, image_index)
        return boxes[torch.arange(len(boxes), device=boxes.device), scores.argmax(1)]

    def rerank(self, model, hidden: torch.Tensor, images: ImageFeatures, image_index: torch.Tensor,
               cells=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The pointer's candidate boxes ``(N, k, 4)`` (canvas pixels) and their scores ``(N, k)``;
        ``cells``: the location head's, if already computed."""
        k = self.config.candidates
        boxes, pointer_logits = model.capability("candidates")(hidden, images, image_index, k, cells)
        boxes = boxes.detach()  # the re-ranker chooses among the boxes; it does not move them
        encoder = model.extractor.box_pixels
        crops = box_crops(images.pixels, image_index.repeat_interleave(k), boxes.reshape(-1, 4),
                          model.config.image_size, encoder.resolution)
        pixel_maps = encoder.features(crops).flatten(1).view(len(boxes), k, -1)
        return boxes, self(hidden, pixel_maps, pointer_logits)

    def losses(self, model, step: TrainingPass, all_heads: bool) -> HeadLosses:
        batch, hidden = step.batch, step.hidden
        located = batch["label_box_mask"][:, :-1]
        rows = ((located.sum(1) == 1) & (batch["location_weight"] > 0)).nonzero()[:, 0]
        if len(rows) == 0:
            loss = hidden.new_zeros(())
        else:
            token = located[rows].float().argmax(1)  # the located label; the state whose input it is: 1 + token
            boxes, scores = self.rerank(model, hidden[rows, 1 + token], step.images, step.prompts.image_index[rows],
                                        step.outputs.get("location_cells"))
            overlap = elementwise_box_iou(boxes, batch["label_boxes"][rows, token][:, None])  # (n, k)
            reachable = overlap.max(1).values >= 0.5
            loss = (F.cross_entropy(scores[reachable].float(), overlap[reachable].argmax(1))
                    if bool(reachable.any()) else scores.sum() * 0.0)
        return HeadLosses(self.config.weight * loss, {"rerank": loss})
