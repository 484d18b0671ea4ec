"""Shapes-world checks: color/shape words right, and where (hand-made cases)."""

import math

import pytest

from pixelllm.data.words import Word
from pixelllm.evaluate.shapes import ColorShapeAccuracy, WordGrounding, mentions


def _word(text, x, y):
    return Word(text, [x - 1, y - 1, x + 1, y + 1], [x, y], [])


def test_mentions():
    words = ["we", "can", "see", "a", "large", "red", "circle", "and", "a", "blue", "star", "and", "the", "square"]
    found = mentions(words)
    assert [(i, a) for i, a in found] == [
        ([5, 6], {"size": "large", "color": "red", "shape": "circle"}),
        ([9, 10], {"color": "blue", "shape": "star"}),
        ([13], {"shape": "square"}),
    ]


def test_color_shape_accuracy_by_hand():
    metric = ColorShapeAccuracy()
    metric.update(["small red circle", "a red circle", "large red square", "blue star", "tree"],
                  [["small red circle"], ["large red circle"], ["large red circle"], ["small green star"],
                   ["a tree in a park"]])
    values = metric.compute()
    # right, right (size is not judged), wrong shape, wrong color; the tree has no vocabulary word
    assert values["color_shape_accuracy"] == 50.0
    assert values["num_samples"] == 4 and values["num_skipped"] == 1


def test_word_grounding_by_hand():
    objects = [("large red circle", [0, 0, 10, 10]), ("small blue star", [20, 20, 30, 30]),
               ("small red circle", [40, 0, 50, 10])]
    words = [_word("a", 0, 0), _word("red", 45, 5), _word("circle,", 5, 5),  # both red circles count
             _word("a", 0, 0), _word("blue", 25, 25), _word("star", 5, 25),  # star's point outside
             _word("a", 0, 0), _word("green", 1, 1), _word("square", 1, 1)]  # no green square at all
    metric, named = WordGrounding(), WordGrounding("narrative_word_grounding")
    metric.update(words, objects)
    named.update(words, objects)
    values = metric.compute()
    assert values["num_samples"] == 6
    assert math.isclose(values["word_grounding"], 100 * 3 / 6)
    assert named.compute()["narrative_word_grounding"] == values["word_grounding"]
    assert "word_grounding" not in named.compute()


def test_scene_coverage_by_hand():
    from pixelllm.evaluate.shapes import SceneCoverage

    objects = ["large red circle", "small red circle", "small blue star"]
    coverage = SceneCoverage()
    coverage.update("a red circle and a red circle, then a blue star", objects)  # twins: both named
    coverage.update("a red circle, a green square and a red circle and a red circle", objects)  # one repeat
    coverage.update("three shapes on a plain background", objects)  # no mention
    values = coverage.compute()
    assert values["objects_named"] == pytest.approx(100 * 5 / 9)  # 3 + 2 + 0 of 3 + 3 + 3
    assert values["mentions_real"] == pytest.approx(100 * 6 / 7)  # the green square is not in the scene
    assert values["captions_repeating"] == pytest.approx(100 / 3)
    empty = SceneCoverage()
    empty.update("nothing at all", objects)
    assert empty.compute()["mentions_real"] == 0.0 and empty.compute()["objects_named"] == 0.0
