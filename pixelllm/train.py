"""Training: one readable loop, the same on one CPU process or many GPUs under ``torchrun``.

    pixelllm train --config configs/shapes_tiny.yaml --out runs/shapes_tiny
    torchrun --nproc-per-node 8 -m pixelllm.train --config configs/paper_trace.yaml --out runs/trace

A run is a config file (``configs/*.yaml``, see ``TrainConfig``): the model (a preset, or real
checkpoints), datasets mixed by sampling weights (each with its task's loss gating), AdamW without
decay on norms and biases, linear warmup then cosine decay, gradient clipping and accumulation,
bf16 autocast on GPUs that have it, optional activation checkpointing, DDP (or FSDP) across
processes. Every step's batch is a pure function of (seed, step), so ``--resume`` continues
exactly where the last checkpoint left off, and a 2-process run sees the same examples as one
process accumulating 2 micro-batches. A dataset given as tar shards streams instead of being held
in memory (``pixelllm.data.streams``): the slots drawn for it take each process's next example of
its share, every sample once per epoch; ``--resume`` still continues exactly (with as many
processes and DataLoader workers as before; with others, it restarts that dataset's epoch), but
which examples a process sees depends on the number of processes and workers.

Outputs in ``--out``: ``metrics.jsonl``, TensorBoard events in ``tb/``, ``last/`` (model +
trainer state, swapped in whole every ``save_every`` steps), ``best/`` (the best evaluation).
A run killed at any moment resumes bit for bit, and bad data never ends one: samples it cannot
use are skipped and counted, a micro-batch left empty is drawn again (docs/training.md).
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
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from tqdm import tqdm

from pixelllm.box_pixel_pretrain import BoxPixelPretrainConfig, pretrain_box_pixels
from pixelllm.config import PixelLLMConfig, dataclass_from_dict, preset
from pixelllm.data.mixture import DataReport, MicroBatches, MixtureBatches, MixtureDataset, collate_counting
from pixelllm.data.pipeline import DEFAULT_AUGMENT, Augment, ExampleBuilder, TaskConfig
from pixelllm.data.report import SkipReport
from pixelllm.data.shards import ShardReader
from pixelllm.data.sources import EXPECTED, open_source
from pixelllm.data.streams import ShardStream, Streams
from pixelllm.data.targets import TASKS, CodebookFormat, answer_text
from pixelllm.errors import CheckpointError, ConfigError, PixelLLMError
from pixelllm.files import atomic_write_text, finish, recover, swap_in
from pixelllm.locations import LocationFormat
from pixelllm.model import PixelLLM, build_from_pretrained_parts, build_model
from pixelllm.model.checkpoint import load_tensors, resolve, write_tensors
from pixelllm.model.heads import head_configs
from pixelllm.tokenization import train_tokenizer

STATE_TENSORS, STATE_JSON = "trainer_state.safetensors", "trainer_state.json"
RUN_DIR = "${out}"
"""In a config's texts: the run directory (``--out``), e.g. ``data: ${out}/data/train``."""


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class DatasetConfig:
    """One training source: ``task`` samples read from ``data`` (layouts: ``pixelllm.data.sources``;
    a folder of tar shards is streamed, any other layout is read into memory)."""

    task: str
    data: str
    weight: float = 1.0
    split: str | None = None
    images: str | None = None
    max_prompts: int | None = None
    augment: dict[str, Any] | None = None  # pipeline.Augment fields; default: the task's
    refer_text_loss: bool = False
    start: int = 0  # the step from which this dataset joins the mixture (a curriculum)
    shuffle_buffer: int = 1000  # tar shards only: each epoch's samples pass a shuffle buffer this large (0: none)


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
    grad_clip: float | None = 1.0  # None: no clipping (the official configs clip nothing)


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
    def load(cls, path: str | os.PathLike, overrides: Mapping[str, Any] | None = None,
             out: str | os.PathLike | None = None) -> TrainConfig:
        """The config of a YAML file, with ``overrides`` applied over it: dotted keys and their values
        (``{"steps": 200, "optim.lr": 5e-4, "datasets.0.weight": 2}``; a list entry by its index, any
        key inside a free mapping such as ``model.overrides``). A key the config does not have, or a
        value of the wrong kind, is a ``ConfigError``. ``RUN_DIR`` (``${out}``) in any text of the
        file or of an override becomes the run directory ``out`` (default: ``default_run_dir(path)``),
        so that a config names the data its ``synth`` section generates wherever the run writes."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        run_dir = str(out if out is not None else default_run_dir(path))
        try:
            config = dataclass_from_dict(cls, _with_run_dir(data or {}, run_dir), "config")
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        for key, value in (overrides or {}).items():
            _override(config, key, _with_run_dir(value, run_dir))
        if not config.datasets:
            raise ConfigError(f"{path}: 'datasets' must list at least one dataset")
        if not any(d.start == 0 for d in config.datasets):
            raise ConfigError(f"{path}: at least one dataset must start at step 0")
        if config.strategy not in ("ddp", "fsdp"):
            raise ConfigError(f"{path}: strategy must be ddp or fsdp, got {config.strategy!r}")
        return config


def default_run_dir(config_path: str | os.PathLike) -> Path:
    """Where a run of the config file ``config_path`` writes without ``--out``: ``runs/<file name>``."""
    return Path("runs") / Path(config_path).stem


def _with_run_dir(value: Any, run_dir: str) -> Any:
    """``value`` (YAML data) with ``RUN_DIR`` in every text replaced by ``run_dir``."""
    if isinstance(value, str):
        return value.replace(RUN_DIR, run_dir)
    if isinstance(value, list):
        return [_with_run_dir(item, run_dir) for item in value]
    if isinstance(value, dict):
        return {key: _with_run_dir(item, run_dir) for key, item in value.items()}
    return value


def _override(config: TrainConfig, key: str, value: Any) -> None:
    """Set the dotted ``key`` of ``config`` to ``value`` (``TrainConfig.load``)."""
    *path, name = key.split(".")
    node = config
    for depth, part in enumerate(path):
        node = _member(node, part, ".".join(path[: depth + 1]))
    if dataclasses.is_dataclass(node):
        _member(node, name, key)
        # the section rebuilt checks and converts the value as the file's would be (sections, tuples)
        section = ".".join(["config", *path])
        rebuilt = dataclass_from_dict(type(node), {**dataclasses.asdict(node), name: value}, section)
        setattr(node, name, getattr(rebuilt, name))
    elif isinstance(node, list):
        node[_list_index(node, name, key)] = value
    elif isinstance(node, dict):
        node[name] = value
    else:
        raise ConfigError(f"unknown config key {key!r}: {'.'.join(path)} is a value, not a section")


def _member(node: Any, part: str, where: str) -> Any:
    """The field, list entry or mapping key ``part`` of ``node``; an unset mapping field becomes ``{}``."""
    if dataclasses.is_dataclass(node):
        names = {f.name: f for f in dataclasses.fields(node)}
        if part not in names:
            raise ConfigError(f"unknown config key {where!r} (choose from: {', '.join(names)})")
        if getattr(node, part) is None and str(names[part].type).startswith("dict"):
            setattr(node, part, {})
        return getattr(node, part)
    if isinstance(node, list):
        return node[_list_index(node, part, where)]
    if isinstance(node, dict):
        return node.setdefault(part, {})
    raise ConfigError(f"unknown config key {where!r}: its parent is a value, not a section")


def _list_index(node: list, part: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"unknown config key {where!r}: the list has entries 0 to {len(node) - 1}")
    return int(part)


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
# Data: every micro-batch is a pure function of (seed, step, global micro index): pixelllm.data.mixture


class Sources(list):
    """Each dataset's ``(samples, builder)`` (for tar shards, their reader: they stream), and in
    ``read`` the reports of what each dataset's reader skipped."""

    def __init__(self) -> None:
        super().__init__()
        self.read: list[SkipReport] = []


