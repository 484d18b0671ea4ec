"""Grouping target tokens back into words for the API (``{"text", "box", "point"}`` per word).

Words are the whitespace-separated pieces of the text, so subword pieces merge into their word
and punctuation written against a word ("road.") stays on it; a piece that is only punctuation
("a cat ." after some decoders) is attached to the word before it (to the next word at the start);
a token of spaces only (a lone "▁") belongs to the word after it.
A word's **box is the mean of its tokens' boxes, leaving out pure-punctuation tokens** (so a
trailing "." never moves a word); a word made only of punctuation uses all its tokens. Its point is
the box center. Tokens without a character span (EOS, padding) belong to no word.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class Word:
    """A word of a generated or target text: ``box`` ``[x0, y0, x1, y1]``, ``point`` ``[x, y]``
    (in whatever frame the token boxes were given), and the indices of its tokens."""

    text: str
    box: list[float]
    point: list[float]
    tokens: list[int]


def caption_words(text: str) -> list[tuple[int, int, str]]:
    """Whitespace-separated words as ``(start, end, text)`` character spans."""
    words, start = [], None
    for i, ch in enumerate(text + " "):
        if ch.isspace():
            if start is not None:
                words.append((start, i, text[start:i]))
                start = None
        elif start is None:
            start = i
    return words


def word_at(words: Sequence[tuple[int, int, str]], text: str, start: int, end: int) -> int | None:
    """Index of the word holding the token ``text[start:end]``: the word of its first non-space
    character. A token with no such character (a lone word-start marker "▁", which some decoders
    render as nothing until the next piece arrives) belongs to the next word; at the end (EOS), to none."""
    first = start
    while first < end and text[first].isspace():
        first += 1
    for i, (w_start, w_end, _) in enumerate(words):
        if w_start <= first < w_end and first < end:
            return i
        if first == end and w_start >= start:
            return i
    return None


def group_words(text: str, offsets: Sequence[tuple[int, int]], boxes, valid=None) -> list[Word]:
    """Words of ``text`` with their boxes.

    ``offsets``: each token's ``(start, end)`` characters in ``text``; ``boxes``: ``(L, 4)`` per
    token; ``valid``: optional bool ``(L,)``, tokens whose box may be used. Words whose tokens have
    no usable box are left out.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    valid = np.ones(len(boxes), bool) if valid is None else np.asarray(valid, bool)
    spans = caption_words(text)
    members: list[list[int]] = [[] for _ in spans]
    for j, (start, end) in enumerate(offsets):
        index = word_at(spans, text, start, end)
        if index is not None and valid[j]:
            members[index].append(j)
    words: list[tuple[str, list[int], list[int]]] = []  # text, all tokens, box tokens
    pending: tuple[str, list[int]] | None = None  # leading punctuation waiting for a word
    for (_, _, piece), tokens in zip(spans, members, strict=True):
        if not _has_alnum(piece) and words:
            text_, all_tokens, box_tokens = words[-1]
            words[-1] = (text_ + piece, all_tokens + tokens, box_tokens)
            continue
        if not _has_alnum(piece):
            pending = (piece, tokens) if pending is None else (pending[0] + piece, pending[1] + tokens)
            continue
        core = [j for j in tokens if _has_alnum(text[offsets[j][0] : offsets[j][1]])]
        if pending is not None:
            piece, tokens, pending = pending[0] + piece, pending[1] + tokens, None
        words.append((piece, tokens, core or tokens))
    if pending is not None:
        words.append((pending[0], pending[1], pending[1]))
    return [_word(t, all_tokens, box_tokens, boxes) for t, all_tokens, box_tokens in words if box_tokens]


def token_offsets(
    tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]
) -> tuple[str, list[tuple[int, int]]]:
    """Decoded text of ``ids`` and each token's character span in it (special tokens: empty spans).

    Works for any tokenizer by decoding growing prefixes: the characters token ``k`` adds are
    its span. Where a decoder rewrites earlier characters (a partial UTF-8 byte), the span
    starts at the first changed character.
    """
    offsets, previous = [], ""
    for k in range(1, len(ids) + 1):
        current = tokenizer.decode(
            list(ids[:k]), skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        common = _common_prefix(previous, current)
        offsets.append((common, len(current)))
        previous = current
    return previous, offsets


def words_from_ids(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], boxes, valid=None) -> list[Word]:
    """``group_words`` for generated ids: decode them, then group."""
    text, offsets = token_offsets(tokenizer, ids)
    return group_words(text, offsets, boxes, valid)


def _word(text: str, tokens: list[int], box_tokens: list[int], boxes: np.ndarray) -> Word:
    box = boxes[box_tokens].mean(axis=0)
    return Word(text, box.tolist(), [float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2], tokens)


def _has_alnum(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
