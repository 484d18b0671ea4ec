"""Decoding: cached = uncached, batched = one by one, beam search = exhaustive search, = HF generate."""

import itertools
import math

import pytest
import torch
from helpers import make_batch, tiny_model

from pixelllm.generation import _beam_search, _brevity_penalty, _Reads, generate
from pixelllm.model import Prompts
from pixelllm.model.decoding import LanguageInputs


def _inputs(model, batch, rows=None):
    rows = torch.arange(3) if rows is None else torch.as_tensor(rows)
    images = model.encode_images(batch["pixel_values"], batch["pixel_mask"])
    return (model, images, batch["prompt_image_index"][rows], batch["prompt_boxes"][rows],
            batch["prompt_is_point"][rows], batch["input_ids"][rows], batch["attention_mask"][rows])


def _trained_a_little(family):
    """A model nudged to emit a few real tokens before EOS (a random one stops at once or never)."""
    model = tiny_model(family, seed=1)
    batch = make_batch(model.config)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(12):
        optimizer.zero_grad()
        model(batch).loss.backward()
        optimizer.step()
    return model.eval(), batch


@pytest.fixture(scope="module", params=["t5", "llama"])
def trained(request):
    return _trained_a_little(request.param)


@pytest.mark.parametrize("beams", [1, 3])
def test_cached_and_uncached_decoding_agree(trained, beams):
    model, batch = trained
    # a strong length reward keeps the barely trained model's beams from stopping at once
    options = dict(num_beams=beams, max_new_tokens=10, length_penalty=3.0)
    cached = generate(*_inputs(model, batch), **options)
    uncached = generate(*_inputs(model, batch), **options, use_cache=False)
    assert cached.sequences == uncached.sequences
    assert any(len(s) > 1 for s in cached.sequences)
    for a, b, s in zip(cached.per_token("token_boxes"), uncached.per_token("token_boxes"), cached.sequences,
                       strict=True):
        assert a.shape == (len(s), 4)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cached.scores, uncached.scores, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("beams", [1, 3])
def test_batched_equals_one_by_one(trained, beams):
    model, batch = trained
    options = dict(num_beams=beams, max_new_tokens=10, length_penalty=3.0)
    together = generate(*_inputs(model, batch), **options)
    assert any(len(s) > 1 for s in together.sequences)
    for row in range(3):
        alone = generate(*_inputs(model, batch, [row]), **options)
        assert alone.sequences[0] == together.sequences[row]
        torch.testing.assert_close(alone.reads["token_boxes"][0], together.reads["token_boxes"][row], atol=1e-4,
                                   rtol=1e-4)


def test_greedy_matches_transformers_generate():
    model, batch = _trained_a_little("t5")
    args = _inputs(model, batch)
    ours = generate(*args, max_new_tokens=10, block_repeats=False)
    visual = model.visual_tokens(args[1], Prompts(*args[2:5]))
    embeds, mask = model.language._prefix(visual, args[5], args[6])
    theirs = model.language.model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=10,
                                           do_sample=False, num_beams=1)
    eos = model.language.eos_token_id
    for row, seq in enumerate(theirs.tolist()):
        tokens = seq[1:]  # drop the decoder start token
        tokens = tokens[: tokens.index(eos)] if eos in tokens else tokens
        tokens = [t for t in tokens if t != model.language.pad_token_id] if eos in seq else tokens
        assert ours.sequences[row] == tokens


class MarkovStepper:
    """A fake LM: the next token's log-probabilities depend only on the last token."""

    def __init__(self, table: torch.Tensor, start: int, rows: int):
        self.table = table
        self.last = torch.full((rows,), start)
        self.first = torch.zeros(rows, 1), table[self.last]

    def step(self, tokens):
        self.last = tokens
        return torch.zeros(len(tokens), 1), self.table[tokens]

    def select(self, index):
        self.last = self.last[index]


def test_beam_search_finds_the_exhaustive_optimum():
    """With enough beams every candidate is kept, so the result must be the best finished sequence
    under the brevity-penalized score, found here by enumerating them all."""
    vocab, eos, start, max_len, alpha = 4, 3, 0, 3, 0.6
    torch.manual_seed(3)
    for _ in range(5):
        table = torch.log_softmax(torch.randn(vocab, vocab) * 2, dim=-1)
        beams = vocab**max_len // 2 + 1
        reads = _Reads(None, beams, max_len)
        out = _beam_search(MarkovStepper(table, start, beams), LanguageInputs(None, None), reads, 1, beams, max_len,
                           eos, alpha)
        best, best_score = None, -math.inf
        for length in range(1, max_len + 1):
            for body in itertools.product(range(eos), repeat=length - 1):
                seq, last, log_p = [*body, eos], start, 0.0
                for token in seq:
                    log_p += table[last, token].item()
                    last = token
                score = log_p / _brevity_penalty(alpha, length)
                if score > best_score:
                    best, best_score = list(body), score
        assert out.sequences[0] == best
        assert math.isclose(out.scores[0].item(), best_score, rel_tol=1e-5)


def test_caption_only_decoding_gives_the_same_text(trained):
    model, batch = trained
    with_boxes = generate(*_inputs(model, batch), max_new_tokens=8)
    without = generate(*_inputs(model, batch), max_new_tokens=8, read=False)
    assert without.sequences == with_boxes.sequences
    assert without.reads == {} and "token_boxes" in with_boxes.reads