def load_sources(config: TrainConfig, tokenizer, model_config: PixelLLMConfig) -> Sources:
    """Every dataset's samples and the builder that puts them on ``model_config``'s canvas."""
    sources = Sources()
    for spec in config.datasets:
        samples, read = _dataset_samples(spec)
        sources.read.append(read)
        unknown = set(spec.augment or {}) - {f.name for f in dataclasses.fields(Augment)}
        if unknown:
            raise ConfigError(f"{spec.task} dataset: unknown augment key(s) {', '.join(sorted(unknown))}")
        augment = Augment(**{**dataclasses.asdict(DEFAULT_AUGMENT[spec.task]), **(spec.augment or {})})
        task = TaskConfig(spec.task, model_config.image_size, max_prompts=spec.max_prompts,
                          prompts=model_config.prompts, augment=augment, refer_text_loss=spec.refer_text_loss,
                          pixel_scale=model_config.pixel_scale, locations=location_format(model_config),
                          codebook=codebook_format(model_config))
        sources.append((samples, ExampleBuilder(tokenizer, task, name=f"{spec.task}:{spec.data}")))
    return sources


def location_format(model_config: PixelLLMConfig) -> LocationFormat | None:
    """How the model's heads write boxes as tokens (the last head whose config has a
    ``LocationFormat`` as ``locations``), or None when none does."""
    formats = [getattr(head_config, "locations", None) for _, head_config in head_configs(model_config).values()]
    return next((f for f in reversed(formats) if isinstance(f, LocationFormat)), None)


