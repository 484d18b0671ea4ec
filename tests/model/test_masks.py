"""The mask head: SAM's loss by hand, the gated adapter, padding that changes nothing."""

import math

import torch
from helpers import make_batch, prompts_of, tiny_model

from pixelllm.model.heads.masks import MaskAdapter, MaskConfig, mask_loss


def test_mask_loss_by_hand():
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    valid[0, :, 3] = False  # 12 valid pixels
    target = torch.zeros(1, 4, 4, dtype=torch.bool)
    target[0, :2, :2] = True  # 4 pixels
    logits = torch.zeros(1, 4, 4)  # p = 0.5 everywhere: focal = 0.5 * ln 2 * (1 - 0.5)^2 per pixel
    terms = mask_loss(logits, torch.tensor([0.25]), target, valid, torch.ones(1))
    assert math.isclose(terms["focal"].item(), 0.5 * math.log(2) * 0.25, rel_tol=1e-5)
    # dice over all 16 pixels: 1 - (2 * 0.5 * 4 + 1) / (0.5 * 16 + 4 + 1)
    assert math.isclose(terms["dice"].item(), 1 - 5 / 13, rel_tol=1e-5)
    # logits 0 -> nothing predicted -> IoU 0; predicted 0.25 -> (0.25)^2
    assert math.isclose(terms["iou"].item(), 0.0625, rel_tol=1e-5)

    perfect = torch.where(target, 20.0, -20.0)
    terms = mask_loss(perfect, torch.tensor([1.0]), target, valid, torch.ones(1))
    assert terms["focal"].item() < 1e-9 and terms["dice"].item() < 1e-6 and terms["iou"].item() == 0
    gated = mask_loss(logits, torch.tensor([0.25]), target, valid, torch.zeros(1))
    assert all(v.item() == 0 for v in gated.values())


def test_adapter_starts_as_plain_sam_and_ignores_padding():
    torch.manual_seed(0)
    adapter = MaskAdapter(MaskConfig(depth=1, heads=2, mlp_dim=32), lm_dim=24, prompt_dim=16).eval()
    box_tokens, visual = torch.randn(2, 2, 16), torch.randn(2, 3, 24)
    text, text_mask = torch.randn(2, 5, 24), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(adapter(box_tokens, visual, text, text_mask), box_tokens)  # tanh(0) gate
        adapter.gate.fill_(1.0)
        full = adapter(box_tokens, visual, text, text_mask)
        assert not torch.allclose(full, box_tokens)
        # more padding (with other values) on the first row changes nothing
        longer = torch.cat([text, torch.randn(2, 4, 24)], dim=1)
        longer_mask = torch.cat([text_mask, torch.zeros(2, 4, dtype=torch.bool)], dim=1)
        torch.testing.assert_close(adapter(box_tokens, visual, longer, longer_mask), full)
        # and the first row alone gives the same as in the batch
        torch.testing.assert_close(adapter(box_tokens[:1], visual[:1], text[:1, :3], text_mask[:1, :3]), full[:1])


def test_mask_logits_cover_the_canvas():
    model = tiny_model().eval()
    batch = make_batch(model.config)
    with torch.no_grad():
        images = model.encode_images(batch["pixel_values"], batch["pixel_mask"])
        visual = model.visual_tokens(images, prompts_of(batch))
        text = torch.randn(3, 4, model.language.hidden_size)
        masks = model.capability("mask_logits")
        logits, iou = masks(images, batch["prompt_image_index"], batch["prompt_boxes"], visual, text,
                            torch.ones(3, 4, dtype=torch.bool))
    size = model.config.image_size
    assert logits.shape == (3, size, size) and iou.shape == (3,)
