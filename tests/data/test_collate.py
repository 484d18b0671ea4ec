"""The collated batch has exactly the contract's keys, dtypes and shapes (docs/architecture.md)."""

import json

import numpy as np
import pytest
import torch

from pixelllm.data.collate import collate
from pixelllm.data.pipeline import ExampleBuilder, TaskConfig
from pixelllm.data.samples import Narrative, Region, Sample, Utterance
from pixelllm.tokenization import encode_prompt, encode_target, train_tokenizer

CAT_LEFT = (17.5, 54.38, 318.75, 469.38)
CAT_RIGHT = (347.5, 25.63, 640.0, 369.38)
S = 64


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(
        [
            "where is the cat on the left",
            "an object of a cat on the right",
            "A long image caption: two cats sleep on a couch.",
        ],
        vocab_size=300,
    )


@pytest.fixture(scope="module")
def samples(real_data):
    anns = {a["id"]: a for a in json.loads((real_data / "coco" / "coco_annotations_39769.json").read_text())}
    image = real_data / "coco" / "000000039769.png"
    regions = [
        Region(CAT_LEFT, ["cat on the left"], anns[2190839]["segmentation"], 17, "L"),
        Region(CAT_RIGHT, ["cat on the right", "right cat"], anns[2190842]["segmentation"], 17, "R"),
    ]
    cats = Sample(image, "39769", (640, 480), "coco", regions=regions)
    trace = Narrative(
        "two cats sleep on a couch.",
        [Utterance("two cats", 0, 1), Utterance("sleep on a couch", 1, 2)],
        np.array([[0.1, 0.2, 0.0], [0.5, 0.2, 1.0], [0.5, 0.6, 2.0]]),
    )
    narrated = Sample(image, "39769", (640, 480), "ln", narratives=[trace])
    return cats, narrated


def examples(tokenizer, sample, task):
    return ExampleBuilder(tokenizer, TaskConfig(task, S))(sample)


def test_contract_keys_dtypes_shapes(tokenizer, samples):
    cats, narrated = samples
    refer, trace = examples(tokenizer, cats, "refer"), examples(tokenizer, narrated, "trace")
    batch = collate([refer, None, trace], pad_token_id=tokenizer.pad_token_id)
    n_prompts = 3 + 1
    lp = max(
        len(encode_prompt(tokenizer, t))
        for t in [
            "where is cat on the left",
            "where is cat on the right",
            "where is right cat",
            "A long image caption:",
        ]
    )
    lt = max(
        len(encode_target(tokenizer, t).ids)
        for t in ["cat on the left", "cat on the right", "right cat", "two cats sleep on a couch."]
    )
    expected = {
        "pixel_values": (torch.float32, (2, 3, S, S)),
        "pixel_mask": (torch.bool, (2, S, S)),
        "prompt_image_index": (torch.long, (n_prompts,)),
        "prompt_boxes": (torch.float32, (n_prompts, 4)),
        "prompt_is_point": (torch.bool, (n_prompts,)),
        "input_ids": (torch.long, (n_prompts, lp)),
        "attention_mask": (torch.long, (n_prompts, lp)),
        "labels": (torch.long, (n_prompts, lt)),
        "label_boxes": (torch.float32, (n_prompts, lt, 4)),
        "label_box_mask": (torch.bool, (n_prompts, lt)),
        "caption_weight": (torch.float32, (n_prompts,)),
        "location_weight": (torch.float32, (n_prompts,)),
        "prompt_scene": (torch.bool, (n_prompts,)),
    }
    assert set(batch) == set(expected) | {"meta"}
    for key, (dtype, shape) in expected.items():
        assert batch[key].dtype == dtype and tuple(batch[key].shape) == shape, key
    assert batch["prompt_image_index"].tolist() == [0, 0, 0, 1]
    assert batch["prompt_scene"].tolist() == [False, False, False, True]  # the whole-image caption
    assert batch["caption_weight"].tolist() == [0, 0, 0, 1] and batch["location_weight"].tolist() == [
        1,
        1,
        1,
        1,
    ]
    # padding: prompts with the pad id and attention 0, labels with -100 and no box target
    ids = encode_prompt(tokenizer, "where is right cat")
    assert batch["input_ids"][2, : len(ids)].tolist() == ids
    assert batch["attention_mask"][2].sum() == len(ids)
    assert (batch["input_ids"][2, len(ids) :] == tokenizer.pad_token_id).all()
    target = encode_target(tokenizer, "right cat").ids
    assert (
        batch["labels"][2, : len(target)].tolist() == target
        and (batch["labels"][2, len(target) :] == -100).all()
    )
    assert batch["label_box_mask"][2].tolist() == [j == len(target) - 2 for j in range(lt)]
    scale = S / 640  # long side 640 -> 64
    np.testing.assert_allclose(
        batch["label_boxes"][2, len(target) - 2].numpy(), np.array(CAT_RIGHT) * scale, rtol=1e-6
    )
    np.testing.assert_allclose(batch["prompt_boxes"][0].numpy(), [0, 0, 64, 48])
    # the trace prompt: every caption token has a box, EOS does not
    caption_len = len(encode_target(tokenizer, "two cats sleep on a couch.").ids)
    assert batch["label_box_mask"][3].tolist() == [j < caption_len - 1 for j in range(lt)]
    meta = batch["meta"]
    assert [m["source"] for m in meta] == ["coco", "ln"]
    assert meta[0]["original_size"] == (640, 480) and meta[0]["scale"] == pytest.approx(scale)
    assert meta[0]["prompts"][0] == {
        "task": "refer",
        "text": "cat on the left",
        "region_id": "L",
        "target_box": list(CAT_LEFT),
    }
    assert meta[1]["prompts"][0]["target_box"] is None


def test_optional_mask_and_detection_keys(tokenizer, samples):
    cats, _ = samples
    batch = collate([examples(tokenizer, cats, "refseg"), examples(tokenizer, cats, "refer")])
    assert batch["gt_masks"].dtype == torch.bool and tuple(batch["gt_masks"].shape) == (6, S, S)
    assert batch["mask_weight"].tolist() == [1, 1, 1, 0, 0, 0]
    assert batch["gt_masks"][:3].flatten(1).any(1).all() and not batch["gt_masks"][3:].any()
    assert not (batch["gt_masks"][0] & ~batch["pixel_mask"][0]).any()
    assert "gt_boxes" not in batch
    batch = collate([examples(tokenizer, cats, "densecap"), examples(tokenizer, cats, "region")])
    assert tuple(batch["gt_boxes"].shape) == (2, 2, 4) and batch["gt_boxes"].dtype == torch.float32
    assert batch["gt_boxes_mask"].tolist() == [[True, True], [False, False]]
    assert batch["detection_weight"].tolist() == [1, 0]
    np.testing.assert_allclose(
        batch["gt_boxes"][0].numpy(), np.array([CAT_LEFT, CAT_RIGHT]) * S / 640, rtol=1e-6
    )
    assert "gt_masks" not in batch


def test_nothing_to_collate():
    assert collate([None, None]) is None
