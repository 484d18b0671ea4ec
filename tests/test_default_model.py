"""The embedded default ships, loads, and does what its model card says it does on scenes it has never
seen: a fresh test split of the shapes world (find the objects, name their colors and shapes), and
scenes drawn here with plain PIL by other code, with other layouts, sizes and object counts (name a
boxed object, find and segment the object a referring expression names, caption the scene with
each color and shape word on its object)."""

from itertools import combinations

import numpy as np
import pytest
from PIL import Image, ImageDraw

import pixelllm
from pixelllm.assets import DEFAULT_CHECKPOINT
from pixelllm.data.shapes.vocab import COLORS, SHAPES
from pixelllm.data.sources import open_source
from pixelllm.evaluate.boxes import box_iou
from pixelllm.evaluate.shapes import lower_words, mentions


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


def test_it_names_the_color_and_shape_of_a_boxed_object(predictor, held_out):
    right = total = 0
    for sample in held_out:
        captions = predictor.encode(sample.image).caption_regions([r.box for r in sample.regions])
        for region, caption in zip(sample.regions, captions, strict=True):
            named = [w for w in region.texts[0].split() if w in COLORS or w in SHAPES]
            total += 1
            right += set(named) <= set(caption.text.split())
    assert total >= 20 and right / total >= 0.9  # the model card: color and shape right 98 % of the time


def drawn_scene(rng: np.random.Generator) -> tuple[Image.Image, list[tuple[str, str, tuple]]]:
    """A scene drawn by this test, not the project's generator: a flat background, 2 to 7 objects
    (the generator draws at most 6) of any size from 10 to 30 % of the short side (the generator
    draws two size bands), placed anywhere without overlap; each (color, shape) pair once."""
    width, height = (int(v) for v in rng.integers(200, 420, size=2))
    image = Image.new("RGB", (width, height), tuple(int(c) for c in rng.integers(90, 170, size=3)))
    draw = ImageDraw.Draw(image)
    objects: list[tuple[str, str, tuple]] = []
    count = int(rng.integers(2, 8))
    while len(objects) < count:
        side = float(rng.uniform(0.10, 0.30)) * min(width, height)
        x0, y0 = float(rng.uniform(0, width - side)), float(rng.uniform(0, height - side))
        box = (x0, y0, x0 + side, y0 + side)
        color, shape = str(rng.choice(list(COLORS))), str(rng.choice(["circle", "square", "triangle"]))
        apart = all(box[2] < b[0] or b[2] < box[0] or box[3] < b[1] or b[3] < box[1] for _, _, b in objects)
        if not apart or any((color, shape) == (c, s) for c, s, _ in objects):
            continue
        fill = COLORS[color]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([((x0 + box[2]) / 2, y0), (box[2], box[3]), (x0, box[3])], fill=fill)
        objects.append((color, shape, box))
    return image, objects


def located_fraction(predictor, scenes: int, seed: int = 0) -> tuple[int, int]:
    """(found, total): expressions "the {color} {shape}" whose box has IoU >= 0.5 with the object."""
    rng = np.random.default_rng(seed)
    found = total = 0
    for _ in range(scenes):
        image, objects = drawn_scene(rng)
        boxes = predictor.locate_batch([predictor.encode(image)], [[f"the {c} {s}" for c, s, _ in objects]])[0]
        for (_, _, box), predicted in zip(objects, boxes, strict=True):
            total += 1
            found += box_iou(np.array([box]), np.array([predicted]))[0, 0] >= 0.5
    return found, total


def test_it_names_objects_drawn_by_other_code(predictor):
    rng = np.random.default_rng(1)
    right = total = 0
    for _ in range(12):
        image, objects = drawn_scene(rng)
        captions = predictor.encode(image).caption_regions([box for _, _, box in objects])
        for (color, shape, _), caption in zip(objects, captions, strict=True):
            total += 1
            right += {color, shape} <= set(caption.text.split())
    assert total >= 40 and right / total >= 0.9  # measured 99.4 % on 40 scenes; the previous default: 76 %


def test_it_locates_named_objects_in_scenes_drawn_by_other_code(predictor):
    found, total = located_fraction(predictor, scenes=12)
    assert total >= 40 and found / total >= 0.9  # measured 100 % here, 99 % on 40 scenes; the MLP-head model: 1 %


