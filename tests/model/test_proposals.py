"""Proposal head: pyramid geometry, box helpers, NMS, CenterNet targets and losses, learning."""

from __future__ import annotations

import itertools
import math
import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pixelllm.errors import ConfigError
from pixelllm.model.boxes import box_iou, generalized_box_iou, nms
from pixelllm.model.heads import BuildContext
from pixelllm.model.heads.proposals import ProposalConfig, ProposalHead, ProposalOutputs, detection_targets


def make_head(image_size=128, in_channels=16, scales=(1.0, 0.5), top_blocks=0, width=32, seed=0, **kw):
    torch.manual_seed(seed)
    config = ProposalConfig(width=width, scales=scales, top_blocks=top_blocks, tower_depth=2, **kw)
    ProposalHead.check(config, None)
    context = BuildContext(SimpleNamespace(image_size=image_size), lm_dim=0, feature_dim=in_channels, sam_channels=0,
                           prompt_dim=0, pixel_dim=0, vocab_size=0)
    return ProposalHead(config, context)


# ----------------------------------------------------------------------------------------------
# Geometry and shapes


@pytest.mark.parametrize(
    "image_size, grid, scales, top_blocks, sizes",
    [
        (384, 27, (2.0, 1.0, 0.5), 2, [54, 27, 13, 7, 4]),  # the paper: 384 / 27 is not an integer
        (160, 20, (1.0, 0.5), 2, [20, 10, 5, 3]),  # the tiny preset
        (100, 7, (4.0, 1.0), 0, [28, 7]),
    ],
)
def test_shapes_strides_and_centers(image_size, grid, scales, top_blocks, sizes):
    head = make_head(image_size, 16, scales, top_blocks)
    out = head(torch.randn(2, 16, grid, grid))
    base = image_size / grid
    expected_strides = [base / s for s in scales] + [base / scales[-1] * 2 ** (k + 1) for k in range(top_blocks)]
    assert out.strides == pytest.approx(expected_strides)
    for level, size in enumerate(sizes):
        assert out.heatmaps[level].shape == (2, size, size)
        assert out.distances[level].shape == (2, size, size, 4)
        assert out.centers[level].shape == (size, size, 2)
        assert (out.distances[level] >= 0).all()
        step = out.centers[level][1, 1] - out.centers[level][0, 0]
        assert step.tolist() == pytest.approx([out.strides[level]] * 2, rel=1e-5)
    for level, scale in enumerate(scales):  # resampled levels tile the canvas: first center at half a stride
        assert out.centers[level][0, 0].tolist() == pytest.approx([base / scale / 2] * 2, rel=1e-5)
    for level in range(len(scales), len(sizes)):  # a stride-2 3x3 conv cell sits on input cell 2i
        assert out.centers[level][1, 1].tolist() == pytest.approx(out.centers[level - 1][2, 2].tolist(), rel=1e-5)
    m = sum(s * s for s in sizes)
    assert out.flat_logits().shape == (2, m) and out.flat_boxes().shape == (2, m, 4)


def test_identity_level_centers_are_the_fused_cells():
    out = make_head(384, 16, (1.0,), 0)(torch.randn(1, 16, 27, 27))
    stride = 384 / 27
    assert out.centers[0][3, 5].tolist() == pytest.approx([5.5 * stride, 3.5 * stride])


def test_bad_scale_is_a_config_error():
    with pytest.raises(ConfigError, match="3.0"):
        make_head(scales=(3.0,))


def test_proposals_are_clipped_sorted_and_capped():
    head = make_head(image_size=128)
    out = head(torch.randn(3, 16, 16, 16))
    valid = torch.tensor([[128.0, 128.0], [128.0, 70.0], [40.0, 128.0]])
    results = head.proposals(out, valid, max_proposals=7, nms_iou=0.6, score_threshold=0.0)
    assert len(results) == 3
    for (boxes, scores), (w, h) in zip(results, valid.tolist(), strict=True):
        assert 0 < len(boxes) <= 7 and scores.shape == (len(boxes),)
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert (scores[:-1] >= scores[1:]).all()
        overlaps = box_iou(boxes, boxes).fill_diagonal_(0)
        assert (overlaps <= 0.6 + 1e-6).all()
    assert head.proposals(out, valid, score_threshold=1.1)[0][0].shape == (0, 4)


