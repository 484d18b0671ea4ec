"""The paper preset on one GPU: decode latency against the memory floor, and a training step's MFU.

    python benchmarks/paper_gpu.py [--preset paper] [--tokens 64] [--batches 8,16,32,64,128]

Random weights (the model is built on the meta device and filled on the GPU: 3.8 B parameters
would take minutes to initialize on the host), bf16.

12. Decoding: greedy, EOS disabled, one traced caption (batch 1) and a batch of 8, KV-cached: the
    time per token against the floor of the bytes one step must read (the LM decoder's weights,
    the location head's, and the cache of the encoder's states and of the tokens so far) over the
    memory bandwidth, both the device's specification and a large copy measured here.
13. Training: the trainer's step (bf16 autocast, FSDP over one process, activation checkpointing,
    every head running as FSDP needs, AdamW) on batches of whole-image traced captions (an
    8-token prompt, a 128-token target located at every token), at each batch size until memory
    runs out: images and target tokens per second, and model FLOPs utilization (the FLOPs of one
    forward and backward as ``torch.utils.flop_counter`` counts them, without the recomputation of
    checkpointing, over the step time and the device's dense bf16 peak).

Also runs on a CPU (``--preset tiny``, gloo) to check the script itself; the figures mean nothing there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

from pixelllm.config import preset
from pixelllm.generation import generate
from pixelllm.model import build_model
from pixelllm.train import OptimConfig, checkpoint_activations, make_optimizer

PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # dense, FLOP/s (SXM parts)
BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}  # bytes/s, the specification


def gpu_name() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name()
    return next((key for key in PEAK_BF16 if key in name), name)


def build(name: str, device: torch.device, dtype: torch.dtype):
    """The preset's model with random weights on ``device``: normal(0, 0.02) matrices, unit norms."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = build_model(preset(name))
    model = model.to_empty(device=device)
    with torch.no_grad():
        for parameter in model.parameters():
            (parameter.normal_(0, 0.02) if parameter.ndim > 1 else parameter.fill_(1.0))
        for buffer in model.buffers():
            buffer.zero_()
    return model.to(dtype)


