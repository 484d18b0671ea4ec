"""The tasks API end to end on a tiny random model: the contract, not the quality."""

import numpy as np
import pytest
import torch
from helpers import tiny_model
from PIL import Image

from pixelllm.data import samples
from pixelllm.data.collate import collate
from pixelllm.data.pipeline import ExampleBuilder, TaskConfig
from pixelllm.errors import InputError
from pixelllm.model import Prompts
from pixelllm.results import Caption, Location, Region, Segmentation
from pixelllm.tasks import Predictor
from pixelllm.thresholds import LOCATE_MIN_SCORE

DECODE = {"max_new_tokens": 6}


@pytest.fixture(scope="module")
def predictor():
    model = tiny_model(seed=2)
    model.heads["proposals"].config.score_threshold = 0.0  # a random detector scores everything low
    return Predictor(model)


@pytest.fixture(scope="module")
def photo(real_data):
    return real_data / "photos" / "chelsea.png"


def _inside(box, size):
    w, h = size
    return 0 <= box[0] <= box[2] <= w and 0 <= box[1] <= box[3] <= h


def test_caption_contract(predictor, photo):
    image = predictor.encode(photo)
    assert image.image_size == Image.open(photo).size
    for caption in (image.caption(**DECODE), image.caption(box=[10, 20, 200, 150], **DECODE),
                    image.caption(point=[100, 80], **DECODE), image.caption(prompt="Describe:", **DECODE)):
        assert isinstance(caption, Caption) and isinstance(caption.text, str)
        assert [w.text for w in caption.words] == caption.text.split()
        for word in caption.words:
            assert _inside(word.box, image.image_size)
            assert word.point == pytest.approx([(word.box[0] + word.box[2]) / 2, (word.box[1] + word.box[3]) / 2])
        data = caption.to_dict()
        assert set(data) == {"caption", "words", "image_size"} and data["image_size"] == list(image.image_size)


def test_locate_segment_densecap_contract(predictor, photo):
    image = predictor.encode(photo)
    box = image.locate("the cat")
    assert len(box) == 4 and all(isinstance(v, float) for v in box) and _inside(box, image.image_size)
    segmentation = image.segment("the cat")
    assert isinstance(segmentation, Segmentation)
    w, h = image.image_size
    assert segmentation.mask.shape == (h, w) and segmentation.mask.dtype == bool
    assert segmentation.box == box  # the same reading of the expression
    data = segmentation.to_dict()
    from pycocotools import mask as mask_utils

    decoded = mask_utils.decode({"size": data["mask"]["size"], "counts": data["mask"]["counts"].encode()})
    assert np.array_equal(decoded.astype(bool), segmentation.mask) and data["area"] == segmentation.mask.sum()
    regions = image.dense_caption(max_regions=3, min_score=0.0, **DECODE)
    assert 0 < len(regions) <= 3 and all(isinstance(r, Region) for r in regions)
    assert [r.score for r in regions] == sorted((r.score for r in regions), reverse=True)
    assert all(_inside(r.box, image.image_size) for r in regions)


def test_find_gives_the_located_box_a_score_and_whether_it_is_found(predictor, photo):
    image = predictor.encode(photo)
    found = image.find("the cat")
    assert isinstance(found, Location) and found.box == image.locate("the cat")
    assert 0 < found.score <= 1 and found.found == (found.score >= LOCATE_MIN_SCORE)
    assert image.find("the cat", min_score=0.0).found and not image.find("the cat", min_score=1.0).found
    data = found.to_dict()
    assert set(data) == {"expression", "box", "score", "found", "image_size"} and data["found"] is found.found
    segmentation = image.segment("the cat")
    assert segmentation.score == pytest.approx(found.score, abs=1e-5) and segmentation.found == found.found
    assert {"score", "found", "mask_score"} <= set(segmentation.to_dict())  # mask_score: the decoder's IoU guess


def test_the_score_is_the_expression_read_as_the_caption_of_its_box(predictor, photo):
    """A score is the geometric mean of the expression's token probabilities on the training path
    of a region caption of the box found for it."""
    expression = "the cat on the left"
    found = predictor.encode(photo).find(expression)
    region = samples.Region(tuple(found.box), [expression])
    sample = samples.Sample(photo, "cat", Image.open(photo).size, regions=[region])
    task = TaskConfig("region", predictor.model.config.image_size, prompts=predictor.prompts)
    batch = collate([ExampleBuilder(predictor.tokenizer, task)(sample)], predictor.tokenizer.pad_token_id)
    model = predictor.model
    with torch.no_grad():
        images = model.encode_images(batch["pixel_values"], batch["pixel_mask"])
        prompts = Prompts(batch["prompt_image_index"], batch["prompt_boxes"], batch["prompt_is_point"])
        _, logits = model.language(model.visual_tokens(images, prompts), batch["input_ids"], batch["attention_mask"],
                                   batch["labels"])
    labels = batch["labels"][0]
    words = (labels >= 0) & (labels != model.language.eos_token_id)
    log_probs = logits[0].float().log_softmax(-1)[words].gather(1, labels[words][:, None])
    assert found.score == pytest.approx(float(log_probs.mean().exp()), rel=1e-3)


def test_find_batched_equals_one_by_one(predictor, real_data):
    encoded = [predictor.encode(real_data / "photos" / name) for name in ("chelsea.png", "rocket.jpg")]
    expressions = [["the cat", "the left ear"], ["the rocket"]]
    for image, texts, results in zip(encoded, expressions, predictor.find_batch(encoded, expressions), strict=True):
        for text, batched in zip(texts, results, strict=True):
            assert image.find(text).score == pytest.approx(batched.score, rel=1e-4)


