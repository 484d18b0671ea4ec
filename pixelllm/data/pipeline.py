"""From a ``Sample`` to a model-ready ``Example``: load the image, augment, build targets on the canvas.

``ExampleBuilder`` does it for one sample and counts what it skipped (unreadable images, samples
with nothing left to learn); ``ExampleBuilder.build`` says why instead (a ``Skip``), counting
nothing. ``ExampleDataset`` wraps a sequence of samples for a ``DataLoader`` (use
``pixelllm.data.collate.collate`` as ``collate_fn``; it drops the ``None`` of skipped samples).

Augmentation defaults follow the official configs: trace none; refer/refseg scale jitter
0.75-1.25 without flip (expressions say "left" and "right"); densecap scale jitter 0.1-2.0 with
flip 0.5. Flipping does not rewrite words like "left", so keep it off where text is spatial.
locate and detect write boxes as fractions of the image (``pixelllm.locations``), and a muse answer
names every target of its question, some by where they lie ("left of the blue square"): these tasks
may shrink the image (scale jitter up to 1; muse 0.75-1) but not crop or flip it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from pixelllm.data.images import MIN_SIDE, ImageTooSmall, load_image
from pixelllm.data.report import SkipReport
from pixelllm.data.samples import Sample
from pixelllm.data.targets import LOCATION_TASKS, TASKS, CodebookFormat, ImageTargets, build_targets, to_canvas
from pixelllm.data.transforms import CanvasTransform, clip_boxes, jitter_boxes
from pixelllm.errors import ConfigError, InputError
from pixelllm.locations import LocationFormat


@dataclass(frozen=True)
class Augment:
    """Scale jitter range of the long side relative to the canvas, horizontal flip probability, and
    box jitter: each side of a region's prompt box (tasks region and densecap) moves by up to this
    fraction of the box's side (``transforms.jitter_boxes``)."""

    scale_range: tuple[float, float] = (1.0, 1.0)
    flip_prob: float = 0.0
    box_jitter: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale_range", tuple(self.scale_range))  # a config file gives a list
        if not 0 <= self.box_jitter < 0.5:
            raise ConfigError(f"augment box_jitter must be in [0, 0.5), got {self.box_jitter}")


DEFAULT_AUGMENT = {
    "trace": Augment(),
    "caption": Augment((0.75, 1.25)),
    "refer": Augment((0.75, 1.25)),
    "refseg": Augment((0.75, 1.25)),
    "region": Augment((0.75, 1.25)),
    "densecap": Augment((0.1, 2.0), 0.5),
    "locate": Augment((0.75, 1.0)),
    "detect": Augment((0.75, 1.0)),
    "muse": Augment((0.75, 1.0)),
}
# the tasks whose augment may only shrink the image, and why
SHRINK_ONLY = {**{task: "writes boxes as fractions of the image" for task in LOCATION_TASKS},
               "muse": "names every target of the image, some by where they lie"}


@dataclass
class TaskConfig:
    """How samples of one dataset become examples. ``augment=None``: no augmentation (evaluation)."""

    task: str
    canvas_size: int
    max_prompts: int | None = None
    max_text_tokens: int = 128
    alignment: str = "official"
    prompts: dict[str, str] | None = None
    augment: Augment | None = None
    refer_text_loss: bool = False
    pixel_scale: int = 1  # the image is drawn at this many times the canvas resolution (PixelLLMConfig.pixel_scale)
    locations: LocationFormat | None = None  # how locate and detect write boxes (the model's head says)
    codebook: CodebookFormat | None = None  # how muse writes its answers (the model's codebook head says)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        a = self.augment
        if self.task in SHRINK_ONLY and a is not None and (max(a.scale_range) > 1 or a.flip_prob or a.box_jitter):
            raise ConfigError(f"task {self.task} {SHRINK_ONLY[self.task]}: its augment may only "
                              f"shrink it (scale_range up to 1, no flip, no box_jitter), got {a}")


@dataclass
class Example:
    """One image on the canvas and its targets in canvas pixels.

    ``pixel_values`` float32 ``(3, kS, kS)`` in [0, 1] (``k = pixel_scale``, 1 unless the semantic
    tower sees finer pixels); ``pixel_mask`` bool ``(S, S)``.
    """

    pixel_values: torch.Tensor
    pixel_mask: torch.Tensor
    targets: ImageTargets
    transform: CanvasTransform
    meta: dict[str, Any] = field(default_factory=dict)


