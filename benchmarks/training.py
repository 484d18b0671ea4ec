"""Training-step speed, measured side by side in one run on the recipe of the embedded default.

    python benchmarks/training.py [--config configs/shapes_tiny.yaml] [--images 64] [--repeats 20]
                                  [--versus OTHER.yaml]

Batches are the config's task mixture (every task present from step 0) drawn from a small shapes
world generated into a temporary directory; the model is the config's preset with random weights.
Each ratio times its two contenders alternately over the same batches and compares medians, so a
busy machine slows both alike. Results go to RESULTS.md by hand.

7. A training step (forward + backward) with the semantic tower compiled by ``torch.compile`` vs
   eager (speed-up; compilation itself is excluded and printed apart).
8. Building a batch (read, augment, targets, collate) vs its forward + backward (time ratio): the
   share that a data-loading worker could overlap.
9. Only where a CUDA GPU is present: a bf16 training step on a batch whose shapes the process has not
   seen before, with cuDNN's attention kernels allowed vs not (speed-down of allowing them; the
   training loop turns them off).
10. A training step with PyTorch's default choice of attention kernel (flash where it applies) vs
    the math kernel only (speed-up of the math kernel).
11. Only with ``--versus``: a training step of the other config's model vs this config's, over the
    same examples (each put on its own model's canvas), alternately (time ratio). The two configs
    must mix the same datasets; their models may differ in anything.

Also printed: each top-level module's share of the forward pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from pixelllm.data.collate import collate
from pixelllm.data.synthetic import generate
from pixelllm.train import MixtureBatches, MixtureDataset, TrainConfig, _setup, _to_device, setup_runtime


def mixed_batches(config: TrainConfig, data: Path, count: int):
    """``count`` micro-batches of the config's mixture over ``data``, as address lists, with the
    dataset they address, the tokenizer trained on ``data`` and the config's model (random weights)."""
    datasets = [dataclasses.replace(d, data=str(data), start=0) for d in config.datasets]
    config = dataclasses.replace(config, datasets=datasets)
    runtime = setup_runtime(config)
    tokenizer, sources, model = _setup(config, None)
    sampler = MixtureBatches([len(s) for s, _ in sources], [d.weight for d in datasets], [0] * len(datasets),
                             config.batch_size, 1, runtime, config.seed, 0, count)
    return list(sampler), MixtureDataset(sources), tokenizer, model


