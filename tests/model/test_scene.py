"""The scene captioner: its objects, its pointer's targets, a new one's start, and what it trains."""

import pytest
import torch
import torch.nn.functional as F
from helpers import make_batch, tiny_config, tokenizer, with_changes

from pixelllm.config import PixelLLMConfig
from pixelllm.errors import ConfigError
from pixelllm.generation import generate
from pixelllm.model import PixelLLM, build_model
from pixelllm.model.heads import BuildContext
from pixelllm.model.heads.scene import SceneCaptioner, SceneConfig, pointer_targets
from pixelllm.tasks import Predictor


def _config(scene: bool = True) -> PixelLLMConfig:
    return with_changes(tiny_config(), extractor={"box_pixels": 16}, heads={"scene": {"objects": 4}} if scene else {})


def _captioner(objects: int, hidden: int, lm_dim: int) -> SceneCaptioner:
    context = BuildContext(None, lm_dim=lm_dim, feature_dim=0, sam_channels=0, prompt_dim=0, pixel_dim=4 * lm_dim,
                           vocab_size=0)
    return SceneCaptioner(SceneConfig(objects=objects, hidden=hidden), context)


def test_pointer_targets_by_hand():
    boxes = torch.tensor([[[0.0, 0, 50, 50], [10, 10, 30, 30], [100, 100, 150, 150]]])
    scores = torch.tensor([[0.9, 0.3, 0.0]])  # the third is padding
    centers = [(20, 20), (40, 40), (120, 120), (20, 20), (200, 200)]
    label_boxes = torch.tensor([[[x - 2.0, y - 2, x + 2, y + 2] for x, y in centers]])
    mask = torch.tensor([[True, True, True, False, True]])
    # (20, 20) lies in both the first box and the second, smaller one: the better detected wins;
    # padding, unlocated tokens and tokens on no object are ignored
    assert pointer_targets(label_boxes, mask, boxes, scores).tolist() == [[0, 0, -100, -100, -100]]
    assert pointer_targets(label_boxes, mask, boxes, torch.tensor([[0.3, 0.9, 0.0]])).tolist() == [
        [1, 0, -100, -100, -100]]


def test_words_are_located_where_reader_and_writer_agree_never_on_padding():
    torch.manual_seed(0)
    captioner = _captioner(objects=3, hidden=16, lm_dim=8)
    boxes = torch.tensor([[[0.0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60]]])
    objects = captioner.object_tokens(torch.randn(1, 3, 4, 8), boxes, torch.tensor([[0.9, 0.8, 0.0]]), 160,
                                      torch.tensor([120.0]))
    assert objects[0, 2].abs().max() == 0  # padding: all-zero tokens
    valid = torch.tensor([[True, True, False]])
    hidden = torch.randn(1, 50, 8)
    reader = captioner.match_logits(captioner.reader, hidden, objects, valid)
    unwritten = torch.cat([hidden, torch.zeros(1, 50, 3)], dim=-1)
    torch.testing.assert_close(captioner.locate(unwritten, objects, boxes, valid), boxes[0, reader[0].argmax(-1)][None])
    assert set(reader[0].argmax(-1).tolist()) == {0, 1}  # both real objects are chosen by some state
    written = torch.tensor([0.0, 1e3, 2e3]).expand(1, 50, 3)  # written from the second object (the third is padding)
    located = captioner.locate(torch.cat([hidden, written], dim=-1), objects, boxes, valid)
    assert (located == boxes[0, 1]).all()


