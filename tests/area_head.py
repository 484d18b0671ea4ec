"""A toy head in a file of its own, for tests/model/test_heads.py: it predicts the log area of each
prompt's box (canvas pixels, a point's as one pixel) from the trunk's visual tokens. Nothing of the
trunk knows it: a config entry names it, ``{"area": {"class": "area_head:AreaHead"}}``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pixelllm.errors import ConfigError
from pixelllm.model.heads import BuildContext, Head, HeadLosses, TrainingPass


@dataclass
class AreaConfig:
    hidden: int = 32
    weight: float = 1.0


class AreaHead(Head):
    name = "area"
    Config = AreaConfig
    loss_names = ("area",)
    provides = ("box_area",)

    def __init__(self, config: AreaConfig, context: BuildContext):
        super().__init__(config, context)
        self.mlp = nn.Sequential(nn.LayerNorm(context.lm_dim), nn.Linear(context.lm_dim, config.hidden), nn.GELU(),
                                 nn.Linear(config.hidden, 1))

    @classmethod
    def check(cls, config: AreaConfig, model_config) -> None:
        if config.hidden < 1:
            raise ConfigError(f"heads.area.hidden must be >= 1, got {config.hidden}")

    def box_area(self, model, visual: torch.Tensor) -> torch.Tensor:
        """The predicted log area ``(N,)`` of each prompt from its visual tokens ``(N, T, D)``."""
        return self.mlp(visual.mean(1))[:, 0]

    def losses(self, model, step: TrainingPass, all_heads: bool) -> HeadLosses:
        spans = step.prompts.spans
        target = ((spans[:, 2:] - spans[:, :2]).clamp(min=1).prod(1)).log()
        loss = F.mse_loss(self.box_area(model, step.visual), target)
        return HeadLosses(self.config.weight * loss, {"area": loss})