# ----------------------------------------------------------------------------------------------
# Boxes and NMS


def test_iou_by_hand():
    a = torch.tensor([[0.0, 0, 2, 2], [0, 0, 10, 10]])
    b = torch.tensor([[1.0, 1, 3, 3], [0, 0, 10, 5], [20, 20, 30, 30]])
    expected = [[1 / 7, 4 / 50, 0], [4 / 100, 0.5, 0]]  # 1 of union 7; a box inside another; half; disjoint
    assert box_iou(a, b).tolist() == [pytest.approx(row, abs=1e-6) for row in expected]


def test_giou_by_hand():
    a = torch.tensor([[0.0, 0, 1, 1], [0, 0, 2, 2], [0, 0, 4, 4]])
    b = torch.tensor([[2.0, 0, 3, 1], [1, 1, 3, 3], [0, 0, 4, 4]])
    # disjoint unit squares: enclosing 3, union 2 -> -1/3; overlap 1 of union 7, enclosing 9 -> 1/7 - 2/9; equal -> 1
    assert generalized_box_iou(a, b).tolist() == pytest.approx([-1 / 3, 1 / 7 - 2 / 9, 1.0], abs=1e-6)


def _reference_nms(boxes: list[list[float]], scores: list[float], threshold: float) -> list[int]:
    def iou(p, q):
        w = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
        h = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
        union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - w * h
        return w * h / union

    kept: list[int] = []
    for i in sorted(range(len(boxes)), key=lambda i: -scores[i]):
        if all(iou(boxes[i], boxes[j]) <= threshold for j in kept):
            kept.append(i)
    return kept


@pytest.mark.parametrize("seed, count, threshold", [(0, 50, 0.5), (1, 200, 0.3), (2, 300, 0.7), (3, 1, 0.5)])
def test_nms_matches_brute_force(seed, count, threshold):
    generator = torch.Generator().manual_seed(seed)
    corner = torch.rand(count, 2, generator=generator) * 100
    size = torch.rand(count, 2, generator=generator) * 40 + 5
    boxes = torch.cat([corner, corner + size], 1)
    scores = torch.rand(count, generator=generator)
    kept = nms(boxes, scores, threshold)
    assert kept.tolist() == _reference_nms(boxes.tolist(), scores.tolist(), threshold)


def test_nms_chain_keeps_the_third_box():
    # A suppresses B; B would suppress C, but B is gone, and C barely overlaps A: A and C stay.
    boxes = torch.tensor([[0.0, 0, 10, 10], [4, 0, 14, 10], [8, 0, 18, 10]])
    assert nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.3).tolist() == [0, 2]
    assert nms(boxes, torch.tensor([0.7, 0.9, 0.8]), 0.3).tolist() == [1]
    assert nms(boxes[:0], torch.zeros(0), 0.5).tolist() == []


# ----------------------------------------------------------------------------------------------
# Targets and losses


def _outputs(image_size=128, grid=16, scales=(1.0, 0.5), top_blocks=0, batch=1):
    head = make_head(image_size, 16, scales, top_blocks)
    return head, head(torch.randn(batch, 16, grid, grid))


def test_heatmap_peak_on_the_assigned_level():
    _, out = _outputs()  # strides 8 and 16: level 0 takes half-diagonals <= 40, level 1 those >= 32
    small = [20.0, 36, 50, 60]  # center (35, 48), half-diagonal sqrt(30^2 + 24^2) / 2 = 19.2
    large = [0.0, 0, 100, 90]  # center (50, 45), half-diagonal 67.3
    both = [10.0, 10, 60, 60]  # center (35, 35), half-diagonal 35.4
    targets = detection_targets(out, torch.tensor([[small, large, both]]), torch.tensor([[True, True, False]]))
    fine, coarse = out.unflatten(targets.heatmap)
    assert fine[0, 6, 4] == 1 and coarse[0, 2, 3] == 1  # (48 // 8, 35 // 8); (45 // 16, 50 // 16)
    assert (fine == 1).sum() == 1 and (coarse == 1).sum() == 1
    assert targets.heatmap.max() == 1 and (targets.heatmap >= 0).all()

    targets = detection_targets(out, torch.tensor([[both]]), torch.tensor([[True]]))
    fine, coarse = out.unflatten(targets.heatmap)
    assert fine[0, 4, 4] == 1 and coarse[0, 2, 2] == 1


