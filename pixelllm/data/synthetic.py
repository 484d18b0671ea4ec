"""The shapes world: a deterministic generator of the embedded default's training data, written
in the real formats (Localized Narratives JSONL, RefCOCO refs + COCO instances, Visual Genome
region descriptions, MUSE multi-target questions) with PNG images. See docs/shapes_world.md.

Every image is a pure function of ``(split, seed, index)``: the same arguments give byte-identical
files whatever the number of workers, and the splits never share a random stream or an image id.
Image ids spell out where they come from: ``{split code}{seed:06d}{index:07d}`` (train 1, val 2,
test 3), so ``10000420000017`` is image 17 of the train split drawn with seed 42.
"""

from __future__ import annotations

import json
import numbers
import os
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from pixelllm.data.shapes import formats
from pixelllm.data.shapes.narrative import compose
from pixelllm.data.shapes.questions import multi_target_questions
from pixelllm.data.shapes.referring import expressions
from pixelllm.data.shapes.scene import Scene, sample_scene
from pixelllm.data.shapes.trace import simulate_trace, speak
from pixelllm.data.shapes.vocab import SPLITS
from pixelllm.errors import InputError

SPLIT_CODES = {"train": 1, "val": 2, "test": 3}
SEED_LIMIT = 10**6
IMAGE_LIMIT = 10**7
ANNOTATORS = 40
"""Simulated annotators; each speaks at its own pace."""
HELD_OUT_SHARE = 0.1
"""Share of ``synth_main``'s images given to each of val and test."""
PNG_COMPRESSION = 3
MAX_WORKERS = 256


@dataclass(frozen=True)
class SynthSummary:
    """What ``generate`` wrote: counts, and the files by kind relative to ``out_dir``."""

    out_dir: str
    split: str
    seed: int
    images: int
    objects: int
    refs: int
    expressions: int
    regions: int
    narratives: int
    questions: int
    files: dict[str, str]
    seconds: float


def image_id(split: str, seed: int, index: int) -> int:
    """The image id of image ``index`` of ``split`` drawn with ``seed`` (see the module doc)."""
    return (SPLIT_CODES[split] * SEED_LIMIT + seed) * IMAGE_LIMIT + index