def step_time(model: torch.nn.Module, batch: dict) -> float:
    """Seconds of one forward + backward (gradients cleared after), bf16 autocast on a GPU."""
    cuda = batch["pixel_values"].is_cuda
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        loss = model(batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compare_compiled(model: torch.nn.Module, batches: list[dict]) -> None:
    """Row 7: steps with the semantic tower compiled and eager, alternately over the same batches."""
    for batch in batches[:3]:  # warm-up
        step_time(model, batch)
    eager_tower = model.vision.semantic
    compiled_tower = torch.compile(eager_tower)
    model.vision.semantic = compiled_tower
    print(f"torch.compile of the semantic tower: {step_time(model, batches[0]):.1f} s the first step")
    times = {eager_tower: [], compiled_tower: []}
    for batch in batches:
        for tower in times:
            model.vision.semantic = tower
            times[tower].append(step_time(model, batch))
    model.vision.semantic = eager_tower
    eager, compiled = statistics.median(times[eager_tower]), statistics.median(times[compiled_tower])
    print(f"7. training step, compiled semantic tower vs eager: eager {eager:.3f} s, compiled {compiled:.3f} s, "
          f"speed-up {eager / compiled:.2f}")


def compare_attention_kernels(model: torch.nn.Module, batches: list[dict]) -> None:
    """Row 10: steps with the default attention kernels and with the math kernel only, alternately."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    times = {"default": [], "math": []}
    for batch in batches:
        times["default"].append(step_time(model, batch))
        with sdpa_kernel([SDPBackend.MATH]):
            times["math"].append(step_time(model, batch))
    default, math = statistics.median(times["default"]), statistics.median(times["math"])
    print(f"10. training step, math attention kernel vs default: default {default:.3f} s, math {math:.3f} s, "
          f"speed-up {default / math:.2f}")


def compare_cudnn_attention(model: torch.nn.Module, batches: list[dict]) -> None:
    """Row 9: first steps on new batch shapes with cuDNN attention allowed and not, alternately."""
    model.cuda()
    batches = [_to_device(batch, torch.device("cuda")) for batch in batches]
    step_time(model, batches[0])  # warm-up
    times = {True: [], False: []}
    for i, batch in enumerate(batches[1:]):
        allowed = i % 2 == 0
        torch.backends.cuda.enable_cudnn_sdp(allowed)
        times[allowed].append(step_time(model, batch))
    torch.backends.cuda.enable_cudnn_sdp(False)
    on, off = statistics.median(times[True]), statistics.median(times[False])
    print(f"9. training step on new shapes ({torch.cuda.get_device_name()}), cuDNN attention allowed vs not: "
          f"allowed {on:.3f} s, not {off:.3f} s, ratio {on / off:.2f}")


def compare_recipes(ours: tuple, theirs: tuple) -> None:
    """Row 11: steps of two recipes, alternately; each is ``(name, model, batches)``, the batches
    built from the same addresses."""
    recipes, times = (ours, theirs), ([], [])
    for _, model, batches in recipes:
        model.train()
        step_time(model, batches[0])  # warm-up
    for i in range(len(ours[2])):
        for (_, model, batches), spent in zip(recipes, times, strict=True):
            spent.append(step_time(model, batches[i]))
    a, b = statistics.median(times[0]), statistics.median(times[1])
    print(f"11. training step, {theirs[0]} vs {ours[0]}: {b:.3f} s vs {a:.3f} s, ratio {b / a:.2f}")


def forward_shares(model: torch.nn.Module, batches: list[dict]) -> dict[str, float]:
    """Each part's (trunk parts and heads) share of the forward time over ``batches``; a head that
    works through methods other than its ``forward`` counts in no part."""
    spent, starts = defaultdict(float), {}
    hooks = []
    for name, module in model.parts().items():
        hooks.append(module.register_forward_pre_hook(lambda m, i, n=name: starts.__setitem__(n, time.perf_counter())))
        hooks.append(module.register_forward_hook(
            lambda m, i, o, n=name: spent.__setitem__(n, spent[n] + time.perf_counter() - starts[n])))
    total = 0.0
    with torch.no_grad():
        for batch in batches:
            start = time.perf_counter()
            model(batch)
            total += time.perf_counter() - start
    for hook in hooks:
        hook.remove()
    return {name: value / total for name, value in sorted(spent.items(), key=lambda kv: -kv[1])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/shapes_tiny.yaml")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--versus", help="another training config: row 11 compares its step with this one's")
    args = parser.parse_args()
    config = TrainConfig.load(args.config)
    torch.set_num_threads(config.threads or torch.get_num_threads())
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:  # the builders read the images from here
        generate(tmp, args.images, seed=0, progress=False)
        addresses, dataset, tokenizer, model = mixed_batches(config, Path(tmp), args.repeats)

        def build(address, dataset=dataset):
            return collate([dataset[a] for a in address], tokenizer.pad_token_id)

        batches = [build(a) for a in addresses]
        model.train()
        print(f"config {args.config}, batch {config.batch_size}, {torch.get_num_threads()} threads, "
              f"{platform.processor() or platform.machine()}, torch {torch.__version__}")
        if args.versus:
            other_addresses, other_dataset, _, other = mixed_batches(TrainConfig.load(args.versus), Path(tmp),
                                                                   args.repeats)
            if other_addresses != addresses:
                raise SystemExit(f"{args.versus} mixes other datasets than {args.config}: no common examples")
            other_batches = [build(a, other_dataset) for a in addresses]
            compare_recipes((args.config, model, batches), (args.versus, other, other_batches))
        compare_compiled(model, batches)
        built, stepped = [], []
        for address in addresses:
            start = time.perf_counter()
            batch = build(address)
            built.append(time.perf_counter() - start)
            stepped.append(step_time(model, batch))
    b, s = statistics.median(built), statistics.median(stepped)
    print(f"8. building a batch vs its forward + backward: build {b:.3f} s, step {s:.3f} s, ratio {b / s:.2f}")
    compare_attention_kernels(model, batches)

    shares = forward_shares(model, batches)
    print("forward shares: " + ", ".join(f"{name} {share:.0%}" for name, share in shares.items()))
    if torch.cuda.is_available():
        compare_cudnn_attention(model, batches)


if __name__ == "__main__":
    main()
