"""The box word head: the cells it pools, its loss by hand, its place in the model's loss, and that
it learns to name what a box holds on maps it has not seen."""

import math

import pytest
import torch
from helpers import make_batch, tiny_config, tokenizer

from pixelllm.config import PixelLLMConfig
from pixelllm.errors import ConfigError
from pixelllm.model.build import build_model
from pixelllm.model.words import BoxWordHead, box_word_loss, pool_boxes


def test_it_pools_the_cells_whose_centers_lie_in_each_box():
    features = torch.arange(64, dtype=torch.float32).view(2, 2, 4, 4)
    # Cell centers are at 0.5, 1.5, 2.5, 3.5: columns 1 and 2, row 1 only, of map 1.
    boxes = torch.tensor([[0.9, 1.2, 2.6, 2.4], [2.1, 0.1, 2.4, 0.4], [0.0, 0.0, 4.0, 4.0]])
    pooled = pool_boxes(features, torch.tensor([1, 0, 0]), boxes)
    inside = features[1, :, 1, 1:3]
    assert torch.equal(pooled[0], torch.cat([inside.mean(1), inside.amax(1)]))
    # A box holding no cell center pools the cell of its middle.
    assert torch.equal(pooled[1], features[0, :, 0, 2].repeat(2))
    whole = features[0].flatten(1)
    assert torch.equal(pooled[2], torch.cat([whole.mean(1), whole.amax(1)]))


def test_loss_by_hand():
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
    # The gated-off prompt's words change nothing.
    labels[2, 0] = 9
    assert math.isclose(box_word_loss(logits, labels, weight, eos).item(), loss.item(), rel_tol=1e-6)


def test_a_negative_weight_is_refused():
    data = tiny_config().to_dict()
    data["word_loss_weight"] = -0.5
    with pytest.raises(ConfigError, match="word_loss_weight"):
        PixelLLMConfig.from_dict(data)


def _word_model(weight: float):
    data = tiny_config().to_dict()
    data["word_loss_weight"] = weight
    torch.manual_seed(0)
    return build_model(PixelLLMConfig.from_dict(data), tokenizer=tokenizer())


def test_the_model_adds_its_loss_on_captions_of_a_box_at_its_weight_and_off_builds_no_head():
    assert tiny_config().word_loss_weight == 0 and build_model(tiny_config()).word_head is None
    model = _word_model(0.5).eval()
    batch = make_batch(model.config)
    with torch.no_grad():
        out = model(batch)
        assert out.losses["words"].item() > 0
        without = model(dict(batch, caption_weight=torch.zeros(3)))
        assert without.losses["words"].item() == 0
        # Only captions of a box count: prompt 1 (a point, no location target) is the batch's one.
        located = model(dict(batch, location_weight=torch.ones(3)))
        assert located.losses["words"].item() == 0
        trace_too = model(dict(batch, location_weight=torch.zeros(3)))
        assert trace_too.losses["words"].item() != out.losses["words"].item()
    model.word_head = None
    with torch.no_grad():
        base = model(batch)
    torch.testing.assert_close(out.loss, base.loss + 0.5 * out.losses["words"])


def test_it_learns_to_name_the_marked_cell_on_unseen_maps():
    """Each map holds one marked cell whose channel pattern stands for a word; the box around it must
    name that word, on maps not trained on."""
    gen = torch.Generator().manual_seed(0)
    words, channels, grid = 5, 8, 6
    codes = torch.randn(words, channels, generator=gen)

    def maps(n):
        features = torch.randn(n, channels, grid, grid, generator=gen) * 0.3
        word = torch.randint(words, (n,), generator=gen)
        cell = torch.randint(grid, (n, 2), generator=gen)
        features[torch.arange(n), :, cell[:, 1], cell[:, 0]] += codes[word]
        boxes = torch.cat([cell, cell + 1], dim=1).float() * 10  # canvas of 60 px, cells of 10
        return features, boxes, word

    head = BoxWordHead(channels, words + 2)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(150):
        features, boxes, word = maps(32)
        labels = torch.stack([word, torch.full_like(word, words + 1)], dim=1)  # the word, then EOS
        loss = box_word_loss(head(features, torch.arange(32), boxes, 60), labels, torch.ones(32), words + 1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    features, boxes, word = maps(200)
    with torch.no_grad():
        predicted = head(features, torch.arange(200), boxes, 60).argmax(1)
    assert (predicted == word).float().mean() > 0.9
