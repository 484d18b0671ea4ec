"""Referring expressions that pick out exactly one object of a scene.

Forms (all lower case, no punctuation):

- "the {color} {shape}" where no other object has that color and shape;
- "the {size} {color} {shape}" where the size is what tells same-colored same-shaped objects
  apart (and sometimes, redundantly, where the object is the only one of its color and shape);
- "the {color} {shape} {relation} the {color} {shape}" where the second object (the anchor) is
  the only one of its color and shape, and of the objects with the first color and shape exactly
  one stands in that relation to it.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from pixelllm.data.shapes.geometry import relation_holds
from pixelllm.data.shapes.scene import Scene, ShapeObject
from pixelllm.data.shapes.vocab import RELATIONS

MAX_RELATIONAL = 2
"""Most relational expressions kept per object."""
REDUNDANT_SIZE_PROBABILITY = 0.25


def _kind(obj: ShapeObject) -> tuple[str, str]:
    return obj.color, obj.shape


def _relational(scene: Scene, index: int, kinds: Counter) -> list[str]:
    """Every true and unambiguous "{target} {relation} {anchor}" expression for one object."""
    target = scene.objects[index]
    found = []
    for anchor_index, anchor in enumerate(scene.objects):
        if anchor_index == index or kinds[_kind(anchor)] != 1:
            continue
        for relation in RELATIONS:
            matching = [
                i
                for i, o in enumerate(scene.objects)
                if i != anchor_index
                and _kind(o) == _kind(target)
                and relation_holds(relation, o.box, anchor.box)
            ]
            if matching == [index]:
                found.append(
                    f"the {target.color} {target.shape} {relation} the {anchor.color} {anchor.shape}"
                )
    return found


def expressions(scene: Scene, rng: np.random.Generator) -> list[list[str]]:
    """For each object (in ``scene.objects`` order) its referring expressions; an empty list for
    an object that no expression of these forms singles out."""
    kinds = Counter(_kind(o) for o in scene.objects)
    sized = Counter((o.size, *_kind(o)) for o in scene.objects)
    result = []
    for index, obj in enumerate(scene.objects):
        sentences = []
        if kinds[_kind(obj)] == 1:
            sentences.append(f"the {obj.color} {obj.shape}")
        if sized[(obj.size, *_kind(obj))] == 1 and (
            kinds[_kind(obj)] > 1 or rng.random() < REDUNDANT_SIZE_PROBABILITY
        ):
            sentences.append(f"the {obj.phrase}")
        relational = _relational(scene, index, kinds)
        if len(relational) > MAX_RELATIONAL:
            relational = [
                relational[i] for i in sorted(rng.choice(len(relational), MAX_RELATIONAL, replace=False))
            ]
        result.append(sentences + relational)
    return result
