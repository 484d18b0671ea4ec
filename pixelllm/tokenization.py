"""Text in and out of the language model: one convention for every LM family.

- A **prompt** is tokenized the tokenizer's own way (T5 appends ``</s>``, Llama prepends ``<s>``).
- A **target** (caption, expression) is the text's tokens without special tokens, then EOS; its
  character offsets say which word each token belongs to.

``train_tokenizer`` builds the small T5-style tokenizer of the embedded default (``<pad>`` = 0,
``</s>`` = 1, ``<unk>`` = 2, sentencepiece-like "▁" word boundaries) with the ``tokenizers`` library.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from pixelllm.errors import InputError

SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}


@dataclass(frozen=True)
class EncodedTarget:
    """A target text as token ids ending with EOS, and each token's ``(start, end)`` characters.

    ``offsets`` has one entry per id; EOS gets ``(len(text), len(text))``.
    """

    text: str
    ids: list[int]
    offsets: list[tuple[int, int]]


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Prompt ids with the tokenizer's own special tokens."""
    return list(tokenizer(text)["input_ids"])


def encode_target(tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int | None = None) -> EncodedTarget:
    """Target ids (text tokens, then EOS), truncated to ``max_tokens`` including the EOS."""
    if not text or not text.strip():
        raise InputError("empty text: a caption or expression needs at least one word")
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    offsets = [tuple(o) for o in encoding["offset_mapping"]]
    if max_tokens is not None:
        ids, offsets = ids[: max_tokens - 1], offsets[: max_tokens - 1]
    return EncodedTarget(text, ids + [tokenizer.eos_token_id], offsets + [(len(text), len(text))])


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a case-preserving BPE tokenizer in the T5 layout on ``texts``.

    Words are split on whitespace with a "▁" marking each word start (as sentencepiece), then
    punctuation is split off, so decoding restores the spacing and offsets map tokens to words.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = [SPECIAL_TOKENS["pad_token"], SPECIAL_TOKENS["eos_token"], SPECIAL_TOKENS["unk_token"]]
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"), pre_tokenizers.Punctuation("isolated")]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = ["▁", *string.ascii_letters, *string.digits, *string.punctuation]  # no <unk> in plain English
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    eos = SPECIAL_TOKENS["eos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, tok.token_to_id(eos))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
