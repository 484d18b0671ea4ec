"""Training: every task's loss goes down, resume continues exactly, 2 processes = 1 process."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pixelllm.errors import ConfigError
from pixelllm.train import MixtureBatches, Runtime, TrainConfig, setup_runtime, train

TASKS = ["trace", "refer", "refseg", "region", "densecap"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from pixelllm.data.synthetic import generate

    path = tmp_path_factory.mktemp("shapes") / "train"
    generate(path, 2, seed=5, split="train", workers=1, progress=False)
    return path


def _config(tmp_path: Path, shapes: Path, **overrides) -> Path:
    data = {
        "model": {"preset": "tiny", "vocab_size": 300},
        "datasets": [{"task": t, "data": str(shapes), "max_prompts": 3, "refer_text_loss": t.startswith("ref")}
                     for t in TASKS],
        "optim": {"lr": 2.0e-3, "warmup_steps": 2},
        "steps": 4, "batch_size": 2, "num_workers": 0, "log_every": 1, "save_every": 2, "threads": 1,
        **overrides,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _losses(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_short_run_overfits_every_task(tmp_path, shapes):
    # Every step sees all five tasks on the same two images (one dataset of each, 5 images a batch).
    config = TrainConfig.load(_config(tmp_path, shapes, steps=60, batch_size=5, save_every=60,
                                      optim={"lr": 4.0e-3, "warmup_steps": 5}))
    train(config, tmp_path / "run")
    records = _losses(tmp_path / "run")
    for r in records:  # SAM's mask loss as the model weighs it
        if "mask_focal" in r:
            r["mask"] = 20 * r["mask_focal"] + r["mask_dice"] + r["mask_iou"]
    for term in ["text", "location", "selection", "mask", "detection_heatmap", "detection_box"]:
        values = [r[term] for r in records if term in r]
        assert len(values) > 10, term
        start, end = sum(values[:3]) / 3, sum(values[-3:]) / 3
        assert end < 0.8 * start, f"{term}: {start:.3f} -> {end:.3f}"
    assert (tmp_path / "run" / "last" / "model.safetensors").is_file()


def test_resume_continues_exactly(tmp_path, shapes):
    straight = TrainConfig.load(_config(tmp_path, shapes, steps=4))
    train(straight, tmp_path / "straight")
    half = TrainConfig.load(_config(tmp_path, shapes, steps=2))
    train(half, tmp_path / "resumed")
    train(straight, tmp_path / "resumed", resume=True)
    a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)


def test_the_data_follows_the_models_overrides(tmp_path, shapes):
    """A run whose semantic tower takes twice the canvas resolution gets its images at that
    resolution, and a run started from a checkpoint keeps that checkpoint's canvas."""
    from pixelllm.config import preset
    from pixelllm.model import PixelLLM

    semantic = {**preset("tiny").semantic, "image_size": 320, "patch_size": 16, "stem_channels": 16}
    model = {"preset": "tiny", "vocab_size": 300, "overrides": {"semantic": semantic}}
    train(TrainConfig.load(_config(tmp_path, shapes, steps=1, model=model)), tmp_path / "fine")
    assert PixelLLM.from_pretrained(tmp_path / "fine" / "last").config.pixel_scale == 2
    init = {"preset": "tiny", "init": str(tmp_path / "fine" / "last")}
    last = train(TrainConfig.load(_config(tmp_path, shapes, steps=1, model=init)), tmp_path / "again")
    assert last["step"] == 1 and math.isfinite(last["loss"])


def test_new_parts_train_alone_from_a_checkpoint(tmp_path, shapes):
    """``init`` with ``overrides`` adds the mask refiner and the referring re-ranker to a trained
    model, ``train_only`` trains them alone: the other weights stay the checkpoint's, and the mask
    refiner's last layer leaves zero (the re-ranker's may not: after one step of the base, none of its
    candidates need overlap a target)."""
    from safetensors.torch import load_file

    train(TrainConfig.load(_config(tmp_path, shapes, steps=1, model=_box_pixel_model())), tmp_path / "base")
    model = {"init": str(tmp_path / "base" / "last"), "train_only": ["heads.mask_refiner", "heads.refer_reranker"],
             "overrides": {"heads": {"mask_refiner": {"resolution": 16, "width": 8},
                                     "refer_reranker": {"candidates": 2}}}}
    refseg = [{"task": "refseg", "data": str(shapes), "max_prompts": 3}]
    last = train(TrainConfig.load(_config(tmp_path, shapes, steps=3, model=model, datasets=refseg)), tmp_path / "new")
    assert last["step"] == 3 and "mask_dice" in last and "rerank" in last
    before = load_file(tmp_path / "base" / "last" / "model.safetensors")
    after = load_file(tmp_path / "new" / "last" / "model.safetensors")
    new = set(after) - set(before)
    assert {".".join(name.split(".")[:2]) for name in new} == {"heads.mask_refiner", "heads.refer_reranker"}
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert after["heads.mask_refiner.correction.weight"].abs().sum() > 0


