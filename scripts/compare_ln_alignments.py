"""Measure how the official (proportional) and time-window LN alignments differ on real human data.

Reads the Video Localized Narratives records (converted to image-LN narratives), tokenizes each
caption, aligns it both ways and compares, over the tokens that have a target under both:

- ``box L1``: mean absolute difference of the 4 box coordinates (normalized, clipped to [0, 1]);
- ``center L1``: mean absolute difference of the 2 center coordinates (official: time-average of
  the 16 samples of the token's utterance; time-window: time-average of the word's own path);
- ``other utt``: fraction of tokens assigned to a different utterance (here: a different word);
- ``|d utt|``: mean absolute difference of the two utterance indices;
- ``box L1 same``: box L1 over the tokens both assign to the same utterance (what remains is
  16-sample vs exact-path geometry and extrapolation);
- ``extrap.``: fraction of text tokens whose official target comes from an utterance window
  reaching outside the trace's time span (linear extrapolation);
- ``cover``: fraction of text tokens with a target under the time-window alignment (the official
  one covers all).

No T5 vocabulary can be downloaded here, so the captions are tokenized with the project's small
BPE trained on the captions themselves, at two vocabulary sizes (tokens per word is reported):
the proportional alignment depends on the token count, the time-window one does not.

Usage: python scripts/compare_ln_alignments.py [VIDLN_JSONL ...]   (default: tests/fixtures/real/vidln)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from pixelllm.data.ln import align_official, align_time_window
from pixelllm.data.vidln import VidlnReader
from pixelllm.tokenization import encode_target, train_tokenizer

DEFAULT_DIR = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "real" / "vidln"
VOCAB_SIZES = (1024, 300)


def compare(narratives, tokenizer) -> dict[str, float]:
    """Token-level differences between the two alignments over ``narratives`` (see module docstring)."""
    box, center, same_box, other, delta, extrapolated = [], [], [], [], [], []
    tokens = words = covered = 0
    for n in narratives:
        target = encode_target(tokenizer, n.caption, 128)
        a, b = align_official(n, target), align_time_window(n, target)
        both = a.mask & b.mask
        box_diff = np.abs(np.clip(a.boxes, 0, 1) - np.clip(b.boxes, 0, 1)).mean(axis=1)
        box.append(box_diff[both])
        center.append(np.abs(np.clip(a.centers, 0, 1) - np.clip(b.centers, 0, 1))[both].mean(axis=1))
        same_box.append(box_diff[both & (a.utterance == b.utterance)])
        other.append((a.utterance != b.utterance)[both])
        delta.append(np.abs(a.utterance - b.utterance)[both])
        t0, t1 = n.trace[0, 2], n.trace[-1, 2]
        outside = np.array([u.start_time < t0 or u.end_time > t1 for u in n.utterances])
        extrapolated.append(outside[a.utterance[a.mask]])
        tokens += len(target.ids) - 1
        words += len(n.caption.split())
        covered += int(b.mask.sum())
    return {
        "narratives": len(narratives),
        "tokens": tokens,
        "tokens_per_word": tokens / words,
        "box_l1": float(np.concatenate(box).mean()),
        "center_l1": float(np.concatenate(center).mean()),
        "other_utterance": float(np.concatenate(other).mean()),
        "utterance_delta": float(np.concatenate(delta).mean()),
        "box_l1_same_utterance": float(np.concatenate(same_box).mean()),
        "extrapolated": float(np.concatenate(extrapolated).mean()),
        "coverage_time": covered / tokens,
    }


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    paths = [Path(p) for p in (argv if argv else sorted(DEFAULT_DIR.glob("*.jsonl")))]
    reader = VidlnReader(paths)
    samples = list(reader)
    groups = {"all": [s.narratives[0] for s in samples]}
    for s in samples:
        groups.setdefault(s.source, []).append(s.narratives[0])
    captions = [n.caption for n in groups["all"]]
    results = {}
    print(reader.summary())
    print(
        "| data | vocab | narratives | tokens | tokens/word | box L1 | center L1 | other utt | |d utt| "
        "| box L1 same | extrap. | cover |"
    )
    print("|" + " --- |" * 12)
    for vocab in VOCAB_SIZES:
        tokenizer = train_tokenizer(captions, vocab_size=vocab)
        for name, narratives in groups.items():
            r = compare(narratives, tokenizer)
            results[f"{name}@{vocab}"] = r
            print(
                f"| {name} | {vocab} | {r['narratives']} | {r['tokens']} | {r['tokens_per_word']:.2f} "
                f"| {r['box_l1']:.3f} | {r['center_l1']:.3f} | {r['other_utterance']:.1%} "
                f"| {r['utterance_delta']:.2f} | {r['box_l1_same_utterance']:.4f} | {r['extrapolated']:.1%} "
                f"| {r['coverage_time']:.1%} |"
            )
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