def draw_image(split: str, seed: int, index: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Draw one image: its (H, W, 3) uint8 RGB pixels and its records in every format (keys
    ``coco_image``, ``annotations``, ``refs``, ``vg_image``, ``vg_regions``, ``narrative``,
    ``muse``)."""
    # Child streams are numbered: the fifth (questions) leaves the first four as they always were.
    scene_rng, text_rng, trace_rng, refer_rng, question_rng = np.random.default_rng(
        [SPLIT_CODES[split], seed, index]
    ).spawn(5)
    scene, pixels = sample_scene(scene_rng)
    ident = image_id(split, seed, index)
    file_name = f"{ident}.png"
    coco_image, annotations = formats.coco_image(ident, file_name, scene), formats.coco_annotations(scene, ident)
    return pixels, {
        "coco_image": coco_image,
        "annotations": annotations,
        "refs": formats.refcoco_refs(scene, ident, split, expressions(scene, refer_rng)),
        "vg_image": formats.vg_image(ident, file_name, scene),
        "vg_regions": formats.vg_regions(scene, ident),
        "narrative": _narrate(scene, ident, split, text_rng, trace_rng),
        "muse": formats.muse_entry(coco_image, annotations, scene, multi_target_questions(scene, question_rng)),
    }


def _narrate(
    scene: Scene, ident: int, split: str, text_rng: np.random.Generator, trace_rng: np.random.Generator
) -> dict[str, Any]:
    """The image's Localized Narratives record by a randomly drawn annotator."""
    annotator = int(text_rng.integers(1, ANNOTATORS + 1))
    rate = np.random.default_rng(annotator).uniform(0.8, 1.25)
    words = compose(scene, text_rng)
    times = speak(words, rate, trace_rng)
    segments = simulate_trace(scene, words, times, trace_rng)
    return formats.ln_record(scene, ident, split, annotator, words, times, segments)


def _draw_and_save(task: tuple[str, str, int, int]) -> dict[str, Any]:
    """Worker: draw one image, save its PNG under ``images_dir``, return its records."""
    images_dir, split, seed, index = task
    pixels, records = draw_image(split, seed, index)
    path = os.path.join(images_dir, records["coco_image"]["file_name"])
    Image.fromarray(pixels).save(path, compress_level=PNG_COMPRESSION)
    return records


def _integer(value: object, what: str, low: int, high: int) -> int:
    """``value`` as an int, or InputError (one line) when it is not an integer in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        raise InputError(f"{what} must be an integer from {low} to {high}, got {value!r}")
    return int(value)


def _check_split(split: object) -> str:
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    return str(split)


def _writable_dir(out_dir: str | os.PathLike) -> Path:
    """Create ``out_dir/images`` and check that files can be written there."""
    path = Path(out_dir)
    try:
        (path / formats.IMAGES_DIR).mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise InputError(f"cannot write to output directory {path}: {error.strerror or error}") from None
    return path


def default_workers() -> int:
    """One worker per CPU this process may use, at most 8."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, available))


def _collect(results: Iterable[dict[str, Any]], bar: tqdm) -> list[dict[str, Any]]:
    """The results as a list, advancing the progress bar as each arrives."""
    records = []
    for record in results:
        records.append(record)
        bar.update()
    return records


def _draw_all(tasks: list[tuple[str, str, int, int]], workers: int, bar: tqdm) -> list[dict[str, Any]]:
    """Run the tasks and return their records in task order, in worker processes when it pays."""
    if workers == 1 or len(tasks) < 4 * workers:
        return _collect(map(_draw_and_save, tasks), bar)
    chunk = max(1, min(32, len(tasks) // (8 * workers)))
    # spawn, not fork: the caller may hold threads (torch, tqdm) that a forked child would inherit.
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        try:
            return _collect(pool.map(_draw_and_save, tasks, chunksize=chunk), bar)
        except BrokenProcessPool as error:
            raise RuntimeError(
                "synth worker processes died; a script that calls generate() with several workers "
                "must do so under `if __name__ == '__main__':`"
            ) from error


def generate(
    out_dir: str | os.PathLike,
    num_images: int,
    seed: int,
    split: str = "train",
    workers: int | None = None,
    progress: bool = True,
) -> SynthSummary:
    """Write ``num_images`` images of ``split`` drawn with ``seed`` into ``out_dir`` in every
    format (layout in docs/shapes_world.md), plus ``summary.json``. Files of an earlier run in
    ``out_dir`` are overwritten, not removed."""
    num_images = _integer(num_images, "the number of images", 1, IMAGE_LIMIT - 1)
    seed = _integer(seed, "the seed", 0, SEED_LIMIT - 1)
    split = _check_split(split)
    workers = default_workers() if workers is None else _integer(workers, "workers", 1, MAX_WORKERS)
    started = time.perf_counter()
    path = _writable_dir(out_dir)
    tasks = [(str(path / formats.IMAGES_DIR), split, seed, index) for index in range(num_images)]
    with tqdm(total=num_images, desc=f"synth {split}", unit="img", disable=not progress) as bar:
        records = _draw_all(tasks, workers, bar)
    info = {"description": "PixelLLM shapes world", "split": split, "seed": seed, "images": num_images}
    files = formats.write_dataset(path, split, info, records)
    summary = SynthSummary(
        out_dir=str(path),
        split=split,
        seed=seed,
        images=num_images,
        objects=sum(len(r["annotations"]) for r in records),
        refs=sum(len(r["refs"]) for r in records),
        expressions=sum(len(ref["sentences"]) for r in records for ref in r["refs"]),
        regions=sum(len(r["vg_regions"]["regions"]) for r in records),
        narratives=len(records),
        questions=sum(len(r["muse"]["questions"]) for r in records),
        files=files,
        seconds=time.perf_counter() - started,
    )
    # Everything but the timing, so that equal runs leave equal files.
    saved = {k: v for k, v in asdict(summary).items() if k not in ("out_dir", "seconds")}
    (path / "summary.json").write_text(json.dumps(saved, indent=2) + "\n", encoding="utf-8")
    return summary


def split_sizes(images: int) -> dict[str, int]:
    """How ``synth_main`` shares ``images`` between the splits: ``HELD_OUT_SHARE`` each for val
    and test (rounded down), the rest for train; splits with no image are left out."""
    held_out = int(images * HELD_OUT_SHARE)
    sizes = {"train": images - 2 * held_out, "val": held_out, "test": held_out}
    return {split: count for split, count in sizes.items() if count > 0}


def synth_main(
    out_dir: str, images: int, seed: int, workers: int | None = None, split: str | None = None
) -> None:
    """``pixelllm synth``: write ``images`` images into ``out_dir/{split}/`` for each split (see
    ``split_sizes``), or all of them into ``out_dir/{split}/`` when ``split`` is given; prints one
    line per split."""
    images = _integer(images, "--images", 1, IMAGE_LIMIT - 1)
    sizes = {_check_split(split): images} if split is not None else split_sizes(images)
    for name, count in sizes.items():
        summary = generate(Path(out_dir) / name, count, seed, name, workers=workers)
        print(
            f"{name}: {summary.images} images, {summary.objects} objects, {summary.expressions} referring "
            f"expressions in {summary.refs} refs, {summary.questions} multi-target questions -> "
            f"{summary.out_dir} ({summary.seconds:.1f} s)"
        )
