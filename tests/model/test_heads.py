"""Heads from outside the trunk: a toy head in a file of its own trains, saves and reloads; the
decoding hooks (per-step readers, vocabulary constraints, forced runs, the repeat rule, special
tokens), each through a small head that the trunk does not know."""

from dataclasses import dataclass

import pytest
import torch
from helpers import make_batch, tiny_config, tokenizer, with_changes

from pixelllm.errors import ConfigError
from pixelllm.generation import generate, teacher_forced_states
from pixelllm.model import PixelLLM, Prompts, build_model
from pixelllm.model.decoding import DecodeHook, ForcedRuns
from pixelllm.model.heads import Head

AREA = {"area": {"class": "area_head:AreaHead", "hidden": 32}}


def _batch_with_boxes(config, seed: int) -> dict:
    """``make_batch``'s prompts with random region boxes (so their areas differ)."""
    gen = torch.Generator().manual_seed(seed)
    batch = make_batch(config, seed=seed)
    size = config.image_size
    corners = (torch.rand(3, 2, 2, generator=gen) * size).sort(1).values
    batch["prompt_boxes"] = torch.cat([corners[:, 0], corners[:, 1] + 4], dim=1).clamp(max=size)
    batch["prompt_is_point"] = torch.zeros(3, dtype=torch.bool)
    return batch


def test_a_head_from_its_own_file_trains_saves_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = build_model(with_changes(tiny_config(), heads=AREA), tokenizer=tokenizer())
    assert list(model.heads) == ["location", "mask", "proposals", "area"] and "area" in model.loss_names
    model.train_only(["heads.area"])
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(40):
        out = model(_batch_with_boxes(model.config, seed=step % 8))
        losses.append(out.losses["area"].item())
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert sum(losses[-5:]) / 5 < 0.3 * sum(losses[:5]) / 5, losses
    model.save_pretrained(tmp_path)
    loaded = PixelLLM.from_pretrained(tmp_path)
    assert loaded.config.heads["area"]["class"] == "area_head:AreaHead"
    batch = _batch_with_boxes(model.config, seed=99)
    model.eval()
    with torch.no_grad():
        images = [m.encode_images(batch["pixel_values"], batch["pixel_mask"]) for m in (model, loaded)]
        prompts = Prompts(batch["prompt_image_index"], batch["prompt_boxes"], batch["prompt_is_point"])
        areas = [m.capability("box_area")(m.visual_tokens(i, prompts))
                 for m, i in zip((model, loaded), images, strict=True)]
    assert torch.equal(*areas)


def test_unknown_heads_and_classes_are_config_errors():
    with pytest.raises(ConfigError, match="unknown head 'aera'"):
        with_changes(tiny_config(), heads={"aera": {}})
    with pytest.raises(ConfigError, match="cannot import 'area_head:Missing'"):
        with_changes(tiny_config(), heads={"area": {"class": "area_head:Missing"}})
    with pytest.raises(ConfigError, match="is not a pixelllm.model.heads.Head"):
        with_changes(tiny_config(), heads={"area": {"class": "area_head:AreaConfig"}})
    with pytest.raises(ConfigError, match="unknown heads.area field.*hiden"):
        with_changes(tiny_config(), heads={"area": {"class": "area_head:AreaHead", "hiden": 3}})


# ----------------------------------------------------------------------------------------------
# Decoding hooks, each through a small head that the trunk does not know


class _Hooked(Head):
    """A head with no parameters that adds the decoding hooks it is given."""

    name = "hooked"
    Config = dataclass(type("HookedConfig", (), {}))

    def __init__(self, hooks):
        super().__init__(None)
        self.hooks = hooks

    def decode_hooks(self, model, images, prompts):
        return self.hooks


@pytest.fixture(scope="module")
def nudged():
    """A model trained a few steps on the batch, so that it writes a few real tokens before EOS."""
    torch.manual_seed(1)
    model = build_model(tiny_config(), tokenizer=tokenizer())
    batch = make_batch(model.config)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(12):
        optimizer.zero_grad()
        model(batch).loss.backward()
        optimizer.step()
    return model.eval(), batch


def _with_hooks(nudged, *hooks):
    """The nudged model with one more head, whose decoding hooks are ``hooks``."""
    model, batch = nudged
    heads = {**dict(model.heads), "hooked": _Hooked(list(hooks))}
    return PixelLLM(model.config, model.vision, model.prompt_encoder, model.extractor, model.language, heads,
                    model.tokenizer).eval(), batch


def _decode(model, batch, rows=(0, 1, 2), **options):
    rows = torch.as_tensor(rows)
    images = model.encode_images(batch["pixel_values"], batch["pixel_mask"])
    return generate(model, images, batch["prompt_image_index"][rows], batch["prompt_boxes"][rows],
                    batch["prompt_is_point"][rows], batch["input_ids"][rows], batch["attention_mask"][rows],
                    max_new_tokens=10, length_penalty=3.0, **options)


class _States(DecodeHook):
    name = "states"

    def read(self, states, rows):
        return states


