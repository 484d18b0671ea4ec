"""The shapes world generator: determinism, disjoint splits, and annotations that agree with the
pixels, the vocabulary and each other, read back with the standard tools only.

The checks re-derive everything from the written files (pixels, COCO polygons decoded by
pycocotools, expression words, trace points) instead of trusting the generator's bookkeeping.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from pixelllm.data.shapes.vocab import ASPECT, COLOR_JITTER, COLORS, IMAGE_SIDE, MAX_OBJECTS, SHAPES, SIZES
from pixelllm.data.synthetic import generate, image_id, split_sizes, synth_main
from pixelllm.errors import InputError

SEED = 7
IMAGES = 24



class _BuiltinsOnly(pickle.Unpickler):
    """Refuses every global but a few builtin containers and scalars."""

    ALLOWED = {"list", "dict", "str", "int", "float", "tuple", "set", "bool"}

    def find_class(self, module: str, name: str):
        if module == "builtins" and name in self.ALLOWED:
            return getattr(builtins, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def _refs(world: Path) -> list[dict]:
    return _BuiltinsOnly(io.BytesIO((world / "refcoco" / "refs(unc).p").read_bytes())).load()


def _narratives(world: Path, split: str = "train") -> list[dict]:
    path = world / "localized_narratives" / f"shapes_{split}_localized_narratives.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _xyxy(annotation: dict) -> tuple[float, float, float, float]:
    x, y, w, h = annotation["bbox"]
    return x, y, x + w, y + h


def _file_digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --- determinism and splits --------------------------------------------------------------------


def test_same_seed_gives_identical_files_whatever_the_workers(world: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate(again, IMAGES, SEED, "train", workers=2, progress=False)
    assert _file_digests(again) == _file_digests(world)


def test_splits_and_seeds_share_no_image(world: Path, tmp_path: Path) -> None:
    generate(tmp_path / "test", 8, SEED, "test", workers=1, progress=False)
    generate(tmp_path / "other", 8, SEED + 1, "train", workers=1, progress=False)
    train_ids = {a["image_id"] for a in _refs(world)} | {int(n["image_id"]) for n in _narratives(world)}
    pixels = {hashlib.sha256(p.read_bytes()).digest() for p in (world / "images").iterdir()}
    for other, split in ((tmp_path / "test", "test"), (tmp_path / "other", "train")):
        ids = {int(n["image_id"]) for n in _narratives(other, split)}
        assert not ids & train_ids
        assert not {hashlib.sha256(p.read_bytes()).digest() for p in (other / "images").iterdir()} & pixels
    assert {r["split"] for r in _refs(tmp_path / "test")} == {"test"}
    assert image_id("test", SEED, 0) != image_id("train", SEED, 0) != image_id("train", SEED + 1, 0)


# --- files parse with the standard tools, in the real layouts ------------------------------------


def test_files_parse_in_the_real_layouts(world: Path, coco: COCO, real_data: Path) -> None:
    assert len(coco.getImgIds()) == IMAGES
    real_annotation = json.loads((real_data / "coco" / "coco_annotations_39769.json").read_text())[0]
    for annotation in coco.loadAnns(coco.getAnnIds()):
        assert set(real_annotation) <= set(annotation)
    real_regions = json.loads((real_data / "vg" / "vg_region_descriptions_img1-5.json").read_text())
    real_images = json.loads((real_data / "vg" / "vg_image_data_img1-5.json").read_text())
    regions = json.loads((world / "visual_genome" / "region_descriptions.json").read_text())
    image_data = json.loads((world / "visual_genome" / "image_data.json").read_text())
    assert [set(r) for r in regions] == [set(real_regions[0])] * IMAGES
    assert all(set(region) == set(real_regions[0]["regions"][0]) for r in regions for region in r["regions"])
    assert [set(i) for i in image_data] == [set(real_images[0])] * IMAGES
    ln_keys = {
        "dataset_id",
        "image_id",
        "annotator_id",
        "caption",
        "timed_caption",
        "traces",
        "voice_recording",
    }
    assert all(set(n) == ln_keys for n in _narratives(world))
    refs = _refs(world)
    assert refs and all(
        set(r)
        == {"sent_ids", "file_name", "ann_id", "ref_id", "image_id", "split", "sentences", "category_id"}
        for r in refs
    )
    assert all(r["sent_ids"] == [s["sent_id"] for s in r["sentences"]] for r in refs)
    summary = json.loads((world / "summary.json").read_text())
    assert all((world / path).exists() for path in summary["files"].values())


def test_regions_describe_each_object(world: Path, coco: COCO) -> None:
    regions = json.loads((world / "visual_genome" / "region_descriptions.json").read_text())
    for entry in regions:
        annotations = {a["id"]: a for a in coco.loadAnns(coco.getAnnIds(imgIds=entry["id"]))}
        assert len(entry["regions"]) == len(annotations)
        for region in entry["regions"]:
            annotation = annotations[region["region_id"]]
            shape = coco.loadCats(annotation["category_id"])[0]["name"]
            assert region["phrase"] == f"{annotation['size']} {annotation['color']} {shape}"
            assert [region["x"], region["y"], region["width"], region["height"]] == annotation["bbox"]


# --- the pixels agree with the annotations and the world's ranges --------------------------------


def _ring(mask: np.ndarray) -> np.ndarray:
    """Pixels just outside the mask (4-neighbours)."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown & ~mask


