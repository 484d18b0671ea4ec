"""The command line: JSON of INTERFACE.md, pictures, exit codes, one-line errors."""

import json

import pytest
from helpers import tiny_model
from PIL import Image

from pixelllm.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = tiny_model(seed=3)
    model.heads["proposals"].config.score_threshold = 0.0  # so that a random detector proposes something
    model.config.max_text_tokens = 8  # keep decoding short
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    model.save_pretrained(path)
    return str(path)


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_caption_json_and_picture(capsys, checkpoint, real_data, tmp_path):
    photo = str(real_data / "photos" / "rocket.jpg")
    picture = tmp_path / "caption.png"
    code, out, err = run(capsys, "caption", photo, "--model", checkpoint, "--json", "--out", str(picture))
    assert code == 0, err
    data = json.loads(out)
    assert set(data) == {"caption", "words", "image_size"}
    assert data["image_size"] == list(Image.open(photo).size)
    assert all(set(w) == {"text", "box", "point"} for w in data["words"])
    assert Image.open(picture).size[0] == data["image_size"][0]
    code, out, _ = run(capsys, "caption", photo, "--model", checkpoint, "--json", "--box", "10", "20", "200", "300")
    assert code == 0 and "caption" in json.loads(out)


def test_locate_segment_densecap_json(capsys, checkpoint, real_data):
    photo = str(real_data / "coco" / "000000039769.png")
    code, out, _ = run(capsys, "locate", photo, "the cat on the left", "--model", checkpoint, "--json")
    data = json.loads(out)
    assert code == 0 and set(data) == {"expression", "box", "image_size"} and len(data["box"]) == 4
    code, out, _ = run(capsys, "segment", photo, "the cat", "--model", checkpoint, "--json")
    data = json.loads(out)
    assert code == 0 and set(data) == {"expression", "box", "mask", "area", "image_size"}
    assert data["mask"]["size"] == [480, 640] and isinstance(data["mask"]["counts"], str)
    code, out, _ = run(capsys, "densecap", photo, "--model", checkpoint, "--json", "--max-regions", "2")
    data = json.loads(out)
    assert code == 0 and len(data["regions"]) <= 2
    assert all(set(r) == {"box", "score", "caption"} for r in data["regions"])


def test_text_output(capsys, checkpoint, real_data):
    code, out, _ = run(capsys, "locate", str(real_data / "photos" / "chelsea.png"), "the cat", "--model", checkpoint)
    assert code == 0 and out.startswith("the cat: [")