def test_a_failing_evaluation_does_not_end_the_run(tmp_path, shapes, capsys):
    missing = tmp_path / "empty-split"  # there, but holding no data: evaluation raises DataError at every step
    missing.mkdir()
    config = TrainConfig.load(_config(tmp_path, shapes, steps=2, eval={"data": str(missing), "tasks": ["refer"],
                                                                        "every": 1}))
    last = train(config, tmp_path / "run")
    assert last["step"] == 2
    assert json.loads((tmp_path / "run" / "last" / "trainer_state.json").read_text())["step"] == 2
    err = capsys.readouterr().err
    assert "evaluating refer at step 1 failed (DataError" in err and "training goes on" in err


def _two_processes(config: Path, out: Path, port: int, entry: list[str], resume: bool = False) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
               *entry, "--config", str(config), "--out", str(out), *(["--resume"] if resume else [])]
    subprocess.run(command, check=True, env=env, capture_output=True, timeout=600)


def _first_update_difference(one: Path, two: Path) -> tuple[float, float, float]:
    """How the first optimizer step of two runs from the same initial weights differs: the fraction of
    weights that differ by more than 1e-4, the largest difference, and the relative difference of
    AdamW's first moments (0.1 x the clipped gradient) over the whole model."""
    from safetensors.torch import load_file

    from pixelllm.model import PixelLLM

    single, double = (PixelLLM.from_pretrained(run / "last") for run in (one, two))
    pairs = zip(single.parameters(), double.parameters(), strict=True)
    diff = torch.cat([(p - q).detach().abs().flatten() for p, q in pairs])
    moments = [load_file(run / "last" / "trainer_state.safetensors") for run in (one, two)]
    names = sorted(key for key in moments[0] if key.endswith("/exp_avg"))
    first, second = (torch.cat([m[key].flatten() for key in names]) for m in moments)
    return float((diff > 1e-4).float().mean()), float(diff.max()), float((first - second).norm() / first.norm())


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_process(tmp_path, shapes, strategy):
    """2 gloo processes x 1 micro-batch = 1 process x 2 accumulated micro-batches, same examples;
    DDP replicates the model, FSDP shards it (and gathers it whole for the checkpoint).

    The first step is compared weight by weight: both runs start from the same weights, and AdamW's
    first step moves each weight by about lr in its gradient's sign, so a gradient or a shard that
    goes wrong moves many weights by up to 2 lr. Later steps are compared by their losses and
    gradient norms only: training at this rate amplifies float noise (the order in which the two
    runs sum micro-batches, kernels that differ between CPUs) by orders of magnitude per step, and
    after three steps 0.4 % of the weights differed by more than 1e-4 on an Intel Xeon where the
    losses still agreed to 1e-7."""
    for name in ("1", "2"):
        (tmp_path / name).mkdir()
    # the same strategy in one process: FSDP runs every head in every step (zero-weighted where a batch
    # has no target for it), which changes the weight decay of those heads
    port = 29517 + (strategy == "fsdp")
    entry = ["-m", "pixelllm.train"]
    for steps, resume in ((1, False), (3, True)):
        one = _config(tmp_path / "1", shapes, steps=steps, accumulation=2, strategy=strategy, save_every=1)
        train(TrainConfig.load(one), tmp_path / "one", resume=resume)
        two = _config(tmp_path / "2", shapes, steps=steps, accumulation=1, strategy=strategy, save_every=1)
        _two_processes(two, tmp_path / "two", port, entry, resume=resume)
        if steps == 1:
            fraction, largest, moments = _first_update_difference(tmp_path / "one", tmp_path / "two")
            assert fraction < 1e-3 and largest <= 2 * 2.0e-3 and moments < 1e-4, (fraction, largest, moments)
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-3)


