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
    assert code == 0 and set(data) == {"expression", "box", "score", "found", "image_size"} and len(data["box"]) == 4
    assert 0 < data["score"] <= 1 and isinstance(data["found"], bool)
    code, out, _ = run(capsys, "locate", photo, "the cat on the left", "--model", checkpoint, "--json",
                       "--min-score", "0")
    assert json.loads(out)["found"] is True
    code, out, _ = run(capsys, "segment", photo, "the cat", "--model", checkpoint, "--json")
    data = json.loads(out)
    assert code == 0 and set(data) == {"expression", "box", "mask", "area", "score", "found", "mask_score",
                                       "image_size"}
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
    (["caption", "{photo}", "--box", "0", "0", "9999", "10"], "extends past the right edge of the 451x300 image"),
    (["caption", "{photo}", "--box", "a", "b", "c", "d"], "--box takes 4 numbers"),
    (["locate", "{photo}", " "], "empty expression"),
    (["locate", "{photo}", "the cat", "--min-score", "2"], "must be a number from 0 to 1"),
    (["densecap", "{photo}", "--max-regions", "0"], "must be at least 1"),
    (["caption", "{dir}"], "is a directory, not an image file"),
    (["caption", "{photo}", "{photo}", "--out", "{dir}/x.png"], "with several images, give a directory"),
    (["caption", "-", "-"], "'-' (stdin) can stand for one image only"),
    (["caption", "{photo}", "--model", "/nonexistent/checkpoint"], "does not exist"),
    (["train", "--config", "/nonexistent.yaml"], "not found"),
    (["nonsense"], "invalid choice"),
])
def test_bad_input_exits_2_with_one_line(capsys, checkpoint, real_data, tmp_path, args, message):
    photo = str(real_data / "photos" / "chelsea.png")
    args = [a.replace("{photo}", photo).replace("{dir}", str(tmp_path)) for a in args]
    if "--model" not in args and args[0] in ("caption", "locate", "densecap"):
        args += ["--model", checkpoint]
    code, out, err = run(capsys, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_several_images_answer_together_one_json_line_each(capsys, checkpoint, real_data, tmp_path):
    photos = [str(real_data / "photos" / name) for name in ("chelsea.png", "rocket.jpg")]
    code, out, err = run(capsys, "caption", *photos, "--model", checkpoint, "--json", "--out", str(tmp_path / "pics"))
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["image"] for line in lines] == photos and all(set(line) >= {"caption", "words"} for line in lines)
    assert sorted(p.name for p in (tmp_path / "pics").iterdir()) == ["chelsea.png", "rocket.png"]
    assert err.count("wrote ") == 2 and str(tmp_path / "pics" / "rocket.png") in err
    alone = json.loads(run(capsys, "caption", photos[1], "--model", checkpoint, "--json")[1])
    assert {k: v for k, v in lines[1].items() if k != "image"} == alone  # batched, the same answer
    code, out, _ = run(capsys, "locate", *photos, "the cat", "--model", checkpoint)
    assert code == 0 and out.startswith(f"{photos[0]}:\nthe cat: [")


def test_an_image_from_stdin(capsys, checkpoint, real_data, monkeypatch):
    import io

    photo = real_data / "photos" / "chelsea.png"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(photo.read_bytes())))
    code, out, err = run(capsys, "locate", "-", "the cat", "--model", checkpoint, "--json")
    assert code == 0 and json.loads(out)["image_size"] == [451, 300], err
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"")))
    code, _, err = run(capsys, "caption", "-", "--model", checkpoint)
    assert code == 2 and err.startswith("error: no image on stdin")


def test_segment_writes_a_binary_mask_and_says_what_it_wrote(capsys, checkpoint, real_data, tmp_path):
    import numpy as np
    from pycocotools import mask as mask_utils

    photo = str(real_data / "photos" / "chelsea.png")
    code, out, err = run(capsys, "segment", photo, "the cat", "--model", checkpoint, "--json",
                         "--mask", str(tmp_path / "mask.png"), "--out", str(tmp_path))
    assert code == 0, err
    assert f"wrote {tmp_path / 'mask.png'}" in err and f"wrote {tmp_path / 'chelsea.png'}" in err
    rle = json.loads(out)["mask"]
    with Image.open(tmp_path / "mask.png") as mask:
        values = np.asarray(mask)
        assert mask.mode == "L" and mask.size == (451, 300) and set(np.unique(values)) <= {0, 255}
    assert np.array_equal(values == 255, mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}))


def test_the_embedded_model_says_when_an_image_is_not_of_its_world(capsys, real_data):
    from pixelllm.assets import SAMPLES

    code, _, err = run(capsys, "locate", str(real_data / "photos" / "chelsea.png"), "the cat")
    assert code == 0 and err.startswith("note: ") and "does not look like the shapes world" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "locate", str(SAMPLES / "shapes1.png"), "the orange square")
    assert code == 0 and err == ""


