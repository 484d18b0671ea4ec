"""The mask refiner: keeps masks in the box's square, starts as the identity there, learns sharp edges."""

import pytest
import torch
import torch.nn.functional as F
from helpers import with_changes

from pixelllm.config import PixelLLMConfig, preset
from pixelllm.errors import ConfigError
from pixelllm.model.box_pixels import box_squares, paste_squares, square_crops
from pixelllm.model.heads.mask_refiner import OUTSIDE_LOGIT, MaskRefiner, MaskRefinerConfig

SIZE = 64


def test_a_crop_pasted_back_is_the_canvas_inside_its_square_and_zero_outside():
    canvas = torch.rand(2, 3, SIZE, SIZE)
    boxes = torch.tensor([[10.0, 12.0, 26.0, 20.0], [40.0, 40.0, 50.0, 56.0]])
    center, side = box_squares(boxes, min_side=16)  # 16 samples of 16- and 16-pixel squares: one per pixel
    assert side.tolist() == [16.0, 16.0]
    pasted = paste_squares(square_crops(canvas, torch.arange(2), center, side, SIZE, 16), center, side, SIZE)
    torch.testing.assert_close(pasted[0, :, 8:24, 10:26], canvas[0, :, 8:24, 10:26])
    torch.testing.assert_close(pasted[1, :, 40:56, 37:53], canvas[1, :, 40:56, 37:53])
    inside = torch.zeros(2, 1, SIZE, SIZE, dtype=torch.bool)
    inside[0, :, 8:24, 10:26] = inside[1, :, 40:56, 37:53] = True
    assert (pasted.masked_fill(inside, 0) == 0).all()


def test_the_square_grows_by_the_margin_on_every_side():
    center, side = box_squares(torch.tensor([[10.0, 20.0, 50.0, 30.0]]), min_side=8, margin=0.25)
    assert center.tolist() == [[30.0, 25.0]] and side.tolist() == [60.0]  # 40 + 2 * 0.25 * 40


def test_a_new_refiner_cuts_the_mask_to_the_boxs_square_and_corrects_only_inside_it():
    torch.manual_seed(0)
    refiner = MaskRefiner(MaskRefinerConfig(resolution=16, margin=0.0, width=8, dilations=[1, 2]))
    pixels, coarse = torch.rand(1, 3, SIZE, SIZE), torch.randn(2, SIZE, SIZE)
    boxes = torch.tensor([[8.0, 8.0, 24.0, 24.0], [30.0, 30.0, 46.0, 46.0]])
    index = torch.zeros(2, dtype=torch.long)
    inside = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
    inside[0, 8:24, 8:24] = inside[1, 30:46, 30:46] = True
    expected = coarse.masked_fill(~inside, OUTSIDE_LOGIT)
    torch.testing.assert_close(refiner(pixels, index, boxes, coarse), expected)
    with torch.no_grad():
        refiner.correction.bias.fill_(1.0)
    torch.testing.assert_close(refiner(pixels, index, boxes, coarse), expected + inside.float())


def _scenes(n: int, generator: torch.Generator):
    """Flat discs on a flat background: canvas pixels ``(n, 3, S, S)``, true masks ``(n, S, S)``,
    boxes ``(n, 4)`` and the coarse logits of a decoder at a quarter of the canvas' resolution."""
    yx = torch.arange(SIZE) + 0.5
    center = 16 + 32 * torch.rand(n, 2, generator=generator)
    radius = 5 + 8 * torch.rand(n, generator=generator)
    inside = ((yx[None, None, :] - center[:, 0, None, None]) ** 2
              + (yx[None, :, None] - center[:, 1, None, None]) ** 2) <= radius[:, None, None] ** 2
    color, background = torch.rand(n, 3, 1, 1, generator=generator), torch.rand(n, 3, 1, 1, generator=generator)
    pixels = torch.where(inside[:, None], color, background)
    boxes = torch.cat([center - radius[:, None], center + radius[:, None]], dim=1)
    quarter = F.avg_pool2d(inside[:, None].float(), 4)  # what a stride-4 mask can say
    coarse = F.interpolate((quarter - 0.5) * 8, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0]
    return pixels, inside, boxes, coarse


def _iou(logits, masks):
    predicted = logits > 0
    return ((predicted & masks).sum() / (predicted | masks).sum()).item()


def test_the_refiner_learns_the_edges_the_coarse_mask_blurs():
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    refiner = MaskRefiner(MaskRefinerConfig(resolution=32, width=16))
    optimizer = torch.optim.Adam(refiner.parameters(), lr=3e-3)
    for _ in range(150):
        pixels, masks, boxes, coarse = _scenes(16, generator)
        refined = refiner(pixels, torch.arange(16), boxes, coarse)
        loss = F.binary_cross_entropy_with_logits(refined, masks.float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    pixels, masks, boxes, coarse = _scenes(64, torch.Generator().manual_seed(1))  # held-out scenes
    with torch.no_grad():
        refined = refiner(pixels, torch.arange(64), boxes, coarse)
    before, after = _iou(coarse, masks), _iou(refined, masks)
    assert 1 - after < 0.5 * (1 - before), (before, after)  # at least half the error gone


def test_the_config_round_trips_and_rejects_impossible_values():
    tiny = preset("tiny")
    config = with_changes(tiny, heads={"mask_refiner": {"resolution": 32}})
    assert config.heads["mask_refiner"] == {"resolution": 32, "margin": 0.25, "width": 32, "dilations": [1, 2, 4, 8, 1]}
    assert PixelLLMConfig.from_dict(config.to_dict()) == config
    assert "mask_refiner" not in tiny.heads
    for bad in ({"resolution": 4}, {"dilations": []}, {"margin": -0.1}, {"width": 12}):
        with pytest.raises(ConfigError, match="heads.mask_refiner needs"):
            with_changes(tiny, heads={"mask_refiner": bad})
    with pytest.raises(ConfigError, match="head 'mask_refiner' needs mask_logits"):
        with_changes(tiny, heads={"mask": None, "mask_refiner": {}})
