"""Multi-target questions (PixelLM's MUSE) about a scene, in the phrasings of SHAPES_WORLD.md.

Forms (all lower case, no punctuation):

- "all the {color} objects", "all the {shape}s", "all the {size} objects": every object with that
  attribute; the attribute may be absent from the scene, and then the question has no target;
- "the {color} {shape} and the {color} {shape}": two objects, each the only one of its color and
  shape in the scene.

Targets are scene object indices in reading order: by the top edge of the tight box (top to
bottom), then by its left edge (left to right). The answer names each target followed by the
``{seg}`` placeholder ("the small red circle {seg}, the large red star {seg}."), or says that there
is none ("there are no green objects.").
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from pixelllm.data.muse import PLACEHOLDER
from pixelllm.data.shapes.scene import Scene, ShapeObject
from pixelllm.data.shapes.vocab import COLORS, SHAPES, SIZES

QUESTIONS_PER_IMAGE = (2, 4)
"""Fewest and most questions asked about one image."""
NO_TARGET_PROBABILITY = 0.15
"""Chance that an attribute question asks for an attribute absent from the scene (when one is)."""
FORMS = ("color", "shape", "size", "pair")
PLURALS = {shape: f"{shape}s" for shape in SHAPES}
"""circles, squares, triangles, diamonds, stars, hexagons."""


@dataclass(frozen=True)
class MultiQuestion:
    """A question, its targets (indices into ``scene.objects``, in reading order) and its answer."""

    text: str
    targets: tuple[int, ...]
    answer: str


def reading_order(objects: tuple[ShapeObject, ...]) -> list[int]:
    """Object indices sorted top to bottom (box top edge), then left to right (box left edge)."""
    return sorted(range(len(objects)), key=lambda i: (objects[i].box[1], objects[i].box[0], i))


def _attribute_phrase(form: str, value: str) -> str:
    """"all the red objects", "all the circles", "all the small objects"."""
    return f"all the {PLURALS[value]}" if form == "shape" else f"all the {value} objects"


def _answer(scene: Scene, targets: tuple[int, ...]) -> str:
    """The targets named in order, each followed by ``{seg}``: "the small red circle {seg}, the
    large red star {seg}."."""
    return ", ".join(f"the {scene.objects[i].phrase} {PLACEHOLDER}" for i in targets) + "."


def _attribute_question(scene: Scene, form: str, rng: np.random.Generator) -> MultiQuestion:
    """An "all the ..." question about one color, shape or size, sometimes one the scene lacks."""
    vocabulary = {"color": list(COLORS), "shape": list(SHAPES), "size": list(SIZES)}[form]
    present = sorted({getattr(obj, form) for obj in scene.objects}, key=vocabulary.index)
    absent = [value for value in vocabulary if value not in present]
    pool = absent if absent and (not present or rng.random() < NO_TARGET_PROBABILITY) else present
    value = pool[int(rng.integers(len(pool)))]
    text = _attribute_phrase(form, value)
    targets = tuple(i for i in reading_order(scene.objects) if getattr(scene.objects[i], form) == value)
    answer = _answer(scene, targets) if targets else f"there are no {text.removeprefix('all the ')}."
    return MultiQuestion(text, targets, answer)


def _unique_kinds(scene: Scene) -> list[int]:
    """Indices of the objects that are the only one of their color and shape."""
    kinds = Counter((obj.color, obj.shape) for obj in scene.objects)
    return [i for i, obj in enumerate(scene.objects) if kinds[obj.color, obj.shape] == 1]


def _pair_question(scene: Scene, rng: np.random.Generator) -> MultiQuestion:
    """"the {color} {shape} and the {color} {shape}" about two objects unique in their kind."""
    first, second = (int(i) for i in rng.choice(_unique_kinds(scene), 2, replace=False))
    named = [scene.objects[first], scene.objects[second]]
    text = " and ".join(f"the {obj.color} {obj.shape}" for obj in named)
    targets = tuple(i for i in reading_order(scene.objects) if i in (first, second))
    return MultiQuestion(text, targets, _answer(scene, targets))


def multi_target_questions(scene: Scene, rng: np.random.Generator) -> list[MultiQuestion]:
    """2 to 4 (``QUESTIONS_PER_IMAGE``) distinct questions about ``scene``, each of a form drawn
    uniformly among those the scene allows (fewer when four times as many draws repeat)."""
    forms = [form for form in FORMS if form != "pair" or len(_unique_kinds(scene)) >= 2]
    wanted = int(rng.integers(QUESTIONS_PER_IMAGE[0], QUESTIONS_PER_IMAGE[1] + 1))
    asked: dict[str, MultiQuestion] = {}
    for _ in range(4 * wanted):
        if len(asked) == wanted:
            break
        form = forms[int(rng.integers(len(forms)))]
        question = _pair_question(scene, rng) if form == "pair" else _attribute_question(scene, form, rng)
        asked.setdefault(question.text, question)
    return list(asked.values())
