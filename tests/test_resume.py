"""Long runs that never lose or corrupt work: a run killed with SIGKILL (as a step begins, or between
the two renames of a checkpoint swap) resumes bit for bit, across a curriculum's step and heads that
start late; unreadable images are skipped, counted and redrawn, and never end a run."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from pixelllm.data.mixture import MixtureBatches
from pixelllm.data.sources import open_source
from pixelllm.data.synthetic import generate
from pixelllm.train import STATE_JSON, Runtime, TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    path = tmp_path_factory.mktemp("shapes") / "train"
    generate(path, 2, seed=5, split="train", workers=1, progress=False)
    return path


def _config(tmp_path: Path, datasets: list[dict], **overrides) -> Path:
    """Box-pixel tokens dropped at random (the training draws from its random state every step)."""
    model = {"preset": "tiny", "vocab_size": 300,
             "overrides": {"extractor": {"box_pixels": 16, "box_pixel_dropout": 0.5},
                           "heads": {"pixel_words": {"weight": 1.0}}}}
    data = {"model": model, "datasets": datasets, "optim": {"lr": 2.0e-3, "warmup_steps": 2}, "steps": 6,
            "batch_size": 2, "num_workers": 0, "log_every": 1, "save_every": 2, "threads": 1, **overrides}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _records(out: Path) -> list[dict]:
    """The training records of ``metrics.jsonl``, without their times."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in records if "loss" in r]


def _killed(config: Path, out: Path, at: str, resume: bool = False) -> None:
    """Run ``pixelllm.train`` in a process that SIGKILLs itself at ``at`` (``tests/killed_train.py``)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(Path(__file__).with_name("killed_train.py")), at, "--config", str(config),
               "--out", str(out), *(["--resume"] if resume else [])]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]


def _step(checkpoint: Path) -> int:
    return json.loads((checkpoint / STATE_JSON).read_text())["step"]


def test_killed_runs_resume_bit_for_bit(tmp_path, shapes):
    """The mask and proposal heads join at step 3 (refseg and densecap data start there). Killed as
    step 4 begins, the run resumes from step 2, across that step; killed between the renames of step
    4's checkpoint swap, it finds that whole copy. Every number logged is the uninterrupted run's."""
    datasets = [{"task": "region", "data": str(shapes), "max_prompts": 3},
                {"task": "refseg", "data": str(shapes), "max_prompts": 3, "start": 3},
                {"task": "densecap", "data": str(shapes), "max_prompts": 3, "start": 3}]
    config = _config(tmp_path, datasets)
    train(TrainConfig.load(config), tmp_path / "straight")
    out = tmp_path / "killed"
    _killed(config, out, "step:4")
    assert _step(out / "last") == 2 and [r["step"] for r in _records(out)] == [1, 2, 3]
    _killed(config, out, "swap:4", resume=True)
    assert not (out / "last").exists() and _step(out / ".last.old") == 2 and _step(out / ".last.tmp") == 4
    train(TrainConfig.load(config), out, resume=True)
    straight, resumed = _records(tmp_path / "straight"), _records(out)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for term in ("mask_dice", "detection_box"):  # the late heads train from step 4 on (masks first at step 6)
        assert [term in r for r in straight[:3]] == [False] * 3 and any(term in r for r in straight[3:])
    assert resumed == straight
    assert not (out / ".last.old").exists() and not (out / ".last.tmp").exists()
    assert all(oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask()) for path in (out / "last").iterdir())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_unreadable_images_are_skipped_counted_and_redrawn(tmp_path, capsys):
    """3 images of 30 unusable: one garbage (the first micro-batch's), one missing, one 3 x 2 pixels.
    The run trains to its last step (micro-batches of one image: those drawn again), counts them in
    metrics.jsonl, the progress bar's line, its checkpoint and its summary, and resumes alike."""
    data = tmp_path / "data"
    generate(data, 30, seed=5, split="train", workers=1, progress=False)
    images = [Path(sample.image) for sample in open_source("trace", data).reader]
    first = MixtureBatches([30], [1.0], [0], 1, 1, Runtime(0, 1, None), seed=0, start=0, steps=1).draw(0, 0)[0][1]
    others = [path for path in images if path != images[first]]
    images[first].write_bytes(b"not an image at all")
    others[0].unlink()
    Image.new("RGB", (3, 2)).save(others[1])
    # cut by a shorter run: its steps lie in the warmup, where the rate does not depend on the run's length
    config = _config(tmp_path, [{"task": "trace", "data": str(data)}], batch_size=1, save_every=3,
                     optim={"lr": 2.0e-3, "warmup_steps": 3})
    train(TrainConfig.load(config), tmp_path / "straight")
    err = capsys.readouterr().err
    assert "skipped=" in err and "data: the batches skipped" in err
    train(TrainConfig.load(config, {"steps": 3}), tmp_path / "resumed")
    train(TrainConfig.load(config), tmp_path / "resumed", resume=True)
    straight, resumed = _records(tmp_path / "straight"), _records(tmp_path / "resumed")
    assert resumed == straight and [r["step"] for r in straight] == [1, 2, 3, 4, 5, 6]
    assert straight[0]["skipped_samples"] >= 1 and straight[0]["redrawn_micro_batches"] >= 1
    counts = json.loads((tmp_path / "resumed" / "last" / STATE_JSON).read_text())["data"]
    assert counts["skipped"][f"trace:{data}"]["unreadable image"] >= 1
    assert sum(n for reasons in counts["skipped"].values() for n in reasons.values()) == straight[-1]["skipped_samples"]


def test_a_number_that_is_not_finite_never_reaches_the_weights_or_the_log(tmp_path):
    """A diverged step ends the run with one line; an evaluation's NaN is logged as null."""
    import math

    import torch

    from pixelllm.errors import PixelLLMError
    from pixelllm.train import _Logger, _refuse_non_finite

    with pytest.raises(PixelLLMError, match=r"step 7: loss nan, grad_norm inf: the training diverged"):
        _refuse_non_finite(7, {"loss": math.nan, "text": 1.0, "grad_norm": math.inf}, tmp_path / "last")
    logger = _Logger(tmp_path, Runtime(0, 1, torch.device("cpu")), TrainConfig(), 0)
    logger.log({"step": 5, "refer/precision@1": math.nan}, progress=False)
    logger.close("")
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["refer/precision@1"] is None
