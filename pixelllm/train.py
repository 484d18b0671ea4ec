"""Training: one readable loop, the same on one CPU process or many GPUs under ``torchrun``.

    pixelllm train --config configs/shapes_tiny.yaml --out runs/shapes_tiny
    torchrun --nproc-per-node 8 -m pixelllm.train --config configs/paper_trace.yaml --out runs/trace

A run is a config file (``configs/*.yaml``, see ``TrainConfig``): the model (a preset, or real
checkpoints), datasets mixed by sampling weights (each with its task's loss gating), AdamW without
decay on norms and biases, linear warmup then cosine decay, gradient clipping and accumulation,
bf16 autocast on GPUs that have it, optional activation checkpointing, DDP (or FSDP) across
processes. Every step's batch is a pure function of (seed, step), so ``--resume`` continues
exactly where the last checkpoint left off, and a 2-process run sees the same examples as one
process accumulating 2 micro-batches.

Outputs in ``--out``: ``metrics.jsonl``, TensorBoard events in ``tb/``, ``last/`` (model +
trainer state, rewritten atomically every ``save_every`` steps), ``best/`` (the best evaluation).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from tqdm import tqdm

from pixelllm.box_pixel_pretrain import BoxPixelPretrainConfig, pretrain_box_pixels
from pixelllm.config import PixelLLMConfig, atomic_write_text, preset
from pixelllm.data.collate import collate
from pixelllm.data.pipeline import DEFAULT_AUGMENT, Augment, ExampleBuilder, TaskConfig
from pixelllm.data.sources import open_source
from pixelllm.errors import ConfigError, PixelLLMError
from pixelllm.model import PixelLLM, build_from_pretrained_parts, build_model
from pixelllm.tokenization import train_tokenizer

STATE_TENSORS, STATE_JSON = "trainer_state.safetensors", "trainer_state.json"


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class DatasetConfig:
    """One training source: ``task`` samples read from ``data`` (layouts: ``pixelllm.data.sources``)."""

    task: str
    data: str
    weight: float = 1.0
    split: str | None = None
    images: str | None = None
    max_prompts: int | None = None
    augment: dict[str, Any] | None = None  # pipeline.Augment fields; default: the task's
    refer_text_loss: bool = False
    start: int = 0  # the step from which this dataset joins the mixture (a curriculum)


@dataclass
class ModelConfig:
    """A preset (with top-level overrides), a checkpoint to start from, or real pretrained parts."""

    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    init: str | None = None  # a PixelLLM checkpoint directory (``overrides`` apply to its config)
    train_only: list[str] | None = None  # the model's parts that train (``PixelLLM.train_only``); None: all
    sam: str | None = None  # Hugging Face checkpoint directories for build_from_pretrained_parts
    semantic: str | None = None
    lm: str | None = None
    tokenizer: str | None = None  # a tokenizer directory; None: the LM's, or train one (vocab_size)
    vocab_size: int = 1024


@dataclass
class OptimConfig:
    lr: float = 1e-4
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    grad_clip: float = 1.0


@dataclass
class EvalConfig:
    """Periodic evaluation on held-out data with the evaluation suite (rank 0)."""

    data: str | None = None
    tasks: list[str] = field(default_factory=list)
    every: int = 1000
    limit: int | None = 200
    metric: str | None = None  # "task/metric" that picks the best checkpoint, higher is better


@dataclass
class SynthConfig:
    """Generate the shapes world into ``<out>/data`` first (train and val splits), if missing."""

    train_images: int = 0
    val_images: int = 0
    seed: int = 0


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    datasets: list[DatasetConfig] = field(default_factory=list)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    box_pixel_pretrain: BoxPixelPretrainConfig = field(default_factory=BoxPixelPretrainConfig)
    steps: int = 1000
    batch_size: int = 8  # images per micro-batch per process
    accumulation: int = 1
    num_workers: int = 1
    seed: int = 0
    log_every: int = 10
    save_every: int = 500
    bf16: bool | None = None  # None: on where a CUDA GPU supports it
    activation_checkpointing: bool = False
    strategy: str = "ddp"  # or "fsdp" (shards parameters; for the large presets)
    threads: int | None = None  # torch CPU threads per process

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainConfig:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        config = _from_dict(cls, data or {}, "config")
        if not config.datasets:
            raise ConfigError(f"{path}: 'datasets' must list at least one dataset")
        if not any(d.start == 0 for d in config.datasets):
            raise ConfigError(f"{path}: at least one dataset must start at step 0")
        if config.strategy not in ("ddp", "fsdp"):
            raise ConfigError(f"{path}: strategy must be ddp or fsdp, got {config.strategy!r}")
        return config


def _from_dict(cls, data: dict, where: str):
    """Nested dataclass from a dict, refusing unknown keys with the key's path in the message."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(unknown)}")
    nested = {"model": ModelConfig, "optim": OptimConfig, "eval": EvalConfig, "synth": SynthConfig,
              "box_pixel_pretrain": BoxPixelPretrainConfig}
    values = {}
    for key, value in data.items():
        if key in nested and cls is TrainConfig:
            value = _from_dict(nested[key], value, f"{where}.{key}")
        elif key == "datasets" and cls is TrainConfig:
            value = [_from_dict(DatasetConfig, d, f"{where}.datasets[{i}]") for i, d in enumerate(value)]
        elif key == "betas":
            value = tuple(value)
        values[key] = value
    return cls(**values)


