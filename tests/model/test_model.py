"""The composed model: shapes, gradients, independence of the location head, checkpoints."""

import pytest
import torch
from helpers import make_batch, prompts_of, tiny_config, tiny_model, tokenizer, with_changes

from pixelllm.config import PixelLLMConfig
from pixelllm.model import PixelLLM, build_model
from pixelllm.model.heads.location import MLPLocator
from pixelllm.model.vision import IMAGENET_MEAN, IMAGENET_STD, normalize

FAMILIES = ["t5", "llama"]


@pytest.mark.parametrize("family", FAMILIES)
def test_output_shapes(family):
    model = tiny_model(family)
    batch = make_batch(model.config)
    out = model(batch)
    assert set(model.loss_names) == set(out.losses)  # every term of the tiny preset's heads
    n, length = batch["labels"].shape
    vocab = model.language.vocab_size
    assert out.logits.shape == (n, length, vocab)
    assert out.outputs["token_boxes"].shape == (n, length - 1, 4)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    images = model.encode_images(batch["pixel_values"], batch["pixel_mask"])
    grid = model.vision.grid
    assert images.features.shape == (2, model.vision.out_channels, grid, grid)
    # the second image is 3/4 as high as the canvas
    size = model.config.image_size
    assert images.valid_size.tolist() == [[size, size], [size, size * 3 // 4]]
    visual = model.visual_tokens(images, prompts_of(batch))
    assert visual.shape == (n, model.config.extractor.num_tokens, model.language.hidden_size)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_exactly_the_trainable_parameters(family):
    model = tiny_model(family, frozen=True).train()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    # What trains: LoRA q/v, extractor (with its projection), location head, semantic tower, mask adapter,
    # proposal head.
    for name in trainable:
        trains = ("extractor.", "heads.location.", "vision.semantic.", "heads.mask.adapter.", "heads.proposals.")
        assert name.startswith(trains) or "lora_" in name, name
    lora = {name for name in trainable if "lora_" in name}
    q_v = ("q", "v") if family == "t5" else ("q_proj", "v_proj")
    assert lora and all(name.split(".lora_")[0].rsplit(".", 1)[-1] in q_v for name in lora)
    if family == "t5":  # encoder self-attention, decoder self- and cross-attention
        assert any(".encoder." in n for n in lora) and any(".decoder." in n for n in lora)
        assert any("EncDecAttention" in n for n in lora)
    assert any(n.startswith("vision.sam.") for n in frozen)
    assert any(n.startswith("prompt_encoder.") for n in frozen)
    assert any(n.startswith("heads.mask.decoder.") for n in frozen)
    assert any(n.startswith("language.") and "lora_" not in n for n in frozen)
    # frozen towers run in eval mode even while the model trains; the frozen LM runs in train mode, its
    # dropout active, as the official code runs T5
    assert not model.vision.sam.training and not model.heads["mask"].decoder.training
    assert model.language.model.training
    assert model.vision.semantic.training and model.extractor.training

    model(make_batch(model.config)).loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"no gradient reached {name}"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_location_head_never_changes_the_text():
    model = tiny_model("t5").eval()
    batch = make_batch(model.config)
    with torch.no_grad():
        before = model(batch)
        for p in model.heads["location"].parameters():
            p.add_(torch.randn_like(p))
        after = model(batch)
    assert torch.equal(before.logits, after.logits)
    assert not torch.allclose(before.outputs["token_boxes"], after.outputs["token_boxes"])


def test_the_paper_head_trains_without_a_selection_loss():
    torch.manual_seed(0)
    model = build_model(with_changes(tiny_config(), heads={"location": {"kind": "mlp"}}), tokenizer=tokenizer())
    assert isinstance(model.heads["location"].locator, MLPLocator)
    out = model(make_batch(model.config))
    assert "selection" not in out.losses and out.losses["location"].item() > 0
    out.loss.backward()
    assert all(p.grad is not None for p in model.heads["location"].parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(tmp_path, family):
    model = tiny_model(family, frozen=True).eval()
    batch = make_batch(model.config)
    with torch.no_grad():
        model.heads["location"].locator.mlp[-1].bias.add_(0.5)  # weights that differ from a fresh init
        expected = model(batch)
    model.save_pretrained(tmp_path / "ckpt")
    names = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not any(name.startswith(".") for name in names), "temporary files left behind"
    from pixelllm.model import PixelLLM

    loaded = PixelLLM.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        got = loaded(batch)
    assert torch.equal(expected.logits, got.logits)
    assert torch.equal(expected.outputs["token_boxes"], got.outputs["token_boxes"])
    assert loaded.tokenizer("a red circle")["input_ids"] == model.tokenizer("a red circle")["input_ids"]
    assert loaded.config.to_dict() == model.config.to_dict()


def test_the_semantic_tower_can_take_finer_pixels():
    """``pixel_scale`` 2: the semantic tower reads the image at twice the canvas resolution and SAM
    its 2 x 2 averages, so a change that averages out in every 2 x 2 block reaches only the first."""
    data = tiny_config().to_dict()
    data["semantic"].update(image_size=320, patch_size=16, stem_channels=16)
    config = PixelLLMConfig.from_dict(data)
    torch.manual_seed(0)
    model = build_model(config, tokenizer=tokenizer()).eval()
    batch = make_batch(config)
    coarse, mask = batch["pixel_values"], batch["pixel_mask"]
    fine = coarse.repeat_interleave(2, 2).repeat_interleave(2, 3)
    checker = 0.05 * (torch.arange(320)[:, None] + torch.arange(320)[None]).remainder(2).mul(2).sub(1)
    with torch.no_grad():
        features, sam = model.vision(fine, mask)
        detailed, sam_detailed = model.vision(fine + checker, mask)
        sam_alone = model.vision.sam(normalize(coarse, mask, IMAGENET_MEAN, IMAGENET_STD)).last_hidden_state
    assert features.shape == (2, model.vision.out_channels, 20, 20)
    torch.testing.assert_close(sam, sam_alone)
    torch.testing.assert_close(sam_detailed, sam)
    semantic = slice(model.vision.sam_channels, None)
    assert (detailed[:, semantic] - features[:, semantic]).abs().mean() > 1e-3
    assert torch.isfinite(model({**batch, "pixel_values": fine}).loss)


def test_a_checkpoint_loads_into_a_config_with_a_new_part_and_trains_it_alone(tmp_path):
    """``from_pretrained(config=...)``: the checkpoint's weights in their places, the new mask
    refiner as built; ``train_only`` leaves every other part without gradients and in eval mode."""
    from pixelllm.errors import CheckpointError, ConfigError

    model = tiny_model()
    model.save_pretrained(tmp_path / "ckpt")
    with_refiner = with_changes(model.config, heads={"mask_refiner": {"resolution": 16}})
    grown = PixelLLM.from_pretrained(tmp_path / "ckpt", config=with_refiner)
    assert "mask_refiner" in grown.heads
    own = model.state_dict()
    for name, value in grown.state_dict().items():
        if not name.startswith("heads.mask_refiner."):
            assert torch.equal(value, own[name]), name
    grown.train_only(["heads.mask_refiner"])
    grown.train()
    trainable = {".".join(name.split(".")[:2]) for name, p in grown.named_parameters() if p.requires_grad}
    assert trainable == {"heads.mask_refiner"}
    assert grown.heads["mask_refiner"].training and not grown.heads["mask"].training
    assert not grown.extractor.training and not grown.language.training
    with pytest.raises(ConfigError, match="train_only names no part of the model: heads.mask_refner"):
        grown.train_only(["heads.mask_refner"])
    grown.save_pretrained(tmp_path / "grown")
    with pytest.raises(CheckpointError, match="has no place for .* weights, such as heads.mask_refiner"):
        PixelLLM.from_pretrained(tmp_path / "grown", config=model.config)


def test_a_deeper_module_can_train_alone():
    model = tiny_model()
    model.train_only(["heads.mask.adapter"])
    model.train()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("heads.mask.adapter.") for name in trainable)
    assert model.heads["mask"].adapter.training and not model.heads["mask"].decoder.training
    assert set(model.frozen) >= {"vision", "heads.location", "heads.mask.decoder"}
