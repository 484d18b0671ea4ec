"""Dense-captioning proposals: a Simple Feature Pyramid and a class-agnostic CenterNet head.

As GRiT and the official PixelLLM, a detector proposes boxes from the fused image map and each
proposal is then captioned with the box as the location prompt. The detector is ViTDet's Simple
Feature Pyramid (deconvolution x2 / x4, identity, max-pool, then stride-2 convolutions for the extra
top levels) under CenterNet's head: a shared conv tower, a 1-channel heatmap whose sigmoid is the
proposal score, and 4 non-negative distances ``(left, top, right, bottom)`` from each cell center to
the box sides. The official code puts CenterNet2's cascade ROI heads behind it; this head, like the
project spec, stops at the CenterNet stage.

Coordinates are canvas pixels throughout, boxes ``[x0, y0, x1, y1]``. Cell ``(row i, column j)`` of
a level sits at ``offset + (j, i) * stride``; the strides are exact fractions of the canvas, so a
grid that does not divide it (384 / 27) stays aligned with the pixels its features came from.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pixelllm.errors import ConfigError
from pixelllm.model.boxes import box_area, clip_boxes, generalized_box_iou, nms
from pixelllm.model.features import ImageFeatures
from pixelllm.model.heads.base import BuildContext, Head, HeadLosses, TrainingPass

FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0
FOCAL_BETA = 4.0
SIGMOID_CLAMP = 1e-4  # the heatmap probability is clamped to [eps, 1 - eps] inside the focal loss
GAUSSIAN_MIN_OVERLAP = 0.8  # CenterNet's radius rule: radius^2 = 2 * area * ((1 - o) / (1 + o))^2
GAUSSIAN_MIN_RADIUS = 4.0  # canvas pixels
LEVEL_RANGE = (2.0, 5.0)  # a level takes objects whose half-diagonal lies in this range, in its strides
BOX_INIT = 8.0  # initial box distances, in strides
HEATMAP_PRIOR = 0.01  # initial proposal score
SUPPORTED_SCALES = (4.0, 2.0, 1.0, 0.5)
_EPS = 1e-6


@dataclass
class ProposalConfig:
    width: int = 256
    scales: tuple[float, ...] = (2.0, 1.0, 0.5)  # pyramid levels, relative to the fused feature map
    top_blocks: int = 2  # extra stride-2 levels above the coarsest scale (ViTDet's p6, p7)
    tower_depth: int = 4  # conv + GroupNorm + ReLU layers shared by the heatmap and box outputs
    pre_nms_topk: int = 1000  # highest-scoring cells over all levels that enter NMS
    max_proposals: int = 100
    nms_iou: float = 0.5
    score_threshold: float = 0.05
    heatmap_weight: float = 0.5  # x CenterNet's heatmap focal loss
    box_weight: float = 1.0  # x 1 - GIoU

    def __post_init__(self):
        self.scales = tuple(float(scale) for scale in self.scales)


# ----------------------------------------------------------------------------------------------
# Network


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a ``(B, C, H, W)`` map."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _pyramid_level(scale: float, in_channels: int, width: int) -> nn.Sequential:
    """One ViTDet level: resample by ``scale``, then 1x1 and 3x3 convolutions, each with LayerNorm."""
    if scale == 4.0:
        resample = [nn.ConvTranspose2d(in_channels, in_channels // 2, 2, stride=2), LayerNorm2d(in_channels // 2),
                    nn.GELU(), nn.ConvTranspose2d(in_channels // 2, in_channels // 4, 2, stride=2)]
        channels = in_channels // 4
    elif scale == 2.0:
        resample, channels = [nn.ConvTranspose2d(in_channels, in_channels // 2, 2, stride=2)], in_channels // 2
    elif scale == 1.0:
        resample, channels = [], in_channels
    elif scale == 0.5:
        resample, channels = [nn.MaxPool2d(2)], in_channels
    else:
        raise ConfigError(f"heads.proposals.scales: {scale} is not one of {SUPPORTED_SCALES}")
    return nn.Sequential(
        *resample,
        nn.Conv2d(channels, width, 1, bias=False), LayerNorm2d(width),
        nn.Conv2d(width, width, 3, padding=1, bias=False), LayerNorm2d(width),
    )


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's Simple Feature Pyramid over one ``(B, C, G, G)`` map.

    One level per ``scales`` entry (relative to the input map), then ``top_blocks`` stride-2 3x3
    convolutions on the coarsest one (a ReLU between them). All levels have ``width`` channels.
    """

    def __init__(self, in_channels: int, width: int, scales: Sequence[float], top_blocks: int):
        super().__init__()
        self.scales = tuple(scales)
        self.levels = nn.ModuleList(_pyramid_level(s, in_channels, width) for s in self.scales)
        self.top = nn.ModuleList(nn.Conv2d(width, width, 3, stride=2, padding=1) for _ in range(top_blocks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(B, C, G, G)`` -> one ``(B, width, H_l, W_l)`` map per level, finest first as in ``scales``."""
        maps = [level(x) for level in self.levels]
        for i, conv in enumerate(self.top):
            maps.append(conv(maps[-1] if i == 0 else F.relu(maps[-1])))
        return maps

    def geometry(self, base_stride: float) -> list[tuple[float, float]]:
        """``(stride, offset)`` of each level in canvas pixels, for an input map of stride ``base_stride``.

        Deconvolution, identity and max-pool levels tile the canvas (offset = half a stride). A
        padded stride-2 3x3 convolution centers output cell ``i`` on input cell ``2 i``: the stride
        doubles and the offset is inherited.
        """
        geometry = [(base_stride / s, base_stride / s / 2) for s in self.scales]
        for _ in self.top:
            stride, offset = geometry[-1]
            geometry.append((2 * stride, offset))
        return geometry


class CenterNetHead(nn.Module):
    """Class-agnostic CenterNet outputs, shared over the levels.

    A tower of ``depth`` x (3x3 conv + GroupNorm + ReLU) feeds a 3x3 conv to the heatmap logit and
    a 3x3 conv to the 4 box distances; each level has a learnable scale on the distances, which are
    made non-negative by a ReLU and measured in strides.
    """

    def __init__(self, width: int, depth: int, num_levels: int):
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(math.gcd(32, width), width), nn.ReLU()]
        self.tower = nn.Sequential(*layers)
        self.heatmap = nn.Conv2d(width, 1, 3, padding=1)
        self.box = nn.Conv2d(width, 4, 3, padding=1)
        self.level_scales = nn.Parameter(torch.ones(num_levels))
        for conv in [*self.tower[::3], self.heatmap, self.box]:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.heatmap.bias, math.log(HEATMAP_PRIOR / (1 - HEATMAP_PRIOR)))
        nn.init.constant_(self.box.bias, BOX_INIT)

    def forward(self, x: torch.Tensor, level: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, width, H, W)`` -> heatmap logits ``(B, H, W)``, distances in strides ``(B, H, W, 4)``."""
        features = self.tower(x)
        distances = F.relu(self.box(features) * self.level_scales[level])
        return self.heatmap(features)[:, 0], distances.permute(0, 2, 3, 1)


@dataclass
class ProposalOutputs:
    """Dense outputs of ``ProposalHead``, one entry per pyramid level ``l`` (finest first).

    ``heatmaps[l] (B, H_l, W_l)``: logits, whose sigmoid is the proposal score.
    ``distances[l] (B, H_l, W_l, 4)``: ``(left, top, right, bottom)`` from the cell center to the
    box sides, canvas pixels, >= 0. ``centers[l] (H_l, W_l, 2)``: ``(x, y)`` of each cell center,
    canvas pixels. ``strides[l]``: the level's cell size in canvas pixels.
    """

    heatmaps: list[torch.Tensor]
    distances: list[torch.Tensor]
    centers: list[torch.Tensor]
    strides: list[float]

    def flat_logits(self) -> torch.Tensor:
        """All cells of all levels: ``(B, m)``, ``m = sum_l H_l W_l``, level by level, row-major."""
        return torch.cat([h.flatten(1) for h in self.heatmaps], 1)

    def flat_centers(self) -> torch.Tensor:
        """``(m, 2)`` cell centers."""
        return torch.cat([c.reshape(-1, 2) for c in self.centers])

    def flat_boxes(self) -> torch.Tensor:
        """``(B, m, 4)`` float32: the box each cell predicts, canvas pixels."""
        distances = torch.cat([d.flatten(1, 2) for d in self.distances], 1).float()
        centers = self.flat_centers().to(distances.device).repeat(1, 2)
        return centers + distances * distances.new_tensor([-1.0, -1.0, 1.0, 1.0])

    def unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Split ``(B, m, ...)`` back into one ``(B, H_l, W_l, ...)`` per level."""
        shapes = [h.shape[1:] for h in self.heatmaps]
        parts = flat.split([s.numel() for s in shapes], dim=1)
        return [p.reshape(p.shape[0], *s, *p.shape[2:]) for p, s in zip(parts, shapes, strict=True)]


@dataclass
class DetectionTargets:
    """CenterNet targets over the flattened cells (order of ``ProposalOutputs.flat_logits``).

    ``heatmap (B, m)``: 1 at each object's center cell on the levels its size is assigned to,
    elsewhere the largest over objects of a Gaussian of the distance to their centers (always < 1).
    ``boxes (B, m, 4)``: the object each cell regresses, canvas pixels, meaningful where
    ``box_mask (B, m)``: the 3x3 cells around a center on an assigned level whose own center lies
    inside the box.
    """

    heatmap: torch.Tensor
    boxes: torch.Tensor
    box_mask: torch.Tensor


class ProposalHead(Head):
    """Simple Feature Pyramid + class-agnostic CenterNet head on the fused image map ``(B, C, G, G)``
    of stride ``S / G`` (``S`` the canvas side); the proposals of dense captioning (``propose``).
    Loss: ``heatmap_weight`` x the heatmap focal loss + ``box_weight`` x (1 - GIoU)."""

    name = "proposals"
    Config = ProposalConfig
    loss_names = ("detection_heatmap", "detection_box")
    provides = ("propose",)

    def __init__(self, config: ProposalConfig, context: BuildContext):
        super().__init__(config, context)
        self.image_size = context.config.image_size
        self.pyramid = SimpleFeaturePyramid(context.feature_dim, config.width, config.scales, config.top_blocks)
        self.head = CenterNetHead(config.width, config.tower_depth, len(config.scales) + config.top_blocks)

    @classmethod
    def check(cls, config: ProposalConfig, model_config) -> None:
        if not config.scales or config.top_blocks < 0 or config.tower_depth < 0:
            raise ConfigError(
                f"heads.proposals needs scales, top_blocks >= 0 and tower_depth >= 0; got scales {config.scales}, "
                f"top_blocks {config.top_blocks}, tower_depth {config.tower_depth}"
            )
        unsupported = [scale for scale in config.scales if scale not in SUPPORTED_SCALES]
        if unsupported:
            raise ConfigError(f"heads.proposals.scales: {unsupported[0]} is not one of {SUPPORTED_SCALES}")

    def propose(self, model, images: ImageFeatures, max_proposals: int | None = None,
                score_threshold: float | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Class-agnostic proposals per image: ``(boxes (K, 4) canvas pixels, scores (K,))``, best
        first; ``max_proposals`` and ``score_threshold`` override the config."""
        return self.proposals(self(images.features), images.valid_size, max_proposals=max_proposals,
                              score_threshold=score_threshold)

    def losses(self, model, step: TrainingPass, all_heads: bool) -> HeadLosses | None:
        batch = step.batch
        has_boxes = "gt_boxes" in batch and bool((batch["detection_weight"] > 0).any())
        if not (has_boxes or all_heads):
            return None
        features = step.images.features
        if has_boxes:
            targets = (batch["gt_boxes"], batch["gt_boxes_mask"], batch["detection_weight"])
        else:  # every parameter takes part, with zero weight
            b = features.shape[0]
            targets = (features.new_zeros(b, 1, 4), torch.zeros(b, 1, dtype=torch.bool, device=features.device),
                       features.new_zeros(b))
        terms = self.loss(self(features), *targets)
        total = self.config.heatmap_weight * terms["heatmap"] + self.config.box_weight * terms["box"]
        return HeadLosses(total, {f"detection_{name}": value for name, value in terms.items()} if has_boxes else {})

    def forward(self, features: torch.Tensor) -> ProposalOutputs:
        """``features (B, C, G, G)`` (``ImageFeatures.features``) -> dense ``ProposalOutputs``."""
        if features.shape[-1] != features.shape[-2]:
            raise ValueError(f"the fused map must be square, got {tuple(features.shape[-2:])}")
        maps = self.pyramid(features)
        geometry = self.pyramid.geometry(self.image_size / features.shape[-1])
        heatmaps, distances, centers = [], [], []
        for level, (x, (stride, offset)) in enumerate(zip(maps, geometry, strict=True)):
            logits, steps = self.head(x, level)
            heatmaps.append(logits)
            distances.append(steps * stride)
            centers.append(_cell_centers(x.shape[-2], x.shape[-1], stride, offset, x.device))
        return ProposalOutputs(heatmaps, distances, centers, [stride for stride, _ in geometry])

    def loss(self, outputs: ProposalOutputs, gt_boxes: torch.Tensor, gt_mask: torch.Tensor,
             weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """CenterNet losses, unweighted.

        ``"heatmap"``: penalty-reduced focal loss (alpha, gamma, beta as the module constants) over
        all cells, normalized by the number of center cells. ``"box"``: 1 - GIoU at the regression
        cells, normalized by their number. Both normalizers count the gated images only.

        Args:
            gt_boxes: ``(B, M, 4)`` canvas pixels. gt_mask: ``(B, M)`` True for real objects.
            weight: ``(B,)`` per-image gate (``detection_weight``; 0 switches an image off).
        """
        targets = detection_targets(outputs, gt_boxes, gt_mask)
        heatmap_sums, center_counts = _focal_loss(outputs.flat_logits(), targets.heatmap)
        image, cell = targets.box_mask.nonzero(as_tuple=True)
        giou = generalized_box_iou(outputs.flat_boxes()[image, cell], targets.boxes[image, cell])
        box_sums = torch.zeros_like(heatmap_sums).index_add(0, image, 1 - giou)
        weight = weight.to(heatmap_sums)
        return {
            "heatmap": _gated_mean(heatmap_sums, center_counts, weight),
            "box": _gated_mean(box_sums, targets.box_mask.sum(1).to(weight), weight),
        }

    @torch.no_grad()
    def proposals(self, outputs: ProposalOutputs, valid_size: torch.Tensor, max_proposals: int | None = None,
                  nms_iou: float | None = None, score_threshold: float | None = None
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Boxes and scores per image: top ``pre_nms_topk`` cells over all levels, clipped, NMS.

        Args:
            valid_size: ``(B, 2)`` width and height of the image on the canvas.
            max_proposals, nms_iou, score_threshold: override the config.

        Returns:
            per image ``(boxes (K, 4), scores (K,))``: canvas pixels clipped to the valid image,
            non-empty, by decreasing score (the heatmap sigmoid), ``K <= max_proposals``.
        """
        config = self.config
        max_proposals = config.max_proposals if max_proposals is None else max_proposals
        nms_iou = config.nms_iou if nms_iou is None else nms_iou
        score_threshold = config.score_threshold if score_threshold is None else score_threshold
        scores = outputs.flat_logits().float().sigmoid()
        scores, cells = scores.topk(min(config.pre_nms_topk, scores.shape[1]), dim=1)
        boxes = outputs.flat_boxes().gather(1, cells[..., None].expand(-1, -1, 4))
        results = []
        for image_boxes, image_scores, size in zip(boxes, scores, valid_size, strict=True):
            image_boxes = clip_boxes(image_boxes, size)
            keep = (image_scores >= score_threshold) & (box_area(image_boxes) > 0)
            image_boxes, image_scores = image_boxes[keep], image_scores[keep]
            kept = nms(image_boxes, image_scores, nms_iou)[:max_proposals]
            results.append((image_boxes[kept], image_scores[kept]))
        return results


def _cell_centers(height: int, width: int, stride: float, offset: float, device: torch.device) -> torch.Tensor:
    """``(H, W, 2)`` ``(x, y)`` canvas-pixel centers of a level's cells."""
    ys = offset + stride * torch.arange(height, device=device, dtype=torch.float32)
    xs = offset + stride * torch.arange(width, device=device, dtype=torch.float32)
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)


# ----------------------------------------------------------------------------------------------
# Targets and losses


def level_ranges(strides: Sequence[float]) -> list[tuple[float, float]]:
    """Half-diagonal range (canvas pixels) of the objects each level detects.

    ``LEVEL_RANGE`` strides of the level, open-ended below on the finest level and above on the
    coarsest; neighbours overlap, so some objects are centers on two levels.
    """
    low, high = LEVEL_RANGE
    ranges = [(low * s, high * s) for s in strides]
    ranges[0] = (0.0, ranges[0][1])
    ranges[-1] = (ranges[-1][0], math.inf)
    return ranges


def detection_targets(outputs: ProposalOutputs, gt_boxes: torch.Tensor, gt_mask: torch.Tensor) -> DetectionTargets:
    """CenterNet targets for ``gt_boxes (B, M, 4)`` (canvas pixels) where ``gt_mask (B, M)``.

    An object is assigned to the levels whose ``level_ranges`` contain its half-diagonal; its center
    cell on a level is the cell nearest to the box center. The Gaussian has
    ``radius^2 = max(2 * area * ((1 - o) / (1 + o))^2, GAUSSIAN_MIN_RADIUS^2)`` with
    ``o = GAUSSIAN_MIN_OVERLAP``, on every level (so a center on a level the object is not assigned to
    is a near-1 negative that the focal loss barely penalizes). A regression cell takes, among the
    objects it may regress, the one with the smallest normalized distance.
    """
    gt_boxes = gt_boxes.float()
    batch, num_objects = gt_mask.shape
    cells = sum(c.shape[0] * c.shape[1] for c in outputs.centers)
    device = gt_boxes.device
    if num_objects == 0:
        return DetectionTargets(torch.zeros(batch, cells, device=device), torch.zeros(batch, cells, 4, device=device),
                                torch.zeros(batch, cells, dtype=torch.bool, device=device))
    size = gt_boxes[..., 2:] - gt_boxes[..., :2]
    valid = gt_mask & (size > 0).all(-1)
    center = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2  # (B, M, 2)
    half_diagonal = size.norm(dim=-1) / 2

    level, column, row = _cell_layout(outputs, device)  # (m,) each
    strides = torch.tensor(outputs.strides, device=device)
    offsets = torch.stack([c[0, 0, 0] for c in outputs.centers]).to(device)
    ranges = torch.tensor(level_ranges(outputs.strides), device=device)  # (L, 2)
    grid = torch.tensor([list(c.shape[1::-1]) for c in outputs.centers], device=device)  # (L, 2) columns, rows
    # Nearest cell to each center on each level: (B, M, L, 2) as (column, row).
    nearest = ((center[:, :, None] - offsets[:, None]) / strides[:, None] + 0.5).floor()
    nearest = torch.minimum(nearest.clamp(min=0), grid - 1)[:, :, level]  # (B, M, m, 2)
    assigned = (half_diagonal[..., None] >= ranges[:, 0]) & (half_diagonal[..., None] <= ranges[:, 1])
    assigned = assigned[:, :, level] & valid[..., None]  # (B, M, m)
    column_gap = (nearest[..., 0] - column).abs()
    row_gap = (nearest[..., 1] - row).abs()
    is_center = assigned & (column_gap == 0) & (row_gap == 0)

    cell_centers = outputs.flat_centers().to(device)  # (m, 2)
    distance2 = (cell_centers - center[:, :, None]).square().sum(-1)  # (B, M, m)
    delta = (1 - GAUSSIAN_MIN_OVERLAP) / (1 + GAUSSIAN_MIN_OVERLAP)
    radius2 = (2 * delta**2 * size.prod(-1)).clamp(min=GAUSSIAN_MIN_RADIUS**2)
    # The floor keeps every non-center value strictly below 1: only centers count as positives.
    normalized = (distance2 / radius2[..., None]).clamp(min=_EPS).masked_fill(is_center, 0)
    heatmap = torch.exp(-normalized).masked_fill(~valid[..., None], 0).amax(1)

    inside = ((cell_centers > gt_boxes[:, :, None, :2]) & (cell_centers < gt_boxes[:, :, None, 2:])).all(-1)
    regresses = assigned & (column_gap <= 1) & (row_gap <= 1) & inside
    closest = normalized.masked_fill(~regresses, math.inf).argmin(1)  # (B, m)
    boxes = gt_boxes.gather(1, closest[..., None].expand(-1, -1, 4))
    return DetectionTargets(heatmap, boxes, regresses.any(1))


def _cell_layout(outputs: ProposalOutputs, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Level, column and row of every flattened cell: three ``(m,)`` long tensors."""
    levels, columns, rows = [], [], []
    for index, centers in enumerate(outputs.centers):
        height, width = centers.shape[:2]
        ys, xs = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
        levels.append(torch.full((height * width,), index, device=device))
        columns.append(xs.reshape(-1))
        rows.append(ys.reshape(-1))
    return torch.cat(levels), torch.cat(columns), torch.cat(rows)


def _focal_loss(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Penalty-reduced focal loss of CenterNet, summed per image.

    Args:
        logits, target: ``(B, m)``; cells where ``target == 1`` are positives.

    Returns:
        per-image loss sums ``(B,)`` and positive counts ``(B,)``.
    """
    p = logits.float().sigmoid().clamp(SIGMOID_CLAMP, 1 - SIGMOID_CLAMP)
    positive = target == 1
    pos = FOCAL_ALPHA * torch.log(p) * (1 - p).pow(FOCAL_GAMMA)
    neg = (1 - FOCAL_ALPHA) * torch.log(1 - p) * p.pow(FOCAL_GAMMA) * (1 - target).pow(FOCAL_BETA)
    return -torch.where(positive, pos, neg).sum(1), positive.sum(1).to(p)


def _gated_mean(sums: torch.Tensor, counts: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``sum_b w_b sums_b / sum_b w_b max(counts_b, 1)``: CenterNet's batch normalization, gated.

    With all weights 1 this is the official mean of the sums over the mean of the counts.
    """
    return (weight * sums).sum() / (weight * counts.clamp(min=1)).sum().clamp(min=1)