# ----------------------------------------------------------------------------------------------
# Processes


@dataclass
class Runtime:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_runtime(config: TrainConfig) -> Runtime:
    """One process, or one of ``torchrun``'s (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    # Every batch has its own text lengths and prompt counts, and cuDNN's attention builds a plan for
    # each new shape (a step on shapes not seen before took 6.6x as long on an H100, benchmarks/
    # RESULTS.md); the flash and memory-efficient kernels need no plan.
    torch.backends.cuda.enable_cudnn_sdp(False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return Runtime(0, 1, device)
    local = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        device = torch.device("cuda", local)
    else:
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    return Runtime(dist.get_rank(), dist.get_world_size(), device)


# ----------------------------------------------------------------------------------------------
# Data: every micro-batch is a pure function of (seed, step, global micro index)


class MixtureDataset(torch.utils.data.Dataset):
    """Examples addressed by ``(dataset, sample, key)``; ``key`` seeds the augmentation."""

    def __init__(self, sources: list[tuple[list, ExampleBuilder]]):
        self.sources = sources

    def __len__(self) -> int:
        return sum(len(samples) for samples, _ in self.sources)

    def __getitem__(self, address: tuple[int, int, tuple[int, ...]]):
        dataset, index, key = address
        samples, builder = self.sources[dataset]
        return builder(samples[index], np.random.default_rng(key))


class MixtureBatches(torch.utils.data.Sampler):
    """For each step from ``start``: this process's micro-batches, as lists of addresses.

    Global micro-batch ``g`` of step ``s`` (``g = micro * world + rank``) is drawn with the RNG
    seeded ``(seed, s, g)``: datasets by weight (those whose ``starts`` step has come), samples
    uniformly (with replacement).
    """

    def __init__(self, sizes: list[int], weights: list[float], starts: list[int], batch_size: int,
                 accumulation: int, runtime: Runtime, seed: int, start: int, steps: int):
        self.sizes = sizes
        self.weights, self.starts = np.asarray(weights, dtype=np.float64), np.asarray(starts)
        self.batch_size, self.accumulation = batch_size, accumulation
        self.rank, self.world, self.seed, self.start, self.steps = runtime.rank, runtime.world, seed, start, steps

    def __len__(self) -> int:
        return (self.steps - self.start) * self.accumulation

    def __iter__(self):
        for step in range(self.start, self.steps):
            for micro in range(self.accumulation):
                g = micro * self.world + self.rank
                rng = np.random.default_rng((self.seed, step, g))
                weights = self.weights * (self.starts <= step)
                datasets = rng.choice(len(self.sizes), size=self.batch_size, p=weights / weights.sum())
                yield [(int(d), int(rng.integers(self.sizes[d])), (self.seed, step, g, slot))
                       for slot, d in enumerate(datasets)]


def load_sources(config: TrainConfig, tokenizer, model_config: PixelLLMConfig) -> list[tuple[list, ExampleBuilder]]:
    """Every dataset's samples and the builder that puts them on ``model_config``'s canvas."""
    sources = []
    for spec in config.datasets:
        reader = open_source(spec.task, spec.data, split=spec.split, images=spec.images).reader
        samples = list(reader)
        if not samples:
            raise ConfigError(f"dataset {spec.task} at {spec.data} has no usable sample ({reader.summary()})")
        unknown = set(spec.augment or {}) - {f.name for f in dataclasses.fields(Augment)}
        if unknown:
            raise ConfigError(f"{spec.task} dataset: unknown augment key(s) {', '.join(sorted(unknown))}")
        augment = Augment(**{**dataclasses.asdict(DEFAULT_AUGMENT[spec.task]), **(spec.augment or {})})
        task = TaskConfig(spec.task, model_config.image_size, max_prompts=spec.max_prompts,
                          prompts=model_config.prompts, augment=augment, refer_text_loss=spec.refer_text_loss,
                          pixel_scale=model_config.pixel_scale)
        sources.append((samples, ExampleBuilder(tokenizer, task, name=f"{spec.task}:{spec.data}")))
    return sources


def texts_for_tokenizer(sources) -> list[str]:
    """Every caption, expression and region text of the training data (to train a tokenizer)."""
    texts = []
    for samples, _ in sources:
        for sample in samples:
            texts += [n.caption for n in sample.narratives] + list(sample.captions)
            texts += [t for region in sample.regions for t in region.texts]
    return texts


# ----------------------------------------------------------------------------------------------
# Model and optimizer


def model_config(m: ModelConfig) -> PixelLLMConfig:
    """The config the model of ``m`` will have (the data needs its canvas before the model exists)."""
    base = PixelLLMConfig.load(m.init) if m.init else preset(m.preset)
    return PixelLLMConfig.from_dict({**base.to_dict(), **m.overrides})


def make_model(config: TrainConfig, tokenizer) -> PixelLLM:
    m = config.model
    if m.init:
        return PixelLLM.from_pretrained(m.init, config=model_config(m) if m.overrides else None)
    base = model_config(m)
    if m.sam or m.semantic or m.lm:
        return build_from_pretrained_parts(base, sam=m.sam, semantic=m.semantic, lm=m.lm, tokenizer=m.tokenizer)
    return build_model(base, tokenizer=tokenizer)


def make_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms, biases and other 1-d parameters."""
    decay, no_decay = [], []
    for _, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim < 2 else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas)


