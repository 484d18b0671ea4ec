"""Small builders shared by the tests: tiny configs, tokenizers, models and batches."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch
from transformers import LlamaConfig

from pixelllm.config import PixelLLMConfig, preset
from pixelllm.model import build_model
from pixelllm.tokenization import encode_prompt, encode_target, train_tokenizer

CORPUS = [
    "In this image we can see a large red circle on the left, and below it a small blue star.",
    "where is the green square above the yellow triangle",
    "an object of a small purple hexagon next to an orange diamond and a white circle",
    "A long image caption: a black star, a red square and a blue triangle.",
]


@functools.cache
def tokenizer():
    return train_tokenizer(CORPUS * 4, vocab_size=200)


def llama_lm_config(vocab: int = 256) -> dict:
    return LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=True,
    ).to_dict()


def tiny_config(family: str = "t5", frozen: bool = False) -> PixelLLMConfig:
    """The tiny preset; ``family`` "llama" swaps in a causal LM; ``frozen`` uses the paper's freezing."""
    config = preset("tiny")
    data = config.to_dict()
    data["lm"]["vocab_size"] = 256
    if family == "llama":
        data["lm"] = llama_lm_config()
    if frozen:
        data.update(freeze_sam=True, lora_rank=4)
    return PixelLLMConfig.from_dict(data)


def prompts_of(batch: dict):
    """The location prompts of a collated batch."""
    from pixelllm.model import Prompts

    return Prompts(batch["prompt_image_index"], batch["prompt_boxes"], batch["prompt_is_point"])


def with_changes(config: PixelLLMConfig, **changes) -> PixelLLMConfig:
    """``config`` with fields changed; mappings (``heads``, ``extractor``) merge key by key, and None
    removes a key (a head)."""
    from pixelllm.train import merge_overrides

    return PixelLLMConfig.from_dict(merge_overrides(config.to_dict(), changes))


def tiny_model(family: str = "t5", frozen: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(tiny_config(family, frozen), tokenizer=tokenizer())


def make_batch(config: PixelLLMConfig, seed: int = 0) -> dict:
    """Two images (one landscape-padded), three prompts: a traced caption, a point prompt, and a
    referring expression with a mask target."""
    gen = torch.Generator().manual_seed(seed)
    tok = tokenizer()
    size = config.image_size
    pixel_mask = torch.ones(2, size, size, dtype=torch.bool)
    pixel_mask[1, size * 3 // 4 :] = False
    pixel_values = torch.rand(2, 3, size, size, generator=gen) * pixel_mask[:, None]
    prompts = ["A long image caption:", "an object of", "where is the red circle"]
    targets = ["a large red circle and a small blue star.", "a white circle", "the red circle"]
    prompt_ids = [encode_prompt(tok, p) for p in prompts]
    target_ids = [encode_target(tok, t).ids for t in targets]
    lp, lt = max(map(len, prompt_ids)), max(map(len, target_ids))
    input_ids = torch.full((3, lp), tok.pad_token_id)
    attention_mask = torch.zeros(3, lp, dtype=torch.long)
    labels = torch.full((3, lt), -100)
    for i, (p, t) in enumerate(zip(prompt_ids, target_ids, strict=True)):
        input_ids[i, : len(p)] = torch.tensor(p)
        attention_mask[i, : len(p)] = 1
        labels[i, : len(t)] = torch.tensor(t)
    label_boxes = torch.rand(3, lt, 4, generator=gen).sort(-1).values * size
    label_box_mask = labels >= 0
    label_box_mask[:, -1] = False
    gt_masks = torch.zeros(3, size, size, dtype=torch.bool)
    gt_masks[2, size // 4 : size // 2, size // 8 : size // 3] = True
    return {
        "pixel_values": pixel_values, "pixel_mask": pixel_mask,
        "prompt_image_index": torch.tensor([0, 0, 1]),
        "prompt_boxes": torch.tensor([[0.0, 0, size, size], [40, 50, 40, 50], [0, 0, size, size * 3 / 4]]),
        "prompt_is_point": torch.tensor([False, True, False]),
        "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
        "label_boxes": label_boxes, "label_box_mask": label_box_mask,
        "caption_weight": torch.tensor([1.0, 1.0, 0.0]), "location_weight": torch.tensor([1.0, 0.0, 1.0]),
        "gt_masks": gt_masks, "mask_weight": torch.tensor([0.0, 0.0, 1.0]),
        "gt_boxes": torch.tensor([[[10.0, 20, 60, 90], [80, 80, 150, 140]], [[30, 30, 70, 60], [0, 0, 0, 0]]]),
        "gt_boxes_mask": torch.tensor([[True, True], [True, False]]), "detection_weight": torch.ones(2),
    }


def load_script(name: str):
    """``scripts/<name>.py`` imported as a module, for testing its functions."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CODEBOOK_HEAD = "pixelllm.model.heads.codebook:CodebookHead"
"""The codebook head named by its class path (the trunk's registry also knows it as ``codebook``)."""


def codebook_model(seed: int = 0, family: str = "t5", **codebook):
    """The tiny preset with the codebook head (a small decoder) instead of the PixelLLM heads."""
    torch.manual_seed(seed)
    heads = {"location": None, "mask": None, "proposals": None,
             "codebook": {"class": CODEBOOK_HEAD, "dim": 64, "mlp_dim": 128, **codebook}}
    return build_model(with_changes(tiny_config(family), heads=heads), tokenizer=tokenizer())

