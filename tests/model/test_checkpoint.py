"""Checkpoints that never load corrupt: the weights' checksum written at save and verified at load;
every fault of a checkpoint's files one line that names the file (fuzzed: only the project's own
errors come out of config loading and of checkpoint bytes); files as readable as the umask says;
no number that is not finite in a result."""

import json
import math
import os
import random
import re
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

from pixelllm.config import PixelLLMConfig, preset
from pixelllm.data.words import Word
from pixelllm.errors import CheckpointError, ConfigError, PixelLLMError
from pixelllm.model import PixelLLM
from pixelllm.model.checkpoint import CHECKSUM_KEY, load_tensors, read_header, write_tensors
from pixelllm.results import Caption, Location, Region, Segmentation
from pixelllm.train import TrainConfig


def fuzz(examples: int) -> settings:
    """Reproducible fuzzing (``PIXELLLM_FUZZ_RANDOM=1``: new examples each run), no example database."""
    return settings(max_examples=examples, deadline=None, database=None,
                    derandomize=os.environ.get("PIXELLLM_FUZZ_RANDOM") != "1",
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("checkpoint") / "model"
    tiny_model().save_pretrained(path)
    return path


def copy_of(saved: Path) -> Path:
    target = Path(tempfile.mkdtemp()) / "model"
    shutil.copytree(saved, target)
    return target


def load_error(directory: Path) -> str:
    """The one line ``PixelLLM.from_pretrained`` refuses ``directory`` with."""
    with pytest.raises(PixelLLMError) as info:
        PixelLLM.from_pretrained(directory)
    message = str(info.value)
    assert "\n" not in message
    return message


def rewrite(path: Path, change) -> None:
    data = bytearray(path.read_bytes())
    change(data)
    path.write_bytes(bytes(data))


def test_the_checksum_catches_any_byte_changed(saved, monkeypatch):
    """64 KB of random bytes among the weights, or one letter of the header: refused. Unverified
    (``PIXELLLM_VERIFY_CHECKSUM=0``), the random bytes still cannot load: they make weights that are
    not finite numbers."""
    header, _ = read_header(saved / "model.safetensors")
    assert header["__metadata__"][CHECKSUM_KEY].startswith("sha256-64MiB:")
    assert torch.equal(PixelLLM.from_pretrained(saved).state_dict()["heads.location.locator.feature.bias"],
                       tiny_model().state_dict()["heads.location.locator.feature.bias"])
    noise = copy_of(saved)
    weights = noise / "model.safetensors"
    rewrite(weights, lambda data: data.__setitem__(slice(len(data) // 2, len(data) // 2 + 65536),
                                                   random.Random(0).randbytes(65536)))
    assert load_error(noise) == (f"{weights} is corrupt: its bytes do not match the checksum written with them "
                                 f"({header['__metadata__'][CHECKSUM_KEY][13:25]}... written, "
                                 f"{load_error(noise).split('written, ')[1]}")
    monkeypatch.setenv("PIXELLLM_VERIFY_CHECKSUM", "0")
    assert "non-finite values (NaN or infinity): the file is corrupt" in load_error(noise)
    monkeypatch.delenv("PIXELLLM_VERIFY_CHECKSUM")
    letter = copy_of(saved)
    weights = letter / "model.safetensors"
    at = weights.read_bytes().index(b"language.model.shared.weight") + 2
    rewrite(weights, lambda data: data.__setitem__(at, ord("X")))
    assert "do not match the checksum" in load_error(letter)


@pytest.mark.parametrize(("name", "change", "message"), [
    ("truncated", lambda data: data.__delitem__(slice(len(data) // 2, None)), "is truncated: tensor "),
    ("empty", lambda data: data.clear(), "is empty"),
    ("a length alone", lambda data: data.__delitem__(slice(6, None)), "is truncated or its header is corrupt"),
    ("a huge header length", lambda data: data.__setitem__(slice(0, 8), struct.pack("<Q", 10**12)),
     "the header's length reads 1,000,000,000,000 bytes"),
    ("a garbled header", lambda data: data.__setitem__(slice(20, 40), b"#" * 20),
     "is corrupt: its header is not a safetensors header"),
])
def test_broken_weight_files_are_one_line_errors(saved, name, change, message):
    broken = copy_of(saved)
    rewrite(broken / "model.safetensors", change)
    error = load_error(broken)
    assert error.startswith(str(broken / "model.safetensors")) and message in error, error


@pytest.mark.parametrize(("file", "change", "message"), [
    ("config.json", lambda c: c.update(extractor=5), "config.json: config.extractor must be a mapping, got int"),
    ("config.json", lambda c: c.update(image_size="160"), "config.json: config.image_size takes int, got '160'"),
    ("config.json", lambda c: c["heads"]["mask"].update(depth=1.5), "config.json: heads.mask.depth takes int, got 1.5"),
    ("config.json", lambda c: c["sam"].update(vision_config=[]), "sam.vision_config must be a mapping, got list"),
    ("tokenizer.json", None, "tokenizer.json is corrupt: a tokenizer file that is not valid JSON"),
    ("tokenizer.json", {"version": "1.0", "model": 5}, "tokenizer.json cannot be read as a tokenizer"),
])
def test_broken_configs_and_tokenizers_are_one_line_errors(saved, file, change, message):
    broken = copy_of(saved)
    path = broken / file
    if callable(change):
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
    else:
        path.write_bytes(random.Random(1).randbytes(3000) if change is None else json.dumps(change).encode())
    error = load_error(broken)
    assert str(broken) in error and message in error, error


def test_a_shape_mismatch_names_the_first_tensor_and_both_shapes(saved):
    wider = copy_of(saved)
    config = json.loads((wider / "config.json").read_text())
    config["heads"]["location"]["hidden"] = 64
    (wider / "config.json").write_text(json.dumps(config))
    message = load_error(wider)
    assert message.startswith(f"{wider / 'model.safetensors'} does not match its config.json: tensor ")
    name, file_shape, model_shape = re.fullmatch(r".*: tensor (\S+) has shape (\[.*\]) in the file, (\[.*\]) "
                                                 r"in the model", message).groups()
    assert name.startswith("heads.location.") and "128" in file_shape and "64" in model_shape


def test_files_are_as_readable_as_the_umask_says(tmp_path):
    previous = os.umask(0o027)
    try:
        tiny_model().save_pretrained(tmp_path / "model")
        write_tensors({"x": torch.zeros(3)}, tmp_path / "state.safetensors")
    finally:
        os.umask(previous)
    modes = {path.name: path.stat().st_mode & 0o777 for path in [*tmp_path.joinpath("model").iterdir(),
                                                                   tmp_path / "state.safetensors"]}
    assert set(modes.values()) == {0o640}, modes
    assert torch.equal(load_tensors(tmp_path / "state.safetensors")["x"], torch.zeros(3))


def test_no_result_holds_a_number_that_is_not_finite():
    nan, word = math.nan, Word("circle", [1.0, 2.0, 3.0, 4.0], [2.0, 3.0], [0])
    for build in (lambda: Caption("a circle", [Word("circle", [nan, 2.0, 3.0, 4.0], [2.0, 3.0], [0])], (8, 8)),
                  lambda: Caption("a circle", [word], (8, 8), score=-math.inf),
                  lambda: Region([0.0, 0.0, nan, 4.0], 0.5, "a circle"),
                  lambda: Segmentation("the circle", [0.0, 0.0, 4.0, 4.0], np.zeros((8, 8), bool), (8, 8), nan),
                  lambda: Location("the circle", [0.0, nan, 4.0, 4.0], 0.5, True, (8, 8)),
                  lambda: Location("the circle", [0.0, 0.0, 4.0, 4.0], nan, False, (8, 8))):
        with pytest.raises(CheckpointError, match="not a finite number .*weights are likely corrupt or diverged"):
            build()
    assert Caption("a circle", [word], (8, 8)).to_dict()["words"][0]["box"] == [1.0, 2.0, 3.0, 4.0]


# ----------------------------------------------------------------------------------------------
# Fuzzing: whatever the bytes or values, the project's own errors or a loaded model

JSON = st.recursive(st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats() | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=5)


def paths(value, prefix=()) -> list[tuple]:
    """Every path into a nested JSON value."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += paths(item, (*prefix, i))
    return found


@st.composite
def mutated(draw, document):
    """``document`` with a few of its values replaced, removed or added."""
    document = json.loads(json.dumps(document))
    for _ in range(draw(st.integers(1, 3))):
        *parent_path, key = draw(st.sampled_from([p for p in paths(document) if p]))
        parent = document
        for part in parent_path:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "remove", "add"]))
        if action == "replace":
            parent[key] = draw(JSON)
        elif action == "remove" and isinstance(parent, dict):
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=6))] = draw(JSON)
    return document


@fuzz(300)
@given(mutated(preset("tiny").to_dict()))
def test_fuzzed_model_configs_load_or_raise_config_errors(data):
    try:
        PixelLLMConfig.from_dict(data)
    except ConfigError as exc:
        assert "\n" not in str(exc)


TRAIN = {"model": {"preset": "tiny", "overrides": {"lora_rank": 0}, "train_only": ["heads.mask"]},
         "datasets": [{"task": "trace", "data": "x", "augment": {"flip_prob": 0.5}, "start": 0}],
         "optim": {"lr": 1e-4, "betas": [0.9, 0.99], "grad_clip": None}, "eval": {"tasks": ["refer"], "limit": 3},
         "steps": 3, "bf16": None, "threads": 1}


@fuzz(200)
@given(mutated(TRAIN))
def test_fuzzed_train_configs_load_or_raise_config_errors(tmp_path_factory, data):
    path = tmp_path_factory.getbasetemp() / "fuzzed.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        TrainConfig.load(path)
    except ConfigError as exc:
        assert "\n" not in str(exc)


@st.composite
def damaged(draw, data: bytes, header_end: int):
    """``data`` truncated, or with a few bytes overwritten (half the time in its header)."""
    data = bytearray(data)
    if draw(st.booleans()):
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, header_end - 1) if draw(st.booleans()) else st.integers(0, len(data) - 1))
        piece = draw(st.binary(min_size=1, max_size=16))
        data[at:at + len(piece)] = piece
    return bytes(data[: max(len(data), 0)])


def _small_file() -> tuple[bytes, int]:
    path = Path(tempfile.mkdtemp()) / "small.safetensors"
    write_tensors({"a": torch.arange(12.0).reshape(3, 4), "b": torch.ones(2, dtype=torch.int64),
                   "c": torch.zeros(5, dtype=torch.bfloat16)}, path)
    return path.read_bytes(), 8 + read_header(path)[1]


SMALL, SMALL_HEADER_END = _small_file()


@fuzz(300)
@given(damaged(SMALL, SMALL_HEADER_END), st.booleans())
def test_fuzzed_tensor_files_read_or_raise_checkpoint_errors(tmp_path_factory, data, verify):
    """The safetensors reader of checkpoints and trainer states: checked with and without the checksum
    (a header that still parses reaches safetensors' own reader)."""
    path = tmp_path_factory.getbasetemp() / "fuzzed.safetensors"
    path.write_bytes(data)
    os.environ["PIXELLLM_VERIFY_CHECKSUM"] = "1" if verify else "0"
    try:
        tensors = load_tensors(path)
        assert data == SMALL or not verify or CHECKSUM_KEY not in read_header(path)[0].get("__metadata__", {})
        assert set(tensors) <= {"a", "b", "c"}
    except CheckpointError as exc:
        assert "\n" not in str(exc)
    finally:
        del os.environ["PIXELLLM_VERIFY_CHECKSUM"]


@fuzz(25)
@given(st.data())
def test_fuzzed_checkpoints_load_or_raise_the_projects_errors(saved, data):
    """Damaged weights (checked with and without the checksum) or a damaged config: a model or a
    one-line ``PixelLLMError``."""
    directory = copy_of(saved)
    weights = directory / "model.safetensors"
    if data.draw(st.booleans()):
        weights.write_bytes(data.draw(damaged(weights.read_bytes(), 8 + read_header(weights)[1])))
    else:
        (directory / "config.json").write_text(json.dumps(data.draw(mutated(json.loads(
            (directory / "config.json").read_text())))))
    os.environ["PIXELLLM_VERIFY_CHECKSUM"] = data.draw(st.sampled_from(["0", "1"]))
    try:
        PixelLLM.from_pretrained(directory)
    except PixelLLMError as exc:
        assert "\n" not in str(exc)
    finally:
        del os.environ["PIXELLLM_VERIFY_CHECKSUM"]
        shutil.rmtree(directory.parent)


def test_a_trainer_state_is_checked_like_the_weights(tmp_path):
    save_file({"x": torch.zeros(3)}, str(tmp_path / "plain.safetensors"))  # no checksum: read unverified
    assert torch.equal(load_tensors(tmp_path / "plain.safetensors")["x"], torch.zeros(3))
    write_tensors({"x": torch.zeros(3)}, tmp_path / "state.safetensors")
    rewrite(tmp_path / "state.safetensors", lambda data: data.__setitem__(-1, 7))
    with pytest.raises(CheckpointError, match="state.safetensors is corrupt: its bytes do not match the checksum"):
        load_tensors(tmp_path / "state.safetensors")


def test_the_cli_prints_one_error_line(saved, tmp_path, capsys):
    """A corrupt checkpoint, or an image with a side under 8 pixels: exit status 2, one ``error:`` line."""
    from pixelllm.cli import main

    Image.new("RGB", (64, 48), (90, 120, 150)).save(tmp_path / "photo.png")
    Image.new("RGB", (3000, 2), (90, 120, 150)).save(tmp_path / "strip.png")
    broken = copy_of(saved)
    (broken / "model.safetensors").write_bytes(b"")
    for image, model, message in ((tmp_path / "photo.png", broken, "model.safetensors is empty"),
                                  (tmp_path / "strip.png", saved, "is 3000x2 pixels: a side under 8 pixels")):
        capsys.readouterr()
        assert main(["caption", str(image), "--model", str(model), "--json"]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_lora_over_a_checkpoint_trained_without_it_keeps_every_weight():
    from pixelllm.assets import DEFAULT_CHECKPOINT

    plain = PixelLLM.from_pretrained(DEFAULT_CHECKPOINT)  # its scene captioner has an LM of its own
    config = PixelLLMConfig.from_dict({**plain.config.to_dict(), "lora_rank": 4})
    state = PixelLLM.from_pretrained(DEFAULT_CHECKPOINT, config=config).state_dict()
    for key, value in plain.state_dict().items():
        module, _, name = key.rpartition(".")
        assert torch.equal(state[key] if key in state else state[f"{module}.base_layer.{name}"], value), key
    assert sum(".lora_B." in key for key in state) == 24 and all(
        not value.any() for key, value in state.items() if ".lora_B." in key)  # fresh: the layers unchanged
