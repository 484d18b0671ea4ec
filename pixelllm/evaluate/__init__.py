"""Evaluation metrics, one module per task family, all with the same interface.

Each metric is fed batch by batch with ``update(...)`` and read with ``compute()``, a
``dict[str, float]`` holding its values (on the papers' scale, see ``docs/metrics.md``) and the
counts ``num_samples``, ``num_skipped`` and ``num_invalid_predictions``. Boxes, masks and points
are in pixels of the original image.
"""

from pixelllm.evaluate.base import Metric
from pixelllm.evaluate.captions import CaptionMetrics, MeteorScorer
from pixelllm.evaluate.densecap import DenseCaptioning
from pixelllm.evaluate.refer import ReferringLocalization
from pixelllm.evaluate.refseg import MultiTargetSegmentation, ReferringSegmentation, TargetCounts
from pixelllm.evaluate.trace import TracePointL1

__all__ = [
    "CaptionMetrics",
    "DenseCaptioning",
    "MeteorScorer",
    "Metric",
    "MultiTargetSegmentation",
    "ReferringLocalization",
    "ReferringSegmentation",
    "TargetCounts",
    "TracePointL1",
]
