"""Losses: tokens without targets are ignored, and each task gate switches its term off."""

import math

import torch
from helpers import make_batch, tiny_model

from pixelllm.model.losses import cell_cross_entropy, location_l1, smoothed_cross_entropy


def test_smoothed_cross_entropy_by_hand():
    # Two classes, uniform logits: -log(1/2) for the true class and the other alike.
    logits = torch.zeros(1, 2, 2)
    labels = torch.tensor([[1, -100]])
    loss = smoothed_cross_entropy(logits, labels, torch.ones(1), smoothing=0.1)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6)
    # V = 3, logits (2, 0, 0), label 0: logp = (2 - lse, -lse, -lse), lse = log(e^2 + 2)
    logits = torch.tensor([[[2.0, 0.0, 0.0]]])
    lse = math.log(math.exp(2) + 2)
    expected = -(0.9 * (2 - lse) + 0.05 * (-lse) * 2)
    loss = smoothed_cross_entropy(logits, torch.tensor([[0]]), torch.ones(1), smoothing=0.1)
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)


def test_location_l1_by_hand():
    pred = torch.tensor([[[0.0, 0, 10, 10], [5, 5, 5, 5]]])
    target = torch.tensor([[[1.0, 2, 13, 14], [100, 100, 100, 100]]])
    mask = torch.tensor([[True, False]])
    assert math.isclose(location_l1(pred, target, mask, torch.ones(1)).item(), (1 + 2 + 3 + 4) / 4)
    assert location_l1(pred, target, mask, torch.zeros(1)).item() == 0


def test_loss_ignores_tokens_without_targets():
    model = tiny_model().eval()
    batch = make_batch(model.config)
    with torch.no_grad():
        base = model(batch).losses
        changed = dict(batch)
        boxes = batch["label_boxes"].clone()
        boxes[~batch["label_box_mask"]] = 1e4  # only where there is no target
        changed["label_boxes"] = boxes
        other = model(changed).losses
    assert torch.equal(base["location"], other["location"])
    assert torch.equal(base["text"], other["text"])
    with torch.no_grad():
        boxes = batch["label_boxes"].clone()
        boxes[batch["label_box_mask"]] += 7.0
        changed["label_boxes"] = boxes
        assert not torch.equal(base["location"], model(changed).losses["location"])


def test_task_gates_switch_terms_off():
    model = tiny_model().eval()
    batch = make_batch(model.config)
    with torch.no_grad():
        off = dict(batch, caption_weight=torch.zeros(3))
        out = model(off)
        assert out.losses["text"].item() == 0 and out.losses["location"].item() > 0
        off = dict(batch, location_weight=torch.zeros(3), mask_weight=torch.zeros(3), detection_weight=torch.zeros(2))
        out = model(off)
        assert out.losses["location"].item() == 0 and out.losses["text"].item() > 0
        assert "mask_focal" not in out.losses
        assert math.isclose(out.loss.item(), out.losses["text"].item(), rel_tol=1e-6)
        out = model(batch)
        mask_terms = 20 * out.losses["mask_focal"] + out.losses["mask_dice"] + out.losses["mask_iou"]
        detection_terms = 0.5 * out.losses["detection_heatmap"] + out.losses["detection_box"]
        location = model.config.heads["location"]
        weight, selection = location["loss_weight"], location["selection_weight"]
        expected = out.losses["text"] + weight * out.losses["location"] + selection * out.losses["selection"] \
            + mask_terms + detection_terms
        assert mask_terms.item() > 0 and math.isclose(out.loss.item(), expected.item(), rel_tol=1e-6)
        # gating a prompt off gives the loss of the batch without that prompt's tokens
        one_off = model(dict(batch, caption_weight=torch.tensor([1.0, 0.0, 0.0]))).losses["text"]
        dropped = batch["labels"].clone()
        dropped[1:] = -100
        only_first = model(dict(batch, labels=dropped, caption_weight=torch.ones(3))).losses["text"]
        torch.testing.assert_close(one_off, only_first)


def test_cell_cross_entropy_targets_the_cell_of_the_box_center():
    grid, canvas = 4, 40  # cells of 10 px
    target = torch.tensor([[[20.0, 0, 30, 18]]])  # center (25, 9): column 2, row 0 -> cell 2
    mask, weight = torch.ones(1, 1, dtype=torch.bool), torch.ones(1)
    right = torch.zeros(1, 1, grid * grid)
    right[..., 2] = 50.0
    wrong = torch.zeros(1, 1, grid * grid)
    wrong[..., 8] = 50.0  # column 0, row 2
    assert cell_cross_entropy(right, target, mask, weight, canvas).item() < 1e-6
    assert math.isclose(cell_cross_entropy(wrong, target, mask, weight, canvas).item(), 50.0, rel_tol=1e-6)
    uniform = torch.zeros(1, 1, grid * grid)
    assert math.isclose(cell_cross_entropy(uniform, target, mask, weight, canvas).item(), math.log(16), rel_tol=1e-6)


def test_per_prompt_average_weighs_each_prompt_once():
    # Prompt 0: one located token with error 4; prompt 1: three located tokens with error 0.
    pred = torch.zeros(2, 3, 4)
    target = torch.zeros(2, 3, 4)
    target[0, 0] = 4.0
    mask = torch.tensor([[True, False, False], [True, True, True]])
    weight = torch.ones(2)
    assert math.isclose(location_l1(pred, target, mask, weight).item(), 4 / 4)
    assert math.isclose(location_l1(pred, target, mask, weight, per_prompt=True).item(), 4 / 2)
