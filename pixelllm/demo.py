"""``pixelllm demo``: every task on the bundled sample images, as pictures, JSON and one web page.

    results = run_demo(pixelllm.load(), "demo-out")

writes into ``demo-out/`` one PNG per task per image (``{sample}_{task}.png``), ``results.json``
(each task's result in its ``--json`` form of INTERFACE.md) and ``index.html``, a self-contained
page with each picture beside its text (relative links, inline CSS, no scripts). With the embedded
model, the page says first that it knows only the shapes world, and marks each sample that does
not look like it.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from tqdm import tqdm

from pixelllm.assets import SAMPLES, SHAPES_WORLD
from pixelllm.data.images import load_image
from pixelllm.data.shapes.likeness import looks_like_shapes_world
from pixelllm.errors import InputError
from pixelllm.results import dense_captions_json, rounded
from pixelllm.viz import (
    draw_caption,
    draw_location,
    draw_regions,
    draw_segmentation,
    palette,
    save_picture,
    write_atomically,
)

TITLES = {"caption": "Caption with a trace", "region_caption": "Caption of a region",
          "locate": "Referring localization", "segment": "Referring segmentation", "densecap": "Dense captions"}
MAX_REGIONS = 8
OUTSIDE_WORLD = "This image does not look like the shapes world: the embedded model's answers on it are not meaningful."


@dataclass(frozen=True)
class Sample:
    """An image for the demo, the expression to locate in it and a region ``[x0, y0, x1, y1]`` to caption."""

    name: str
    path: Path
    expression: str
    region: tuple[float, float, float, float]


def bundled_samples() -> list[Sample]:
    """The sample images that ship in ``pixelllm/assets/samples`` (listed in its ``samples.json``)."""
    entries = json.loads((SAMPLES / "samples.json").read_text(encoding="utf-8"))
    return [Sample(e["name"], SAMPLES / e["file"], e["expression"], tuple(e["region"])) for e in entries]


def run_demo(predictor, out_dir: str | os.PathLike, images: Sequence[Sample] | None = None, progress: bool = True,
             decoding: dict | None = None, max_regions: int = MAX_REGIONS) -> dict:
    """Run every task on each sample (default: the bundled ones) and write pictures, ``results.json``
    and ``index.html`` into ``out_dir`` (created if needed). ``decoding`` options (such as
    ``max_new_tokens``) go to every task. Returns what ``results.json`` holds."""
    out = _output_dir(out_dir)
    samples = bundled_samples() if images is None else list(images)
    options = _Options(decoding or {}, max_regions)
    results = {"embedded": predictor.embedded, "samples": []}
    with tqdm(total=len(samples) * len(TASKS), desc="demo", unit="task", disable=not progress) as bar:
        for sample in samples:
            image = load_image(sample.path)
            encoded = predictor.encode(image)
            entry = {"name": sample.name, "image": sample.path.name, "pictures": {}}
            if predictor.embedded and not looks_like_shapes_world(image):
                entry["note"] = OUTSIDE_WORLD
            for task, run in TASKS.items():
                bar.set_postfix_str(f"{sample.name}: {task}")
                entry[task], picture = run(encoded, image, sample, options)
                entry["pictures"][task] = save_picture(picture, out / f"{sample.name}_{task}.png").name
                bar.update()
            results["samples"].append(entry)
    write_atomically(out / "results.json", json.dumps(results, indent=1).encode("utf-8"))
    write_atomically(out / "index.html", render_page(results).encode("utf-8"))
    return results


def _output_dir(out_dir: str | os.PathLike) -> Path:
    path = Path(out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create output directory {path}: {error.strerror or error}") from None
    return path


# -- the tasks: each gives its JSON (as in INTERFACE.md) and its picture -------------------------


@dataclass(frozen=True)
class _Options:
    decoding: dict
    max_regions: int


def _caption(encoded, image, sample: Sample, options: _Options):
    caption = encoded.caption(**options.decoding)
    return caption.to_dict(), draw_caption(image, caption)


def _region_caption(encoded, image, sample: Sample, options: _Options):
    caption = encoded.caption(box=list(sample.region), **options.decoding)
    return {"box": rounded(sample.region), **caption.to_dict()}, draw_caption(image, caption, prompt=sample.region)


def _locate(encoded, image, sample: Sample, options: _Options):
    location = encoded.find(sample.expression)
    picture = draw_location(image, location.box, location.expression, location.score, location.found)
    return location.to_dict(), picture


def _segment(encoded, image, sample: Sample, options: _Options):
    segmentation = encoded.segment(sample.expression)
    return segmentation.to_dict(), draw_segmentation(image, segmentation)


def _densecap(encoded, image, sample: Sample, options: _Options):
    regions = encoded.dense_caption(max_regions=options.max_regions, **options.decoding)
    result = dense_captions_json(regions, encoded.image_size)
    return result, draw_regions(image, regions)


TASKS: dict[str, Callable] = {"caption": _caption, "region_caption": _region_caption, "locate": _locate,
                              "segment": _segment, "densecap": _densecap}



# -- the page ----------------------------------------------------------------------------------

PAGE_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em;
       color: #222; background: #fafafa; }
h1 { font-size: 1.6em; margin-bottom: .2em; }
h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ccc; }
figure { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; margin: 1.2em 0; }
figure img { max-width: min(100%, 560px); height: auto; border: 1px solid #ccc; }
figcaption { flex: 1; min-width: 260px; }
figcaption h3 { margin: 0 0 .4em; font-size: 1.05em; }
.w { border-bottom: 4px solid var(--c); padding: 0 1px; }
.swatch { display: inline-block; width: .8em; height: .8em; margin-right: .4em; background: var(--c);
          border: 1px solid #333; vertical-align: -1px; }
.muted { color: #777; }
.notice { padding: .6em .9em; border-left: 4px solid #e0a800; background: #fff6d6; }
ol { padding-left: 1.2em; margin: 0; }
code { font-size: .9em; }
"""