def test_the_comparison_catches_a_rank_whose_gradient_is_dropped(tmp_path, shapes):
    """The first-step check of ``test_two_processes_match_one_process`` fails for a broken FSDP run in
    which rank 1's gradients never reach the average (its logged loss is still right)."""
    for name in ("1", "2"):
        (tmp_path / name).mkdir()
    one = _config(tmp_path / "1", shapes, steps=1, accumulation=2, strategy="fsdp")
    train(TrainConfig.load(one), tmp_path / "one")
    two = _config(tmp_path / "2", shapes, steps=1, accumulation=1, strategy="fsdp")
    _two_processes(two, tmp_path / "two", 29519, [str(Path(__file__).with_name("dropped_rank_train.py"))])
    assert _losses(tmp_path / "one")[0]["loss"] == pytest.approx(_losses(tmp_path / "two")[0]["loss"], rel=1e-6)
    fraction, _, moments = _first_update_difference(tmp_path / "one", tmp_path / "two")
    assert fraction > 0.05 and moments > 0.1, (fraction, moments)


@pytest.fixture(scope="module")
def refer_shards(shapes, tmp_path_factory):
    """The split's referring data in tar shards (one sample a shard), by scripts/write_shards.py."""
    from helpers import load_script

    path = tmp_path_factory.mktemp("refer_shards")
    shards, summary = load_script("write_shards").write_source_shards("refer", str(shapes), str(path),
                                                                      samples_per_shard=1)
    assert shards == 2 and summary.endswith("shards: kept 2, skipped 0, repaired 0")
    return path


def test_a_run_from_shards_resumes_exactly(tmp_path, shapes, refer_shards):
    """Streamed referring data read by 2 DataLoader workers, 3 examples a step from 2 samples an epoch:
    the checkpoint after step 1 falls in the second epoch with worker 1 to read next, and the resumed
    run takes the examples the uninterrupted one takes (the same losses)."""
    datasets = [{"task": "refer", "data": str(refer_shards), "max_prompts": 3, "shuffle_buffer": 2}]
    common = {"datasets": datasets, "batch_size": 3, "num_workers": 2, "save_every": 1}
    train(TrainConfig.load(_config(tmp_path, shapes, steps=3, **common)), tmp_path / "straight")
    train(TrainConfig.load(_config(tmp_path, shapes, steps=1, **common)), tmp_path / "resumed")
    state = json.loads((tmp_path / "resumed" / "last" / "trainer_state.json").read_text())
    assert state["streams"] == {"processes": 1, "workers": 2, "ranks": [{"0": [1, 1]}]}  # (epoch, taken)
    train(TrainConfig.load(_config(tmp_path, shapes, steps=3, **common)), tmp_path / "resumed", resume=True)
    a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert [r["step"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)


def test_shards_stream_under_two_processes(tmp_path, shapes, refer_shards):
    """2 gloo processes stream the shards (one sample each an epoch), mixed with narratives held in
    memory: every slot drawn for the shards was filled from its process's stream, the checkpoint
    holds both processes' places, and a run resumed from it continues as the uninterrupted one."""
    datasets = [{"task": "refer", "data": str(refer_shards), "max_prompts": 3}, {"task": "trace", "data": str(shapes)}]
    for out, steps, resume in (("straight", 3, False), ("resumed", 2, False), ("resumed", 3, True)):
        config = _config(tmp_path, shapes, steps=steps, datasets=datasets, num_workers=1, save_every=1)
        _two_processes(config, tmp_path / out, 29520, ["-m", "pixelllm.train"], resume=resume)
    a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)
    places = json.loads((tmp_path / "straight" / "last" / "trainer_state.json").read_text())["streams"]
    assert (places["processes"], places["workers"]) == (2, 1)
    for rank, place in enumerate(places["ranks"]):
        batches = MixtureBatches([2, 2], [1.0, 1.0], [0, 0], batch_size=2, accumulation=1,
                                 runtime=Runtime(rank, 2, torch.device("cpu")), seed=0, start=0, steps=3)
        slots = sum(address[0] == 0 for batch in batches for address in batch)
        epoch, taken = place["0"]
        assert epoch * 1 + taken == slots  # one sample a process an epoch