def test_heatmap_gaussian_and_regression_cells():
    _, out = _outputs()
    box = [20.0, 36, 50, 62]
    targets = detection_targets(out, torch.tensor([[box]]), torch.tensor([[True]]))
    fine = out.unflatten(targets.heatmap)[0][0]
    # Cell (row 6, column 5) is at (44, 52); center (35, 49); radius^2 = 2 * 780 * (0.2 / 1.8)^2.
    radius2 = 2 * 780 * (0.2 / 1.8) ** 2
    assert fine[6, 5].item() == pytest.approx(math.exp(-(9**2 + 3**2) / radius2), rel=1e-5)
    mask = out.unflatten(targets.box_mask)
    assert mask[1].sum() == 0
    assert mask[0][0].nonzero().tolist() == [list(cell) for cell in itertools.product([5, 6, 7], [3, 4, 5])]
    assert (targets.boxes[targets.box_mask] == torch.tensor(box)).all()


def test_peak_on_a_grid_that_does_not_divide_the_canvas():
    _, out = _outputs(image_size=384, grid=27, scales=(1.0,))
    targets = detection_targets(out, torch.tensor([[[90.0, 190, 110, 210]]]), torch.tensor([[True]]))
    heatmap = out.unflatten(targets.heatmap)[0][0]
    # Center (100, 200); cell centers at (i + 0.5) * 384 / 27: column 7 (106.7), row 14 (206.2).
    assert heatmap[14, 7] == 1 and (heatmap == 1).sum() == 1


def test_padding_objects_and_empty_images_have_no_targets():
    _, out = _outputs(batch=2)
    boxes = torch.tensor([[[10.0, 10, 40, 40], [0, 0, 0, 0]], [[5.0, 5, 30, 30], [60, 60, 90, 90]]])
    mask = torch.tensor([[False, True], [False, False]])
    targets = detection_targets(out, boxes, mask)
    assert targets.heatmap.max() == 0 and not targets.box_mask.any()
    targets = detection_targets(out, boxes[:, :0], mask[:, :0])
    assert targets.heatmap.shape == (2, 16 * 16 + 8 * 8) and not targets.box_mask.any()


def test_loss_gating():
    head, out = _outputs(batch=2)
    boxes = torch.tensor([[[10.0, 10, 40, 40], [50, 60, 120, 100]], [[5.0, 5, 30, 30], [60, 60, 90, 90]]])
    mask = torch.tensor([[True, True], [True, False]])
    off = head.loss(out, boxes, mask, torch.zeros(2))
    assert off["heatmap"].item() == 0 and off["box"].item() == 0
    (off["heatmap"] + off["box"]).backward()
    assert all(p.grad is None or (p.grad == 0).all() for p in head.parameters())

    on = head.loss(out, boxes, mask, torch.ones(2))
    assert on["heatmap"] > 0 and on["box"] > 0
    first_only = head.loss(out, boxes, mask, torch.tensor([1.0, 0.0]))
    alone = head.loss(ProposalOutputs([h[:1] for h in out.heatmaps], [d[:1] for d in out.distances], out.centers,
                                out.strides), boxes[:1], mask[:1], torch.ones(1))
    for key in ("heatmap", "box"):
        assert first_only[key].item() == pytest.approx(alone[key].item(), rel=1e-5)
    assert (ProposalConfig().heatmap_weight, ProposalConfig().box_weight) == (0.5, 1.0)


