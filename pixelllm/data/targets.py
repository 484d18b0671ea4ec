"""Per-prompt training targets of every task, from a ``Sample``.

``build_targets`` works in **original pixels**; ``to_canvas`` maps the result onto the canvas of a
``CanvasTransform`` (clipping, and dropping what the crop removed). Per task (docs/architecture.md):

- trace: "A long image caption:" on the whole image -> the narrative's caption; every token but
  EOS has a box (LN alignment); caption + location loss.
- caption: the same prompt -> a caption; no location; caption loss.
- refer: "where is {expression}" on the whole image -> the expression; only the last word (the
  token before EOS) has a box, the object's; location loss.
- refseg: as refer, plus the object's mask; location + mask loss.
- region: "an object of" with the region's box as location prompt -> the region's text; caption loss.
- densecap: region prompts for the sampled regions, and every region box as ``gt_boxes``;
  caption + detection loss.
- locate: "locate {expression}" on the whole image -> the object's box in location tokens
  (``pixelllm.locations``); the answer loss (``answer_weight``) of a head that writes them.
- detect: "detect <c0>: circle, <c1>: red star" on the whole image (the image's category names, or
  with ``rng`` for half of them the finer names of their regions, such as "red star"; in a random
  order with ``rng``, else as they first appear; at most as many as there are class tokens)
  -> each object of those classes as its class token then its box, by class slot, then top to
  bottom and left to right; the answer loss.
- muse: one prompt per question on the whole image, the codebook's template with the question
  (``CodebookFormat``) -> the answer with the whole codebook group after each target, no space
  before it ("the small red circle[SEG0]...[SEG5], the large red star[SEG0]...[SEG5]."), not
  truncated (every group stays whole); a question without a text answer gets PixelLM's template
  ("the red circle[SEG0]... and the blue star[SEG0]... ."), one with no target keeps its text
  answer ("there are no purple objects.") and trains on it alone; each target's mask in answer
  order (``seg_masks``); the codebook head's losses (``codebook_weight``).

locate and detect need the ``LocationFormat`` (``locations``) of the model's head; their tokens are
fractions of the image, so the image may be resized but not cropped or flipped.

Candidates are narratives (trace), captions (caption), or ``(region, text)`` pairs; ``max_prompts``
keeps a random subset (with ``rng``) or the first ones (without).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np
from transformers import PreTrainedTokenizerBase

from pixelllm.config import DEFAULT_PROMPTS
from pixelllm.data.coco import decode_segmentation
from pixelllm.data.ln import ALIGNMENTS
from pixelllm.data.muse import PLACEHOLDER
from pixelllm.data.samples import Question, Region, Sample
from pixelllm.data.transforms import CanvasTransform, clip_boxes, touches
from pixelllm.errors import ConfigError
from pixelllm.locations import LocationFormat, locate_prompt
from pixelllm.tokenization import encode_prompt, encode_target

LOCATION_TASKS = ("locate", "detect")
TASKS = ("trace", "caption", "refer", "refseg", "region", "densecap", *LOCATION_TASKS, "muse")
_PLACEHOLDER = re.compile(r"\s*" + re.escape(PLACEHOLDER))


@dataclass(frozen=True)
class CodebookFormat:
    """How the task muse writes answers for a codebook head: ``group`` the head's tokens, written whole
    and in order after each target, and ``prompt`` the question's template (``{question}`` replaced)."""

    group: tuple[str, ...]
    prompt: str


@dataclass
class PromptTarget:
    """One prompt on an image and what it should produce.

    Coordinates are in the frame of the enclosing ``ImageTargets`` (original or canvas pixels).
    ``label_boxes`` float64 ``(Lt, 4)`` and ``label_box_mask`` bool ``(Lt,)`` align with
    ``label_ids`` (tokens then EOS); ``mask`` is bool ``(H, W)`` (original) or ``(S, S)`` (canvas).
    ``text``: the target's text (locate: the expression, whose answer is its box; detect: the answer).
    ``region`` is the index in ``sample.regions`` of the object the prompt is about.
    """

    task: str
    text: str
    prompt_ids: list[int]
    prompt_box: np.ndarray
    label_ids: list[int]
    label_boxes: np.ndarray
    label_box_mask: np.ndarray
    caption_weight: float
    location_weight: float
    prompt_is_point: bool = False
    mask: np.ndarray | None = None
    mask_weight: float = 0.0
    region: int | None = None
    region_id: str | None = None
    target_box: np.ndarray | None = None  # the object's box in original pixels (evaluation)
    answer_weight: float = 0.0  # the answer is written in location tokens (tasks locate, detect)
    seg_masks: list[np.ndarray] | None = None  # muse: each target's mask (frame as ``mask``), in answer order
    codebook_weight: float = 0.0  # muse: the answer writes a codebook group after each target


