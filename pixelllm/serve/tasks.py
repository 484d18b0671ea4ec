"""The tasks the server answers: one ``ServedTask`` entry per task in ``TASKS``.

An entry names the task's request fields and answers a whole batch of requests through the
Predictor's batched API, with the JSON of ``pixelllm <task> --json``. A task is offered when the
loaded predictor has the batched method the entry needs (``method``), so a system that lands with
new methods gets its tasks served by adding its entries here (``capability``: a task only some
models have). ``OTHER_SYSTEMS`` names the systems of the tasks a model may lack.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pixelllm.errors import PixelLLMError
from pixelllm.results import dense_captions_json, segment_all_json
from pixelllm.thresholds import DENSECAP_MIN_SCORE, LOCATE_MIN_SCORE

Item = tuple[Any, dict[str, Any]]  # (an RGB PIL image, the task's arguments)


@dataclass(frozen=True)
class Field:
    """A request field: ``kind`` "text", "array" (a JSON array), "integer" or "number"."""

    kind: str
    description: str
    required: bool = False


@dataclass(frozen=True)
class ServedTask:
    """A task of the server: its fields, the Predictor method it needs, and how it answers a batch.

    ``answer(predictor, items)`` returns one JSON dict per item, in order; it may raise
    ``PixelLLMError`` for a bad item (``answer_batch`` then finds which one).
    """

    name: str
    summary: str
    method: str
    answer: Callable[[Any, list[Item]], list[dict]]
    fields: dict[str, Field] = field(default_factory=dict)
    capability: str | None = None  # the head's entry point the method needs, if only some models have it

    def available(self, predictor) -> bool:
        if not callable(getattr(predictor, self.method, None)):
            return False
        return self.capability is None or predictor.model.has_capability(self.capability)


@contextlib.contextmanager
def batch_invariant() -> Iterator[None]:
    """Run the model so that a request's answer does not depend on the batch it is in.

    oneDNN picks its convolution kernels by batch size, and their sums differ in the last bits
    (the proposal head's boxes moved by 2e-5 px between a batch of 1 and of 6, enough to change a
    rounded coordinate); PyTorch's own CPU convolution computes every image alone. It costs about
    2 % on the embedded model (35 % on a batch of masks). The CLI's task commands run the same way,
    so their ``--json`` equals the server's answers.
    """
    import torch

    previous = torch.backends.mkldnn.enabled  # (its flags() context also resets TF32 and warns about it)
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


def answer_batch(task: ServedTask, predictor, items: list[Item]) -> list[dict | PixelLLMError]:
    """Answer every item; a ``PixelLLMError`` (a bad box, an empty expression) is that item's answer.

    The batch runs as one; if the predictor refuses it, each item runs alone, so that one bad
    request does not fail the others. Any other exception propagates: a fault of the batch.
    """
    with batch_invariant():
        try:
            return task.answer(predictor, items)
        except PixelLLMError:
            return [_answer_alone(task, predictor, item) for item in items]


def _answer_alone(task: ServedTask, predictor, item: Item) -> dict | PixelLLMError:
    try:
        return task.answer(predictor, [item])[0]
    except PixelLLMError as exc:
        return exc


def _caption(predictor, items: list[Item]) -> list[dict]:
    """Whole-image captions decode together (beam 4), box captions together (greedy); a point or
    a text prompt has no batched form in the Predictor, so those run one by one."""
    encoded = predictor.encode_batch([image for image, _ in items])
    answers: list[dict | None] = [None] * len(items)
    scene = [i for i, (_, args) in enumerate(items) if not args]
    for i, caption in zip(scene, predictor.caption_batch([encoded[i] for i in scene]), strict=True):
        answers[i] = caption.to_dict()
    boxed = [i for i, (_, args) in enumerate(items) if set(args) == {"box"}]
    regions = predictor.caption_regions_batch([encoded[i] for i in boxed], [[items[i][1]["box"]] for i in boxed])
    for i, captions in zip(boxed, regions, strict=True):
        answers[i] = captions[0].to_dict()
    for i, (_, args) in enumerate(items):
        if answers[i] is None:
            answers[i] = encoded[i].caption(**args).to_dict()
    return answers


def _locate(predictor, items: list[Item]) -> list[dict]:
    return [found.to_dict() for found in _by_expression(predictor, items, predictor.find_batch)]


def _segment(predictor, items: list[Item]) -> list[dict]:
    return [found.to_dict() for found in _by_expression(predictor, items, predictor.segment_batch)]


def _by_expression(predictor, items: list[Item], method) -> list:
    """``method`` (``find_batch`` or ``segment_batch``) on every item's expression, one batch per
    distinct ``min_score`` (the Predictor takes one value for a batch)."""
    encoded = predictor.encode_batch([image for image, _ in items])
    answers: list = [None] * len(items)
    for min_score, rows in _groups(items, lambda args: args.get("min_score", LOCATE_MIN_SCORE)).items():
        found = method([encoded[i] for i in rows], [[items[i][1]["expression"]] for i in rows], min_score)
        for i, (answer,) in zip(rows, found, strict=True):
            answers[i] = answer
    return answers


def _densecap(predictor, items: list[Item]) -> list[dict]:
    """One batch per distinct ``max_regions`` and ``min_score`` (the Predictor takes one of each for a batch)."""
    encoded = predictor.encode_batch([image for image, _ in items])
    answers: list[dict | None] = [None] * len(items)
    options = _groups(items, lambda args: (args.get("max_regions"), args.get("min_score", DENSECAP_MIN_SCORE)))
    for (max_regions, min_score), rows in options.items():
        found = predictor.dense_caption_batch([encoded[i] for i in rows], max_regions, min_score)
        for i, regions in zip(rows, found, strict=True):
            answers[i] = dense_captions_json(regions, items[i][0].size)
    return answers


def _segment_all(predictor, items: list[Item]) -> list[dict]:
    encoded = predictor.encode_batch([image for image, _ in items])
    found = predictor.segment_all_batch(encoded, [args["query"] for _, args in items])
    return [segment_all_json(args["query"], segments, image.size)
            for (image, args), segments in zip(items, found, strict=True)]


def _groups(items: list[Item], key: Callable[[dict], Hashable]) -> dict[Hashable, list[int]]:
    """The items' indices grouped by ``key`` of their arguments, in order."""
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for i, (_, args) in enumerate(items):
        groups[key(args)].append(i)
    return groups