def test_images_are_in_range(world: Path, coco: COCO) -> None:
    for image in coco.loadImgs(coco.getImgIds()):
        picture = Image.open(world / "images" / image["file_name"])
        assert picture.mode == "RGB" and picture.size == (image["width"], image["height"])
        assert IMAGE_SIDE[0] <= min(picture.size) and max(picture.size) <= IMAGE_SIDE[1]
        assert ASPECT[0] <= picture.width / picture.height <= ASPECT[1]
        assert 1 <= len(coco.getAnnIds(imgIds=image["id"])) <= MAX_OBJECTS


def test_masks_cover_their_color_and_boxes_are_tight(world: Path, coco: COCO) -> None:
    for image in coco.loadImgs(coco.getImgIds()):
        pixels = np.asarray(Image.open(world / "images" / image["file_name"])).astype(int)
        for annotation in coco.loadAnns(coco.getAnnIds(imgIds=image["id"])):
            mask = coco.annToMask(annotation).astype(bool)
            distance = np.abs(pixels - np.array(COLORS[annotation["color"]])).max(axis=2)
            assert (distance[mask] <= COLOR_JITTER).mean() >= 0.95
            assert (distance[_ring(mask)] <= COLOR_JITTER).mean() <= 0.1
            rows, columns = np.nonzero(mask)
            tight = [
                columns.min(),
                rows.min(),
                columns.max() + 1 - columns.min(),
                rows.max() + 1 - rows.min(),
            ]
            assert annotation["bbox"] == [float(v) for v in tight]
            assert annotation["area"] == mask.sum()


def test_objects_stay_inside_have_their_size_and_overlap_little(coco: COCO) -> None:
    for image in coco.loadImgs(coco.getImgIds()):
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        short = min(image["width"], image["height"])
        for annotation in annotations:
            x0, y0, x1, y1 = _xyxy(annotation)
            assert 0 <= x0 < x1 <= image["width"] and 0 <= y0 < y1 <= image["height"]
            low, high = SIZES[annotation["size"]]
            assert low <= max(x1 - x0, y1 - y0) / short <= high
        masks = [coco.annToMask(a).astype(bool) for a in annotations]
        for i, a in enumerate(annotations):
            for j in range(i):
                assert not (masks[i] & masks[j]).any()
                b = annotations[j]
                ax0, ay0, ax1, ay1 = _xyxy(a)
                bx0, by0, bx1, by1 = _xyxy(b)
                shared = max(0, min(ax1, bx1) - max(ax0, bx0)) * max(0, min(ay1, by1) - max(ay0, by0))
                assert shared <= 0.2 * min(a["bbox"][2] * a["bbox"][3], b["bbox"][2] * b["bbox"][3])


# --- referring expressions single out their object ---------------------------------------------

_COLOR = "|".join(COLORS)
_SHAPE = "|".join(SHAPES)
_EXPRESSION = re.compile(
    rf"the (?:(?P<size>small|large) )?(?P<color>{_COLOR}) (?P<shape>{_SHAPE})"
    rf"(?: (?P<relation>left of|right of|above|below)"
    rf" the (?P<anchor_color>{_COLOR}) (?P<anchor_shape>{_SHAPE}))?"
)


def _holds(relation: str, a: dict, b: dict) -> bool:
    ax0, ay0, ax1, ay1 = _xyxy(a)
    bx0, by0, bx1, by1 = _xyxy(b)
    return {"left of": ax1 <= bx0, "right of": ax0 >= bx1, "above": ay1 <= by0, "below": ay0 >= by1}[relation]


def _referents(expression: str, annotations: list[dict], shape_of: dict[int, str]) -> list[int]:
    """Ids of the annotations the expression can mean, read from its words alone."""
    parsed = _EXPRESSION.fullmatch(expression)
    assert parsed, expression

    def matches(a: dict, color: str, shape: str, size: str | None = None) -> bool:
        return a["color"] == color and shape_of[a["category_id"]] == shape and size in (None, a["size"])

    found = [a for a in annotations if matches(a, parsed["color"], parsed["shape"], parsed["size"])]
    if parsed["relation"]:
        anchors = [a for a in annotations if matches(a, parsed["anchor_color"], parsed["anchor_shape"])]
        assert len(anchors) == 1, expression
        found = [a for a in found if a is not anchors[0] and _holds(parsed["relation"], a, anchors[0])]
    return [a["id"] for a in found]


