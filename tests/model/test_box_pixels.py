"""The box pixel encoder (``extractor.box_pixels``): where its crops sample, what its tokens see,
that it learns small shapes, its word loss (the head ``pixel_words``), and its config checks."""

import math

import numpy as np
import pytest
import torch
from helpers import make_batch, tiny_config, tokenizer, with_changes
from PIL import Image, ImageDraw

from pixelllm.config import PixelLLMConfig
from pixelllm.errors import ConfigError
from pixelllm.model import PixelLLM, Prompts, build_model
from pixelllm.model.box_pixels import BOX_PIXEL_TOKENS, BoxPixelEncoder, box_crops
from pixelllm.model.heads.pixel_words import box_word_loss


def _ramp(size: int, scale: int = 1) -> torch.Tensor:
    """``(1, 3, kS, kS)`` pixels whose channel 0 holds each pixel center's canvas x and channel 1
    its canvas y, so that bilinear sampling returns the canvas coordinates it reads at."""
    centers = (torch.arange(size * scale, dtype=torch.float32) + 0.5) / scale
    pixels = torch.zeros(1, 3, size * scale, size * scale)
    pixels[0, 0] = centers[None, :]
    pixels[0, 1] = centers[:, None]
    return pixels


@pytest.mark.parametrize("scale", [1, 2])
def test_crops_sample_a_square_around_the_box(scale):
    size, r = 64, 8
    boxes = torch.tensor([[10.0, 20.0, 30.0, 30.0], [40.0, 40.0, 40.0, 40.0]])  # a wide box, a point
    crops = box_crops(_ramp(size, scale), torch.zeros(2, dtype=torch.long), boxes, size, r)
    steps = (torch.arange(r) + 0.5) / r - 0.5
    # the wide box: a 20-px square around its center (20, 25), so its proportions survive
    torch.testing.assert_close(crops[0, 0], (20 + 20 * steps).expand(r, r))
    torch.testing.assert_close(crops[0, 1], (25 + 20 * steps)[:, None].expand(r, r))
    # the point: the R x R canvas pixels around it
    torch.testing.assert_close(crops[1, 0], (40 + r * steps).expand(r, r))


def test_crops_outside_the_canvas_read_zero():
    crops = box_crops(torch.ones(1, 3, 64, 64), torch.zeros(1, dtype=torch.long),
                      torch.tensor([[-20.0, 10.0, 20.0, 50.0]]), 64, 8)  # its left half is off the canvas
    assert crops[0, :, :, :4].abs().max() == 0 and crops[0, :, :, 4:].min() > 0.99


def _box_pixel_config(resolution: int = 16, word_loss_weight: float = 0.0) -> PixelLLMConfig:
    heads = {"pixel_words": {"weight": word_loss_weight}} if word_loss_weight else {}
    return with_changes(tiny_config(), extractor={"box_pixels": resolution}, heads=heads)


def test_tokens_are_appended_and_read_only_the_crop():
    torch.manual_seed(0)
    model = build_model(_box_pixel_config()).eval()
    size = model.config.image_size
    pixels = torch.rand(1, 3, size, size)
    images = model.encode_images(pixels, torch.ones(1, size, size, dtype=torch.bool))
    box, index, is_point = torch.tensor([[20.0, 20.0, 40.0, 50.0]]), torch.zeros(1, dtype=torch.long), \
        torch.zeros(1, dtype=torch.bool)
    with torch.no_grad():
        tokens = model.visual_tokens(images, Prompts(index, box, is_point))
        assert tokens.shape == (1, model.config.extractor.num_tokens + BOX_PIXEL_TOKENS, model.language.hidden_size)
        changed = images.pixels.clone()
        changed[..., 100:, 100:] = torch.rand(3, size - 100, size - 100)  # far outside the crop
        far = model.extractor.box_pixels(changed, index, box, size)
        changed[..., 30:40, 25:35] = 1 - changed[..., 30:40, 25:35]  # inside the box
        near = model.extractor.box_pixels(changed, index, box, size)
    own = tokens[:, -BOX_PIXEL_TOKENS:]
    torch.testing.assert_close(far, own)
    assert (near - own).abs().max() > 1e-4  # untrained, the LayerNorm keeps changes small