def test_it_learns_to_point_hidden_states_at_the_object_they_describe():
    """Each of 4 objects shows one of 8 "kinds" (a noisy code); a hidden state describes one of
    them (another noisy code of the same kind). Held-out rows: the pointer finds that object."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    looks, words = torch.randn(8, 4, 16, generator=gen), torch.randn(8, 16, generator=gen)
    captioner = _captioner(objects=4, hidden=32, lm_dim=16)
    boxes, scores = torch.zeros(1, 4, 4).expand(64, -1, -1), torch.ones(64, 4)

    def rows(n):
        kinds = torch.stack([torch.randperm(8, generator=gen)[:4] for _ in range(n)])  # (n, 4) distinct
        named = torch.randint(0, 4, (n,), generator=gen)
        pixels = looks[kinds] + 0.3 * torch.randn(n, 4, 4, 16, generator=gen)
        hidden = words[kinds[torch.arange(n), named]] + 0.3 * torch.randn(n, 16, generator=gen)
        objects = captioner.object_tokens(pixels, boxes[:n], scores[:n], 160, torch.full((n,), 160.0))
        return captioner.match_logits(captioner.reader, hidden, objects, scores[:n] > 0), named

    optimizer = torch.optim.Adam(captioner.parameters(), lr=3e-3)
    for _ in range(300):
        logits, named = rows(64)
        loss = F.cross_entropy(logits, named)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        logits, named = rows(64)
        accuracy = (logits.argmax(1) == named).float().mean().item()
    assert accuracy > 0.9, accuracy  # chance: 0.25


def test_a_new_scene_captioner_starts_from_the_models_lm_and_trains_alone(tmp_path):
    torch.manual_seed(0)
    base = build_model(_config(scene=False), tokenizer=tokenizer())
    base.save_pretrained(tmp_path)
    model = PixelLLM.from_pretrained(tmp_path, config=_config())
    for ours, copied in zip(model.language.state_dict().values(),
                            model.heads["scene"].language.state_dict().values(), strict=True):
        assert torch.equal(ours, copied)
    model.train_only(["heads.scene"])
    model.train()
    batch = make_batch(model.config)  # a traced caption, a point prompt, an expression with a mask
    batch["prompt_scene"] = torch.tensor([True, False, False])
    out = model(batch)
    assert {"scene_text", "scene_pointer", "text", "location"} <= set(out.losses)
    out.loss.backward()
    trained = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all(name.startswith("heads.scene.") for name in trained)
    assert any(name.startswith("heads.scene.language.") for name in trained)
    # the rest of the model sees the traced caption with zero weight
    zeroed = {**batch, "caption_weight": batch["caption_weight"] * torch.tensor([0.0, 1, 1]),
              "location_weight": batch["location_weight"] * torch.tensor([0.0, 1, 1])}
    base.train()
    with torch.no_grad():
        torch.testing.assert_close(base(zeroed).losses["text"], out.losses["text"])
        torch.testing.assert_close(base(zeroed).losses["location"], out.losses["location"])


def test_whole_image_captions_come_from_it_and_point_at_its_objects():
    torch.manual_seed(0)
    model = build_model(_config(), tokenizer=tokenizer()).eval()
    predictor = Predictor(model)
    image = predictor.encode((torch.rand(120, 160, 3) * 255).to(torch.uint8).numpy())
    with torch.no_grad():
        objects = model.heads["scene"].objects(model, image.features, torch.zeros(1, dtype=torch.long))
    canvas_boxes = objects.boxes[0][objects.valid[0]]
    decoded = predictor._generate([(image, image._trace_prompt())], num_beams=2, max_new_tokens=6)
    read = predictor.token_boxes([image], decoded.sequences)[0]  # teacher-forced, in original pixels
    original_boxes = torch.tensor(image.transform.boxes_to_original(canvas_boxes.numpy()), dtype=torch.float32)
    for box in decoded.per_token("token_boxes")[0]:
        assert (box - canvas_boxes).abs().amax(1).min() < 1e-4, box
    for box in torch.tensor(read, dtype=torch.float32):
        assert (box - original_boxes).abs().amax(1).min() < 0.5, box
    caption = image.caption(num_beams=1, max_new_tokens=6)
    region = image.caption(box=[10, 10, 80, 60], max_new_tokens=6)
    with torch.no_grad():
        for p in model.heads["scene"].language.parameters():
            p.add_(torch.randn_like(p))
    assert image.caption(num_beams=1, max_new_tokens=6).text != caption.text
    assert image.caption(box=[10, 10, 80, 60], max_new_tokens=6).text == region.text


def test_with_all_heads_it_takes_part_in_a_step_without_whole_image_captions():
    torch.manual_seed(0)
    model = build_model(_config(), tokenizer=tokenizer())
    batch = {**make_batch(model.config), "prompt_scene": torch.zeros(3, dtype=torch.bool)}
    model(batch, all_heads=True).loss.backward()  # as FSDP needs: every parameter gets a gradient
    gradients = [p.grad for p in model.heads["scene"].parameters()]
    assert all(g is not None for g in gradients) and all(g.abs().max() == 0 for g in gradients)


@pytest.mark.parametrize("beams", [1, 3])
def test_its_decoding_agrees_cached_uncached_batched_and_alone(beams):
    torch.manual_seed(1)
    model = build_model(_config(), tokenizer=tokenizer())
    batch = {**make_batch(model.config), "prompt_scene": torch.tensor([True, False, False])}
    optimizer = torch.optim.Adam(model.heads["scene"].parameters(), lr=3e-3)
    for _ in range(12):  # nudged to emit a few real tokens before EOS
        optimizer.zero_grad()
        model(batch).loss.backward()
        optimizer.step()
    model.eval()
    images = model.encode_images(batch["pixel_values"], batch["pixel_mask"])
    batch["input_ids"][2], batch["attention_mask"][2] = batch["input_ids"][0], batch["attention_mask"][0]
    rows = torch.tensor([0, 2])  # the trace prompt on each image's whole box

    def decode(rows, **options):
        return generate(model, images, batch["prompt_image_index"][rows], batch["prompt_boxes"][rows],
                        batch["prompt_is_point"][rows], batch["input_ids"][rows], batch["attention_mask"][rows],
                        whole_image=True, num_beams=beams, max_new_tokens=10, length_penalty=3.0, **options)

    cached, uncached = decode(rows), decode(rows, use_cache=False)
    assert cached.sequences == uncached.sequences and any(len(s) > 1 for s in cached.sequences)
    for row in range(2):
        boxes = cached.reads["token_boxes"]
        torch.testing.assert_close(boxes[row], uncached.reads["token_boxes"][row], atol=1e-4, rtol=1e-4)
        alone = decode(rows[row : row + 1])
        assert alone.sequences[0] == cached.sequences[row]
        torch.testing.assert_close(alone.reads["token_boxes"][0], boxes[row], atol=1e-4, rtol=1e-4)


def test_config_errors():
    with pytest.raises(ConfigError, match="head 'scene' needs box_pixels"):
        with_changes(tiny_config(), heads={"scene": {}})
    with pytest.raises(ConfigError, match="heads.scene needs objects >= 1"):
        with_changes(tiny_config(), extractor={"box_pixels": 16}, heads={"scene": {"objects": 0}})
    with pytest.raises(ConfigError, match="head 'scene' needs propose"):
        with_changes(tiny_config(), extractor={"box_pixels": 16}, heads={"proposals": None, "scene": {}})

