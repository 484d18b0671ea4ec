"""The codebook head (PixelLM on the trunk): groups gathered in order, the mask loss reaching the
codebook rows, the projection and the LM, the refinement weights, fixed fusion, decoding that never
leaves a group incomplete (cached = uncached, batched = one by one), and a small overfit on
shapes-world MUSE questions. The head is named by its class (no line of the trunk knows it)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import CODEBOOK_HEAD as CODEBOOK
from helpers import codebook_model as _model
from PIL import Image

from pixelllm.data.coco import decode_segmentation
from pixelllm.data.collate import collate
from pixelllm.data.muse import MuseReader
from pixelllm.data.pipeline import ExampleBuilder, TaskConfig
from pixelllm.data.samples import Question, Region, Sample
from pixelllm.data.synthetic import draw_image
from pixelllm.data.targets import answer_text
from pixelllm.generation import generate
from pixelllm.model import PixelLLM
from pixelllm.model.decoding import DecodeHook
from pixelllm.model.heads.codebook import group_starts, mask_terms
from pixelllm.tasks import Predictor
from pixelllm.train import codebook_format

LM_WEIGHTS = {"t5": ("encoder.block.0.layer.0.SelfAttention.v.weight", "decoder.block.0.layer.0.SelfAttention.q.weight",
                     "decoder.block.1.layer.1.EncDecAttention.v.weight"),
              "llama": ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight")}


def _samples(tmp_path, indices):
    """Shapes-world images as a MUSE file, read back by ``MuseReader``."""
    entries = []
    for index in indices:
        pixels, records = draw_image("train", 0, index)
        Image.fromarray(pixels).save(tmp_path / records["muse"]["file_name"])
        entries.append(records["muse"])
    (tmp_path / "muse.json").write_text(json.dumps(entries))
    return list(MuseReader(tmp_path / "muse.json", tmp_path))


def _batch(model, samples):
    """The training batch of the task muse on ``samples`` (no augmentation)."""
    task = TaskConfig("muse", model.config.image_size, codebook=codebook_format(model.config))
    builder = ExampleBuilder(model.tokenizer, task)
    return collate([builder(s) for s in samples], model.tokenizer.pad_token_id)


def _segment_all(model, samples, **decoding):
    """Every question of ``samples`` answered through the Predictor, in one batch."""
    predictor = Predictor(model)
    encoded = [predictor.encode(sample.image) for sample in samples for _ in sample.questions]
    return predictor.segment_all_batch(encoded, [q.text for s in samples for q in s.questions], **decoding)


def test_answers_carry_a_whole_group_after_each_target_and_labels_gather_in_order(tmp_path):
    model = _model()
    head = model.heads["codebook"]
    ids = head.token_ids(model)
    assert head.special_tokens(head.config) == [f"[SEG{i}]" for i in range(6)] and len(set(ids)) == 6
    written = answer_text(Question("q", "a red circle {seg} and a star {seg}.", []), "<G>")
    assert written == "a red circle<G> and a star<G>."
    assert answer_text(Question("q", None, [Region((0, 0, 1, 1), ["red circle"]), Region((0, 0, 1, 1), ["star"])]),
                       "<G>") == "red circle<G> and star<G>."
    batch = _batch(model, _samples(tmp_path, [1]))
    rows, starts = group_starts(batch["labels"], ids)
    assert torch.equal(rows, batch["seg_prompt_index"]) and len(rows) == sum(len(q.targets) for q in
                                                                             _samples(tmp_path, [1])[0].questions)
    for row, start in zip(rows.tolist(), starts.tolist(), strict=True):
        assert batch["labels"][row, start : start + 6].tolist() == ids
    hidden = torch.randn(*batch["labels"].shape, 7)
    states = hidden[rows[:, None], starts[:, None] + torch.arange(6)]
    assert states.shape == (len(rows), 6, 7) and torch.equal(states[0, 0], hidden[rows[0], starts[0]])


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_the_mask_loss_reaches_the_codebook_rows_the_projection_and_the_lm(tmp_path, family):
    model = _model(family=family)
    batch = _batch(model, _samples(tmp_path, [1]))
    out = model(batch)
    (2.0 * out.losses["codebook_bce"] + 0.5 * out.losses["codebook_dice"]).backward()
    head = model.heads["codebook"]
    ids = head.token_ids(model)
    embedding = model.language.model.get_input_embeddings().weight.grad
    # the states of tokens 1..5 read tokens 0..4, and a later target's states read the groups before it
    assert (embedding[ids].abs().sum(1) > 0).all()
    checked = [(name, p) for name, p in [*head.named_parameters(), *model.language.named_parameters()]
               if name.startswith(("projection", "token_weights", "decoder.scale_weights"))
               or name.endswith(LM_WEIGHTS[family])]
    assert len(checked) == 4 + 2 + len(LM_WEIGHTS[family])  # projection (2 linears), fusion, scales, the LM
    for name, parameter in checked:
        assert parameter.grad is not None and float(parameter.grad.abs().sum()) > 0, name


def test_fixed_fusion_weights_are_buffers_and_a_question_without_target_trains_on_its_text():
    model = _model(fusion_learnable=False)
    head = model.heads["codebook"]
    names = {name for name, _ in head.named_parameters()}
    assert "token_weights" not in names and "decoder.scale_weights" not in names
    assert torch.equal(head.token_weights, torch.full((2, 3), 1 / 3)) and "token_weights" in head.state_dict()
    blank = Sample(np.zeros((60, 80, 3), dtype=np.uint8), "blank", source="muse",
                   questions=[Question("all the purple objects", "there are no purple objects.", [])])
    batch = _batch(model, [blank])
    assert batch["seg_masks"].shape == (0, 160, 160)
    out = model(batch)
    assert set(out.losses) == {"text", "codebook_text"} and float(out.losses["codebook_text"].detach()) > 0
    out.loss.backward()
    assert model(batch, all_heads=True).loss.requires_grad


def test_the_refinement_term_weighs_pixels_claimed_by_two_masks_of_one_question():
    logits = torch.full((3, 4, 4), -5.0)
    logits[0, :2] = logits[1, 1:3] = 5.0  # masks 0 and 1 (question 0) both claim row 1
    logits[2, 1] = 5.0  # question 1: row 1 too, but alone in its question
    targets = torch.zeros(3, 4, 4, dtype=torch.bool)
    valid = torch.ones(3, 4, 4, dtype=torch.bool)
    terms = mask_terms(logits, targets, valid, torch.tensor([0, 0, 1]))
    bce_on = torch.nn.functional.softplus(torch.tensor(5.0))  # BCE of a claimed pixel against 0
    torch.testing.assert_close(terms["refine"], bce_on * 4 / 16 * 2 / 3)
    assert float(terms["bce"]) > float(terms["refine"]) > 0


class _PushCodebook(DecodeHook):
    """Pushes every codebook token far up, in a different order per row, at every step."""

    def __init__(self, ids):
        self.ids = torch.tensor(ids)

    def constrain(self, logits, history, rows):
        gen = torch.Generator().manual_seed(history.shape[1])
        push = torch.rand(len(logits), len(self.ids), generator=gen) * 50 + 50
        return logits.index_add(1, self.ids, push)


def _check_groups(sequence, ids):
    i = 0
    while i < len(sequence):
        if sequence[i] in ids:
            assert sequence[i : i + len(ids)] == ids, sequence
            i += len(ids)
        else:
            i += 1


def test_a_started_group_is_always_completed():
    model = _model(seed=3).eval()
    head = model.heads["codebook"]
    ids = head.token_ids(model)
    n, size = 12, model.config.image_size
    pixels = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, size, size, dtype=torch.bool)
    images = model.encode_images(pixels, mask)
    answers = head.codebook_answers(model, [f"question {i}" for i in range(n)])
    ids_in = [model.tokenizer(p)["input_ids"] for p in answers.prompts]
    input_ids = torch.tensor([row + [0] * (max(map(len, ids_in)) - len(row)) for row in ids_in])
    attention_mask = (torch.arange(input_ids.shape[1]) < torch.tensor([len(r) for r in ids_in])[:, None]).long()
    index = torch.arange(n) % 2
    boxes = torch.tensor([[0.0, 0, size, size]]).expand(n, 4)
    for max_new in (9, 20):
        head.config.max_new_tokens = max_new
        hooks = [*head.codebook_answers(model, ["q"]).hooks, _PushCodebook(ids)]
        out = generate(model, images, index, boxes, torch.zeros(n, dtype=torch.bool), input_ids, attention_mask,
                       max_new_tokens=max_new, hooks=hooks)
        assert all(len(s) <= max_new for s in out.sequences)
        assert sum(s.count(ids[0]) for s in out.sequences) >= n  # groups were started in every row
        for sequence in out.sequences:
            _check_groups(sequence, ids)
    head.config.max_new_tokens = 96


@pytest.fixture(scope="module")
def overfit(tmp_path_factory):
    """The tiny preset trained on the questions of two shapes-world images (~25 s on one core)."""
    samples = _samples(tmp_path_factory.mktemp("muse"), [1, 2])
    model = _model()
    batch = _batch(model, samples)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(80):
        out = model(batch)
        first = first or {k: float(v.detach()) for k, v in out.losses.items()}
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    last = {k: float(v.detach()) for k, v in model(batch).losses.items()}
    return model.eval(), samples, batch, first, last


def test_a_few_shapes_world_images_overfit(overfit):
    model, samples, batch, first, last = overfit
    assert last["codebook_text"] < 0.05 * first["codebook_text"], (first, last)
    assert last["codebook_dice"] < 0.75 * first["codebook_dice"], (first, last)
    questions = [q for s in samples for q in s.questions]
    found = _segment_all(model, samples)
    assert [len(f) for f in found] == [len(q.targets) for q in questions]
    ious = []
    for sample, segments, question in zip([s for s in samples for _ in s.questions], found, questions, strict=True):
        width, height = sample.image_size
        for segment, target in zip(segments, question.targets, strict=True):
            truth = decode_segmentation(target.segmentation, height, width)
            ious.append((segment.mask & truth).sum() / (segment.mask | truth).sum())
            assert segment.mask.shape == (height, width) and 0 <= segment.score <= 1
            if segment.mask.any():
                ys, xs = np.nonzero(segment.mask)
                assert segment.box == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert np.mean(ious) > 0.3, ious


def test_segments_cached_equal_uncached_and_batched_equal_one_by_one(overfit):
    model, samples, batch, _, _ = overfit
    predictor = Predictor(model)
    encoded = [predictor.encode(sample.image) for sample in samples for _ in sample.questions]
    questions = [q.text for s in samples for q in s.questions]
    cached = predictor.segment_all_batch(encoded, questions)
    uncached = predictor.segment_all_batch(encoded, questions, use_cache=False)
    alone = [encoded[i].segment_all(questions[i]) for i in range(len(questions))]
    for other in (uncached, alone):
        assert [len(r) for r in other] == [len(r) for r in cached]
        for row, other_row in zip(cached, other, strict=True):
            for a, b in zip(row, other_row, strict=True):
                assert (a.mask != b.mask).mean() < 1e-3 and abs(a.score - b.score) < 1e-3


def test_the_head_saves_and_reloads_by_its_class_path(overfit, tmp_path):
    model, samples, batch, _, _ = overfit
    model.save_pretrained(tmp_path)
    loaded = PixelLLM.from_pretrained(tmp_path).eval()
    assert loaded.config.heads["codebook"]["class"] == CODEBOOK and loaded.heads["codebook"].token_ids(loaded) == \
        model.heads["codebook"].token_ids(model)
    found = [_segment_all(m, samples) for m in (model, loaded)]
    saved, reloaded = ([[(s.box, s.score) for s in row] for row in rows] for rows in found)
    assert saved == reloaded


def test_the_muse_evaluation_runs_on_the_trained_head(overfit):
    from pathlib import Path

    from pixelllm.evaluate.runner import evaluate

    model, samples, _, _, _ = overfit
    folder = Path(samples[0].image).parent
    result = evaluate(Predictor(model), "muse", folder / "muse.json", images=folder, progress=False)
    questions = sum(len(s.questions) for s in samples)
    assert result.num_samples == questions and result.metrics["count_accuracy"] == 100.0  # as the overfit test
    assert 30 < result.metrics["gIoU"] <= 100 and 0 < result.metrics["gIoU_official"] <= 100