def test_data_that_cannot_train_is_a_config_error(tmp_path, shapes, real_data):
    for dataset, message in (({"task": "regioncap", "data": str(shapes)},
                              "dataset task 'regioncap' has no training targets; choose one of trace"),
                             ({"task": "muse", "data": str(shapes / "muse" / "shapes_train.json")},
                              "task muse writes codebook groups: it needs a model with a codebook head"),
                             ({"task": "trace", "data": str(real_data / "vidln")},
                              r"has no images \(a Video Localized Narratives .jsonl file")):
        with pytest.raises(ConfigError, match=message):
            train(TrainConfig.load(_config(tmp_path, shapes, datasets=[dataset])), tmp_path / "bad")


def test_the_codebook_head_joins_a_checkpoint_and_trains_on_muse(tmp_path, shapes):
    """The shape of configs/pixellm_shapes.yaml: a checkpoint without the codebook head gains it by
    ``overrides``, and the muse task trains it with the LM alone for 2 steps (``train_only``): its loss
    terms are logged, the new [SEG] rows of the LM's embedding move, and the towers stay the checkpoint's."""
    from safetensors.torch import load_file

    from pixelllm.model import PixelLLM

    region = [{"task": "region", "data": str(shapes), "max_prompts": 3}]
    train(TrainConfig.load(_config(tmp_path, shapes, steps=1, datasets=region)), tmp_path / "base")
    model = {"init": str(tmp_path / "base" / "last"), "train_only": ["language", "heads.codebook"],
             "overrides": {"heads": {"codebook": {"dim": 32, "heads": 2, "mlp_dim": 64}}}}
    muse = [{"task": "muse", "data": str(shapes / "muse" / "shapes_train.json")}]
    train(TrainConfig.load(_config(tmp_path, shapes, steps=2, model=model, datasets=muse)), tmp_path / "muse")
    records = _losses(tmp_path / "muse")
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert {"codebook_text", "codebook_bce", "codebook_dice"} <= set(r) and r["codebook_text"] > 0
    trained = PixelLLM.from_pretrained(tmp_path / "muse" / "last")
    rows = trained.heads["codebook"].token_ids(trained)
    before = load_file(tmp_path / "base" / "last" / "model.safetensors")
    after = load_file(tmp_path / "muse" / "last" / "model.safetensors")
    embedding = "language.model.decoder.embed_tokens.weight"  # T5's tied embeddings, as saved
    assert (before[embedding][rows] != after[embedding][rows]).any(1).all()
    assert all(torch.equal(before[name], after[name]) for name in before if name.startswith("vision."))


def test_the_shards_config_example_loads():
    config = TrainConfig.load(Path(__file__).resolve().parents[1] / "configs" / "shapes_tiny_shards.yaml")
    assert [d.task for d in config.datasets if "/shards/" in d.data] == ["region", "refer"]


def test_datasets_join_at_their_start_step():
    runtime = Runtime(0, 1, torch.device("cpu"))
    batches = MixtureBatches([5, 5], [1.0, 1.0], [0, 3], batch_size=16, accumulation=1, runtime=runtime, seed=0,
                             start=0, steps=6)
    used = [{address[0] for address in batch} for batch in batches]
    assert used[:3] == [{0}, {0}, {0}] and all(u == {0, 1} for u in used[3:])


def test_the_runtime_turns_off_cudnn_attention():
    # cuDNN plans attention per shape, and training batches change shape every step (benchmarks/RESULTS.md).
    torch.backends.cuda.enable_cudnn_sdp(True)
    try:
        assert setup_runtime(TrainConfig()).world == 1
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)


def test_config_errors(tmp_path, shapes):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        TrainConfig.load(bad)
    bad.write_text(yaml.safe_dump({"datasets": [{"task": "trace", "data": "x"}], "stpes": 3}))
    with pytest.raises(ConfigError, match="unknown config field.*stpes"):
        TrainConfig.load(bad)
    bad.write_text(yaml.safe_dump({"datasets": [{"task": "trace", "data": "x", "wieght": 2}]}))
    with pytest.raises(ConfigError, match=r"unknown config.datasets\[0\] field\(s\): 'wieght'"):
        TrainConfig.load(bad)
    with pytest.raises(ConfigError, match="not found"):
        TrainConfig.load(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="--resume: no checkpoint"):
        train(TrainConfig.load(_config(tmp_path, shapes)), tmp_path / "fresh", resume=True)
    region = {"task": "region", "data": str(shapes)}
    for augment, message in (({"box_jiter": 0.1}, "region dataset: unknown augment key.s. box_jiter"),
                             ({"box_jitter": 0.6}, r"augment box_jitter must be in \[0, 0.5\), got 0.6")):
        config = TrainConfig.load(_config(tmp_path, shapes, datasets=[{**region, "augment": augment}]))
        with pytest.raises(ConfigError, match=message):
            train(config, tmp_path / "bad_augment")