def segmented_iou(predictor, scenes: int, seed: int = 0) -> float:
    """Cumulative IoU (the refseg metric's cIoU) of the masks of "the {color} {shape}" over scenes
    drawn by other code; an object's true mask is its box's pixels of its exact fill color."""
    rng = np.random.default_rng(seed)
    intersection = union = 0
    for _ in range(scenes):
        image, objects = drawn_scene(rng)
        pixels = np.asarray(image)
        masks = predictor.segment_batch([predictor.encode(image)], [[f"the {c} {s}" for c, s, _ in objects]])[0]
        for (color, _, box), segmentation in zip(objects, masks, strict=True):
            truth = (pixels == COLORS[color]).all(-1)
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            inside = np.zeros_like(truth)
            inside[y0:y1 + 1, x0:x1 + 1] = True
            truth &= inside
            intersection += (segmentation.mask & truth).sum()
            union += (segmentation.mask | truth).sum()
    return intersection / union


def test_it_segments_named_objects_in_scenes_drawn_by_other_code(predictor):
    assert segmented_iou(predictor, scenes=12) >= 0.8  # measured 0.95; without the mask refiner 0.58


def grounded_fraction(predictor, scenes: int, seed: int = 0) -> tuple[int, int]:
    """(grounded, total): color and shape words of the traced captions of scenes drawn by other code
    whose point lies in the box of an object of the mention's color and shape (word grounding as the
    model card measures it; sizes are not checked: these scenes draw any size, not two bands)."""
    rng = np.random.default_rng(seed)
    grounded = total = 0
    for _ in range(scenes):
        image, objects = drawn_scene(rng)
        caption = predictor.encode(image).caption()
        words = [(lower_words(w.text) or [""])[0] for w in caption.words]
        for indices, said in mentions(words):
            boxes = [box for color, shape, box in objects
                     if said.get("color", color) == color and said.get("shape", shape) == shape]
            for i in indices:
                x, y = caption.words[i].point
                total += 1
                grounded += any(b[0] <= x <= b[2] and b[1] <= y <= b[3] for b in boxes)
    return grounded, total


def test_its_traced_captions_point_at_what_they_name_in_scenes_drawn_by_other_code(predictor):
    grounded, total = grounded_fraction(predictor, scenes=12)
    # measured 94 % (51 of 54 words), 95 % on 40 other scenes; stop 22's default: 3 of 24
    assert total >= 40 and grounded / total >= 0.85


def test_it_tells_objects_that_are_there_from_colors_and_shapes_that_are_not(predictor):
    """On scenes drawn by other code, "the {color} {shape}" of each object is found, and of a color
    the scene does not have mostly not (docs/model_card.md, "Scores")."""
    rng = np.random.default_rng(2)
    there, absent = [], []
    for _ in range(12):
        image, objects = drawn_scene(rng)
        encoded = predictor.encode(image)
        colors = {color for color, _, _ in objects}
        there += [encoded.find(f"the {color} {shape}").found for color, shape, _ in objects]
        others = [color for color in COLORS if color not in colors][:4]
        absent += [encoded.find(f"the {color} {shape}").found
                   for color, (_, shape, _) in zip(others, objects, strict=False)]
    assert len(there) >= 40 and np.mean(there) >= 0.85  # measured 100 %
    assert len(absent) >= 30 and np.mean(absent) <= 0.3  # measured 10 %; with a color the scene has, 34 %


def test_dense_captions_leave_out_repeats_of_an_object(predictor, held_out):
    """The proposals' NMS keeps a box nested in a larger one around the same object; dense captions
    leave it out when it has the better box's caption."""
    def nested(a, b) -> float:
        inside = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        return inside / max(min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])), 1e-9)

    repeats = {True: 0, False: 0}
    for sample in held_out:
        encoded = predictor.encode(sample.image)
        for deduplicate in repeats:
            regions = predictor.dense_caption_batch([encoded], min_score=0.05, deduplicate=deduplicate)[0]
            repeats[deduplicate] += sum(a.caption == b.caption and nested(a.box, b.box) >= 0.5
                                        for a, b in combinations(regions, 2))
    assert repeats[False] > 0 and repeats[True] == 0
