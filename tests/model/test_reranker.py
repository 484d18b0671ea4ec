"""The referring re-ranker: a new one keeps the pointer's choice; it learns to choose by pixels."""

import pytest
import torch
import torch.nn.functional as F
from helpers import make_batch, tiny_config, tokenizer, with_changes

from pixelllm.config import PixelLLMConfig
from pixelllm.errors import ConfigError
from pixelllm.model import build_model
from pixelllm.model.heads import BuildContext
from pixelllm.model.heads.refer_reranker import ReferReranker, RerankerConfig


def _config(**reranker) -> PixelLLMConfig:
    return with_changes(tiny_config(), extractor={"box_pixels": 16},
                        heads={"refer_reranker": {"candidates": 3, **reranker}})


def test_a_new_reranker_keeps_the_pointers_box():
    torch.manual_seed(0)
    model = build_model(_config(), tokenizer=tokenizer()).eval()
    batch = make_batch(model.config)
    with torch.no_grad():
        images = model.encode_images(batch["pixel_values"], batch["pixel_mask"])
        hidden = torch.randn(3, model.language.hidden_size)
        index = batch["prompt_image_index"]
        refer_boxes = model.capability("refer_boxes")
        torch.testing.assert_close(refer_boxes(hidden, images, index), model.capability("token_boxes")(hidden, images,
                                                                                                       index))
        reranker = model.heads["refer_reranker"]
        reranker.pointer_scale.fill_(-1.0)  # now the pointer's worst candidate wins
        boxes, _ = reranker.rerank(model, hidden, images, index)
        torch.testing.assert_close(refer_boxes(hidden, images, index), boxes[:, -1])


def test_it_learns_to_choose_the_candidate_whose_pixels_the_text_names():
    """Each of 3 candidates shows one of 6 "shapes" (a noisy code); the text names one of them; the
    pointer slightly prefers a wrong candidate. Held-out rows: the named candidate wins."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    codes, words = torch.randn(6, 32, generator=gen), torch.randn(6, 16, generator=gen)

    def rows(n):
        shapes = torch.stack([torch.randperm(6, generator=gen)[:3] for _ in range(n)])  # (n, 3) distinct
        named = torch.randint(0, 3, (n,), generator=gen)
        pixels = codes[shapes] + 0.3 * torch.randn(n, 3, 32, generator=gen)
        text = words[shapes[torch.arange(n), named]] + 0.3 * torch.randn(n, 16, generator=gen)
        pointer = torch.zeros(n, 3)
        pointer[torch.arange(n), (named + 1) % 3] = 0.5
        return text, pixels, pointer, named

    context = BuildContext(None, lm_dim=16, feature_dim=0, sam_channels=0, prompt_dim=0, pixel_dim=32, vocab_size=0)
    reranker = ReferReranker(RerankerConfig(candidates=3, hidden=32), context)
    optimizer = torch.optim.Adam(reranker.parameters(), lr=3e-3)
    for _ in range(300):
        text, pixels, pointer, named = rows(64)
        loss = F.cross_entropy(reranker(text, pixels, pointer), named)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    text, pixels, pointer, named = rows(500)
    with torch.no_grad():
        accuracy = (reranker(text, pixels, pointer).argmax(1) == named).float().mean().item()
    assert accuracy > 0.9, accuracy  # the pointer alone: 0


def test_config_errors():
    with pytest.raises(ConfigError, match="heads.refer_reranker needs candidates >= 2"):
        _config(candidates=1)
    with pytest.raises(ConfigError, match="head 'refer_reranker' needs box_pixels"):
        with_changes(tiny_config(), heads={"refer_reranker": {}})
    mlp = {"location": {"kind": "mlp"}, "refer_reranker": {}}
    with pytest.raises(ConfigError, match="head 'refer_reranker' needs candidates"):  # the MLP head has no peaks
        with_changes(tiny_config(), extractor={"box_pixels": 16}, heads=mlp)


def test_its_loss_counts_only_prompts_located_at_one_token():
    torch.manual_seed(0)
    model = build_model(_config(), tokenizer=tokenizer())
    batch = make_batch(model.config)  # a traced caption (many located words), a point prompt, an expression
    loss = model(batch).losses["rerank"]
    assert torch.isfinite(loss) and loss >= 0
    batch["location_weight"][:] = 0  # nothing to locate: no prompt counts
    assert model(batch).losses["rerank"].item() == 0
