"""The LM adapters: incremental decoding with a cache reproduces the teacher-forced pass."""

import pytest
import torch
from helpers import make_batch, prompts_of, tiny_model


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_cached_steps_equal_teacher_forcing(family):
    model = tiny_model(family, frozen=True).eval()
    batch = make_batch(model.config)
    labels = batch["labels"]
    with torch.no_grad():
        images = model.encode_images(batch["pixel_values"], batch["pixel_mask"])
        visual = model.visual_tokens(images, prompts_of(batch))
        hidden, logits = model.language(visual, batch["input_ids"], batch["attention_mask"], labels)
        step_hidden, step_logits, state = model.language.start(visual, batch["input_ids"], batch["attention_mask"])
        hs, ls = [step_hidden], [step_logits]
        for j in range(labels.shape[1] - 1):
            token = labels[:, j].clamp(min=0)
            step_hidden, step_logits, state = model.language.step(state, token)
            hs.append(step_hidden)
            ls.append(step_logits)
    valid = labels >= 0  # positions after a row's EOS see padding in one pass and real tokens in none
    torch.testing.assert_close(torch.stack(hs, 1)[valid], hidden[valid], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.stack(ls, 1)[valid], logits[valid], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_select_reorders_rows(family):
    model = tiny_model(family).eval()
    batch = make_batch(model.config)
    with torch.no_grad():
        images = model.encode_images(batch["pixel_values"], batch["pixel_mask"])
        visual = model.visual_tokens(images, prompts_of(batch))
        _, _, state = model.language.start(visual, batch["input_ids"], batch["attention_mask"])
        token = torch.tensor([5, 6, 7])
        _, expected, _ = model.language.step(state, token)
        _, _, state = model.language.start(visual, batch["input_ids"], batch["attention_mask"])
        state = model.language.select(state, torch.tensor([2, 2, 0]))
        _, got, _ = model.language.step(state, token[[2, 2, 0]])
    torch.testing.assert_close(got, expected[[2, 2, 0]], atol=1e-5, rtol=1e-5)


def test_prompt_padding_does_not_change_a_row():
    """A decoder-only prefix is right-aligned: extra padding on one row leaves its outputs alone."""
    model = tiny_model("llama").eval()
    batch = make_batch(model.config)
    padded = {k: v for k, v in batch.items()}
    padded["input_ids"] = torch.nn.functional.pad(batch["input_ids"], (0, 3), value=0)
    padded["attention_mask"] = torch.nn.functional.pad(batch["attention_mask"], (0, 3), value=0)
    with torch.no_grad():
        a, b = model(batch), model(padded)
    valid = batch["labels"] >= 0
    torch.testing.assert_close(a.logits[valid], b.logits[valid], atol=1e-4, rtol=1e-4)
