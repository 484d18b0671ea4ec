"""Tokens back into words: subwords merged, punctuation attached, one box and point per word."""

import numpy as np
import pytest

from pixelllm.data.words import group_words, token_offsets, words_from_ids
from pixelllm.tokenization import encode_target, train_tokenizer

# "Two cats, sleeping . ok": tokens "Two", " ca", "ts", ",", " sleeping", " .", " ok", EOS
TEXT = "Two cats, sleeping . ok"
OFFSETS = [(0, 3), (3, 6), (6, 8), (8, 9), (9, 18), (18, 20), (20, 23), (23, 23)]
BOXES = np.array(
    [[10 * i, 10 * i, 10 * i + 10, 10 * i + 10] for i in range(8)], float
)  # token i: [10i, 10i+10]


def test_subwords_and_punctuation():
    words = group_words(TEXT, OFFSETS, BOXES)
    assert [w.text for w in words] == ["Two", "cats,", "sleeping.", "ok"]
    assert [w.tokens for w in words] == [[0], [1, 2, 3], [4, 5], [6]]
    # "cats,": the mean of " ca" [10, 10, 20, 20] and "ts" [20, 20, 30, 30]; the comma does not count
    assert words[1].box == [15, 15, 25, 25] and words[1].point == [20, 20]
    # "sleeping." keeps the box of " sleeping" only, the stray " ." joins it without moving it
    assert words[2].box == [40, 40, 50, 50] and words[2].point == [45, 45]
    assert words[0].point == [5, 5]


def test_leading_punctuation_and_invalid_tokens():
    text = "- hello world"
    offsets = [(0, 1), (1, 7), (7, 13), (13, 13)]
    words = group_words(text, offsets, BOXES[:4])
    assert [w.text for w in words] == ["-hello", "world"]
    assert words[0].tokens == [0, 1] and words[0].box == [10, 10, 20, 20]
    valid = np.array([True, True, False, False])  # "world" has no usable box: left out
    assert [w.text for w in group_words(text, offsets, BOXES[:4], valid)] == ["-hello"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["A tabby cat sleeps on the red couch, near two remotes."], vocab_size=120)


def test_words_from_generated_ids(tokenizer):
    caption = "A tabby cat sleeps on the red couch, near two remotes."
    ids = encode_target(tokenizer, caption).ids  # with EOS, as generation ends
    boxes = np.zeros((len(ids), 4))
    boxes[:, 2:] = 1
    text, offsets = token_offsets(tokenizer, ids)
    assert text == caption
    assert offsets[-1][0] == offsets[-1][1]  # EOS adds no character
    words = words_from_ids(tokenizer, ids, boxes)
    assert [w.text for w in words] == [
        "A",
        "tabby",
        "cat",
        "sleeps",
        "on",
        "the",
        "red",
        "couch,",
        "near",
        "two",
        "remotes.",
    ]
    assert sum(len(w.tokens) for w in words) == len(ids) - 1
    assert all(w.point == [0.5, 0.5] for w in words)