@pytest.mark.parametrize("args, message", [
    (["caption", "missing.png"], "not found"),
    (["caption", "{photo}", "--box", "10", "10", "5", "50"], "x1 > x0"),
    (["caption", "{photo}", "--box", "0", "0", "9999", "10"], "outside"),
    (["caption", "{photo}", "--box", "a", "b", "c", "d"], "--box takes 4 numbers"),
    (["locate", "{photo}", " "], "empty expression"),
    (["caption", "{photo}", "--model", "/nonexistent/checkpoint"], "does not exist"),
    (["train", "--config", "/nonexistent.yaml"], "not found"),
    (["nonsense"], "invalid choice"),
])
def test_bad_input_exits_2_with_one_line(capsys, checkpoint, real_data, args, message):
    photo = str(real_data / "photos" / "chelsea.png")
    args = [a.replace("{photo}", photo) for a in args]
    if "--model" not in args and args[0] in ("caption", "locate"):
        args += ["--model", checkpoint]
    code, out, err = run(capsys, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_corrupt_image_is_refused(capsys, checkpoint, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    code, _, err = run(capsys, "caption", str(broken), "--model", checkpoint)
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err


def test_info_and_synth(capsys, tmp_path):
    code, out, _ = run(capsys, "info", "--preset", "tiny")
    assert code == 0 and "extractor" in out and "all" in out
    code, out, err = run(capsys, "synth", str(tmp_path / "world"), "--images", "3", "--seed", "2", "--workers", "1")
    assert code == 0, err
    assert any((tmp_path / "world").rglob("*.png"))


def test_overrides_are_yaml_scalars():
    from pixelllm.cli import parse_overrides

    assert parse_overrides(["steps=200", "optim.lr=5e-4", "bf16=null", "optim.betas=[0.9, 0.95]", "seed=-3",
                            "eval.metric=refer/precision@1", "flag=true", "ratio=.5E+1"]) == {
        "steps": 200, "optim.lr": 5e-4, "bf16": None, "optim.betas": [0.9, 0.95], "seed": -3,
        "eval.metric": "refer/precision@1", "flag": True, "ratio": 5.0}


def test_train_config_overrides(tmp_path):
    from pixelllm.errors import ConfigError
    from pixelllm.train import TrainConfig

    config = tmp_path / "config.yaml"
    config.write_text("datasets: [{task: trace, data: x}, {task: region, data: y, start: 5}]\noptim: {lr: 1.0e-4}\n")
    loaded = TrainConfig.load(config, {"steps": 200, "optim.lr": 5e-4, "optim.warmup_steps": 3, "datasets.1.weight": 2,
                                       "optim.betas": [0.9, 0.95], "model.overrides.max_text_tokens": 8,
                                       "datasets.0.augment.hflip": False, "bf16": True, "optim.grad_clip": 2})
    assert (loaded.steps, loaded.optim.lr, loaded.optim.warmup_steps, loaded.datasets[1].weight) == (200, 5e-4, 3, 2)
    assert loaded.optim.betas == (0.9, 0.95) and loaded.model.overrides == {"max_text_tokens": 8}
    assert loaded.datasets[0].augment == {"hflip": False} and loaded.bf16 is True
    assert loaded.optim.grad_clip == 2.0 and isinstance(loaded.optim.grad_clip, float)
    assert loaded.datasets[0].weight == 1.0 and TrainConfig.load(config).steps == 1000  # the file is unchanged
    for overrides, message in [({"stpes": 2}, "unknown config key 'stpes'"),
                               ({"optim.lrr": 1}, "unknown config key 'optim.lrr'"),
                               ({"datasets.2.weight": 1}, "entries 0 to 1"),
                               ({"steps.x": 1}, "not a section"),
                               ({"steps": "many"}, "takes int, got 'many'"),
                               ({"steps": 2.5}, "takes int"),
                               ({"optim.lr": True}, "takes float"),
                               ({"datasets.0.start": 3}, "at least one dataset must start at step 0"),
                               ({"strategy": "zero"}, "ddp or fsdp")]:
        with pytest.raises(ConfigError, match=message):
            TrainConfig.load(config, overrides)


def test_train_takes_overrides_on_the_command_line(capsys, tmp_path):
    from pixelllm.data.synthetic import generate

    generate(tmp_path / "shapes", 2, seed=5, split="train", workers=1, progress=False)
    config = tmp_path / "config.yaml"
    config.write_text(f"model: {{preset: tiny, vocab_size: 300}}\n"
                      f"datasets: [{{task: region, data: {tmp_path / 'shapes'}}}]\n"
                      "steps: 50\nbatch_size: 2\nnum_workers: 0\nthreads: 1\n")
    code, _, err = run(capsys, "train", "--config", str(config), "--out", str(tmp_path / "run"), "steps=2",
                       "log_every=1", "save_every=2", "optim.lr=5e-4")
    assert code == 0, err
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("step", 0) for r in steps) == 2
    for bad, message in [("optim.lrr=1", "unknown config key 'optim.lrr'"), ("steps", "is not KEY=VALUE"),
                         ("steps=[1", "not a YAML value")]:
        code, _, err = run(capsys, "train", "--config", str(config), bad)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_eval_takes_its_options_on_the_command_line(capsys, checkpoint, tmp_path):
    from pixelllm.data.synthetic import generate

    generate(tmp_path / "shapes", 3, seed=2, split="test", workers=1, progress=False)
    data = str(tmp_path / "shapes")
    code, out, err = run(capsys, "eval", "--model", checkpoint, "--task", "refer", "--data", data, "--json",
                         "limit=1", "batch_size=1", "progress=false")
    assert code == 0, err
    one = json.loads(out)
    code, out, _ = run(capsys, "eval", "--model", checkpoint, "--task", "refer", "--data", data, "--json",
                       "progress=false")
    assert code == 0 and 0 < one["num_samples"] < json.loads(out)["num_samples"]
    code, _, err = run(capsys, "eval", "--model", checkpoint, "--task", "refer", "--data", data, "limt=1")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "unknown eval option 'limt'" in lines[0] and "limit" in lines[0]


def test_a_small_model_runs_on_one_thread_unless_told(capsys, checkpoint, real_data):
    import torch

    photo = str(real_data / "photos" / "chelsea.png")
    threads = torch.get_num_threads()
    try:
        assert run(capsys, "locate", photo, "the cat", "--model", checkpoint, "--threads", "2")[0] == 0
        assert torch.get_num_threads() == 2
        assert run(capsys, "locate", photo, "the cat", "--model", checkpoint)[0] == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_the_cli_imports_only_what_a_command_uses():
    import subprocess
    import sys

    code = ("import sys; from pixelllm.cli import main; main(['--help'])")
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and "usage: pixelllm" in done.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in done.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "transformers", "numpy", "PIL", "fastapi", "yaml"}, imported