def codebook_format(model_config: PixelLLMConfig) -> CodebookFormat | None:
    """How the model's codebook head wants its answers written (the last head that provides
    ``codebook_answers``: its special tokens and question template), or None when none does."""
    heads = [(cls, c) for cls, c in head_configs(model_config).values() if "codebook_answers" in cls.provided(c)]
    if not heads:
        return None
    cls, head_config = heads[-1]
    return CodebookFormat(tuple(cls.special_tokens(head_config)), head_config.prompt)


def _dataset_samples(spec: DatasetConfig) -> tuple[list | ShardReader, SkipReport]:
    """A dataset's samples, read into memory, or the reader of its tar shards; and its reader's report."""
    if spec.task not in TASKS:
        raise ConfigError(f"dataset task {spec.task!r} has no training targets; choose one of {', '.join(TASKS)}")
    source = open_source(spec.task, spec.data, split=spec.split, images=spec.images)
    samples = source.reader if source.layout == "shards" else list(source.reader)
    if not len(samples):
        raise ConfigError(f"dataset {spec.task} at {spec.data} has no usable sample ({source.reader.summary()})")
    if source.layout != "shards" and all(sample.image is None for sample in samples):
        raise ConfigError(f"dataset {spec.task} at {spec.data} has no images ({EXPECTED[source.layout]}): "
                          "nothing to train on")
    return samples, source.reader.report


def make_streams(config: TrainConfig, sources, runtime: Runtime) -> Streams:
    """The streams of this process's share of the tar-shard datasets among ``sources``."""
    streams = {
        d: ShardStream(samples.directory, builder.build, seed=(config.seed, d), shuffle_buffer=spec.shuffle_buffer,
                       num_workers=config.num_workers, rank=runtime.rank, world=runtime.world,
                       name=builder.report.name)
        for d, ((samples, builder), spec) in enumerate(zip(sources, config.datasets, strict=True))
        if isinstance(samples, ShardReader)
    }
    return Streams(streams, runtime.rank, runtime.world, config.num_workers)


def texts_for_tokenizer(sources) -> list[str]:
    """Every caption, expression, region text, question and answer of the training data (to train a
    tokenizer; tar shards are read through once for it)."""
    texts = []
    for samples, _ in sources:
        for sample in samples:
            texts += [n.caption for n in sample.narratives] + list(sample.captions)
            texts += [t for region in sample.regions for t in region.texts]
            texts += [text for q in sample.questions for text in (q.text, answer_text(q, ""))]
    return texts


# ----------------------------------------------------------------------------------------------
# Model and optimizer


def model_config(m: ModelConfig) -> PixelLLMConfig:
    """The config the model of ``m`` will have (the data needs its canvas before the model exists):
    the preset's or the checkpoint's, with ``overrides`` merged in (mappings merge key by key; a
    value of None removes the key, e.g. a head)."""
    base = PixelLLMConfig.load(resolve(m.init)) if m.init else preset(m.preset)
    return PixelLLMConfig.from_dict(merge_overrides(base.to_dict(), m.overrides))