@dataclass
class ImageTargets:
    """All prompts on one image, plus ``gt_boxes`` float64 ``(M, 4)`` for the detection head."""

    frame: str  # "original" or "canvas"
    prompts: list[PromptTarget]
    gt_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    detection_weight: float = 0.0


def build_targets(
    sample: Sample,
    task: str,
    tokenizer: PreTrainedTokenizerBase,
    image_size: tuple[int, int],
    *,
    rng: np.random.Generator | None = None,
    max_prompts: int | None = None,
    max_text_tokens: int = 128,
    alignment: str = "official",
    prompts: dict[str, str] | None = None,
    refer_text_loss: bool = False,
    locations: LocationFormat | None = None,
    codebook: CodebookFormat | None = None,
) -> ImageTargets:
    """Targets of ``task`` on ``sample``, in original pixels of an image of ``image_size = (W, H)``.

    ``refer_text_loss``: referring expressions also train the text (the official ref stage trains
    the location only; inference reads the expression teacher-forced either way). ``locations``:
    how the tasks locate and detect write boxes; ``codebook``: how the task muse writes its answers.
    """
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if task in LOCATION_TASKS:
        return _location_targets(sample, task, tokenizer, image_size, _checked(locations, tokenizer, task),
                                 rng, max_prompts, max_text_tokens)
    if task == "muse":
        return _muse_targets(sample, tokenizer, image_size, _checked_codebook(codebook, tokenizer), rng, max_prompts)
    if alignment not in ALIGNMENTS:
        raise ConfigError(f"unknown LN alignment {alignment!r}; choose one of {', '.join(ALIGNMENTS)}")
    builder = _Builder(tokenizer, image_size, max_text_tokens, {**DEFAULT_PROMPTS, **(prompts or {})},
                       refer_caption_weight=float(refer_text_loss))
    if task == "trace":
        chosen = _choose(sample.narratives, max_prompts, rng)
        return ImageTargets("original", [builder.trace(n, ALIGNMENTS[alignment]) for n in chosen])
    if task == "caption":
        return ImageTargets(
            "original", [builder.caption(c) for c in _choose(sample.captions, max_prompts, rng)]
        )
    pairs = [
        (i, text)
        for i, region in enumerate(sample.regions)
        for text in region.texts
        if task != "refseg" or region.segmentation is not None
    ]
    chosen = _choose(pairs, max_prompts, rng)
    if task in ("refer", "refseg"):
        return ImageTargets("original", [builder.refer(sample, i, text, task) for i, text in chosen])
    targets = ImageTargets("original", [builder.region(sample, i, text, task) for i, text in chosen])
    if task == "densecap":
        targets.gt_boxes = np.array([r.box for r in sample.regions], dtype=np.float64).reshape(-1, 4)
        targets.detection_weight = 1.0
    return targets


def _checked(locations: LocationFormat | None, tokenizer: PreTrainedTokenizerBase, task: str) -> LocationFormat:
    """``locations``, once sure that the tokenizer has its special tokens."""
    if locations is None:
        raise ConfigError(f"task {task} writes boxes as location tokens: it needs the model's location format")
    vocab = tokenizer.get_vocab()
    missing = [t for t in locations.bin_tokens()[:1] + locations.class_tokens()[:1] if t not in vocab]
    if missing:
        raise ConfigError(f"task {task}: the tokenizer lacks {missing[0]}; build the model with a head that "
                          "writes location tokens first")
    return locations


def _checked_codebook(codebook: CodebookFormat | None, tokenizer: PreTrainedTokenizerBase) -> CodebookFormat:
    """``codebook``, once sure that the tokenizer has its tokens."""
    if codebook is None:
        raise ConfigError("task muse writes codebook groups: it needs a model with a codebook head (heads.codebook)")
    missing = [t for t in codebook.group if t not in tokenizer.get_vocab()]
    if missing:
        raise ConfigError(f"task muse: the tokenizer lacks {missing[0]}; build the model with its codebook head first")
    return codebook


