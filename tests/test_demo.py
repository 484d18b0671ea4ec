"""The demo: bundled samples, and what it writes (pictures, results.json, index.html)."""

import html
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from pixelllm.assets import SHAPES_WORLD
from pixelllm.data.words import Word
from pixelllm.demo import OUTSIDE_WORLD, TITLES, Sample, bundled_samples, run_demo
from pixelllm.errors import InputError
from pixelllm.results import Caption, Location, Region, Segmentation
from pixelllm.tasks import Predictor
from pixelllm.viz import picture_scale
from tests.helpers import tiny_model

CAPTION_KEYS = {"caption", "words", "image_size"}
INTERFACE_KEYS = {
    "caption": CAPTION_KEYS,
    "region_caption": CAPTION_KEYS | {"box"},
    "locate": {"expression", "box", "score", "found", "image_size"},
    "segment": {"expression", "box", "mask", "area", "score", "found", "mask_score", "image_size"},
    "densecap": {"regions", "image_size"},
}
SHAPES_WORDS = {"red", "green", "blue", "yellow", "purple", "orange", "white", "black",
                "circle", "square", "triangle", "diamond", "star", "hexagon"}


def links(page: str) -> list[str]:
    return re.findall(r'(?:src|href)="?([^"\s>]+)', page)


def test_bundled_samples_are_small_and_ask_about_what_is_in_them():
    samples = bundled_samples()
    assert len(samples) == 4 and len({s.name for s in samples}) == 4
    assert sum(s.path.suffix == ".png" for s in samples) == 3  # shapes scenes, and one photo
    for sample in samples:
        with Image.open(sample.path) as image:
            width, height = image.size
        x0, y0, x1, y1 = sample.region
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert set(sample.expression.split()) & SHAPES_WORDS  # within the default model's vocabulary
        if sample.path.suffix == ".png":
            assert sample.path.stat().st_size < 60_000
    assert (samples[0].path.parent / "README.md").is_file()  # attribution


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    """The demo of a random tiny model on one bundled sample (its outputs are random but well formed)."""
    out = tmp_path_factory.mktemp("demo") / "nested" / "out"
    results = run_demo(Predictor(tiny_model()), out, images=bundled_samples()[:1], progress=False,
                       decoding={"max_new_tokens": 4}, max_regions=2)
    return out, results


def test_results_json_holds_every_task_in_its_interface_form(tiny_demo):
    out, results = tiny_demo
    saved = json.loads((out / "results.json").read_text())
    assert saved == results
    (entry,) = saved["samples"]
    width, height = entry["caption"]["image_size"]
    for task, keys in INTERFACE_KEYS.items():
        assert keys <= set(entry[task]), task
    for word in entry["caption"]["words"] + entry["region_caption"]["words"]:
        assert set(word) == {"text", "box", "point"}
    rle = entry["segment"]["mask"]
    decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    assert decoded.shape == (height, width) and decoded.sum() == entry["segment"]["area"]
    for region in entry["densecap"]["regions"]:
        assert set(region) == {"box", "score", "caption"}


def test_every_task_has_a_picture_of_the_image_and_the_page_links_only_existing_files(tiny_demo):
    out, results = tiny_demo
    (entry,) = results["samples"]
    assert set(entry["pictures"]) == set(INTERFACE_KEYS) == set(TITLES)
    size = entry["caption"]["image_size"]
    for picture in entry["pictures"].values():
        with Image.open(out / picture) as image:
            assert image.format == "PNG" and image.width == round(size[0] * picture_scale(size))
    page = (out / "index.html").read_text()
    targets = links(page)
    assert set(entry["pictures"].values()) | {"results.json"} == set(targets)
    assert all((out / target).is_file() for target in targets)
    assert "<script" not in page and "<style>" in page


class FakeImage:
    """An encoded image whose every answer holds text that HTML must escape."""

    image_size = (64, 48)
    text = "a <b>bold</b> & \"quoted\" caption"

    def caption(self, box=None, **decoding):
        words = [Word(t, [0, 0, 10, 10], [5, 5], []) for t in self.text.split()]
        return Caption(self.text, words, self.image_size)

    def find(self, expression, **decoding):
        return Location(expression, [1.0, 2.0, 30.0, 40.0], 0.5, True, self.image_size)

    def segment(self, expression, **decoding):
        mask = np.zeros((48, 64), dtype=bool)
        mask[10:20, 10:30] = True
        return Segmentation(expression, [10.0, 10.0, 30.0, 20.0], mask, self.image_size)

    def dense_caption(self, max_regions=None, **decoding):
        return [Region([0.0, 0.0, 20.0, 20.0], 0.5, self.text)]


class FakePredictor:
    def __init__(self, embedded=False):
        self.embedded = embedded

    def encode(self, image):
        return FakeImage()


@pytest.fixture
def fake_sample(tmp_path) -> Sample:
    path = tmp_path / "in.png"
    Image.new("RGB", (64, 48), (90, 120, 150)).save(path)
    return Sample("x<y", path, "the <red> circle", (0, 0, 32, 24))


def test_the_page_escapes_every_text(tmp_path, fake_sample):
    run_demo(FakePredictor(), tmp_path / "out", images=[fake_sample], progress=False)
    page = (tmp_path / "out" / "index.html").read_text()
    assert "<b>" not in page and "<red>" not in page and "x<y" not in page
    assert "&lt;b&gt;bold&lt;/b&gt;" in page and "&lt;red&gt;" in page and "&amp;" in page


def test_with_the_embedded_model_the_page_says_what_it_knows_and_marks_photos(tmp_path, fake_sample):
    noise = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)  # nothing like the shapes world
    Image.fromarray(noise).save(tmp_path / "photo.png")
    photo = Sample("photo", tmp_path / "photo.png", "the cat", (0, 0, 32, 24))
    results = run_demo(FakePredictor(embedded=True), tmp_path / "out", images=[fake_sample, photo], progress=False)
    page = (tmp_path / "out" / "index.html").read_text()
    assert html.escape(SHAPES_WORLD) in page and html.escape(OUTSIDE_WORLD) in page
    assert results["embedded"] and "note" not in results["samples"][0] and results["samples"][1]["note"]
    run_demo(FakePredictor(embedded=False), tmp_path / "other", images=[photo], progress=False)
    assert "shapes world" not in (tmp_path / "other" / "index.html").read_text()


def test_the_page_shows_pictures_at_their_own_size_at_most():
    from pixelllm.demo import PAGE_STYLE

    rule = re.search(r"figure img \{([^}]*)\}", PAGE_STYLE).group(1)
    assert "width: 100%" not in rule.replace("max-width", "")  # never stretched past the picture's pixels


def test_progress_is_shown_on_stderr_unless_turned_off(tmp_path, fake_sample, capsys):
    run_demo(FakePredictor(), tmp_path / "a", images=[fake_sample])
    assert "demo" in capsys.readouterr().err
    run_demo(FakePredictor(), tmp_path / "b", images=[fake_sample], progress=False)
    assert capsys.readouterr().err == ""


def test_an_output_path_that_is_a_file_is_a_one_line_input_error(tmp_path, fake_sample):
    (tmp_path / "taken").write_text("")
    with pytest.raises(InputError, match="cannot create output directory .*taken"):
        run_demo(FakePredictor(), Path(tmp_path / "taken"), images=[fake_sample], progress=False)
