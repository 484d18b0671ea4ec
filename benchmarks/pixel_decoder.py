"""PixelLM's efficiency claim at the paper preset's size: one referring mask through the codebook
head's light pixel decoder against the SAM mask-decoder path, in FLOPs and CPU time side by side.

    python benchmarks/pixel_decoder.py [--repeats 5] [--threads 1] [--masks 1]

Random weights. Both paths start from an encoded image and the LM's states (neither the image
encoder nor the LM is counted) and end at canvas-size logits:

- **codebook**: the 6 states of a group -> projection and fusion -> the pixel decoder over the fused
  SAM || semantic map and the semantic map (PixelLM's 256 wide, depth 2, 8 heads, MLP 2048) -> canvas;
- **SAM**: the mask head (``heads/masks.py``): SAM's prompt encoder on the box, the mask adapter
  over the visual tokens and the expression's states, SAM's mask decoder over SAM's map -> canvas.

``--masks M`` gives M masks of one image (the pixel decoder's necks run once per image).
``--sam-encoder`` also measures SAM's ViT on one image (random weights, the preset's size): the part
PixelLM's design leaves out altogether (our trunk keeps it in the fused map). FLOPs by
``torch.utils.flop_counter.FlopCounterMode`` (matrix products, convolutions, attention); times are
medians of alternate runs (A, B, A, B, ...), so a busy machine slows both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch
from decoding import side_by_side  # benchmarks/decoding.py: this script's folder is on the path
from torch.utils.flop_counter import FlopCounterMode
from transformers.models.sam.modeling_sam import SamMaskDecoder, SamPromptEncoder, SamVisionEncoder

from pixelllm.config import preset
from pixelllm.model.build import hf_config
from pixelllm.model.features import ImageFeatures
from pixelllm.model.heads.base import BuildContext
from pixelllm.model.heads.codebook import CodebookConfig, CodebookHead
from pixelllm.model.heads.masks import MaskConfig, MaskHead
from pixelllm.model.prompt import PromptEncoder

TEXT_TOKENS = 12  # the expression's states the mask adapter reads


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def paths(masks: int):
    """The two paths as closures on the paper preset's sizes, and the sizes in words."""
    config = preset("paper")
    sam_config = hf_config(config.sam)
    lm_dim, sam_channels = config.lm["d_model"], sam_config.vision_config.output_channels
    semantic_channels, size = config.semantic["hidden_size"], config.image_size
    sam_grid = size // sam_config.vision_config.patch_size
    grid = max(sam_grid, config.semantic["image_size"] // config.semantic["patch_size"])
    prompt_encoder = PromptEncoder(SamPromptEncoder(sam_config))
    context = BuildContext(config, lm_dim, sam_channels + semantic_channels, sam_channels, prompt_encoder.dim, 0,
                           32128, sam=SimpleNamespace(mask_decoder=SamMaskDecoder(sam_config.mask_decoder_config)))
    codebook = CodebookHead(CodebookConfig(dim=256, heads=8, mlp_dim=2048), context).eval()
    mask = MaskHead(MaskConfig(), context).eval()
    images = ImageFeatures(torch.randn(1, sam_channels + semantic_channels, grid, grid),
                           torch.randn(1, sam_channels, sam_grid, sam_grid), torch.tensor([[size, size]]) * 1.0,
                           torch.zeros(1, 3, size, size))
    index = torch.zeros(masks, dtype=torch.long)
    states = torch.randn(masks, codebook.config.group_size, lm_dim)
    boxes = torch.tensor([[40.0, 60, 200, 300]]).expand(masks, 4)
    visual = torch.randn(masks, config.extractor.num_tokens, lm_dim)
    text, text_mask = torch.randn(masks, TEXT_TOKENS, lm_dim), torch.ones(masks, TEXT_TOKENS, dtype=torch.bool)
    for part in (codebook, mask, prompt_encoder):
        part.requires_grad_(False)  # FlopCounterMode's module tracker trips on parameters needing grad
    model = SimpleNamespace(config=config, prompt_encoder=prompt_encoder)

    def run_codebook():
        return codebook.masks(model, images, index, states)

    def run_sam():
        return mask.mask_logits(model, images, index, boxes, visual, text, text_mask)[0]

    sizes = (f"canvas {size}, fused map {sam_channels + semantic_channels}x{grid}x{grid}, SAM map "
             f"{sam_channels}x{sam_grid}x{sam_grid}, LM width {lm_dim}; pixel decoder "
             f"{sum(p.numel() for p in codebook.parameters()) / 1e6:.1f} M parameters (head), SAM path "
             f"{sum(p.numel() for p in (*mask.parameters(), *prompt_encoder.parameters())) / 1e6:.1f} M")
    return run_codebook, run_sam, sizes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--masks", type=int, default=1)
    parser.add_argument("--sam-encoder", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    run_codebook, run_sam, sizes = paths(args.masks)
    f_codebook, f_sam = flops(run_codebook), flops(run_sam)
    t_codebook, t_sam = side_by_side(run_codebook, run_sam, args.repeats)
    print(sizes)
    print(f"{args.masks} mask(s) of one image, {args.threads} thread(s), {args.repeats} repeats")
    print(f"{'path':<10} {'GFLOPs':>10} {'ms':>10}")
    print(f"{'codebook':<10} {f_codebook / 1e9:>10.2f} {t_codebook * 1e3:>10.1f}")
    print(f"{'SAM':<10} {f_sam / 1e9:>10.2f} {t_sam * 1e3:>10.1f}")
    print(f"codebook / SAM: FLOPs {f_codebook / f_sam:.2f}, time {t_codebook / t_sam:.2f}")
    if args.sam_encoder:
        f_vit, t_vit = sam_encoder_cost(args.repeats)
        print(f"{'SAM ViT':<10} {f_vit / 1e9:>10.2f} {t_vit * 1e3:>10.1f}   (one image, not in either path)")
        print(f"codebook / (SAM ViT + SAM path): FLOPs {f_codebook / (f_vit + f_sam):.4f}, "
              f"time {t_codebook / (t_vit + t_sam):.4f}")


def sam_encoder_cost(repeats: int) -> tuple[int, float]:
    """FLOPs and median seconds of SAM's ViT (the paper preset's, random weights) on one canvas image."""
    config = preset("paper")
    encoder = SamVisionEncoder(hf_config(config.sam).vision_config).eval().requires_grad_(False)
    pixels = torch.randn(1, 3, config.image_size, config.image_size)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        encoder(pixels)
        times.append(time.perf_counter() - start)
    return flops(lambda: encoder(pixels)), statistics.median(times)


if __name__ == "__main__":
    main()