def learning_rate(step: int, total: int, optim: OptimConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio``."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    progress = (step - optim.warmup_steps) / max(1, total - optim.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return optim.lr * (optim.min_lr_ratio + (1 - optim.min_lr_ratio) * cosine)


def wrap_model(model: PixelLLM, config: TrainConfig, runtime: Runtime) -> torch.nn.Module:
    """DDP or FSDP across processes; the plain model for one process."""
    if config.activation_checkpointing:
        model.language.model.gradient_checkpointing_enable()
        model.vision.semantic.gradient_checkpointing_enable()
    if runtime.world == 1:
        return model
    if config.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for module in model.modules():  # shard each transformer layer, then the rest
            if type(module).__name__ in _FSDP_LAYERS:
                fully_shard(module)
        return fully_shard(model)
    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    # Not every task's heads run in every batch (masks, proposals): DDP must allow unused parameters.
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)


_FSDP_LAYERS = {"T5Block", "LlamaDecoderLayer", "Qwen2DecoderLayer", "SamVisionLayer", "CLIPEncoderLayer",
                "SiglipEncoderLayer"}


# ----------------------------------------------------------------------------------------------
# Checkpoints: model as save_pretrained, trainer state as safetensors + JSON (no pickle)


def save_training_checkpoint(directory: Path, model: PixelLLM, optimizer, step: int, extra: dict,
                             runtime: Runtime) -> None:
    """Write ``directory`` atomically (built beside, then swapped in). Every process must call it:
    under FSDP the full model and optimizer states are gathered to the main process, which writes."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options) if is_sharded(model) else None
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    if not runtime.main:
        return
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=model_state)
    tensors = {f"state/{name}/{key}": value.detach().cpu().contiguous()
               for name, values in optimizer_state["state"].items() for key, value in values.items()}
    tensors["torch_rng"] = torch.get_rng_state()
    save_file(tensors, str(tmp / STATE_TENSORS))
    state = {"step": step, "param_groups": optimizer_state["param_groups"], **extra}
    atomic_write_text(tmp / STATE_JSON, json.dumps(state, indent=2))
    old = directory.with_name(f".{directory.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def load_training_state(directory: Path, model: torch.nn.Module, optimizer) -> dict:
    """Restore the optimizer (its full state, read by every process) and the RNG of a checkpoint."""
    state = json.loads((directory / STATE_JSON).read_text())
    tensors = load_file(str(directory / STATE_TENSORS))
    per_param: dict[str, dict] = {}
    for key, value in tensors.items():
        if key.startswith("state/"):
            name, field_name = key[len("state/"):].rsplit("/", 1)
            per_param.setdefault(name, {})[field_name] = value
    groups = [{**g, "betas": tuple(g["betas"])} for g in state["param_groups"]]
    # strict=False: parameters that never received a gradient (SAM's unused mask-prompt encoder) have no state
    set_optimizer_state_dict(model, optimizer, {"state": per_param, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True, strict=False))
    torch.set_rng_state(tensors["torch_rng"])
    return state


def is_sharded(model: torch.nn.Module) -> bool:
    """True for a model sharded by FSDP (its parameters are DTensors)."""
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# The loop


def train(config: TrainConfig, out: str | os.PathLike, resume: bool = False) -> dict:
    """Train as ``config`` says, writing into ``out``; returns the last logged metrics."""
    runtime = setup_runtime(config)
    out = Path(out)
    if runtime.main:
        out.mkdir(parents=True, exist_ok=True)
        prepare_synthetic_data(config, out)
    if runtime.world > 1:
        dist.barrier()
    torch.manual_seed(config.seed)
    checkpoint = out / "last"
    if resume and not (checkpoint / STATE_JSON).is_file():
        raise ConfigError(f"--resume: no checkpoint in {checkpoint}")
    tokenizer, sources, model = _setup(config, checkpoint if resume else None)
    model.to(runtime.device).train()
    pretrain_losses = [] if resume else _pretrain_box_pixels(model, sources, config, runtime)
    wrapped = wrap_model(model, config, runtime)  # FSDP shards the model in place: before the optimizer
    optimizer = make_optimizer(model, config.optim)
    start, best = 0, -math.inf
    if resume:
        state = load_training_state(checkpoint, model, optimizer)
        start, best = state["step"], state.get("best", -math.inf)
    batches = MixtureBatches([len(s) for s, _ in sources], [d.weight for d in config.datasets],
                             [d.start for d in config.datasets], config.batch_size, config.accumulation, runtime,
                             config.seed, start, config.steps)
    loader = torch.utils.data.DataLoader(
        MixtureDataset(sources), batch_sampler=batches, num_workers=config.num_workers,
        collate_fn=lambda examples: collate(examples, tokenizer.pad_token_id),
        persistent_workers=config.num_workers > 0,
    )
    bf16 = config.bf16 if config.bf16 is not None else (
        runtime.device.type == "cuda" and torch.cuda.is_bf16_supported())
    logger = _Logger(out, runtime, config, start)
    for epoch, loss in enumerate(pretrain_losses, 1):
        logger.log({"step": 0, "box_pixel_pretrain_epoch": epoch, "box_pixel_pretrain_loss": loss}, progress=False)
    micro_batches = iter(loader)
    last = {}
    for step in range(start, config.steps):
        lr = learning_rate(step, config.steps, config.optim)
        for group in optimizer.param_groups:
            group["lr"] = lr
        totals = _accumulate(wrapped, micro_batches, config, runtime, bf16)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        last = {"step": step + 1, "lr": lr, "grad_norm": float(norm), **totals}
        logger.log(last)
        done = step + 1 == config.steps
        if (step + 1) % config.save_every == 0 or done:  # before evaluating: whatever happens there
            save_training_checkpoint(checkpoint, model, optimizer, step + 1, {"best": best}, runtime)
        if config.eval.data and config.eval.tasks and ((step + 1) % config.eval.every == 0 or done):
            scores = evaluate_during_training(model, config, runtime, step + 1)
            logger.log({"step": step + 1, **scores}, progress=False)
            score = scores.get(config.eval.metric) if config.eval.metric else None
            if score is not None and score > best:  # the same decision on every process
                best = score
                save_training_checkpoint(out / "best", model, optimizer, step + 1, {"best": best}, runtime)
            model.train()
    logger.close()
    if runtime.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return last


def _setup(config: TrainConfig, resume_from: Path | None):
    if resume_from is not None:
        model = PixelLLM.from_pretrained(resume_from)
        tokenizer = model.tokenizer
    else:
        tokenizer = None
        if config.model.tokenizer:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(config.model.tokenizer)
        model = None
    # Readers need no tokenizer; the builders get it once it exists.
    sources = load_sources(config, tokenizer, model.config if model is not None else model_config(config.model))
    if model is None:
        if tokenizer is None and not (config.model.lm or config.model.init):
            # deterministic: every process trains the same tokenizer from the same texts
            tokenizer = train_tokenizer(texts_for_tokenizer(sources), vocab_size=config.model.vocab_size)
        model = make_model(config, tokenizer)
        tokenizer = model.tokenizer
    for _, builder in sources:
        builder.tokenizer = tokenizer
    if config.model.train_only is not None:
        model.train_only(config.model.train_only)
    return tokenizer, sources, model


def _pretrain_box_pixels(model: PixelLLM, sources, config: TrainConfig, runtime: Runtime) -> list[float]:
    """``config.box_pixel_pretrain`` on the first region dataset, before the main loop (and before
    the model is wrapped, so every process starts it alike); the epochs' losses."""
    if config.box_pixel_pretrain.epochs <= 0:
        return []
    region = next((i for i, spec in enumerate(config.datasets) if spec.task == "region"), None)
    if region is None:
        raise ConfigError("box_pixel_pretrain needs a region dataset in 'datasets'")
    samples, builder = sources[region]
    return pretrain_box_pixels(model, samples, builder, config.box_pixel_pretrain, config.seed, runtime.main)