@pytest.mark.parametrize("beams", [1, 3])
def test_a_reader_records_the_state_of_every_token_cached_or_not_batched_or_alone(nudged, beams):
    model, batch = _with_hooks(nudged, _States())
    cached = _decode(model, batch, num_beams=beams)
    uncached = _decode(model, batch, num_beams=beams, use_cache=False)
    assert cached.sequences == uncached.sequences and any(len(s) > 1 for s in cached.sequences)
    with torch.no_grad():
        images = model.encode_images(batch["pixel_values"], batch["pixel_mask"])
        inputs = model.language_inputs(images, Prompts(batch["prompt_image_index"], batch["prompt_boxes"],
                                                       batch["prompt_is_point"]))
        forced = teacher_forced_states(inputs, batch["input_ids"], batch["attention_mask"], cached.sequences)
    for row, sequence in enumerate(cached.sequences):
        states = cached.reads["states"][row]
        assert states.shape == (len(sequence) + 1, model.language.hidden_size)
        torch.testing.assert_close(states, forced[row, : len(sequence) + 1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(states, uncached.reads["states"][row], atol=1e-4, rtol=1e-4)
        alone = _decode(model, batch, rows=[row], num_beams=beams)
        assert alone.sequences[0] == sequence
        torch.testing.assert_close(alone.reads["states"][0], states, atol=1e-4, rtol=1e-4)
    assert torch.equal(cached.reads["token_boxes"][0][1:], cached.per_token("token_boxes")[0])


@pytest.mark.parametrize("beams", [1, 3])
def test_forced_runs_follow_their_trigger_in_every_row(nudged, beams):
    trigger = _decode(*nudged, num_beams=beams).sequences[0][0]  # the token row 0 writes first
    eos = nudged[0].language.eos_token_id
    run = [t for t in range(3, 40) if t not in (trigger, eos)][:3]
    model, batch = _with_hooks(nudged, ForcedRuns({trigger: run}))
    out = _decode(model, batch, num_beams=beams)
    assert out.sequences[0][:4] == [trigger, *run]
    for sequence in out.sequences:
        for i, token in enumerate(sequence):
            if token == trigger:
                assert sequence[i + 1 : i + 4] == run[: len(sequence) - i - 1]
    assert out.sequences == _decode(model, batch, num_beams=beams, use_cache=False).sequences
    assert [_decode(model, batch, rows=[r], num_beams=beams).sequences[0] for r in range(3)] == out.sequences


class _Slots(DecodeHook):
    """Typed slots: odd positions take only the tokens ``allowed``."""

    def __init__(self, allowed):
        self.allowed = allowed

    def constrain(self, logits, history, rows):
        if history.shape[1] % 2 == 0:
            return logits
        keep = torch.zeros(logits.shape[-1], dtype=torch.bool)
        keep[self.allowed] = True
        return logits.masked_fill(~keep, -1e9)


@pytest.mark.parametrize("beams", [1, 3])
def test_a_vocabulary_mask_types_the_slots(nudged, beams):
    allowed = [7, 8, 9]
    model, batch = _with_hooks(nudged, _Slots(allowed))
    out = _decode(model, batch, num_beams=beams)
    assert any(len(s) > 1 for s in out.sequences)
    for sequence in out.sequences:
        assert all(token in allowed for token in sequence[1::2])
    assert out.sequences == _decode(model, batch, num_beams=beams, use_cache=False).sequences


class _Favourite(DecodeHook):
    """Pushes one token far up at every step; may spare it from the repeat rule or turn the rule off."""

    def __init__(self, token, repeatable=(), block_repeats=True):
        self.token, self.repeatable, self.block_repeats = token, tuple(repeatable), block_repeats

    def constrain(self, logits, history, rows):
        return logits.index_add(1, torch.tensor([self.token]), torch.full((len(logits), 1), 100.0))


@pytest.mark.parametrize("spared, rule_on, repeats", [((), True, False), ((12,), True, True), ((), False, True)])
def test_the_repeat_rule_can_spare_a_token_or_be_turned_off(nudged, spared, rule_on, repeats):
    model, batch = _with_hooks(nudged, _Favourite(12, spared, block_repeats=rule_on))
    sequence = _decode(model, batch, rows=[0]).sequences[0]
    assert sequence[0] == 12 and (sequence[:3] == [12, 12, 12]) == repeats
    if not repeats:
        assert all(a != b for a, b in zip(sequence, sequence[1:], strict=False))


@dataclass
class ToyTokensConfig:
    tokens: int = 2


class ToyTokensHead(Head):
    """A head that only adds special tokens (``<toy0>``, ``<toy1>``, ...)."""

    name = "toy_tokens"
    Config = ToyTokensConfig

    @classmethod
    def special_tokens(cls, config):
        return [f"<toy{i}>" for i in range(config.tokens)]


def test_a_heads_special_tokens_join_the_tokenizer(tmp_path):
    tok = tokenizer()
    tok.save_pretrained(tmp_path)
    fresh = type(tok).from_pretrained(tmp_path)
    before = len(fresh)
    model = build_model(with_changes(tiny_config(), heads={"toy": {"class": "test_heads:ToyTokensHead"}}),
                        tokenizer=fresh)
    ids = model.tokenizer.convert_tokens_to_ids(["<toy0>", "<toy1>"])
    assert len(model.tokenizer) == before + 2 and ids == [before, before + 1]
    assert model.tokenizer("a <toy1> b")["input_ids"].count(ids[1]) == 1
    model.save_pretrained(tmp_path / "model")
    assert len(PixelLLM.from_pretrained(tmp_path / "model").tokenizer) == before + 2  # not added twice