@pytest.mark.parametrize("on_whole_image", [True, False])
def test_whole_image_prompts_read_box_pixels_unless_turned_off(on_whole_image):
    data = _box_pixel_config().to_dict()
    data["extractor"]["box_pixels_on_whole_image"] = on_whole_image
    torch.manual_seed(0)
    model = build_model(PixelLLMConfig.from_dict(data)).eval()
    size = model.config.image_size
    mask = torch.ones(1, size, size, dtype=torch.bool)
    mask[:, 120:] = False  # a landscape image: its whole area is 160 x 120 on the canvas
    images = model.encode_images(torch.rand(1, 3, size, size) * mask, mask)
    boxes = torch.tensor([[0.0, 0.0, size, 120.0], [0.0, 0.0, size, 100.0], [20.0, 20.0, 40.0, 50.0]])
    with torch.no_grad():
        tokens = model.visual_tokens(images, Prompts(torch.zeros(3, dtype=torch.long), boxes,
                                                     torch.zeros(3, dtype=torch.bool)))
    zero = (tokens[:, -BOX_PIXEL_TOKENS:] == 0).flatten(1).all(1)
    assert zero.tolist() == [not on_whole_image, False, False]


def test_training_reaches_the_box_pixel_encoder_and_checkpoints_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model(_box_pixel_config(), tokenizer=tokenizer())
    model(make_batch(model.config)).loss.backward()
    assert model.extractor.box_pixels.cnn[0].weight.grad.abs().sum() > 0
    model.save_pretrained(tmp_path)
    loaded = PixelLLM.from_pretrained(tmp_path)
    assert loaded.config.extractor.box_pixels == 16
    torch.testing.assert_close(loaded.extractor.box_pixels.cnn[0].weight, model.extractor.box_pixels.cnn[0].weight)