def _accumulate(wrapped, micro_batches, config: TrainConfig, runtime: Runtime, bf16: bool) -> dict:
    """Forward and backward ``accumulation`` micro-batches; returns the mean of each loss term over
    the micro-batches (of all processes) that had it."""
    names = ("loss", *PixelLLM.LOSS_NAMES)
    sums, counts = torch.zeros(len(names), dtype=torch.float64), torch.zeros(len(names), dtype=torch.float64)
    for micro in range(config.accumulation):
        batch = _to_device(next(micro_batches), runtime.device)
        sync = micro == config.accumulation - 1 or not hasattr(wrapped, "no_sync")
        with (nullcontext() if sync else wrapped.no_sync()), \
                torch.autocast(runtime.device.type, dtype=torch.bfloat16, enabled=bf16):
            output = wrapped(batch, all_heads=config.strategy == "fsdp")
            (output.loss / config.accumulation).backward()
        terms = {"loss": output.loss, **output.losses}
        for i, name in enumerate(names):
            if name in terms:
                sums[i] += float(terms[name].detach())
                counts[i] += 1
    if runtime.world > 1:
        dist.all_reduce(sums)
        dist.all_reduce(counts)
    return {name: float(sums[i] / counts[i]) for i, name in enumerate(names) if counts[i] > 0}