def render_page(results: dict) -> str:
    """``index.html`` for the demo's ``results``: per sample, each task's picture beside its text."""
    sections = []
    for entry in results["samples"]:
        figures = [_figure(task, entry[task], entry["pictures"][task]) for task in TASKS]
        note = f"<p class=notice>{_e(entry['note'])}</p>\n" if "note" in entry else ""
        sections.append(f"<h2>{_e(entry['name'])} <span class=muted>({_e(entry['image'])})</span></h2>\n{note}"
                        + "\n".join(figures))
    notice = f"<p class=notice>{_e(SHAPES_WORLD)} (docs/shapes_world.md)</p>\n" if results.get("embedded") else ""
    return ("<!DOCTYPE html>\n<html lang=en>\n<head>\n<meta charset=utf-8>\n<title>PixelLLM demo</title>\n"
            f"<style>{PAGE_STYLE}</style>\n</head>\n<body>\n<h1>PixelLLM demo</h1>\n{notice}"
            "<p class=muted>Every task on each sample image. Coordinates are pixels of the original image, "
            "boxes <code>[x0, y0, x1, y1]</code>. The results are also in <a href=results.json>results.json</a>.</p>\n"
            + "\n".join(sections) + "\n</body>\n</html>\n")


def _figure(task: str, result: dict, picture: str) -> str:
    return (f"<figure><img src=\"{_e(quote(picture))}\" alt=\"{_e(TITLES[task])}\">"
            f"<figcaption><h3>{TITLES[task]}</h3>{_describe(task, result)}</figcaption></figure>")


def _describe(task: str, result: dict) -> str:
    """The result as a short HTML text, in the colors of its picture."""
    if task in ("caption", "region_caption"):
        words = result["words"]
        text = " ".join(f"<span class=w style=\"--c:{_css(color)}\">{_e(word['text'])}</span>"
                        for word, color in zip(words, palette(len(words)), strict=True))
        where = f"<p>Region <code>{result['box']}</code></p>" if task == "region_caption" else ""
        return f"{where}<p>{text or _NONE}</p>"
    if task == "locate":
        return f"<p>“{_e(result['expression'])}” → <code>{result['box']}</code>, {_found(result)}</p>"
    if task == "segment":
        width, height = result["image_size"]
        share = 100 * result["area"] / max(width * height, 1)
        return (f"<p>“{_e(result['expression'])}” → box <code>{result['box']}</code>, "
                f"mask of {result['area']} pixels ({share:.1f}% of the image), {_found(result)}</p>")
    regions = result["regions"]
    items = "".join(f"<li><span class=swatch style=\"--c:{_css(color)}\"></span>{_e(r['caption']) or _NONE} "
                    f"<span class=muted>{r['score']:.2f} <code>{r['box']}</code></span></li>"
                    for r, color in zip(regions, palette(len(regions)), strict=True))
    return f"<ol>{items}</ol>" if items else f"<p>{_NONE}</p>"


_NONE = "<span class=muted>(none)</span>"


def _found(result: dict) -> str:
    """A referring result's score, and whether it counts as found."""
    verdict = "found" if result["found"] else "<strong>not found</strong> (the box is the best guess)"
    return f"score {result['score']:.3f}: {verdict}"


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)


def _css(color: tuple[int, int, int]) -> str:
    return "rgb({},{},{})".format(*color)