def answer_text(question: Question, group: str) -> str:
    """The target text of ``question`` with ``group`` (the codebook tokens, joined) after each target."""
    if question.answer is not None:
        return _PLACEHOLDER.sub(group, question.answer)
    names = [f"{(t.texts or ['the object'])[0]}{group}" for t in question.targets]
    return (", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]) + "."


def _muse_targets(sample: Sample, tokenizer: PreTrainedTokenizerBase, image_size: tuple[int, int],
                  codebook: CodebookFormat, rng: np.random.Generator | None, max_prompts: int | None) -> ImageTargets:
    """The prompts of ``muse`` (module docstring), with the targets' masks bool ``(H, W)`` of the image
    ``image_size = (W, H)``."""
    width, height = image_size
    whole = np.array([0.0, 0.0, width, height], dtype=np.float64)
    group = "".join(codebook.group)
    prompts = []
    for question in _choose(sample.questions, max_prompts, rng):
        text = answer_text(question, group)
        ids = encode_target(tokenizer, text).ids
        masks = [decode_segmentation(t.segmentation, height, width) for t in question.targets]
        prompt_ids = encode_prompt(tokenizer, codebook.prompt.format(question=question.text))
        prompts.append(PromptTarget("muse", text, prompt_ids, whole, ids, np.zeros((len(ids), 4)),
                                    np.zeros(len(ids), bool), 0.0, 0.0, seg_masks=masks, codebook_weight=1.0))
    return ImageTargets("original", prompts)


def _location_targets(sample: Sample, task: str, tokenizer: PreTrainedTokenizerBase, image_size: tuple[int, int],
                      locations: LocationFormat, rng: np.random.Generator | None, max_prompts: int | None,
                      max_text_tokens: int) -> ImageTargets:
    """The prompts of ``locate`` (one per expression) or ``detect`` (one per image), answered in
    location tokens of boxes in the frame of the whole image ``image_size``."""
    whole = np.array([0.0, 0.0, *image_size], dtype=np.float64)

    def prompt(prompt_text: str, answer: str, text: str, **extra) -> PromptTarget:
        ids = encode_target(tokenizer, answer, max_text_tokens).ids
        return PromptTarget(task, text, encode_prompt(tokenizer, prompt_text), whole, ids,
                            np.zeros((len(ids), 4)), np.zeros(len(ids), bool), 0.0, 0.0, answer_weight=1.0, **extra)

    if task == "locate":
        pairs = _choose([(i, text) for i, region in enumerate(sample.regions) for text in region.texts],
                        max_prompts, rng)
        return ImageTargets("original", [
            prompt(locate_prompt(text), locations.answer([(None, sample.regions[i].box)], image_size), text, region=i,
                   region_id=sample.regions[i].region_id, target_box=np.asarray(sample.regions[i].box, np.float64))
            for i, text in pairs])
    named = _detection_labels(sample, rng)
    labels = list(dict.fromkeys(label for label, _ in named))
    if rng is not None:
        labels = [labels[i] for i in rng.permutation(len(labels))]
    slots = {label: k for k, label in enumerate(labels[: locations.num_class_tokens])}
    objects = sorted((slots[label], r.box[1], r.box[0], r.box) for label, r in named if label in slots)
    if not objects:
        return ImageTargets("original", [])
    answer = locations.answer([(slot, box) for slot, _, _, box in objects], image_size)
    return ImageTargets("original", [prompt(locations.detect_prompt(list(slots)), answer, answer)])


def _detection_labels(sample: Sample, rng: np.random.Generator | None) -> list[tuple[str, Region]]:
    """Each named region with the label detection asks for it by: its category (``texts[0]``), or,
    for half of the categories drawn with ``rng`` whose every region has one, its finer name
    (``texts[1]``: the COCO reader's color and category, "red star"), so that every region of a
    category answers to exactly one label of the instruction."""
    by_category: dict[str, list[Region]] = {}
    for region in sample.regions:
        if region.texts:
            by_category.setdefault(region.texts[0], []).append(region)
    named = []
    for category, regions in by_category.items():
        fine = rng is not None and all(len(r.texts) > 1 for r in regions) and rng.random() < 0.5
        named += [(r.texts[1] if fine else category, r) for r in regions]
    return named


def _choose(items: list, limit: int | None, rng: np.random.Generator | None) -> list:
    if limit is None or len(items) <= limit:
        return list(items)
    if rng is None:
        return list(items[:limit])
    return [items[i] for i in sorted(rng.choice(len(items), size=limit, replace=False))]


@dataclass
class _Builder:
    tokenizer: PreTrainedTokenizerBase
    image_size: tuple[int, int]
    max_text_tokens: int
    prompts: dict[str, str]
    refer_caption_weight: float = 0.0
    masks: dict[int, np.ndarray] = field(default_factory=dict)  # decoded once per region

    def _base(
        self,
        task: str,
        prompt_text: str,
        text: str,
        prompt_box,
        caption_weight: float,
        location_weight: float,
        **extra,
    ) -> PromptTarget:
        ids = encode_target(self.tokenizer, text, self.max_text_tokens).ids
        return PromptTarget(
            task,
            text,
            encode_prompt(self.tokenizer, prompt_text),
            np.asarray(prompt_box, np.float64),
            ids,
            np.zeros((len(ids), 4)),
            np.zeros(len(ids), bool),
            caption_weight,
            location_weight,
            **extra,
        )

    def whole_image(self) -> np.ndarray:
        return np.array([0.0, 0.0, *self.image_size], dtype=np.float64)

    def trace(self, narrative, align) -> PromptTarget:
        target = encode_target(self.tokenizer, narrative.caption, self.max_text_tokens)
        aligned = align(narrative, target)
        return PromptTarget(
            "trace",
            narrative.caption,
            encode_prompt(self.tokenizer, self.prompts["trace"]),
            self.whole_image(),
            target.ids,
            aligned.to_pixels(self.image_size),
            aligned.mask.copy(),
            1.0,
            1.0,
        )

    def caption(self, text: str) -> PromptTarget:
        return self._base("caption", self.prompts["trace"], text, self.whole_image(), 1.0, 0.0)

    def refer(self, sample: Sample, index: int, text: str, task: str) -> PromptTarget:
        region = sample.regions[index]
        box = np.asarray(region.box, np.float64)
        extra = {}
        if task == "refseg":
            if index not in self.masks:
                w, h = self.image_size
                self.masks[index] = decode_segmentation(region.segmentation, h, w)
            extra = {"mask": self.masks[index], "mask_weight": 1.0}
        p = self._base(
            task,
            self.prompts["refer"].format(expression=text),
            text,
            self.whole_image(),
            self.refer_caption_weight,
            1.0,
            region=index,
            region_id=region.region_id,
            target_box=box,
            **extra,
        )
        last_word = len(p.label_ids) - 2  # the token before EOS
        if last_word >= 0:
            p.label_boxes[last_word], p.label_box_mask[last_word] = box, True
        return p

    def region(self, sample: Sample, index: int, text: str, task: str) -> PromptTarget:
        region = sample.regions[index]
        box = np.asarray(region.box, np.float64)
        return self._base(
            task,
            self.prompts["region"],
            text,
            box,
            1.0,
            0.0,
            region=index,
            region_id=region.region_id,
            target_box=box,
        )


def to_canvas(targets: ImageTargets, transform: CanvasTransform) -> tuple[ImageTargets, Counter[str]]:
    """Map original-pixel targets onto the canvas; also return what was dropped, by reason.

    A prompt is dropped when its box (or the box of the object it is about) has no area left on
    the canvas (``object left the crop``) or its mask (or one of its ``seg_masks``) has no pixel
    left; trace tokens whose box misses the image lose their location target; ``gt_boxes`` with no
    area left are dropped. A whole-image prompt box becomes ``transform.valid_box``. ``target_box``
    stays in original pixels (for evaluation).
    """
    if targets.frame != "original":
        raise ValueError(f"targets are already in the {targets.frame} frame")
    valid = transform.valid_box
    dropped: Counter[str] = Counter()
    prompts = []
    for p in targets.prompts:
        mapped = _prompt_to_canvas(p, transform, valid)
        if isinstance(mapped, str):
            dropped[mapped] += 1
        else:
            prompts.append(mapped)
    gt_boxes, keep = clip_boxes(transform.boxes_to_canvas(targets.gt_boxes), valid)
    dropped["box left the crop"] += int((~keep).sum())
    return ImageTargets("canvas", prompts, gt_boxes[keep], targets.detection_weight), +dropped


def _prompt_to_canvas(p: PromptTarget, transform: CanvasTransform, valid: np.ndarray) -> PromptTarget | str:
    prompt_box = transform.boxes_to_canvas(p.prompt_box)
    visible = touches(prompt_box, valid) if p.prompt_is_point else clip_boxes(prompt_box, valid)[1]
    if p.target_box is not None:
        visible = visible and clip_boxes(transform.boxes_to_canvas(p.target_box), valid)[1]
    if not visible:
        return "object left the crop"
    boxes = transform.boxes_to_canvas(p.label_boxes)
    label_mask = p.label_box_mask & touches(boxes, valid)
    mask = None
    if p.mask is not None:
        mask = transform.mask_to_canvas(p.mask)
        if p.mask_weight > 0 and not mask.any():
            return "mask left the crop"
    seg_masks = None if p.seg_masks is None else [transform.mask_to_canvas(m) for m in p.seg_masks]
    if seg_masks is not None and not all(m.any() for m in seg_masks):
        return "mask left the crop"
    return replace(
        p,
        prompt_box=clip_boxes(prompt_box, valid)[0],
        label_boxes=clip_boxes(boxes, valid)[0],
        label_box_mask=label_mask,
        mask=mask,
        seg_masks=seg_masks,
    )