def _box_pixel_model() -> dict:

    return {"preset": "tiny", "vocab_size": 300,
            "overrides": {"extractor": {"box_pixels": 16}, "heads": {"pixel_words": {"weight": 1.0}}}}


def test_box_pixel_pretraining_learns_before_the_loop_and_resume_skips_it(tmp_path, shapes):
    pretrain = {"epochs": 8, "batch_size": 4, "lr": 3.0e-3}
    straight = TrainConfig.load(_config(tmp_path, shapes, steps=2, model=_box_pixel_model(),
                                        box_pixel_pretrain=pretrain))
    train(straight, tmp_path / "straight")
    epochs = [r for r in _losses(tmp_path / "straight") if "box_pixel_pretrain_loss" in r]
    assert [r["box_pixel_pretrain_epoch"] for r in epochs] == list(range(1, 9))
    assert epochs[-1]["box_pixel_pretrain_loss"] < 0.7 * epochs[0]["box_pixel_pretrain_loss"]
    half = TrainConfig.load(_config(tmp_path, shapes, steps=1, model=_box_pixel_model(), box_pixel_pretrain=pretrain))
    train(half, tmp_path / "resumed")
    train(straight, tmp_path / "resumed", resume=True)  # pretraining again would change the weights
    a, b = ([r for r in _losses(tmp_path / name) if "loss" in r] for name in ("straight", "resumed"))
    assert len([r for r in _losses(tmp_path / "resumed") if "box_pixel_pretrain_loss" in r]) == 8
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)


def test_region_crops_are_the_region_prompts_with_their_captions(shapes):
    from pixelllm.box_pixel_pretrain import region_crops
    from pixelllm.config import preset
    from pixelllm.data.pipeline import ExampleBuilder, TaskConfig
    from pixelllm.data.sources import open_source
    from pixelllm.tokenization import train_tokenizer

    samples = list(open_source("region", shapes).reader)
    tok = train_tokenizer([t for s in samples for r in s.regions for t in r.texts], vocab_size=300)
    builder = ExampleBuilder(tok, TaskConfig("region", preset("tiny").image_size, max_prompts=4))
    crops, labels = region_crops(samples, builder, 10, 16)
    examples = [builder(s) for s in samples]
    assert crops.shape == (sum(len(e.targets.prompts) for e in examples), 3, 16, 16)
    first = examples[0].targets.prompts[0]
    assert labels[0, : len(first.label_ids)].tolist() == first.label_ids and first.label_ids[-1] == tok.eos_token_id
    assert (labels[0, len(first.label_ids):] == -100).all()
    assert crops.std() > 0.05  # the canvas pixels, not padding


def test_box_pixel_pretraining_config_errors(tmp_path, shapes):
    with pytest.raises(ConfigError, match="box_pixel_pretrain needs epochs >= 0"):
        TrainConfig.load(_config(tmp_path, shapes, box_pixel_pretrain={"epochs": -1}))
    with pytest.raises(ConfigError, match="unknown config.box_pixel_pretrain field.*epoch"):
        TrainConfig.load(_config(tmp_path, shapes, box_pixel_pretrain={"epoch": 2}))
    no_encoder = TrainConfig.load(_config(tmp_path, shapes, box_pixel_pretrain={"epochs": 1}))
    with pytest.raises(ConfigError, match="needs extractor.box_pixels and the head pixel_words"):
        train(no_encoder, tmp_path / "no_encoder")
    no_region = TrainConfig.load(_config(tmp_path, shapes, model=_box_pixel_model(), box_pixel_pretrain={"epochs": 1},
                                         datasets=[{"task": "refer", "data": str(shapes)}]))
    with pytest.raises(ConfigError, match="needs a region dataset"):
        train(no_region, tmp_path / "no_region")
