"""The location head's locators: the pointer masks padding cells and learns to point at what the
hidden state asks for; both locators answer the same call."""

import torch

from pixelllm.model.heads.location import MLPLocator
from pixelllm.model.losses import cell_cross_entropy, location_l1
from pixelllm.model.pointer import PointerLocator


def box_center(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., :2] + boxes[..., 2:]) / 2

GRID, CANVAS, CHANNELS, DIM = 8, 64, 16, 32


def _marked_scenes(n: int, gen: torch.Generator):
    """Random feature maps with one cell marked per image; the target box is that cell's box."""
    features = torch.randn(n, CHANNELS, GRID, GRID, generator=gen)
    cells = torch.randint(0, GRID * GRID, (n,), generator=gen)
    features.view(n, CHANNELS, -1)[torch.arange(n), :, cells] += 3.0
    cell = CANVAS / GRID
    x0, y0 = (cells % GRID) * cell, (cells // GRID) * cell
    boxes = torch.stack([x0, y0, x0 + cell, y0 + cell], dim=-1).float()
    return features, cells, boxes


def test_both_heads_answer_the_same_call_with_any_leading_shape():
    features = torch.randn(2, CHANNELS, GRID, GRID)
    valid = torch.tensor([[64.0, 64.0], [64.0, 40.0]])
    index = torch.tensor([1, 0, 1])
    for head in (MLPLocator(DIM, 16, 2), PointerLocator(DIM, CHANNELS, CANVAS, 16, 2)):
        cells = head.cells(features)
        boxes, _ = head.locate(torch.randn(3, 5, DIM), cells, index, valid[index])
        assert boxes.shape == (3, 5, 4)
        step, _ = head.locate(torch.randn(3, DIM), cells, index, valid[index])
        assert step.shape == (3, 4)


def test_pointer_never_points_into_the_padding():
    torch.manual_seed(0)
    head = PointerLocator(DIM, CHANNELS, CANVAS, 16, 2)
    features = torch.randn(1, CHANNELS, GRID, GRID)
    valid = torch.tensor([[64.0, 20.0]])  # rows 0-2 (y < 24) overlap the image, rows 3-7 are padding
    _, logits = head.locate(torch.randn(1, 4, DIM), head.cells(features), torch.zeros(1, dtype=torch.long), valid)
    rows = logits.view(1, 4, GRID, GRID)
    assert torch.isinf(rows[:, :, 3:]).all() and torch.isfinite(rows[:, :, :3]).all()


def test_pointer_learns_to_point_at_the_marked_cell_on_unseen_maps():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    head = PointerLocator(DIM, CHANNELS, CANVAS, 32, 2)
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    hidden = torch.randn(1, 1, DIM).expand(16, -1, -1)  # one question: "where is the marked cell?"
    mask, weight, valid = torch.ones(16, 1, dtype=torch.bool), torch.ones(16), torch.full((16, 2), float(CANVAS))
    index = torch.arange(16)
    for _ in range(300):
        features, _, boxes = _marked_scenes(16, gen)
        pred, logits = head.locate(hidden, head.cells(features), index, valid)
        loss = cell_cross_entropy(logits, boxes[:, None], mask, weight, CANVAS) + \
            0.1 * location_l1(pred, boxes[:, None], mask, weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    features, cells, boxes = _marked_scenes(16, torch.Generator().manual_seed(99))
    with torch.no_grad():
        pred, logits = head.locate(hidden, head.cells(features), index, valid)
    assert (logits[:, 0].argmax(-1) == cells).float().mean() >= 0.9
    error = (box_center(pred[:, 0]) - box_center(boxes)).abs().max(-1).values
    assert (error < CANVAS / GRID / 2).float().mean() >= 0.9  # the center lands in the right cell


def test_pointer_split_between_two_objects_boxes_one_of_them_not_the_space_between():
    head = PointerLocator(DIM, CHANNELS, CANVAS, 16, 2)
    with torch.no_grad():  # logits = 10 x channel 0 of each cell; the MLP adds no offset
        for layer in (head.position, head.feature, head.key, head.query[1], head.mlp[-1]):
            layer.weight.zero_()
            layer.bias.zero_()
        head.feature.weight[0, 0] = 1.0
        head.key.weight.copy_(torch.eye(16))
        head.query[1].bias[0] = 40.0
    features = torch.zeros(1, CHANNELS, GRID, GRID)
    features[0, 0, 1, 1], features[0, 0, 6, 6] = 1.0, 0.98  # two objects, softmax mass ~0.55 / 0.45
    valid = torch.full((1, 2), float(CANVAS))
    boxes, _ = head.locate(torch.randn(1, DIM), head.cells(features), torch.zeros(1, dtype=torch.long), valid)
    cell = CANVAS / GRID
    assert torch.allclose(box_center(boxes[0]), torch.tensor([1.5, 1.5]) * cell, atol=0.05 * cell)


def test_candidates_are_distinct_peaks_best_first_and_the_first_is_locates_box():
    torch.manual_seed(0)
    head = PointerLocator(DIM, CHANNELS, CANVAS, 16, 2)
    features, hidden = torch.randn(2, CHANNELS, GRID, GRID), torch.randn(3, DIM)
    cells, index = head.cells(features), torch.tensor([0, 1, 1])
    valid = torch.tensor([[CANVAS, CANVAS], [CANVAS, CANVAS / 2]]).float()[index]
    boxes, logits = head.candidates(hidden, cells, index, valid, 3)
    assert boxes.shape == (3, 3, 4) and logits.shape == (3, 3)
    located, all_logits = head.locate(hidden, cells, index, valid)
    torch.testing.assert_close(boxes[:, 0], located)
    assert (logits[:, :-1] >= logits[:, 1:]).all()  # best first
    torch.testing.assert_close(logits[:, 0], all_logits.max(-1).values)
    centers = head.cell_centers(GRID)
    peaks = [[int((all_logits[row] == value).nonzero()[0]) for value in logits[row]] for row in range(3)]
    for row in peaks:  # every two peaks at least two cells apart in x or y
        for i in range(3):
            for j in range(i):
                assert (centers[row[i]] - centers[row[j]]).abs().max() >= 2 * CANVAS / GRID
