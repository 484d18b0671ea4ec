"""MUSE questions as training batches for the codebook head (PixelLM's sequence construction).

One prompt per question, on its whole image: the prompt text is the head's template with the
question; the target is the answer with the whole codebook group written after each target, no
space before it ("the small red circle[SEG0]...[SEG5], the large red star[SEG0]...[SEG5]."); a
question without a text answer gets PixelLM's template ("the red circle[SEG0]... and the blue
star[SEG0]... ."). A question with no target keeps its text answer ("there are no purple objects.")
and trains on it alone. Targets are not truncated (every group stays whole).

The batch is ``collate``'s (docs/architecture.md, "The batch contract") with ``caption_weight`` and
``location_weight`` 0, plus the codebook head's fields: ``codebook_weight`` float32 ``(N,)`` (1 on
these prompts), ``seg_masks`` bool ``(T, S, S)`` the canvas masks of every target, prompt by prompt in
answer order, and ``seg_prompt_index`` long ``(T,)`` the prompt of each.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch

from pixelllm.data.coco import decode_segmentation
from pixelllm.data.collate import collate
from pixelllm.data.images import load_image
from pixelllm.data.muse import PLACEHOLDER
from pixelllm.data.pipeline import Example
from pixelllm.data.samples import Question, Sample
from pixelllm.data.targets import ImageTargets, PromptTarget
from pixelllm.data.transforms import CanvasTransform
from pixelllm.tokenization import encode_prompt, encode_target

TASK = "muse"
_PLACEHOLDER = re.compile(r"\s*" + re.escape(PLACEHOLDER))


def answer_text(question: Question, group: str) -> str:
    """The target text of ``question`` with ``group`` (the codebook tokens, joined) after each target."""
    if question.answer is not None:
        return _PLACEHOLDER.sub(group, question.answer)
    names = [f"{(t.texts or ['the object'])[0]}{group}" for t in question.targets]
    return (", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]) + "."


def muse_example(sample: Sample, tokenizer, canvas_size: int, group: Sequence[str], prompt: str,
                 pixel_scale: int = 1) -> tuple[Example, list[list[np.ndarray]]]:
    """One image's questions on the canvas (no augmentation) and each question's target masks
    (bool ``(S, S)`` canvas, in answer order). ``prompt``: the template with ``{question}``."""
    image = load_image(sample.image)
    transform = CanvasTransform.fit(image.size, canvas_size)
    pixel_values, pixel_mask = transform.image_to_canvas(image, pixel_scale)
    width, height = image.size
    prompts, masks = [], []
    for question in sample.questions:
        text = answer_text(question, "".join(group))
        ids = encode_target(tokenizer, text).ids
        prompts.append(PromptTarget(TASK, text, encode_prompt(tokenizer, prompt.format(question=question.text)),
                                    transform.valid_box, ids, np.zeros((len(ids), 4)), np.zeros(len(ids), bool),
                                    caption_weight=0.0, location_weight=0.0))
        masks.append([transform.mask_to_canvas(decode_segmentation(t.segmentation, height, width))
                      for t in question.targets])
    meta = {"image_id": sample.image_id, "source": sample.source, "original_size": image.size,
            "scale": transform.scale, "transform": transform}
    return Example(pixel_values, pixel_mask, ImageTargets("canvas", prompts), transform, meta), masks


def muse_batch(examples: Sequence[tuple[Example, list[list[np.ndarray]]]], pad_token_id: int = 0) -> dict:
    """``collate`` of ``muse_example``s with the codebook head's fields (module docstring)."""
    batch = collate([example for example, _ in examples], pad_token_id)
    questions = [question for _, masks in examples for question in masks]
    size = batch["pixel_mask"].shape[-1]
    flat = [mask for question in questions for mask in question]
    batch["codebook_weight"] = torch.ones(len(questions))
    batch["seg_masks"] = (torch.from_numpy(np.stack(flat)) if flat else torch.zeros(0, size, size, dtype=torch.bool))
    batch["seg_prompt_index"] = torch.tensor([i for i, question in enumerate(questions) for _ in question],
                                             dtype=torch.long)
    return batch
