"""Collation of ``Example`` objects into the batch contract of ``PixelLLM.forward``.

Keys, dtypes and shapes are those of docs/architecture.md ("The batch contract"): ``B`` images,
``N`` prompts over all of them, ``Lp`` prompt and ``Lt`` target tokens, canvas ``S``. The optional
keys appear only when some example has them: ``gt_masks``/``mask_weight`` when a prompt has a mask,
``gt_boxes``/``gt_boxes_mask``/``detection_weight`` when an image has detection targets,
``answer_weight`` when a prompt's answer is written in location tokens (tasks locate, detect),
``codebook_weight``/``seg_masks``/``seg_prompt_index`` when a prompt's answer writes codebook groups
(task muse: ``codebook_weight`` float32 ``(N,)``, ``seg_masks`` bool ``(T, S, S)`` the canvas mask of
every target, prompt by prompt in answer order, ``seg_prompt_index`` long ``(T,)`` the prompt of each).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pixelllm.data.pipeline import Example, Skip

IGNORE_INDEX = -100
SCENE_TASKS = ("trace", "caption")  # the tasks whose prompts caption the whole image


def collate(examples: Sequence[Example | Skip | None], pad_token_id: int = 0) -> dict[str, Any] | None:
    """Stack ``examples`` (``None`` and ``Skip`` entries, from skipped samples, are dropped) into one batch dict.

    Returns None when nothing is left. ``input_ids`` are right-padded with ``pad_token_id``,
    ``labels`` with -100; ``meta`` is a list of ``B`` dicts (``image_id``, ``source``,
    ``original_size`` ``(W, H)``, ``scale``, ``transform``, and ``prompts``: per prompt its task,
    target text, region id and ``target_box`` in original pixels, or None).
    """
    examples = [e for e in examples if isinstance(e, Example)]
    if not examples:
        return None
    prompts = [(b, p) for b, e in enumerate(examples) for p in e.targets.prompts]
    n, lp, lt = (
        len(prompts),
        max(len(p.prompt_ids) for _, p in prompts),
        max(len(p.label_ids) for _, p in prompts),
    )
    size = examples[0].pixel_mask.shape[-1]
    batch: dict[str, Any] = {
        "pixel_values": torch.stack([e.pixel_values for e in examples]),
        "pixel_mask": torch.stack([e.pixel_mask for e in examples]),
        "prompt_image_index": torch.tensor([b for b, _ in prompts], dtype=torch.long),
        "prompt_boxes": _floats([p.prompt_box for _, p in prompts], (n, 4)),
        "prompt_is_point": torch.tensor([p.prompt_is_point for _, p in prompts], dtype=torch.bool),
        "input_ids": torch.full((n, lp), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros((n, lp), dtype=torch.long),
        "labels": torch.full((n, lt), IGNORE_INDEX, dtype=torch.long),
        "label_boxes": torch.zeros((n, lt, 4), dtype=torch.float32),
        "label_box_mask": torch.zeros((n, lt), dtype=torch.bool),
        "caption_weight": torch.tensor([p.caption_weight for _, p in prompts], dtype=torch.float32),
        "location_weight": torch.tensor([p.location_weight for _, p in prompts], dtype=torch.float32),
        "prompt_scene": torch.tensor([p.task in SCENE_TASKS for _, p in prompts], dtype=torch.bool),
    }
    for i, (_, p) in enumerate(prompts):
        batch["input_ids"][i, : len(p.prompt_ids)] = torch.tensor(p.prompt_ids, dtype=torch.long)
        batch["attention_mask"][i, : len(p.prompt_ids)] = 1
        batch["labels"][i, : len(p.label_ids)] = torch.tensor(p.label_ids, dtype=torch.long)
        batch["label_boxes"][i, : len(p.label_ids)] = torch.from_numpy(np.asarray(p.label_boxes, np.float32))
        batch["label_box_mask"][i, : len(p.label_ids)] = torch.from_numpy(np.asarray(p.label_box_mask, bool))
    if any(p.mask is not None for _, p in prompts):
        batch["gt_masks"] = torch.zeros((n, size, size), dtype=torch.bool)
        for i, (_, p) in enumerate(prompts):
            if p.mask is not None:
                batch["gt_masks"][i] = torch.from_numpy(p.mask)
        batch["mask_weight"] = torch.tensor([p.mask_weight for _, p in prompts], dtype=torch.float32)
    if any(p.answer_weight > 0 for _, p in prompts):
        batch["answer_weight"] = torch.tensor([p.answer_weight for _, p in prompts], dtype=torch.float32)
    if any(p.codebook_weight > 0 for _, p in prompts):
        batch.update(_codebook_fields([p for _, p in prompts], size))
    if any(e.targets.detection_weight > 0 or len(e.targets.gt_boxes) for e in examples):
        m = max(len(e.targets.gt_boxes) for e in examples)
        batch["gt_boxes"] = torch.zeros((len(examples), m, 4), dtype=torch.float32)
        batch["gt_boxes_mask"] = torch.zeros((len(examples), m), dtype=torch.bool)
        for b, e in enumerate(examples):
            count = len(e.targets.gt_boxes)
            batch["gt_boxes"][b, :count] = torch.from_numpy(np.asarray(e.targets.gt_boxes, np.float32))
            batch["gt_boxes_mask"][b, :count] = True
        batch["detection_weight"] = torch.tensor(
            [e.targets.detection_weight for e in examples], dtype=torch.float32
        )
    batch["meta"] = [_meta(e) for e in examples]
    return batch


def _codebook_fields(prompts: list, size: int) -> dict[str, torch.Tensor]:
    """``codebook_weight (N,)``, ``seg_masks (T, S, S)`` and ``seg_prompt_index (T,)`` of ``N`` prompts
    whose ``T`` targets' canvas masks are their ``seg_masks`` (module docstring)."""
    targets = [(i, mask) for i, p in enumerate(prompts) for mask in p.seg_masks or []]
    masks = [torch.from_numpy(mask) for _, mask in targets]
    return {
        "codebook_weight": torch.tensor([p.codebook_weight for p in prompts], dtype=torch.float32),
        "seg_masks": torch.stack(masks) if masks else torch.zeros((0, size, size), dtype=torch.bool),
        "seg_prompt_index": torch.tensor([i for i, _ in targets], dtype=torch.long),
    }


def _floats(rows: list, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(np.asarray(rows, dtype=np.float32).reshape(shape))


def _meta(example: Example) -> dict[str, Any]:
    prompts = [
        {
            "task": p.task,
            "text": p.text,
            "region_id": p.region_id,
            "target_box": None if p.target_box is None else [float(v) for v in p.target_box],
        }
        for p in example.targets.prompts
    ]
    return {**example.meta, "prompts": prompts}