def merge_overrides(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` merged in, recursively for mappings; None removes a key."""
    merged = dict(base)
    for key, value in overrides.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_overrides(merged[key], value)
        else:
            merged[key] = value
    return merged


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


def checkpoint_activations(model: PixelLLM) -> None:
    """Recompute the LM's and the semantic tower's layer activations in the backward pass (towers
    that cannot, such as the tiny preset's, keep theirs)."""
    for tower in (model.language.model, model.vision.semantic):
        if getattr(tower, "supports_gradient_checkpointing", False):
            tower.activation_checkpointing_enable()


def wrap_model(model: PixelLLM, config: TrainConfig, runtime: Runtime) -> torch.nn.Module:
    """DDP or FSDP across processes; the plain model for one process."""
    if config.activation_checkpointing:
        checkpoint_activations(model)
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
                "SiglipEncoderLayer", "Eva02Block"}


# ----------------------------------------------------------------------------------------------
# Checkpoints: model as save_pretrained, trainer state as safetensors + JSON (no pickle)


def save_training_checkpoint(directory: Path, model: PixelLLM, optimizer, step: int, extra: dict,
                             runtime: Runtime) -> None:
    """Write ``directory`` whole: built beside it as ``.<name>.tmp``, every file flushed to the disk,
    then swapped in (``pixelllm.files.swap_in``). Every process must call it: under FSDP the full model
    and optimizer states are gathered to the main process, which writes, and each process's random
    state goes in."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options) if is_sharded(model) else None
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    random_states = _random_states(runtime)
    if not runtime.main:
        return
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=model_state)
    tensors = {f"state/{name}/{key}": value.detach().cpu().contiguous()
               for name, values in optimizer_state["state"].items() for key, value in values.items()}
    write_tensors({**tensors, **random_states}, tmp / STATE_TENSORS)
    state = {"step": step, "param_groups": optimizer_state["param_groups"], **extra}
    atomic_write_text(tmp / STATE_JSON, json.dumps(state, indent=2))  # last: its presence marks a whole copy
    finish(tmp, directory=True)
    swap_in(tmp, directory)


def recover_checkpoint(directory: Path) -> None:
    """Put back the newest whole copy of ``directory`` where a crash in the middle of its swap left
    none (``pixelllm.files.recover``)."""
    recover(directory, lambda copy: (copy / STATE_JSON).is_file())


def load_training_state(directory: Path, model: torch.nn.Module, optimizer, runtime: Runtime) -> dict:
    """Restore the optimizer (its full state, read by every process) and this process's random state
    from a checkpoint; returns its ``trainer_state.json``."""
    path = directory / STATE_JSON
    try:
        state = json.loads(path.read_bytes())
        step, groups = int(state["step"]), [{**g, "betas": tuple(g["betas"])} for g in state["param_groups"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a trainer state ({type(exc).__name__}: {exc})") from None
    tensors = load_tensors(directory / STATE_TENSORS)
    per_param: dict[str, dict] = {}
    for key, value in tensors.items():
        if key.startswith("state/"):
            name, field_name = key[len("state/"):].rsplit("/", 1)
            per_param.setdefault(name, {})[field_name] = value
    try:
        # strict=False: parameters that never received a gradient (SAM's unused mask-prompt encoder, a
        # head whose dataset starts later) have no state
        set_optimizer_state_dict(model, optimizer, {"state": per_param, "param_groups": groups},
                                 options=StateDictOptions(full_state_dict=True, strict=False))
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{directory / STATE_TENSORS} does not fit the model's optimizer "
                              f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''})"
                              ) from None
    _drop_made_up_state(model, optimizer, per_param)
    _restore_random_states(tensors, runtime, directory / STATE_TENSORS)
    return {**state, "step": step}


def _drop_made_up_state(model: torch.nn.Module, optimizer, saved: dict) -> None:
    """Forget the optimizer state of the parameters the checkpoint has none for: loading gives every
    parameter state by a step of zero gradients, and AdamW would count that step in their first
    real update (a curriculum's late head would end a step off the uninterrupted run)."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    for parameter in [p for p in optimizer.state if names.get(id(p)) not in saved]:
        del optimizer.state[parameter]


def _random_states(runtime: Runtime) -> dict[str, torch.Tensor]:
    """Every process's random states, ``torch_rng/<rank>`` and ``cuda_rng/<rank>`` (a collective)."""
    mine = {"torch_rng": torch.get_rng_state()}
    if runtime.device.type == "cuda":
        mine["cuda_rng"] = torch.cuda.get_rng_state(runtime.device)
    ranks = [mine]
    if runtime.world > 1:
        ranks = [None] * runtime.world
        dist.all_gather_object(ranks, mine)
    return {f"{name}/{rank}": value for rank, states in enumerate(ranks) for name, value in states.items()}


def _restore_random_states(tensors: dict[str, torch.Tensor], runtime: Runtime, path: Path) -> None:
    """This process's random states from a checkpoint (rank 0's where it was written by fewer
    processes; ``torch_rng`` alone in checkpoints of earlier versions)."""
    rank = runtime.rank if f"torch_rng/{runtime.rank}" in tensors else 0
    state = tensors.get(f"torch_rng/{rank}", tensors.get("torch_rng"))
    if state is None or state.dtype != torch.uint8:
        raise CheckpointError(f"{path} lacks the random state of the run (torch_rng/{rank})")
    torch.set_rng_state(state)
    if runtime.device.type == "cuda" and f"cuda_rng/{rank}" in tensors:
        torch.cuda.set_rng_state(tensors[f"cuda_rng/{rank}"], runtime.device)


def is_sharded(model: torch.nn.Module) -> bool:
    """True for a model sharded by FSDP (its parameters are DTensors)."""
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# The loop


def train(config: TrainConfig, out: str | os.PathLike, resume: bool = False) -> dict:
    """Train as ``config`` says, writing into ``out``; returns the last logged metrics."""
    runtime = setup_runtime(config)
    out = Path(out)
    checkpoint = out / "last"
    if runtime.main:
        out.mkdir(parents=True, exist_ok=True)
        prepare_synthetic_data(config, out)
        if resume:
            recover_checkpoint(checkpoint)
    if runtime.world > 1:
        dist.barrier()
    torch.manual_seed(config.seed)
    if resume and not (checkpoint / STATE_JSON).is_file():
        raise ConfigError(f"--resume: no checkpoint in {checkpoint}")
    tokenizer, sources, model = _setup(config, checkpoint if resume else None)
    model.to(runtime.device).train()
    pretrain_losses = [] if resume else _pretrain_box_pixels(model, sources, config, runtime)
    wrapped = wrap_model(model, config, runtime)  # FSDP shards the model in place: before the optimizer
    optimizer = make_optimizer(model, config.optim)
    streams = make_streams(config, sources, runtime)
    state = load_training_state(checkpoint, model, optimizer, runtime) if resume else {}
    start, best = state.get("step", 0), state.get("best", -math.inf)
    streams.restore(state)
    report = DataReport(runtime.world, state, runtime.main, read=sources.read)
    micro_batches = _micro_batches(config, sources, streams, tokenizer.pad_token_id, runtime, start, report)
    bf16 = config.bf16 if config.bf16 is not None else (
        runtime.device.type == "cuda" and torch.cuda.is_bf16_supported())
    logger = _Logger(out, runtime, config, start)
    for epoch, loss in enumerate(pretrain_losses, 1):
        logger.log({"step": 0, "box_pixel_pretrain_epoch": epoch, "box_pixel_pretrain_loss": loss}, progress=False)
    last, evaluated = {}, {}
    for step in range(start, config.steps):
        lr = learning_rate(step, config.steps, config.optim)
        for group in optimizer.param_groups:
            group["lr"] = lr
        totals = _accumulate(wrapped, model.loss_names, micro_batches, config, runtime, bf16)
        clip = config.optim.grad_clip if config.optim.grad_clip is not None else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
        _refuse_non_finite(step + 1, {**totals, "grad_norm": norm}, checkpoint)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        last = {"step": step + 1, "lr": lr, "grad_norm": norm, **totals, **report.step()}
        logger.log(last)
        done = step + 1 == config.steps
        if (step + 1) % config.save_every == 0 or done:  # before evaluating: whatever happens there
            save_training_checkpoint(checkpoint, model, optimizer, step + 1,
                                     {"best": best, **streams.state(), **report.state()}, runtime)
        if config.eval.data and config.eval.tasks and ((step + 1) % config.eval.every == 0 or done):
            scores = evaluate_during_training(model, config, runtime, step + 1)
            evaluated = {"step": step + 1, **scores}
            logger.log(evaluated, progress=False)
            score = scores.get(config.eval.metric) if config.eval.metric else None
            if score is not None and score > best:  # the same decision on every process
                best = score
                save_training_checkpoint(out / "best", model, optimizer, step + 1,
                                         {"best": best, **streams.state(), **report.state()}, runtime)
            model.train()
    logger.close(report.summary() + "\n" + outputs_summary(out, evaluated, best, config.eval.metric))
    # DDP's reducer and the data workers go while every process is still in the group: a reducer
    # freed after destroy_process_group can deadlock in the gloo group's destructor at exit.
    del wrapped, micro_batches
    if runtime.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return last


def outputs_summary(out: Path, evaluated: dict, best: float, metric: str | None) -> str:
    """Where a finished run left its checkpoints and logs, and its last evaluation's scores
    (``evaluated``: ``{"step": n, "task/metric": value, ...}``, empty when none ran)."""
    lines = [f"model: {out / 'last'} (the last step; use it with --model {out / 'last'})"]
    if math.isfinite(best) and (out / "best").is_dir():
        lines.append(f"best: {out / 'best'} ({metric} {best:.3f})")
    if evaluated:
        scores = ", ".join(f"{name} {value:.3f}" for name, value in evaluated.items() if name != "step")
        lines.append(f"eval at step {evaluated['step']}: {scores or 'no score (see the warning above)'}")
    else:
        lines.append("eval: none ran (the config's eval section names no data or tasks)")
    lines.append(f"logs: {out / 'metrics.jsonl'}, TensorBoard {out / 'tb'}")
    return "\n".join(lines)


def _micro_batches(config: TrainConfig, sources: Sources, streams: Streams, pad_token_id: int, runtime: Runtime,
                   start: int, report: DataReport) -> MicroBatches:
    """This process's micro-batches from step ``start``, through a DataLoader (its workers build the
    in-memory datasets' examples; the main process fills the streamed datasets' slots)."""
    sampler = MixtureBatches([len(s) for s, _ in sources], [d.weight for d in config.datasets],
                             [d.start for d in config.datasets], config.batch_size, config.accumulation, runtime,
                             config.seed, start, config.steps)
    dataset, collate_fn = MixtureDataset(sources), partial(collate_counting, pad_token_id=pad_token_id)
    in_memory = len(streams) < len(sources)  # else the loader only hands out stream slots
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=config.num_workers if in_memory else 0,
        collate_fn=list if streams else collate_fn, persistent_workers=in_memory and config.num_workers > 0,
        generator=torch.Generator(),  # the workers' seeds are drawn from it, not from the training's random state
    )
    return MicroBatches(loader, sampler, dataset, streams, collate_fn, report)


def _refuse_non_finite(step: int, values: dict[str, float], checkpoint: Path) -> None:
    """A loss or gradient norm that is not a finite number ends the run before it reaches the weights."""
    bad = [f"{name} {value}" for name, value in values.items() if not math.isfinite(value)]
    if bad:
        raise PixelLLMError(f"step {step}: {', '.join(bad)}: the training diverged (lower optim.lr, raise "
                            "optim.warmup_steps or set optim.grad_clip) or a batch holds a number that is not finite; "
                            f"the weights were not updated, and --resume goes on from the checkpoint in {checkpoint}")


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


def _accumulate(wrapped, loss_names: tuple[str, ...], micro_batches, config: TrainConfig, runtime: Runtime,
                bf16: bool) -> dict:
    """Forward and backward ``accumulation`` micro-batches; returns the mean of each loss term over
    the micro-batches (of all processes) that had it."""
    names = ("loss", *loss_names)
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


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def evaluate_during_training(model: PixelLLM, config: TrainConfig, runtime: Runtime, step: int) -> dict:
    """Scores ``{"task/metric": value}`` on the held-out data (computed on rank 0, shared with all).

    An evaluation that fails is reported in one line and scores nothing: it never ends the run. It
    leaves the random state as it found it, so that a run resumed after it goes on alike.
    """
    scores: dict[str, float] = {}
    if runtime.main:
        from pixelllm.evaluate.runner import evaluate

        model.eval()
        devices = [runtime.device] if runtime.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            for task in config.eval.tasks:
                scores.update(_evaluate_task(evaluate, model, task, config, step))
    if runtime.world > 1:
        shared = [scores]
        dist.broadcast_object_list(shared, src=0)
        scores = shared[0]
    return scores


def _evaluate_task(evaluate, model: PixelLLM, task: str, config: TrainConfig, step: int) -> dict[str, float]:
    """One task's scores, or none (and a warning) where its evaluation fails."""
    try:
        result = evaluate(model, task, config.eval.data, limit=config.eval.limit, progress=False)
    except Exception as exc:  # noqa: BLE001 (hours of training outweigh one evaluation)
        tqdm.write(f"warning: evaluating {task} at step {step} failed ({type(exc).__name__}: {exc}); "
                   "training goes on", file=sys.stderr)
        return {}
    return {f"{task}/{name}": value for name, value in result.metrics.items()}


def prepare_synthetic_data(config: TrainConfig, out: Path) -> None:
    """Generate the configured shapes-world splits into ``<out>/data`` unless they exist. First,
    every dataset and the evaluation data must exist or be among those splits: a wrong path fails
    at once, not after minutes of generating."""
    synth = config.synth
    splits = {out / "data" / split: count for split, count in (("train", synth.train_images),
                                                                ("val", synth.val_images)) if count > 0}
    generated = [target.resolve() for target in splits]
    named = [(f"dataset {spec.task}", spec.data) for spec in config.datasets]
    for what, data in named + ([("eval.data", config.eval.data)] if config.eval.data else []):
        path = Path(data).resolve()
        if not path.exists() and not any(path == target or target in path.parents for target in generated):
            made = (f"; this run generates {' and '.join(str(t) for t in splits)} (in a config: "
                    f"{RUN_DIR}/data/{'|'.join(t.name for t in splits)})") if splits else ""
            raise ConfigError(f"{what}: {data} does not exist{made}")
    for target, count in splits.items():
        if not (target / "summary.json").is_file():
            from pixelllm.data.synthetic import generate

            generate(target, count, synth.seed, split=target.name)


class _Logger:
    """Progress bar, ``metrics.jsonl`` and TensorBoard, on the main process only. A resumed run first
    forgets what a killed one logged after its checkpoint, a fresh one all an earlier one logged in
    its folder (each step is logged once)."""

    def __init__(self, out: Path, runtime: Runtime, config: TrainConfig, start: int):
        self.enabled = runtime.main
        self.every = config.log_every
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        metrics = out / "metrics.jsonl"
        if metrics.is_file() and start:
            _keep_records_until(metrics, start)
        elif metrics.is_file():  # a run started afresh in a used folder logs from nothing
            metrics.unlink()
        self.file = open(metrics, "a")  # noqa: SIM115 (kept open for the whole run)
        # purge_step: TensorBoard drops the events of steps from it that an earlier run wrote
        self.writer = SummaryWriter(str(out / "tb"), purge_step=start + 1 if start else 0)
        self.bar = tqdm(total=config.steps, initial=start, desc="train", dynamic_ncols=True)
        self.started = time.time()

    def log(self, record: dict, progress: bool = True) -> None:
        if not self.enabled:
            return
        step = record["step"]
        if progress:
            self.bar.update(1)
            counts = {"skipped": record.get("skipped_samples"), "records_skipped": record.get("skipped_records")}
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", **{name: n for name, n in counts.items() if n})
        if not progress or step % self.every == 0:
            # an evaluation's score that is not a finite number is written as null (JSON has no NaN)
            record = {name: None if isinstance(value, float) and not math.isfinite(value) else value
                      for name, value in {**record, "elapsed_s": round(time.time() - self.started, 1)}.items()}
            self.file.write(json.dumps(record, allow_nan=False) + "\n")
            self.file.flush()
            for name, value in record.items():
                if name != "step" and isinstance(value, int | float):
                    self.writer.add_scalar(name, value, step)

    def close(self, summary: str) -> None:
        """Close the outputs and write ``summary`` (stderr)."""
        if self.enabled:
            self.bar.close()
            self.file.close()
            self.writer.close()
            tqdm.write(summary, file=sys.stderr)


def _keep_records_until(path: Path, step: int) -> None:
    """Keep the records of ``path`` (JSON lines) up to ``step``; a line cut short by a kill goes too."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``torchrun -m pixelllm.train`` (``pixelllm train`` calls ``train`` directly)."""
    parser = argparse.ArgumentParser(prog="pixelllm.train")
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=5e-4")
    args = parser.parse_args(argv)
    try:
        from pixelllm.cli import parse_overrides

        out = args.out or default_run_dir(args.config)
        train(TrainConfig.load(args.config, parse_overrides(args.overrides), out=out), out, resume=args.resume)
    except PixelLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
