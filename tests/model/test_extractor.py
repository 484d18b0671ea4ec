"""The prompt feature extractor: box attention sees only the box; the in-repo tower; fresh SAM init."""

import math

import torch
from helpers import tiny_config

from pixelllm.config import ExtractorConfig, PixelLLMConfig
from pixelllm.errors import ConfigError
from pixelllm.model import ImageFeatures, Prompts, build_model
from pixelllm.model.build import new_sam


def _extract(model, features, boxes):
    size = model.config.image_size
    images = ImageFeatures(features, None, torch.tensor([[float(size), float(size)]]), torch.zeros(1, 3, size, size))
    prompts = Prompts(torch.zeros(len(boxes), dtype=torch.long), boxes, torch.zeros(len(boxes), dtype=torch.bool))
    return model.extractor(images, prompts, model.prompt_encoder)


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
    bias = model.extractor._box_bias(torch.tensor([[0.0, 0.0, size, size]]), grid, tokens + 5)
    visible = (bias[0, 0] == 0).view(tokens + 5, grid, grid)
    span = math.ceil(grid / g)  # the feature cells that overlap one token's cell
    assert visible[0, :span, :span].all() and visible[0].sum() == span * span  # token 0: top left
    last = tokens - 1  # bottom right
    assert visible[last, -span:, -span:].all() and visible[last].sum() == span * span
    assert visible[tokens:].all()  # the prompt tokens see the whole box
    # a box smaller than a cell still lets every token see the cell that holds it
    tiny = model.extractor._box_bias(torch.tensor([[50.0, 50.0, 51.0, 51.0]]), grid, tokens + 5)
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
        together = model.visual_tokens(images, Prompts(index, boxes, is_point))
        apart = torch.cat([model.visual_tokens(images, Prompts(index[i : i + 1], boxes[i : i + 1], is_point[i : i + 1]))
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