_EXPRESSION = Field("text", "the referring expression, e.g. 'the red circle'", required=True)
_FOUND_SCORE = Field("number", f"the least score for found: true (default {LOCATE_MIN_SCORE})")

TASKS: dict[str, ServedTask] = {task.name: task for task in (
    ServedTask("caption", "a caption with a box and a point for every word", "caption_batch", _caption, {
        "box": Field("array", "[x0, y0, x1, y1]: caption this region instead of the whole image"),
        "point": Field("array", "[x, y]: caption the object at this point"),
        "prompt": Field("text", "the text prompt (default: the model's)"),
    }),
    ServedTask("locate", "the box of a referring expression, its score and whether it is found", "find_batch",
               _locate, {"expression": _EXPRESSION, "min_score": _FOUND_SCORE}),
    ServedTask("segment", "the box and mask (COCO RLE) of a referring expression, its score and whether it is found",
               "segment_batch", _segment, {"expression": _EXPRESSION, "min_score": _FOUND_SCORE}),
    ServedTask("densecap", "every object found, with a box, a score and a caption", "dense_caption_batch",
               _densecap, {"max_regions": Field("integer", "at most this many regions"),
                           "min_score": Field("number", f"the least region score (default {DENSECAP_MIN_SCORE})")}),
    ServedTask("segment_all", "every target a query names, any number, each with a box, a mask and a score",
               "segment_all_batch", _segment_all,
               {"query": Field("text", "what to segment, e.g. 'all the red objects'", required=True)},
               capability="codebook_answers"),
)}

OTHER_SYSTEMS = {"detect": "visionllm-v2", "segment_all": "pixellm", "ask": "visionllm-v2"}
"""INTERFACE.md's tasks of the other systems, and the system each belongs to: a loaded model without
them is told so (404), whether or not an entry of ``TASKS`` serves the task for a model that has it."""