def _to_device(batch: dict | None, device: torch.device) -> dict:
    if batch is None:
        raise PixelLLMError("a whole micro-batch was skipped: every sample in it was unreadable")
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def evaluate_during_training(model: PixelLLM, config: TrainConfig, runtime: Runtime, step: int) -> dict:
    """Scores ``{"task/metric": value}`` on the held-out data (computed on rank 0, shared with all).

    An evaluation that fails is reported in one line and scores nothing: it never ends the run.
    """
    scores: dict[str, float] = {}
    if runtime.main:
        from pixelllm.evaluate.runner import evaluate

        model.eval()
        for task in config.eval.tasks:
            try:
                result = evaluate(model, task, config.eval.data, limit=config.eval.limit, progress=False)
            except Exception as exc:  # noqa: BLE001 (hours of training outweigh one evaluation)
                tqdm.write(f"warning: evaluating {task} at step {step} failed ({type(exc).__name__}: {exc}); "
                           "training goes on", file=sys.stderr)
                continue
            scores.update({f"{task}/{name}": value for name, value in result.metrics.items()})
    if runtime.world > 1:
        shared = [scores]
        dist.broadcast_object_list(shared, src=0)
        scores = shared[0]
    return scores


def prepare_synthetic_data(config: TrainConfig, out: Path) -> None:
    """Generate the configured shapes-world splits into ``<out>/data`` unless they exist."""
    synth = config.synth
    for split, count in (("train", synth.train_images), ("val", synth.val_images)):
        target = out / "data" / split
        if count > 0 and not (target / "summary.json").is_file():
            from pixelllm.data.synthetic import generate

            generate(target, count, synth.seed, split=split)


class _Logger:
    """Progress bar, ``metrics.jsonl`` and TensorBoard, on the main process only."""

    def __init__(self, out: Path, runtime: Runtime, config: TrainConfig, start: int):
        self.enabled = runtime.main
        self.every = config.log_every
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.file = open(out / "metrics.jsonl", "a")  # noqa: SIM115 (kept open for the whole run)
        self.writer = SummaryWriter(str(out / "tb"))
        self.bar = tqdm(total=config.steps, initial=start, desc="train", dynamic_ncols=True)
        self.started = time.time()

    def log(self, record: dict, progress: bool = True) -> None:
        if not self.enabled:
            return
        step = record["step"]
        if progress:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.3f}")
        if not progress or step % self.every == 0:
            record = {**record, "elapsed_s": round(time.time() - self.started, 1)}
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            for name, value in record.items():
                if name != "step" and isinstance(value, int | float):
                    self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.file.close()
            self.writer.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``torchrun -m pixelllm.train`` (``pixelllm train`` calls ``train`` directly)."""
    parser = argparse.ArgumentParser(prog="pixelllm.train")
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", default=None)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    try:
        config = TrainConfig.load(args.config)
        train(config, args.out or Path("runs") / Path(args.config).stem, resume=args.resume)
    except PixelLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