def test_focal_loss_by_hand():
    head, out = _outputs(scales=(0.5,))  # one 8 x 8 level of stride 16
    for h in out.heatmaps:
        h.data.fill_(0.0)  # every probability 0.5
    box = torch.tensor([[[40.0, 40, 80, 80]]])  # one positive: the cell at (56, 56)
    targets = detection_targets(out, box, torch.tensor([[True]]))
    negatives = targets.heatmap[targets.heatmap < 1]
    pos = 0.25 * math.log(2) * 0.5**2
    neg = 0.75 * math.log(2) * 0.5**2 * ((1 - negatives) ** 4).sum().item()
    loss = head.loss(out, box, torch.tensor([[True]]), torch.ones(1))
    assert loss["heatmap"].item() == pytest.approx(pos + neg, rel=1e-5)


# ----------------------------------------------------------------------------------------------
# Learning: colored rectangles on gray, under a fixed random patch encoder

CANVAS, PATCH = 128, 8
STEPS = 300
COLORS = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.1, 0.2, 0.9], [0.95, 0.85, 0.1], [0.6, 0.1, 0.7]])


def _scene(generator: torch.Generator, max_objects: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """A gray canvas with 1-3 separate rectangles of 14-64 px sides; their boxes ``(n, 4)``."""
    image = torch.full((3, CANVAS, CANVAS), 0.5)
    boxes: list[torch.Tensor] = []
    target = int(torch.randint(1, max_objects + 1, (1,), generator=generator))
    while len(boxes) < target:
        w, h = (torch.randint(14, 65, (2,), generator=generator)).tolist()
        x0 = int(torch.randint(0, CANVAS - w + 1, (1,), generator=generator))
        y0 = int(torch.randint(0, CANVAS - h + 1, (1,), generator=generator))
        box = torch.tensor([x0, y0, x0 + w, y0 + h], dtype=torch.float32)
        if any(_near(box, b) for b in boxes):
            continue
        color = COLORS[int(torch.randint(0, len(COLORS), (1,), generator=generator))]
        image[:, y0 : y0 + h, x0 : x0 + w] = color[:, None, None]
        boxes.append(box)
    return image, torch.stack(boxes)


def _near(a: torch.Tensor, b: torch.Tensor, gap: float = 4.0) -> bool:
    """Whether two boxes overlap or come closer than ``gap`` pixels (then they would read as one)."""
    return bool(a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap)


def _batch(generator: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scenes = [_scene(generator) for _ in range(size)]
    images = torch.stack([image for image, _ in scenes])
    boxes = torch.zeros(size, 3, 4)
    mask = torch.zeros(size, 3, dtype=torch.bool)
    for i, (_, b) in enumerate(scenes):
        boxes[i, : len(b)] = b
        mask[i, : len(b)] = True
    return images, boxes, mask


@pytest.fixture
def one_thread():
    """Layers this small run several times faster on one thread than contending for more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_head_learns_to_propose_rectangles(one_thread):
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 32, PATCH, stride=PATCH), nn.GELU()).requires_grad_(False)
    head = make_head(CANVAS, 32, scales=(1.0, 0.5), top_blocks=0, width=32)
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(1)
    start = time.monotonic()
    for _ in range(STEPS):
        images, boxes, mask = _batch(generator, 8)
        losses = head.loss(head(encoder(images)), boxes, mask, torch.ones(8))
        loss = 0.5 * losses["heatmap"] + losses["box"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    train_seconds = time.monotonic() - start

    head.eval()
    images, boxes, mask = _batch(torch.Generator().manual_seed(12345), 64)
    with torch.no_grad():
        results = head.proposals(head(encoder(images)), torch.full((64, 2), float(CANVAS)), max_proposals=10)
    found = total = top_hits = 0
    for (pred, _), gt, valid in zip(results, boxes, mask, strict=True):
        gt = gt[valid]
        total += len(gt)
        if len(pred):
            found += int((box_iou(gt, pred).max(1).values >= 0.5).sum())
            top_hits += int((box_iou(gt, pred[: len(gt)]).max(1).values >= 0.5).sum())
    recall, top_recall = found / total, top_hits / total
    print(f"trained {STEPS} steps in {train_seconds:.1f}s; {total} held-out boxes: recall@0.5 {recall:.3f} "
          f"(10 proposals), {top_recall:.3f} (as many proposals as objects); final loss {loss.item():.3f}")
    assert recall >= 0.8
    assert top_recall >= 0.6
