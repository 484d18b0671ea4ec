"""Narratives spoken the way Localized Narratives annotators speak, word by word, with each word
tagged by what the annotator's mouse is over while it is said (its *focus*)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pixelllm.data.shapes.geometry import position_phrases, relation_holds
from pixelllm.data.shapes.scene import Scene, ShapeObject
from pixelllm.data.shapes.vocab import RELATIONS

Focus = int | str | None
"""An object's index in ``Scene.objects``; "scene" (all objects); "background"; or None (the
mouse is free: travelling, or over nothing in particular)."""

_OPENERS = (
    "In this image we can see",
    "In this picture I can see",
    "Here we can see",
    "In this image there is",
    "I can see",
    "There is",
)
_AFTER_COUNT_OPENERS = ("There is", "I can see", "We can see", "First there is")
_COUNT_OPENERS = ("In this image we can see", "In this picture there are", "Here I can see")
_NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
_SENTENCE_LEADS = ("We can also see", "There is also", "I can also see", "Apart from that there is")
_COMMA_LEADS = ("and", "and there is", "and we can also see")
_RELATION_LEADS = {
    "left of": ("to the left of it", "to the left of that"),
    "right of": ("to the right of it", "to the right of that"),
    "above": ("above it", "above that"),
    "below": ("below it", "below that"),
}
_THERE_IS = ("there is", "we can see", "I can see")
_BACKGROUND_WORDS = {"flat": "plain", "gradient": "shaded", "noisy": "grainy"}
_BACKGROUND_SENTENCES = ("In the background there is a {} surface", "The background is {}")


@dataclass(frozen=True)
class Word:
    """One spoken word as written in the caption (punctuation attached) and its focus."""

    text: str
    focus: Focus

    @property
    def utterance(self) -> str:
        """The word as transcribed speech: without punctuation."""
        return self.text.strip(".,")


class _Transcript:
    """Accumulates words, commas and full stops; capitalizes each sentence's first word."""

    def __init__(self) -> None:
        self.words: list[Word] = []
        self._capitalize = True

    def say(self, text: str, focus: Focus = None) -> None:
        for token in text.split():
            if self._capitalize:
                token = token[0].upper() + token[1:]
                self._capitalize = False
            self.words.append(Word(token, focus))

    def mark(self, punctuation: str) -> None:
        last = self.words[-1]
        self.words[-1] = Word(last.text + punctuation, last.focus)
        self._capitalize = punctuation == "."


def object_words(obj: ShapeObject, with_size: bool) -> str:
    """The words naming an object, e.g. "a large red circle" or "an orange star"."""
    words = f"{obj.size} {obj.color} {obj.shape}" if with_size else f"{obj.color} {obj.shape}"
    return ("an " if words[0] in "aeiou" else "a ") + words


def _order(scene: Scene, rng: np.random.Generator) -> list[int]:
    """The order the annotator describes the objects in: left to right, top to bottom, largest
    first, or as they come to mind."""
    indices = list(range(len(scene.objects)))
    boxes = [o.box for o in scene.objects]
    keys = (
        lambda i: boxes[i][0] + boxes[i][2],
        lambda i: boxes[i][1] + boxes[i][3],
        lambda i: -scene.objects[i].area,
    )
    style = int(rng.integers(len(keys) + 1))
    if style == len(keys):
        return [int(i) for i in rng.permutation(indices)]
    return sorted(indices, key=keys[style])


def _pick(options: tuple[str, ...], rng: np.random.Generator) -> str:
    return options[int(rng.integers(len(options)))]


def _introduce(
    transcript: _Transcript,
    scene: Scene,
    index: int,
    previous: int | None,
    first_openers: tuple[str, ...],
    rng: np.random.Generator,
) -> None:
    """Say one object: a lead-in joining it to what came before, the object itself, and maybe
    where it is. Relation and position words are said only when geometrically true."""
    obj = scene.objects[index]
    positions = position_phrases(obj.box, scene.width, scene.height)
    position = _pick(positions, rng) if positions and rng.random() < 0.6 else None
    relations = (
        []
        if previous is None
        else [r for r in RELATIONS if relation_holds(r, obj.box, scene.objects[previous].box)]
    )
    leads = ["plain"] + ["relation"] * bool(relations) + ["position"] * (position is not None)
    lead = leads[int(rng.integers(len(leads)))]
    new_sentence = previous is None or rng.random() < 0.5
    if previous is not None:
        transcript.mark("." if new_sentence else ",")
    if lead == "relation":
        relation = relations[int(rng.integers(len(relations)))]
        text = _pick(_RELATION_LEADS[relation], rng) + " " + _pick(_THERE_IS, rng)
        transcript.say(text if new_sentence else "and " + text)
    elif lead == "position":
        text = position + " " + _pick(_THERE_IS, rng)
        transcript.say(text if new_sentence else "and " + text)
        position = None
    elif previous is None:
        transcript.say(_pick(first_openers, rng))
    else:
        transcript.say(_pick(_SENTENCE_LEADS if new_sentence else _COMMA_LEADS, rng))
    twins = sum(o.color == obj.color and o.shape == obj.shape for o in scene.objects) > 1
    transcript.say(object_words(obj, with_size=twins or rng.random() < 0.75), focus=index)
    if position is not None:
        transcript.say(position, focus=index)


def compose(scene: Scene, rng: np.random.Generator) -> list[Word]:
    """A narrative of the scene: every object is described once, in a random order, with varied
    lead-ins ("and below it there is ...", "On the right we can see ...") and sometimes a count
    of the shapes first and the background last."""
    transcript = _Transcript()
    count = len(scene.objects)
    openers = _OPENERS
    if count > 1 and rng.random() < 0.25:
        transcript.say(_pick(_COUNT_OPENERS, rng))
        transcript.say(f"{_NUMBERS[count]} shapes", focus="scene")
        transcript.mark(".")
        openers = _AFTER_COUNT_OPENERS
    previous = None
    for index in _order(scene, rng):
        _introduce(transcript, scene, index, previous, openers, rng)
        previous = index
    if rng.random() < 0.3:
        transcript.mark(".")
        sentence = _pick(_BACKGROUND_SENTENCES, rng).format(_BACKGROUND_WORDS[scene.background])
        transcript.say(sentence, focus="background")
    transcript.mark(".")
    return transcript.words