class Skip(NamedTuple):
    """A sample that gave no example: the builder (``source``, its report's name) and why."""

    source: str
    reason: str


class ExampleBuilder:
    """Callable ``(sample, rng) -> Example | None``; ``report`` counts kept and skipped samples."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, config: TaskConfig, name: str | None = None
    ) -> None:
        self.tokenizer, self.config = tokenizer, config
        self.report = SkipReport(name or config.task)

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Example | None:
        example = self.build(sample, rng)
        if isinstance(example, Skip):
            self.report.skip(example.reason)
            return None
        self.report.keep()
        return example

    def build(self, sample: Sample, rng: np.random.Generator | None = None) -> Example | Skip:
        """The example of ``sample``, or the ``Skip`` that says why there is none (the report counts
        only the targets repaired on the way)."""
        c = self.config
        if sample.image is None:
            return self._skip("no image")
        try:
            image = load_image(sample.image, name=_image_name(sample))
        except ImageTooSmall:
            return self._skip(f"image under {MIN_SIDE} pixels on a side")
        except InputError:
            return self._skip("unreadable image")
        if sample.image_size is not None and tuple(sample.image_size) != image.size:
            return self._skip("image size differs from its annotation")
        if c.augment is not None and rng is not None:
            transform = CanvasTransform.random(
                image.size, c.canvas_size, rng, c.augment.scale_range, c.augment.flip_prob
            )
        else:
            transform = CanvasTransform.fit(image.size, c.canvas_size)
        try:
            targets = build_targets(
                sample,
                c.task,
                self.tokenizer,
                image.size,
                rng=rng,
                max_prompts=c.max_prompts,
                max_text_tokens=c.max_text_tokens,
                alignment=c.alignment,
                prompts=c.prompts,
                refer_text_loss=c.refer_text_loss,
                locations=c.locations,
                codebook=c.codebook,
            )
        except (ValueError, InputError):  # a mask or text the reader did not vet (e.g. built by hand)
            return self._skip("malformed annotation")
        if not targets.prompts:
            return self._skip(f"no {c.task} target in the sample")
        targets, dropped = to_canvas(targets, transform)
        for reason, count in dropped.items():
            self.report.repair(f"dropped: {reason}", count)
        if not targets.prompts:
            return self._skip("no target left after the crop")
        if c.augment is not None and rng is not None and c.augment.box_jitter > 0:
            targets = _jitter_region_prompts(targets, c.augment.box_jitter, rng, transform.valid_box)
        pixel_values, pixel_mask = transform.image_to_canvas(image, c.pixel_scale)
        meta = {
            "image_id": sample.image_id,
            "source": sample.source,
            "original_size": image.size,
            "scale": transform.scale,
            "transform": transform,
        }
        return Example(pixel_values, pixel_mask, targets, transform, meta)

    def _skip(self, reason: str) -> Skip:
        return Skip(self.report.name, reason)


def _image_name(sample: Sample) -> str:
    return str(sample.image) if isinstance(sample.image, str | Path) else f"image of sample {sample.image_id}"


class ExampleDataset(torch.utils.data.Dataset):
    """Map-style dataset over ``samples``; item ``i`` of epoch ``e`` is augmented with the RNG
    seeded ``(seed, e, i)``, so results do not depend on worker count or order. Skipped samples
    come back as ``None``. Call ``set_epoch`` before each epoch.
    """

    def __init__(self, samples: Sequence[Sample], builder: ExampleBuilder, seed: int = 0) -> None:
        self.samples, self.builder, self.seed, self.epoch = samples, builder, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Example | None:
        rng = np.random.default_rng((self.seed, self.epoch, index))
        return self.builder(self.samples[index], rng)


def _jitter_region_prompts(targets: ImageTargets, amount: float, rng: np.random.Generator,
                           valid_box: np.ndarray) -> ImageTargets:
    """Jitter the prompt boxes of region and dense captions (canvas pixels), kept on the image. A
    jittered box keeps its object's center (``amount < 0.5``), so it keeps area on the image."""
    prompts = list(targets.prompts)
    chosen = [i for i, p in enumerate(prompts) if p.task in ("region", "densecap") and not p.prompt_is_point]
    if chosen:
        boxes = np.stack([prompts[i].prompt_box for i in chosen])
        moved = clip_boxes(jitter_boxes(boxes, amount, rng), valid_box)[0]
        for i, box in zip(chosen, moved, strict=True):
            prompts[i] = replace(prompts[i], prompt_box=box)
    return replace(targets, prompts=prompts)