def test_batched_equals_one_by_one(predictor, real_data):
    photos = [real_data / "photos" / name for name in ("chelsea.png", "rocket.jpg", "grace_hopper.jpg")]
    together = predictor.caption_batch(photos, num_beams=1, **DECODE)
    for path, caption in zip(photos, together, strict=True):
        alone = predictor.encode(path).caption(num_beams=1, **DECODE)
        assert alone.text == caption.text
        for a, b in zip(alone.words, caption.words, strict=True):
            assert a.box == pytest.approx(b.box, abs=1e-2)
    image = predictor.encode(photos[0])
    boxes = [[10, 10, 120, 90], [200, 50, 400, 280], [0, 0, 451, 300]]
    regions = image.caption_regions(boxes, **DECODE)
    for box, region in zip(boxes, regions, strict=True):
        assert image.caption(box=box, **DECODE).text == region.text


def test_segment_batch_equals_one_by_one(predictor, real_data):
    encoded = [predictor.encode(real_data / "photos" / name) for name in ("chelsea.png", "rocket.jpg")]
    expressions = [["the cat", "the left ear"], ["the rocket"]]
    together = predictor.segment_batch(encoded, expressions)
    for image, texts, results in zip(encoded, expressions, together, strict=True):
        for text, batched in zip(texts, results, strict=True):
            alone = image.segment(text)
            assert alone.box == pytest.approx(batched.box, abs=1e-2)
            assert alone.score == pytest.approx(batched.score, abs=1e-4)
            assert (alone.mask != batched.mask).mean() < 1e-3  # a few threshold pixels at most


def test_locate_reads_the_box_where_training_puts_it(predictor, photo):
    """The located box is the training path's box at the one token that a referring example trains
    (the expression's last word), for the same image and expression."""
    expression = "the cat on the left"
    region = samples.Region((10.0, 20.0, 200.0, 150.0), [expression])
    sample = samples.Sample(photo, "cat", Image.open(photo).size, regions=[region])
    task = TaskConfig("refer", predictor.model.config.image_size, prompts=predictor.prompts, refer_text_loss=True)
    example = ExampleBuilder(predictor.tokenizer, task)(sample)
    batch = collate([example], predictor.tokenizer.pad_token_id)
    model = predictor.model
    with torch.no_grad():
        images = model.encode_images(batch["pixel_values"], batch["pixel_mask"])
        index = batch["prompt_image_index"]
        visual = model.visual_tokens(images, Prompts(index, batch["prompt_boxes"], batch["prompt_is_point"]))
        hidden, _ = model.language(visual, batch["input_ids"], batch["attention_mask"], batch["labels"])
        boxes = model.capability("token_boxes")(hidden[:, 1:], images, index)[0]
    trained = batch["label_box_mask"][0, :-1].nonzero()[:, 0]
    assert len(trained) == 1  # one located token per referring expression
    encoded = predictor.encode(photo)
    expected = encoded.transform.boxes_to_original(boxes[int(trained[0])].numpy())
    assert encoded.locate(expression) == pytest.approx(expected.tolist(), abs=1e-2)


def test_encode_once_prompt_many(predictor, photo):
    image = predictor.encode(photo)
    features = image.features.features.clone()
    image.caption(**DECODE)
    image.locate("the cat")
    assert torch.equal(features, image.features.features)


@pytest.mark.parametrize("kwargs, message", [
    ({"box": [50, 50, 10, 80]}, "needs x1 > x0"),
    ({"box": [0, 0, 1000, 50]}, r"extends past the right edge of the 451x300 image \(x1 = 1000 > 451\)"),
    ({"box": [0, -3, 50, 50]}, r"past the top edge .*\(y0 = -3 < 0\)"),
    ({"box": [451.5, 0, 452, 50]}, "has no area inside the 451x300 image"),
    ({"box": [0, 0, float("nan"), 5]}, "finite"),
    ({"point": [-5, 10]}, "extends past the left edge"),
    ({"box": [1, 2, 3, 4], "point": [1, 2]}, "not both"),
    ({"prompt": "   "}, "empty prompt"),
])
def test_bad_prompts(predictor, photo, kwargs, message):
    with pytest.raises(InputError, match=message):
        predictor.encode(photo).caption(**kwargs)


def test_a_prompt_up_to_a_pixel_past_the_edge_is_clipped(predictor, photo):
    image = predictor.encode(photo)  # 451 x 300
    edge = image.caption(box=[400, 250, 451, 300], **DECODE)
    assert image.caption(box=[400, 250, 452, 301], **DECODE).text == edge.text
    assert image.caption(point=[451.5, -0.5], **DECODE).text == image.caption(point=[451, 0], **DECODE).text


def test_bad_expressions_and_images(predictor, photo, tmp_path):
    image = predictor.encode(photo)
    with pytest.raises(InputError, match="empty expression"):
        image.locate("")
    with pytest.raises(InputError, match="max_regions"):
        image.dense_caption(max_regions=0)
    for bad in (-0.1, 1.5, float("nan"), "0.5"):
        with pytest.raises(InputError, match="min_score must be a number from 0 to 1"):
            image.find("the cat", min_score=bad)
    with pytest.raises(InputError, match="min_score"):
        image.dense_caption(min_score=2)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(InputError):
        predictor.encode(broken)
