"""The embedded default ships, loads, and does what its model card says it does on scenes it has never
seen (a fresh test split drawn in the test): find the objects and name their colors."""

import numpy as np
import pytest

import pixelllm
from pixelllm.assets import DEFAULT_CHECKPOINT
from pixelllm.data.shapes.vocab import COLORS
from pixelllm.data.sources import open_source
from pixelllm.evaluate.boxes import box_iou


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    from pixelllm.data.synthetic import generate

    path = tmp_path_factory.mktemp("held_out")
    generate(path, 8, seed=7, split="test", workers=1, progress=False)
    return list(open_source("regioncap", path).reader)


@pytest.fixture(scope="module")
def predictor():
    return pixelllm.load()


def test_the_checkpoint_ships_small():
    assert (DEFAULT_CHECKPOINT / "model.safetensors").stat().st_size < 25 * 2**20
    assert {p.name for p in DEFAULT_CHECKPOINT.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}


def test_it_finds_the_objects_of_unseen_scenes(predictor, held_out):
    found = total = 0
    for sample in held_out:
        regions = predictor.encode(sample.image).dense_caption(max_regions=10)
        boxes = np.array([r.box for r in regions]).reshape(-1, 4)
        for region in sample.regions:
            total += 1
            found += bool(len(boxes)) and box_iou(np.array([region.box]), boxes).max() >= 0.5
    assert total >= 20 and found / total >= 0.8  # the model card: detection mAP 94


def test_it_names_the_color_of_a_boxed_object(predictor, held_out):
    right = total = 0
    for sample in held_out:
        captions = predictor.encode(sample.image).caption_regions([r.box for r in sample.regions])
        for region, caption in zip(sample.regions, captions, strict=True):
            color = next(w for w in region.texts[0].split() if w in COLORS)
            total += 1
            right += color in caption.text.split()
    assert total >= 20 and right / total >= 0.8  # the model card: color right 98 % of the time
