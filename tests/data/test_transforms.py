"""CanvasTransform: hand-worked mappings, and properties (inverse, flip twice, nothing leaves the image)."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pixelllm.data.images import load_image
from pixelllm.data.transforms import (
    CanvasTransform,
    clip_boxes,
    hflip_boxes,
    hflip_mask,
    hflip_points,
    prepare_image,
    touches,
)


def test_prepare_real_photo(real_data):
    image = load_image(real_data / "photos" / "chelsea.png")  # 451 x 300
    pixel_values, pixel_mask, t = prepare_image(image, 160)
    assert pixel_values.shape == (3, 160, 160) and pixel_values.dtype.is_floating_point
    assert t.scale == pytest.approx(160 / 451)
    # long side fills the canvas; short side round(300 * 160 / 451) = round(106.43) = 106 rows
    assert t.content_size == (160, 106)
    assert pixel_mask.sum() == 160 * 106 and pixel_mask[:106].all() and not pixel_mask[106:].any()
    assert pixel_values[:, 106:].abs().sum() == 0 and pixel_values.min() >= 0 and pixel_values.max() <= 1
    np.testing.assert_allclose(t.valid_box, [0, 0, 160, 300 * 160 / 451])


def test_uniform_image_values():
    image = Image.new("RGB", (4, 2), (255, 0, 51))
    pixel_values, pixel_mask, t = prepare_image(image, 8)  # scale 2: content 8 x 4
    assert t.content_size == (8, 4)
    np.testing.assert_allclose(
        pixel_values[:, :4, :].reshape(3, -1).mean(1).numpy(), [1.0, 0.0, 0.2], atol=1e-6
    )
    assert pixel_values[:, 4:].abs().sum() == 0


def test_hand_worked_box_mappings():
    t = CanvasTransform((200, 100), 100, 0.5)
    # (20, 10, 60, 50) * 0.5
    np.testing.assert_allclose(t.boxes_to_canvas([20, 10, 60, 50]), [10, 5, 30, 25])
    flipped = CanvasTransform((200, 100), 100, 0.5, flip=True)
    # flip: (200 - 60, 10, 200 - 20, 50) = (140, 10, 180, 50); * 0.5
    np.testing.assert_allclose(flipped.boxes_to_canvas([20, 10, 60, 50]), [70, 5, 90, 25])
    np.testing.assert_allclose(flipped.points_to_canvas([[20, 10]]), [[90, 5]])
    cropped = CanvasTransform((200, 100), 100, 1.0, offset=(10, 0))
    # scale 1, shift left by 10
    np.testing.assert_allclose(cropped.boxes_to_canvas([20, 10, 60, 50]), [10, 10, 50, 50])
    # the 200 x 100 image at scale 1 cut at x = 10: visible width min(200 - 10, 100) = 100
    np.testing.assert_allclose(cropped.valid_box, [0, 0, 100, 100])
    assert cropped.content_size == (100, 100)


def test_clip_and_touches():
    limits = np.array([0, 0, 10, 10.0])
    boxes = np.array([[-5, 2, 5, 8], [11, 0, 20, 5], [10, 3, 12, 4], [3, 3, 3, 3]], float)
    clipped, keep = clip_boxes(boxes, limits)
    np.testing.assert_allclose(clipped[0], [0, 2, 5, 8])
    assert keep.tolist() == [True, False, False, False]
    assert touches(boxes, limits).tolist() == [True, False, True, True]


def test_mask_round_trip_at_integer_scale():
    mask = np.zeros((3, 4), bool)
    mask[1, 2] = mask[0, 0] = True
    t = CanvasTransform((4, 3), 8, 2.0)
    canvas = t.mask_to_canvas(mask)
    assert canvas.sum() == 2 * 4 and canvas[2:4, 4:6].all()  # each pixel becomes 2 x 2
    np.testing.assert_array_equal(t.mask_to_original(canvas), mask)


def test_mask_logits_go_back_bilinearly_and_a_flip_is_undone():
    """Logits are resized before the threshold: a logit ramp that crosses 0 between two canvas pixels
    crosses it between original pixels too (half way), where a thresholded mask could only fall
    on a canvas pixel's edge; a flipped transform flips the mask back."""
    t = CanvasTransform((8, 4), 8, 0.5)  # 8 x 4 original on a 4 x 2 content area of an 8-px canvas
    logits = torch.full((8, 8), -50.0)
    logits[:2, :4] = torch.tensor([-3.0, -1.0, 1.0, 3.0])  # crosses 0 half way between columns 1 and 2
    out = t.mask_to_original(logits)
    assert out.shape == (4, 8) and out.dtype == bool
    assert out[:, :4].sum() == 0 and out[:, 4:].all()
    flipped = replace(t, flip=True).mask_to_original(logits)
    np.testing.assert_array_equal(flipped, out[:, ::-1])
    np.testing.assert_array_equal(t.mask_to_original(logits.numpy()), out)


# ----------------------------------------------------------------------------------------------
# Properties


