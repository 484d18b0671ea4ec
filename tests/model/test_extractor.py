"""The prompt feature extractor: box attention sees only the box; box geometry; the in-repo tower;
fresh SAM init."""

import math

import torch
from helpers import tiny_config

from pixelllm.config import ExtractorConfig, PixelLLMConfig
from pixelllm.errors import ConfigError
from pixelllm.model import build_model
from pixelllm.model.build import new_sam
from pixelllm.model.extractor import box_geometry


def _extract(model, features, boxes):
    prompt = model.prompt_encoder
    grid = features.shape[-1]
    index = torch.zeros(len(boxes), dtype=torch.long)
    is_point = torch.zeros(len(boxes), dtype=torch.bool)
    size = model.config.image_size
    return model.extractor(features, index, prompt(boxes, is_point), prompt.no_mask_embedding(grid),
                           prompt.dense_positional_encoding(grid), boxes, size, torch.zeros(1, 3, size, size))


def test_box_attention_sees_only_the_box():
    torch.manual_seed(0)
    model = build_model(tiny_config()).eval()
    size, grid, channels = model.config.image_size, model.vision.grid, model.vision.out_channels
    cell = size / grid
    box = torch.tensor([[3 * cell, 4 * cell, 9 * cell, 8 * cell]])  # exactly cells x 3..8, y 4..7
    features = torch.randn(1, channels, grid, grid)
    changed = features.clone()
    outside = torch.ones(grid, grid, dtype=torch.bool)
    outside[4:8, 3:9] = False
    changed[0][:, outside] = torch.randn(channels, int(outside.sum()))
    with torch.no_grad():
        assert torch.allclose(_extract(model, features, box), _extract(model, changed, box), atol=1e-5)
        changed[0, :, 5, 5] += 3.0  # inside the box
        assert not torch.allclose(_extract(model, features, box), _extract(model, changed, box), atol=1e-3)


def test_token_grid_gives_each_token_its_cell():
    torch.manual_seed(0)
    model = build_model(tiny_config()).eval()
    size, grid, g = model.config.image_size, model.vision.grid, model.config.extractor.token_grid
    tokens = g * g
    bias = model.extractor._box_bias(torch.tensor([[0.0, 0.0, size, size]]), grid, size, tokens + 5)
    visible = (bias[0, 0] == 0).view(tokens + 5, grid, grid)
    span = math.ceil(grid / g)  # the feature cells that overlap one token's cell
    assert visible[0, :span, :span].all() and visible[0].sum() == span * span  # token 0: top left
    last = tokens - 1  # bottom right
    assert visible[last, -span:, -span:].all() and visible[last].sum() == span * span
    assert visible[tokens:].all()  # the prompt tokens see the whole box
    # a box smaller than a cell still lets every token see the cell that holds it
    tiny = model.extractor._box_bias(torch.tensor([[50.0, 50.0, 51.0, 51.0]]), grid, size, tokens + 5)
    assert ((tiny[0, 0] == 0).sum(-1) >= 1).all()


def test_repeated_prompts_are_extracted_once_with_the_same_tokens():
    torch.manual_seed(0)
    model = build_model(tiny_config()).eval()
    size = model.config.image_size
    pixels = torch.rand(2, 3, size, size)
    with torch.no_grad():
        images = model.encode_images(pixels, torch.ones(2, size, size, dtype=torch.bool))
        boxes = torch.tensor([[0.0, 0, size, size], [10, 10, 50, 60], [0, 0, size, size], [0, 0, size, size]])
        index = torch.tensor([0, 0, 0, 1])
        is_point = torch.zeros(4, dtype=torch.bool)
        together = model.visual_tokens(images, index, boxes, is_point)
        apart = torch.cat([model.visual_tokens(images, index[i : i + 1], boxes[i : i + 1], is_point[i : i + 1])
                           for i in range(4)])
    torch.testing.assert_close(together, apart, atol=1e-5, rtol=1e-5)
    assert torch.equal(together[0], together[2]) and not torch.allclose(together[0], together[3])


