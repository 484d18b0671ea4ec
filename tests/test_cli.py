"""The command line: JSON of INTERFACE.md, pictures, exit codes, one-line errors."""

import json

import pytest
from helpers import tiny_model
from PIL import Image

from pixelllm.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = tiny_model(seed=3)
    model.config.proposal_head.score_threshold = 0.0  # so that a random detector proposes something
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