def test_version_and_help_name_every_option_with_its_default(capsys):
    import argparse

    from pixelllm import __version__
    from pixelllm.cli import build_parser

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"pixelllm {__version__}"
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert "shapes world" in parser.format_help() and "shapes world" in commands["caption"].format_help()
    for name, command in commands.items():
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.dest} has no help"
            if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS):
                assert "default" in action.help, f"{name} {action.option_strings[0]}: say its default"
    assert "80/10/10" in commands["synth"].format_help()


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
    assert f"model: {tmp_path / 'run' / 'last'}" in err and "eval: none ran" in err  # where the run left it
    for bad, message in [("optim.lrr=1", "unknown config key 'optim.lrr'"), ("steps", "is not KEY=VALUE"),
                         ("steps=[1", "not a YAML value")]:
        code, _, err = run(capsys, "train", "--config", str(config), bad)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_a_config_names_its_run_directory_as_out(tmp_path):
    from pathlib import Path

    from pixelllm.train import TrainConfig

    config = tmp_path / "config.yaml"
    config.write_text('datasets: [{task: region, data: "${out}/data/train"}]\neval: {data: "${out}/data/val"}\n')
    loaded = TrainConfig.load(config, {"datasets.0.images": "${out}/images"}, out=tmp_path / "run")
    assert loaded.datasets[0].data == str(tmp_path / "run" / "data" / "train")
    assert loaded.datasets[0].images == str(tmp_path / "run" / "images")
    assert loaded.eval.data == str(tmp_path / "run" / "data" / "val")
    assert TrainConfig.load(config).datasets[0].data == str(Path("runs") / "config" / "data" / "train")
    shipped = Path(__file__).resolve().parents[1] / "configs" / "shapes_tiny.yaml"
    tiny = TrainConfig.load(shipped, out=tmp_path / "elsewhere")
    assert {d.data for d in tiny.datasets} == {str(tmp_path / "elsewhere" / "data" / "train")}


def test_a_missing_dataset_fails_before_any_data_is_generated(capsys, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("model: {preset: tiny}\nsynth: {train_images: 50, val_images: 5}\n"
                      "datasets: [{task: region, data: \"${out}/data/train\"}, {task: trace, data: elsewhere/train}]\n")
    code, _, err = run(capsys, "train", "--config", str(config), "--out", str(tmp_path / "run"))
    assert code == 2 and "dataset trace: elsewhere/train does not exist; this run generates" in err
    assert not (tmp_path / "run" / "data").exists()


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


def test_a_reader_that_stops_early_ends_the_output_quietly(checkpoint, real_data):
    """``pixelllm caption a.jpg b.jpg | head -1``: the pipe closes while the CLI still prints."""
    import subprocess
    import sys

    photos = [str(real_data / "photos" / name) for name in ("chelsea.png", "rocket.jpg")]
    command = [sys.executable, "-m", "pixelllm.cli", "caption", *photos, "--model", checkpoint]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as done:
        done.stdout.close()  # a reader that has read nothing and gone
        err = done.stderr.read().decode()
    assert done.returncode == 141 and "Traceback" not in err, err


def test_the_systems_load_by_name(capsys, real_data, tmp_path, monkeypatch):
    from pixelllm.assets import DEFAULT_CHECKPOINT, system_checkpoint

    assert system_checkpoint("pixelllm") == system_checkpoint(None) == DEFAULT_CHECKPOINT
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pixelllm").mkdir()  # a directory of that name (the package's, in a checkout) does not shadow it
    photo = str(real_data / "photos" / "chelsea.png")
    by_name, default = (run(capsys, "caption", photo, "--json", *model)[1] for model in (["--model", "pixelllm"], []))
    assert by_name == default and json.loads(by_name)["caption"]
    for name, issue in (("pixellm", 29), ("visionllm-v1", 28), ("VisionLLM-v2", 30)):
        code, _, err = run(capsys, "locate", photo, "the cat", "--model", name)
        assert code == 2 and err.startswith(f"error: the system '{name.lower()}' is not embedded yet (issue {issue})")
        assert err.count("\n") == 1


@pytest.fixture(scope="module")
def codebook_checkpoint(tmp_path_factory):
    from helpers import codebook_model

    path = tmp_path_factory.mktemp("ckpt") / "codebook"
    codebook_model(seed=1, max_new_tokens=24).save_pretrained(path)
    return str(path)


def test_segment_all_writes_every_target_with_a_picture_and_their_union(capsys, codebook_checkpoint, real_data,
                                                                        tmp_path):
    import numpy as np
    from pycocotools import mask as mask_utils

    photo = real_data / "photos" / "chelsea.png"
    out, masks = tmp_path / "all.png", tmp_path / "mask.png"
    code, printed, err = run(capsys, "segment", str(photo), "all the cats", "--all", "--model", codebook_checkpoint,
                             "--json", "--out", str(out), "--mask", str(masks))
    assert code == 0, err
    result = json.loads(printed)
    assert result["query"] == "all the cats" and result["image_size"] == [451, 300]
    union = np.zeros((300, 451), bool)
    for target in result["targets"]:
        assert set(target) == {"box", "mask", "score"} and 0 <= target["score"] <= 1
        union |= mask_utils.decode({**target["mask"], "counts": target["mask"]["counts"].encode()}).astype(bool)
    assert np.array_equal(np.asarray(Image.open(masks)) > 0, union)
    assert Image.open(out).size[0] >= 451 and f"wrote {out}" in err
    code, printed, _ = run(capsys, "segment", str(photo), "all the cats", "--all", "--model", codebook_checkpoint)
    assert code == 0 and printed.startswith("all the cats: ") and printed.count("score") == len(result["targets"])


def test_segment_all_on_a_model_without_it_names_the_system(capsys, checkpoint, real_data):
    code, _, err = run(capsys, "segment", str(real_data / "photos" / "chelsea.png"), "all the cats", "--all",
                       "--model", checkpoint)
    assert code == 2 and err.startswith("error: this model has no segment_all") and "pixellm" in err
