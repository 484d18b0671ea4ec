"""Shapes-world checks of the embedded default: are the color and shape words right, and where?

Two metrics, defined on the fixed vocabulary of ``docs/shapes_world.md`` (colors, shapes, sizes):

- ``ColorShapeAccuracy`` (region captions): a caption is right when its color and shape words are
  exactly those of a reference (``"small red circle"`` vs ``"a red circle"``: right; ``"red square"``:
  wrong). References without a color or shape word are not counted.
- ``WordGrounding`` (traced captions): every color or shape word of a caption belongs to a mention
  (``[size] color shape``, e.g. "a large red circle"); the objects of the scene that match the
  mention are the ones it names; the word is grounded when its predicted point lies in the box of
  one of them. A mention that matches no object (a wrong color, a made-up shape) counts all its
  words as missed. Result: the fraction of grounded words, as ``word_grounding`` for the captions
  the model generates and ``narrative_word_grounding`` for the ground-truth narratives read
  teacher-forced (where every mention names a real object, so it measures the pointing alone).
- ``SceneCoverage`` (whole-image captions): how a caption covers its scene, counting the mentions
  that say a color and a shape. Each mention names one object of the scene it matches, one not
  named before if there is one (so two mentions of twins name both): ``objects_named``, the
  percent of the scene's objects some mention names; ``mentions_real``, the percent of mentions
  that match an object of the scene (0 when the captions make none); ``captions_repeating``, the
  percent of captions with a mention whose every matching object was named already.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pixelllm.data.shapes.vocab import COLORS, SHAPES, SIZES
from pixelllm.evaluate.base import Metric

VOCABULARY = set(COLORS) | set(SHAPES)


def lower_words(text: str) -> list[str]:
    """Lower-case alphabetic words of ``text``."""
    return re.findall(r"[a-z]+", text.lower())


def shape_word(text: str) -> str | None:
    """The first shape word of ``text``, or ``None``."""
    return next((w for w in lower_words(text) if w in SHAPES), None)


def color_shape_words(text: str) -> set[str]:
    return {w for w in lower_words(text) if w in VOCABULARY}


def mentions(words: Sequence[str]) -> list[tuple[list[int], dict[str, str]]]:
    """Runs of ``[size] [color] [shape]`` in ``words`` (lower-case word strings), each as the
    indices of its color/shape words and its attributes ``{"size", "color", "shape"}`` (those said)."""
    found, i = [], 0
    while i < len(words):
        attributes, indices, j = {}, [], i
        for kind, table in (("size", SIZES), ("color", COLORS), ("shape", SHAPES)):
            if j < len(words) and words[j] in table:
                attributes[kind] = words[j]
                if kind != "size":
                    indices.append(j)
                j += 1
        if indices:
            found.append((indices, attributes))
            i = j
        else:
            i += 1
    return found


def matches(attributes: dict[str, str], phrase: str) -> bool:
    """Whether ``phrase`` says every attribute value (e.g. ``{"color": "red", "shape": "star"}``)."""
    said = set(lower_words(phrase))
    return all(value in said for value in attributes.values())


# The shapes-world scores a report shows beside the protocol's own, where the data gives them.
SHAPES_METRICS = ("color_shape_accuracy", "word_grounding", "narrative_word_grounding", "objects_named",
                  "mentions_real", "captions_repeating")


class ColorShapeAccuracy(Metric):
    """Percent of region captions whose color and shape words equal a reference's."""

    def _clear(self) -> None:
        self.right = 0

    def update(self, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
        for prediction, refs in zip(predictions, references, strict=True):
            wanted = [color_shape_words(r) for r in refs if color_shape_words(r)]
            if not wanted:
                self.counts["num_skipped"] += 1
                continue
            self.counts["num_samples"] += 1
            self.right += color_shape_words(prediction) in wanted

    def _values(self) -> dict[str, float]:
        total = self.counts["num_samples"]
        return {"color_shape_accuracy": 100.0 * self.right / total if total else float("nan")}


class WordGrounding(Metric):
    """Percent of color and shape words whose point is in the box of an object they name, reported
    under ``key``."""

    def __init__(self, key: str = "word_grounding") -> None:
        self.key = key
        super().__init__()

    def _clear(self) -> None:
        self.grounded = 0

    def update(self, words: Sequence, objects: Sequence[tuple[str, Sequence[float]]]) -> None:
        """``words``: a caption's words, each with ``text`` and ``point`` ``[x, y]``; ``objects``:
        the scene's ``(phrase, box)`` pairs, in the same pixel frame. Each color or shape word is a sample."""
        texts = [(lower_words(w.text) or [""])[0] for w in words]
        for indices, attributes in mentions(texts):
            boxes = [box for phrase, box in objects if matches(attributes, phrase)]
            for i in indices:
                x, y = words[i].point
                self.counts["num_samples"] += 1
                self.grounded += any(b[0] <= x <= b[2] and b[1] <= y <= b[3] for b in boxes)

    def _values(self) -> dict[str, float]:
        total = self.counts["num_samples"]
        return {self.key: 100.0 * self.grounded / total if total else float("nan")}


class SceneCoverage(Metric):
    """How whole-image captions cover their scenes (``objects_named``, ``mentions_real``,
    ``captions_repeating``); see the module docstring. A caption is a sample."""

    def _clear(self) -> None:
        self.objects = self.named = self.mentions = self.real = self.repeating = 0

    def update(self, caption: str, objects: Sequence[str]) -> None:
        """``caption``: the text; ``objects``: the scene's objects' phrases ("small red circle")."""
        named: set[int] = set()
        repeated = False
        for _, attributes in mentions(lower_words(caption)):
            if not {"color", "shape"} <= set(attributes):
                continue
            self.mentions += 1
            candidates = [i for i, phrase in enumerate(objects) if matches(attributes, phrase)]
            self.real += bool(candidates)
            fresh = [i for i in candidates if i not in named]
            named.update(fresh[:1])
            repeated |= bool(candidates) and not fresh
        self.counts["num_samples"] += 1
        self.objects += len(objects)
        self.named += len(named)
        self.repeating += repeated

    def _values(self) -> dict[str, float]:
        def percent(part: int, whole: int, empty: float = float("nan")) -> float:
            return 100.0 * part / whole if whole else empty

        return {"objects_named": percent(self.named, self.objects),
                "mentions_real": percent(self.real, self.mentions, empty=0.0),  # no mention: none is real
                "captions_repeating": percent(self.repeating, self.counts["num_samples"])}