def measured_bandwidth(device: torch.device) -> float:
    """Bytes per second of a 2 GiB device-to-device copy (read + write), median of 10."""
    if device.type != "cuda":
        return float("nan")
    a = torch.empty(2**30, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    times = []
    for _ in range(10):
        torch.cuda.synchronize()
        start = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * a.numel() * a.element_size() / statistics.median(times)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def inputs(model, batch: int, prompt: int, device):
    size = model.config.image_size
    pixels = torch.rand(batch, 3, size, size, device=device, dtype=torch.bfloat16)
    mask = torch.ones(batch, size, size, dtype=torch.bool, device=device)
    boxes = torch.tensor([[0.0, 0.0, size, size]], device=device).expand(batch, 4)
    ids = torch.randint(2, 1000, (batch, prompt), device=device)
    return pixels, mask, boxes, ids


@torch.no_grad()
def decode_latency(model, device, tokens: int, batch: int, repeats: int = 5) -> tuple[float, float]:
    """Seconds per token of greedy decoding (after the prefix), and the bytes one step reads."""
    model.language.eos_token_id = -1  # never stop early: every decode runs its full length
    pixels, mask, boxes, ids = inputs(model, batch, 8, device)
    images = model.encode_images(pixels, mask)
    index = torch.arange(batch, device=device)
    args = (model, images, index, boxes, torch.zeros(batch, dtype=torch.bool, device=device), ids,
            torch.ones_like(ids))
    times = {}
    for length in (1, tokens):  # the difference removes the prefix (encoder, start) from the per-token time
        generate(*args, max_new_tokens=length, block_repeats=False)
        samples = []
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            generate(*args, max_new_tokens=length, block_repeats=False)
            synchronize(device)
            samples.append(time.perf_counter() - start)
        times[length] = statistics.median(samples)
    per_token = (times[tokens] - times[1]) / (tokens - 1)
    lm = model.language.model
    decoder = [lm.decoder, lm.lm_head] if hasattr(lm, "decoder") else [lm]
    weights = sum(p.numel() * p.element_size() for part in decoder for p in part.parameters())
    weights += sum(p.numel() * p.element_size() for p in model.heads["location"].parameters())
    config = lm.config
    layers = getattr(config, "num_decoder_layers", None) or config.num_hidden_layers
    width = config.num_heads * config.d_kv if hasattr(config, "d_kv") else config.hidden_size
    encoder_length = model.config.extractor.num_tokens + 8
    cache = 2 * layers * width * 2 * batch * (encoder_length + tokens / 2)  # k and v, bf16, mean self length
    return per_token, weights + cache


def trace_batch(model, batch: int, device, target: int = 128) -> dict:
    """Whole-image traced captions: an 8-token prompt, ``target`` tokens each located."""
    pixels, mask, boxes, ids = inputs(model, batch, 8, device)
    size = model.config.image_size
    labels = torch.randint(2, 1000, (batch, target), device=device)
    labels[:, -1] = 1
    corners = (torch.rand(batch, target, 2, 2, device=device) * size).sort(2).values
    return {
        "pixel_values": pixels.float(), "pixel_mask": mask, "prompt_image_index": torch.arange(batch, device=device),
        "prompt_boxes": boxes.contiguous(), "prompt_is_point": torch.zeros(batch, dtype=torch.bool, device=device),
        "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
        "label_boxes": corners.flatten(2), "label_box_mask": torch.ones(batch, target, dtype=torch.bool, device=device),
        "caption_weight": torch.ones(batch, device=device), "location_weight": torch.ones(batch, device=device),
        "prompt_scene": torch.ones(batch, dtype=torch.bool, device=device),
    }


def forward_backward_flops(model, device) -> float:
    """FLOPs of one forward and backward of one image's traced caption (``torch.utils.flop_counter``)."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = trace_batch(model, 1, device)
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(device.type, dtype=torch.bfloat16):
        model(batch, all_heads=True).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def shard(model, device):
    """FSDP over one process, as the trainer's ``wrap_model`` shards (each transformer layer, then the rest)."""
    from torch.distributed.fsdp import fully_shard

    from pixelllm.train import _FSDP_LAYERS

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29531")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    for module in model.modules():
        if type(module).__name__ in _FSDP_LAYERS:
            fully_shard(module)
    return fully_shard(model)


def train_steps(model, device, batch: int, repeats: int) -> float:
    """Median seconds of the trainer's step (forward, backward, clip, AdamW) at ``batch`` images."""
    optimizer = make_optimizer(model, OptimConfig(lr=1e-5))
    data = trace_batch(model, batch, device)
    times = []
    for step in range(repeats + 2):
        synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            model(data, all_heads=True).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if step >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batches", default="8,16,32,64,128")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-decode", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.enable_cudnn_sdp(False)  # as the trainer runs (benchmarks/RESULTS.md)
    name = gpu_name()
    print(f"preset {args.preset}, device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
          f"torch {torch.__version__}")
    if not args.skip_decode:
        model = build(args.preset, device, torch.bfloat16).eval()
        bandwidth = measured_bandwidth(device)
        print(f"memory bandwidth: measured copy {bandwidth / 1e12:.2f} TB/s, "
              f"specification {BANDWIDTH.get(name, float('nan')) / 1e12:.2f} TB/s")
        for batch in (1, 8):
            per_token, read = decode_latency(model, device, args.tokens, batch)
            floors = {label: read / value for label, value in (("spec", BANDWIDTH.get(name, float("nan"))),
                                                              ("measured", bandwidth))}
            print(f"12. decode, batch {batch}: {1e3 * per_token:.2f} ms/token; a step reads {read / 1e9:.2f} GB; "
                  + ", ".join(f"floor ({k}) {1e3 * f:.3f} ms, ratio {per_token / f:.2f}" for k, f in floors.items()),
                  flush=True)
        del model
    model = build(args.preset, device, torch.float32).train()
    flops = forward_backward_flops(model, device)
    print(f"13. one image's forward + backward: {flops / 1e9:.1f} GFLOP (model FLOPs, no recomputation)", flush=True)
    checkpoint_activations(model)
    shard(model, device)
    peak = PEAK_BF16.get(name, float("nan"))
    for batch in (int(b) for b in args.batches.split(",")):
        try:
            seconds = train_steps(model, device, batch, args.repeats)
        except torch.OutOfMemoryError:
            print(f"13. batch {batch}: out of memory")
            break
        memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        print(f"13. batch {batch}: {seconds:.3f} s/step, {batch / seconds:.1f} images/s, "
              f"{batch * 128 / seconds:.0f} target tokens/s, MFU {batch * flops / seconds / peak:.1%} "
              f"(peak memory {memory:.1f} GiB)", flush=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main()
