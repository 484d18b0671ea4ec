"""Decoding speed, as ratios measured side by side in one run on one model.

    python benchmarks/decoding.py [--preset base] [--repeats 3] [--threads N] [--rows 5,6]

Each ratio times its two contenders alternately (A, B, A, B, ...) and compares medians, so that
a busy shared machine slows both alike. The model has random weights and never stops early (its
EOS is disabled), so every decode runs the full number of steps. Results go to RESULTS.md by hand.

1. KV-cached decoding vs the official uncached loop (``use_cache=False``), 64 new tokens.
2. Decoding with a location per token vs caption only (the localization head's overhead).
3. This decoder vs ``transformers``' own ``generate`` on the same T5, caption only, greedy.
4. 32 region captions decoded as one batch vs one by one.
5. 8 referring expressions located on one encoded image vs 8 full calls (each encoding the image
   again). Locating reads the expression in one teacher-forced pass; nothing is decoded.
6. 8 referring masks read as one batch vs one by one.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch

from pixelllm.config import preset
from pixelllm.model import build_model
from pixelllm.tasks import Predictor
from pixelllm.tokenization import train_tokenizer

WORDS = ["a", "large", "red", "circle", "small", "blue", "star", "green", "square", "yellow", "triangle",
         "purple", "hexagon"]


def side_by_side(first, second, repeats: int) -> tuple[float, float]:
    """Median seconds of ``first`` and ``second``, run alternately after one warm-up each."""
    first(), second()
    a, b = [], []
    for _ in range(repeats):
        for fn, times in ((first, a), (second, b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b)


def make_predictor(name: str) -> Predictor:
    torch.manual_seed(0)
    config = preset(name)
    tokenizer = train_tokenizer([" ".join(WORDS)] * 10, vocab_size=300)
    model = build_model(config, tokenizer=tokenizer).eval()
    model.language.eos_token_id = -1  # never stop early: every decode runs its full length
    return Predictor(model)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="base")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rows", default="1,2,3,4,5,6", help="the ratios to measure, e.g. 5,6")
    args = parser.parse_args()
    rows = {int(row) for row in args.rows.split(",")}
    if args.threads:
        torch.set_num_threads(args.threads)
    predictor = make_predictor(args.preset)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
    encoded = predictor.encode(image)
    print(f"preset {args.preset}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}")

    request = [encoded._trace_prompt()]
    tokens = 64

    def decode(**options):
        return lambda: encoded._decode(request, num_beams=1, max_new_tokens=tokens, **options)

    if 1 in rows:
        cached, uncached = side_by_side(decode(), decode(use_cache=False), args.repeats)
        report("1. cached vs uncached, 64 tokens (speed-up)", uncached / cached, ">= 5")
    if 2 in rows:
        with_boxes, text_only = side_by_side(decode(), decode(read=False), args.repeats)
        report("2. with locations vs caption only (time ratio)", with_boxes / text_only, "<= 1.05")
    if 3 in rows:
        ours, theirs = side_by_side(decode(read=False, block_repeats=False),
                                    hf_generate(predictor, encoded, request, tokens), args.repeats)
        report("3. ours vs transformers generate, caption only (time ratio)", ours / theirs, "<= 1.1")
    if 4 in rows:
        boxes = [[x, y, x + 120, y + 90] for x in range(0, 480, 60) for y in range(0, 360, 90)][:32]
        batched, single = side_by_side(lambda: encoded.caption_regions(boxes, max_new_tokens=16),
                                       lambda: [encoded.caption(box=b, max_new_tokens=16) for b in boxes],
                                       args.repeats)
        report("4. 32 region captions: one by one vs batched (speed-up)", single / batched, ">= 4")

    expressions = [f"the {c} {s}" for c, s in zip(WORDS[2::3], WORDS[3::3], strict=False)][:8] * 2
    expressions = expressions[:8]
    if 5 in rows:
        once, every = side_by_side(lambda: [encoded.locate(e) for e in expressions],
                                   lambda: [predictor.encode(image).locate(e) for e in expressions], args.repeats)
        report("5. 8 expressions located: 8 full calls vs one encoding (speed-up)", every / once, ">= 3")
    if 6 in rows:
        batched, single = side_by_side(lambda: predictor.segment_batch([encoded], [expressions]),
                                       lambda: [encoded.segment(e) for e in expressions], args.repeats)
        report("6. 8 referring masks: one by one vs batched (speed-up)", single / batched, ">= 4")


def hf_generate(predictor: Predictor, encoded, request, tokens: int):
    """``transformers`` greedy ``generate`` from the same encoder inputs (T5 family only)."""
    with torch.no_grad():
        reader, _, _, ids, ids_mask = predictor._model_inputs([(encoded, request[0])])
    embeds, mask = reader.language._prefix(reader.visual, ids, ids_mask)
    lm = reader.language.model

    def run():
        with torch.no_grad():
            lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                        do_sample=False, num_beams=1)

    return run


def report(name: str, value: float, target: str) -> None:
    print(f"{name:<68}{value:8.2f}   (target {target})")


if __name__ == "__main__":
    main()