def test_every_expression_means_exactly_its_object(world: Path, coco: COCO) -> None:
    shape_of = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    refs = _refs(world)
    forms = set()
    for ref in refs:
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=ref["image_id"]))
        assert ref["category_id"] == coco.loadAnns(ref["ann_id"])[0]["category_id"]
        for sentence in ref["sentences"]:
            assert sentence["tokens"] == sentence["sent"].split()
            assert _referents(sentence["sent"], annotations, shape_of) == [ref["ann_id"]]
            forms.add(len(sentence["tokens"]))
    assert {3, 4} <= forms and forms & {7, 8}, "every expression form should occur"


# --- narratives: the trace is over an object while its words are said -------------------------


def _mentions(words: list[str]) -> list[tuple[int, str | None]]:
    """(index of the color word, size word or None) for each "[size] color shape" in the words;
    fails if a color or shape word appears outside such a mention."""
    found = []
    for i, word in enumerate(words):
        if word in COLORS:
            assert i + 1 < len(words) and words[i + 1] in SHAPES, words
            found.append((i, words[i - 1] if i and words[i - 1] in SIZES else None))
        elif word in SHAPES:
            assert i and words[i - 1] in COLORS, words
    return found


def _share_inside(points: np.ndarray, box: tuple[float, float, float, float]) -> float:
    x0, y0, x1, y1 = box
    inside = (points[:, 0] >= x0) & (points[:, 0] <= x1) & (points[:, 1] >= y0) & (points[:, 1] <= y1)
    return float(inside.mean())


def test_trace_is_over_each_object_while_its_words_are_said(world: Path, coco: COCO) -> None:
    shape_of = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    for narrative in _narratives(world):
        image = coco.loadImgs(int(narrative["image_id"]))[0]
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        points = np.array(
            [
                [p["x"] * image["width"], p["y"] * image["height"], p["t"]]
                for segment in narrative["traces"]
                for p in segment
            ]
        )
        timed = narrative["timed_caption"]
        words = [u["utterance"].lower() for u in timed]
        mentioned = set()
        for i, size in _mentions(words):
            candidates = [
                a
                for a in annotations
                if a["color"] == words[i]
                and shape_of[a["category_id"]] == words[i + 1]
                and size in (None, a["size"])
            ]
            windows = []
            for u in timed[i : i + 2]:
                during = points[(points[:, 2] >= u["start_time"]) & (points[:, 2] <= u["end_time"])]
                assert len(during) >= 2
                windows.append(during[:, :2])
            over = [a for a in candidates if all(_share_inside(w, _xyxy(a)) >= 0.8 for w in windows)]
            assert over, (narrative["caption"], words[i : i + 2])
            mask = coco.annToMask(over[0]).astype(bool)
            on_mask = [mask[w[:, 1].astype(int), w[:, 0].astype(int)].mean() for w in windows]
            assert min(on_mask) >= 0.8, "the mouse should be over the shape itself, not only its box"
            mentioned.add((words[i], words[i + 1]))
        assert mentioned == {(a["color"], shape_of[a["category_id"]]) for a in annotations}


def test_narrative_text_times_and_trace_are_consistent(world: Path) -> None:
    for narrative in _narratives(world):
        timed = narrative["timed_caption"]
        assert " ".join(u["utterance"] for u in timed) == re.sub(r"[.,]", "", narrative["caption"])
        starts = [u["start_time"] for u in timed]
        assert all(u["start_time"] < u["end_time"] for u in timed) and starts == sorted(starts)
        points = [p for segment in narrative["traces"] for p in segment]
        assert all(segment for segment in narrative["traces"]) and len(points) > 1
        times = [p["t"] for p in points]
        assert times == sorted(times) and times[0] <= starts[0] and times[-1] >= timed[-1]["end_time"]
        assert all(0 <= p["x"] <= 1 and 0 <= p["y"] <= 1 for p in points)


# --- arguments and the CLI entry point -----------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_images": 0}, "number of images"),
        ({"num_images": -3}, "number of images"),
        ({"seed": -1}, "seed"),
        ({"split": "testA"}, "split"),
        ({"workers": 0}, "workers"),
    ],
)
def test_bad_arguments_raise_input_error(tmp_path: Path, kwargs: dict, message: str) -> None:
    arguments = {"out_dir": tmp_path, "num_images": 1, "seed": 0, **kwargs}
    with pytest.raises(InputError, match=message):
        generate(**arguments, progress=False)


def test_unwritable_output_directory_raises_input_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(InputError, match="cannot write") as raised:
        generate(blocker / "out", 1, 0, progress=False)
    assert "\n" not in str(raised.value)


def test_synth_main_writes_every_split(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert split_sizes(10) == {"train": 8, "val": 1, "test": 1}
    assert split_sizes(3) == {"train": 3}
    synth_main(str(tmp_path), 10, 3, workers=1)
    for split, count in split_sizes(10).items():
        assert len(list((tmp_path / split / "images").iterdir())) == count
        assert {r["split"] for r in _refs(tmp_path / split)} <= {split}
    assert len(capsys.readouterr().out.strip().splitlines()) == 3
    with pytest.raises(InputError, match="--images"):
        synth_main(str(tmp_path), 0, 3)