def test_token_grid_needs_matching_tokens():
    data = tiny_config().to_dict()
    data["extractor"]["num_tokens"] = 8
    try:
        PixelLLMConfig.from_dict(data)
    except ConfigError as error:
        assert f"token_grid {data['extractor']['token_grid']}" in str(error)
    else:
        raise AssertionError("a token grid with 8 tokens was accepted")
    assert ExtractorConfig().box_attention is False  # the official design: off by default


def _geometry_model():
    data = tiny_config().to_dict()
    data["extractor"]["box_geometry"] = True
    return build_model(PixelLLMConfig.from_dict(data))


def test_box_geometry_by_hand():
    size = 160
    boxes = torch.tensor([[0.0, 0.0, 160.0, 160.0], [10.0, 20.0, 30.0, 30.0], [5.0, 5.0, 5.0, 5.0],
                          [40.0, 40.0, 40.5, 56.0]])
    log_s, unit = math.log(size), math.log(1.25)
    half = math.log(0.5) / unit
    expected = torch.tensor([
        [0.0, 0.0, 0.0, 0.0],
        [math.log(20 / size) / log_s, math.log(10 / size) / log_s, half, -half],
        [-1.0, -1.0, 0.0, 0.0],  # a point reads as a one-pixel square
        [-1.0, math.log(16 / size) / log_s, math.log(16) / unit, math.log(16) / unit],  # half a pixel wide: one
    ])
    torch.testing.assert_close(box_geometry(boxes, size), expected)


def test_box_geometry_is_off_by_default_and_builds_no_layer():
    assert ExtractorConfig().box_geometry is False and tiny_config().extractor.box_geometry is False
    assert build_model(tiny_config()).extractor.geometry is None
    assert _geometry_model().extractor.geometry is not None


def test_box_geometry_tells_apart_boxes_that_cover_the_same_cells():
    """Two boxes inside one feature cell, a hexagon's (0.87 as tall as wide) and a circle's (square),
    see the same cells; with the geometry embedding a small readout learns to tell them apart on
    boxes it has not seen (without it, the same training stays at chance: 48 % measured)."""
    torch.manual_seed(0)
    model = _geometry_model()
    extractor = model.extractor
    size, grid, channels = model.config.image_size, model.vision.grid, model.vision.out_channels
    features = torch.randn(1, channels, grid, grid)
    readout = torch.nn.Linear(extractor.norm.normalized_shape[0], 2)
    parameters = [*extractor.parameters(), *readout.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=1e-3)

    def boxes_and_labels(n, gen):
        label = torch.randint(0, 2, (n,), generator=gen)
        width = 4 + 4 * torch.rand(n, generator=gen)  # 4-8 px: inside one 8-px cell
        height = torch.where(label == 1, width * math.sqrt(3) / 2, width)
        cell = torch.randint(0, grid, (n, 2), generator=gen).float() * size / grid
        return torch.stack([cell[:, 0], cell[:, 1], cell[:, 0] + width, cell[:, 1] + height], -1), label

    gen = torch.Generator().manual_seed(1)
    for _ in range(60):
        boxes, label = boxes_and_labels(32, gen)
        loss = torch.nn.functional.cross_entropy(readout(_extract(model, features, boxes).mean(1)), label)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        boxes, label = boxes_and_labels(400, torch.Generator().manual_seed(2))
        accuracy = (readout(_extract(model, features, boxes).mean(1)).argmax(-1) == label).float().mean()
    assert accuracy > 0.9, accuracy


def test_a_fresh_sam_can_learn():
    """transformers' random SAM init is for loading only (weights ~1e-10, Fourier matrix std ~hidden/2)."""
    sam = new_sam(tiny_config())
    assert 0.01 < sam.vision_encoder.layers[0].attn.qkv.weight.std() < 0.04
    gaussian = sam.prompt_encoder.shared_embedding.positional_embedding
    assert 0.5 < gaussian.std() < 2.0
    assert torch.equal(gaussian, sam.shared_image_embedding.positional_embedding)


def test_small_vit_round_trips_through_the_auto_classes():
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model("pixelllm_small_vit", image_size=64, patch_size=8, hidden_size=32,
                                  num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    tower = AutoModel.from_config(config)
    assert tower(torch.rand(2, 3, 64, 64)).last_hidden_state.shape == (2, 64, 32)