def _small_shapes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` 64-px images, each with one small circle or square (6-10 px, random place and color
    on a random gray): pixels ``(n, 3, 64, 64)``, boxes ``(n, 4)``, labels ``(n,)`` (1: square)."""
    gen = torch.Generator().manual_seed(seed)
    images, boxes, labels = [], [], []
    for _ in range(n):
        side, label = int(torch.randint(6, 11, (1,), generator=gen)), int(torch.randint(0, 2, (1,), generator=gen))
        x, y = (int(v) for v in torch.randint(0, 64 - side, (2,), generator=gen))
        gray, color = int(torch.randint(90, 170, (1,), generator=gen)), tuple(
            int(v) for v in torch.randint(0, 256, (3,), generator=gen))
        image = Image.new("RGB", (64, 64), (gray, gray, gray))
        draw = ImageDraw.Draw(image)
        (draw.rectangle if label else draw.ellipse)([x, y, x + side - 1, y + side - 1], fill=color)
        images.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1))
        boxes.append([x, y, x + side, y + side])
        labels.append(label)
    return torch.stack(images), torch.tensor(boxes, dtype=torch.float32), torch.tensor(labels)


def test_the_encoder_learns_small_shapes_it_has_not_seen():
    """Circles and squares of 6-10 px with square boxes (so the box's proportions say nothing): a
    linear readout of the encoder's tokens, trained on 512 images, names held-out ones."""
    torch.manual_seed(0)
    encoder = BoxPixelEncoder(16, 32, 32)
    readout = torch.nn.Linear(BOX_PIXEL_TOKENS * 32, 2)
    optimizer = torch.optim.Adam([*encoder.parameters(), *readout.parameters()], lr=3e-3)
    pixels, boxes, labels = _small_shapes(512, seed=0)
    for step in range(400):
        pick = torch.arange(step * 32, step * 32 + 32) % 512
        logits = readout(encoder(pixels, pick, boxes[pick], 64).flatten(1))
        loss = torch.nn.functional.cross_entropy(logits, labels[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    pixels, boxes, labels = _small_shapes(200, seed=1)
    with torch.no_grad():
        predicted = readout(encoder(pixels, torch.arange(200), boxes, 64).flatten(1)).argmax(-1)
    accuracy = (predicted == labels).float().mean()
    assert accuracy > 0.9, accuracy


def test_its_word_loss_alone_teaches_the_encoder_small_shapes_it_has_not_seen():
    """The same shapes, named by a linear layer over the encoder's 2 x 2 map (as the pixel word head
    reads it), trained with the box word loss against a caption of one word and EOS."""
    torch.manual_seed(0)
    encoder, head, eos = BoxPixelEncoder(16, 32, 32), torch.nn.Linear(BOX_PIXEL_TOKENS * 32, 3), 2
    optimizer = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=3e-3)
    pixels, boxes, labels = _small_shapes(512, seed=0)
    for step in range(400):
        pick = torch.arange(step * 32, step * 32 + 32) % 512
        captions = torch.stack([labels[pick], torch.full((32,), eos)], dim=1)
        logits = head(encoder.features(box_crops(pixels, pick, boxes[pick], 64, 16)).flatten(1))
        loss = box_word_loss(logits, captions, torch.ones(32), eos)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    pixels, boxes, labels = _small_shapes(200, seed=1)
    with torch.no_grad():
        predicted = head(encoder.features(box_crops(pixels, torch.arange(200), boxes, 64, 16)).flatten(1)).argmax(-1)
    accuracy = (predicted == labels).float().mean()
    assert accuracy > 0.9, accuracy


def test_the_model_adds_the_pixel_word_loss_on_captions_of_a_box_and_it_reaches_only_the_cnn():
    torch.manual_seed(0)
    model = build_model(_box_pixel_config(word_loss_weight=0.5), tokenizer=tokenizer()).eval()
    batch = make_batch(model.config)
    with torch.no_grad():
        out = model(batch)
        assert out.losses["pixel_words"].item() > 0 and "words" not in out.losses
        # Prompt 1 (a point, no location target) is the batch's one caption of a box.
        assert model(dict(batch, location_weight=torch.ones(3))).losses["pixel_words"].item() == 0
    head = model.heads.pop("pixel_words")
    with torch.no_grad():
        base = model(batch)
    torch.testing.assert_close(out.loss, base.loss + 0.5 * out.losses["pixel_words"])
    model.heads["pixel_words"] = head
    model(batch).losses["pixel_words"].backward()
    assert model.extractor.box_pixels.cnn[0].weight.grad.abs().sum() > 0
    assert model.extractor.box_pixels.projection.weight.grad is None  # it reads the map before the tokens
    assert all(p.grad is None for p in model.language.parameters())


@pytest.mark.parametrize("resolution, weight, message", [(16, -1.0, ">= 0"), (0, 0.5, "needs box_pixels")])
def test_the_pixel_word_loss_needs_a_weight_of_zero_or_more_and_box_pixels(resolution, weight, message):
    with pytest.raises(ConfigError, match=message):
        with_changes(tiny_config(), extractor={"box_pixels": resolution}, heads={"pixel_words": {"weight": weight}})


def test_the_word_loss_by_hand():
    logits = torch.zeros(3, 10)
    logits[1, 4] = 2.0
    eos = 1
    # Prompt 0 has words {3, 4} (4 twice; EOS and padding are not words), prompt 1 only {4}.
    labels = torch.tensor([[3, 4, 4, 1, -100], [4, 1, -100, -100, -100], [7, 1, -100, -100, -100]])
    weight = torch.tensor([1.0, 1.0, 0.0])
    first = math.log(10)  # uniform logits: -log(1/10) for each of its two words
    second = -(2.0 - math.log(math.exp(2.0) + 9))
    loss = box_word_loss(logits, labels, weight, eos)
    assert math.isclose(loss.item(), (first + second) / 2, rel_tol=1e-6)
    labels[2, 0] = 9  # the gated-off prompt's words change nothing
    assert math.isclose(box_word_loss(logits, labels, weight, eos).item(), loss.item(), rel_tol=1e-6)


def test_dropout_zeroes_whole_prompts_in_training_only():
    torch.manual_seed(0)
    encoder = BoxPixelEncoder(8, 32, 32, dropout=0.5)
    pixels, index = torch.rand(1, 3, 32, 32), torch.zeros(400, dtype=torch.long)
    boxes = torch.tensor([[4.0, 4.0, 20.0, 20.0]]).expand(400, 4)
    dropped = (encoder(pixels, index, boxes, 32) == 0).flatten(1)
    assert (dropped.all(1) | ~dropped.any(1)).all()  # a prompt keeps all its tokens or none
    assert 0.4 < dropped.all(1).float().mean() < 0.6
    assert not (encoder.eval()(pixels, index, boxes, 32) == 0).flatten(1).all(1).any()


@pytest.mark.parametrize("key, value", [("box_pixel_dropout", 1.0), ("box_pixel_dropout", -0.1)])
def test_dropout_must_be_a_probability_below_one(key, value):
    data = _box_pixel_config().to_dict()
    data["extractor"][key] = value
    with pytest.raises(ConfigError, match=key):
        PixelLLMConfig.from_dict(data)


@pytest.mark.parametrize("value", [4, 10, -8])
def test_box_pixels_must_be_a_multiple_of_four_from_eight(value):
    data = tiny_config().to_dict()
    data["extractor"]["box_pixels"] = value
    with pytest.raises(ConfigError, match="box_pixels"):
        PixelLLMConfig.from_dict(data)


def test_off_by_default_and_in_the_presets():
    assert tiny_config().extractor.box_pixels == 0
    assert build_model(tiny_config()).extractor.box_pixels is None
    assert "pixel_words" not in tiny_config().heads and "pixel_words" not in build_model(tiny_config()).heads