@st.composite
def transforms(draw, max_side=2000):
    w, h = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    canvas = draw(st.integers(16, 512))
    low = draw(st.floats(0.1, 2.0))
    high = draw(st.floats(low, 2.0))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return CanvasTransform.random(
        (w, h), canvas, rng, (low, high), flip_prob=draw(st.sampled_from([0.0, 0.5, 1.0]))
    )


@st.composite
def boxes_in(draw, size):
    w, h = size
    xs = sorted(draw(st.lists(st.floats(0, w), min_size=2, max_size=2)))
    ys = sorted(draw(st.lists(st.floats(0, h), min_size=2, max_size=2)))
    return np.array([xs[0], ys[0], xs[1], ys[1]])


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 4000), st.lists(st.floats(-1e4, 1e4), min_size=4, max_size=4))
def test_flip_twice_is_identity(width, values):
    box = np.array(values)
    np.testing.assert_allclose(hflip_boxes(hflip_boxes(box, width), width), box, atol=1e-9)
    points = box.reshape(2, 2)
    np.testing.assert_allclose(hflip_points(hflip_points(points, width), width), points, atol=1e-9)
    mask = np.arange(12).reshape(3, 4) % 3 == 0
    np.testing.assert_array_equal(hflip_mask(hflip_mask(mask)), mask)


@settings(max_examples=200, deadline=None)
@given(transforms(), st.data())
def test_canvas_to_original_inverts(t, data):
    box = data.draw(boxes_in(t.original_size))
    back = t.boxes_to_original(t.boxes_to_canvas(box))
    np.testing.assert_allclose(back, box, rtol=1e-9, atol=1e-6)
    points = box.reshape(2, 2)
    np.testing.assert_allclose(t.points_to_original(t.points_to_canvas(points)), points, rtol=1e-9, atol=1e-6)


@settings(max_examples=200, deadline=None)
@given(transforms(), st.data())
def test_nothing_leaves_the_image(t, data):
    boxes = np.stack([data.draw(boxes_in(t.original_size)) for _ in range(3)])
    clipped, keep = clip_boxes(t.boxes_to_canvas(boxes), t.valid_box)
    valid = t.valid_box
    cw, ch = t.content_size
    # the valid box is on the canvas and within the image content (up to the half pixel of rounding)
    assert valid[2] <= t.canvas_size and valid[3] <= t.canvas_size
    assert valid[2] <= cw + 0.5 and valid[3] <= ch + 0.5
    kept = clipped[keep]
    assert np.all(kept[:, 0] >= 0) and np.all(kept[:, 1] >= 0)
    assert np.all(kept[:, 2] <= valid[2]) and np.all(kept[:, 3] <= valid[3])
    assert np.all(kept[:, 2] > kept[:, 0]) and np.all(kept[:, 3] > kept[:, 1])


@settings(max_examples=30, deadline=None)
@given(transforms(max_side=300), st.data())
def test_masks_stay_inside_the_pixel_mask(t, data):
    w, h = t.original_size
    mask = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))).random((h, w)) < 0.3
    _, pixel_mask, _ = prepare_image(Image.new("RGB", (w, h)), t.canvas_size, t)
    canvas = t.mask_to_canvas(mask)
    assert canvas.shape == (t.canvas_size, t.canvas_size)
    assert not (canvas & ~pixel_mask.numpy()).any()
    assert t.mask_to_original(canvas).shape == (h, w)


@settings(max_examples=50, deadline=None)
@given(transforms(max_side=400))
def test_pixel_mask_matches_content_size(t):
    _, pixel_mask, _ = prepare_image(Image.new("RGB", t.original_size, (9, 9, 9)), t.canvas_size, t)
    cw, ch = t.content_size
    assert pixel_mask.sum() == cw * ch and pixel_mask[:ch, :cw].all()


def test_finer_pixels_keep_the_placement():
    """``pixel_scale`` 2 draws the same crop, flip and scale at twice the resolution: averaging each
    2 x 2 block gives back the canvas image, and the mask stays at canvas size."""
    stripes = np.zeros((200, 300, 3), dtype=np.uint8)
    stripes[:, (np.arange(300) // 25) % 2 == 1, 0] = 255
    stripes[(np.arange(200) // 15) % 2 == 1, :, 2] = 255
    image = Image.fromarray(stripes)
    t = CanvasTransform((300, 200), 64, 64 * 1.3 / 300, offset=(9, 0), flip=True)
    coarse, mask = t.image_to_canvas(image)
    fine, fine_mask = t.image_to_canvas(image, pixel_scale=2)
    assert fine.shape == (3, 128, 128) and mask.shape == fine_mask.shape == (64, 64)
    assert torch.equal(fine_mask, mask) and mask[:55].all() and not mask[55:].any()
    pooled = torch.nn.functional.avg_pool2d(fine[None], 2)[0]
    assert (pooled - coarse)[:, mask].abs().mean() < 0.035  # 0.023: the two resamplings differ at edges
    for dim in (1, 2):  # one canvas pixel off, the stripes no longer line up (0.10 and 0.07)
        assert (torch.roll(pooled, 1, dims=dim) - coarse)[:, mask].abs().mean() > 0.06
    assert fine[:, 111:].abs().sum() == 0  # round(200 * 2s) = 111 rows
