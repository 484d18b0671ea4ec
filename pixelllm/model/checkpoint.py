"""Checkpoints: a directory of ``config.json`` + ``model.safetensors`` (+ tokenizer files), written
durably and read without pickle; a Hugging Face repository id is found in the hub's local cache.

``save`` writes each file into a temporary folder beside the target, flushes it to the disk with
the mode the umask gives, and renames it into place (the config last, so a reader never sees a
config without its weights). Every safetensors file it writes carries a checksum of its own bytes
in its header (``write_tensors``), which ``load`` verifies before it trusts a byte
(``PIXELLLM_VERIFY_CHECKSUM=0`` skips that; files without one, written elsewhere, load unverified).

``load`` builds the model from its config and loads the weights strictly, or into another config
(``config=``: a model with a new head keeps that head's fresh weights, or lets the head start from
the model: ``Head.start_from``). Whatever is wrong with a checkpoint (a missing, truncated or
corrupt file, a config of the wrong types, a tokenizer that does not parse, a tensor of the wrong
shape, a weight that is not a finite number) is a one-line ``CheckpointError`` or ``ConfigError``
naming the file.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from pixelllm.config import CONFIG_NAME, PixelLLMConfig
from pixelllm.errors import CheckpointError, PixelLLMError
from pixelllm.files import finish, sync_directory

WEIGHTS_NAME = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

# The checksum: SHA-256 over the SHA-256 of each 64 MiB of the file (hashed in parallel), the header
# counted with this placeholder in the checksum's place.
CHECKSUM_KEY = "pixelllm.checksum"
CHECKSUM_KIND = "sha256-64MiB:"
_PLACEHOLDER = CHECKSUM_KIND + "0" * 64
_CHUNK = 64 << 20
_MAX_HEADER = 100_000_000  # safetensors' own limit
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A local directory as it is; else a Hugging Face repository id (``org/name``, optionally
    ``org/name@revision``) resolved to its snapshot in the hub's cache (``HF_HUB_CACHE``), with no
    download when ``HF_HUB_OFFLINE`` is set. ``CheckpointError`` when neither is there."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    text = str(name_or_path)
    repo, _, revision = text.partition("@")
    if os.path.isabs(text) or text.startswith(".") or repo.count("/") != 1 or not all(repo.split("/")):
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, revision=revision or None, cache_dir=os.environ.get("HF_HUB_CACHE"),
                                      local_files_only=constants.HF_HUB_OFFLINE))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        where = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
        raise CheckpointError(f"{text} is neither a local directory nor a repository in the Hugging Face cache "
                              f"{where} ({type(exc).__name__}); download it there first or give a directory") from None


def save(model, directory: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model`` (a ``PixelLLM``) into ``directory``, each file atomically and durably.
    ``state_dict``: the weights to write instead of the model's own (a sharded model's, gathered to
    one process)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".saving-") as tmp:
        weights = Path(tmp) / WEIGHTS_NAME
        if state_dict is None:
            save_model(model, str(weights), metadata={CHECKSUM_KEY: _PLACEHOLDER})
            stamp_checksum(weights)
        else:
            tied = _tied_names(model)
            write_tensors({k: v.contiguous() for k, v in state_dict.items() if k not in tied}, weights)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(tmp)
        model.config.save(tmp)
        for name in sorted(os.listdir(tmp), key=lambda n: n == CONFIG_NAME):  # config last
            finish(os.path.join(tmp, name))
            os.replace(os.path.join(tmp, name), directory / name)
    sync_directory(directory)
    return directory


def load(cls, name_or_path: str | os.PathLike, device: str | torch.device | None = None,
         config: PixelLLMConfig | None = None):
    """Build ``cls`` (``PixelLLM``) from a checkpoint (``resolve``) and load its weights.

    ``config``: build this config instead of the checkpoint's own (for example its own with a new
    head): weights it has no place for are an error, and each head the checkpoint has no weights
    for starts as it was built (or as ``Head.start_from`` says).
    """
    directory = resolve(name_or_path)
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint directory {directory} lacks {', '.join(missing)}")
    weights = directory / WEIGHTS_NAME
    against = "the given config" if config is not None else "its config.json"
    config = config or PixelLLMConfig.load(directory)
    header, _ = read_header(weights)
    verify_checksum(weights)
    model = _build(cls, config, load_tokenizer(directory), directory, against)
    _check_shapes(header, model.state_dict(), weights, against)
    try:
        missing, unexpected = _load_weights(model, weights)
    except (RuntimeError, ValueError, OSError, SafetensorError) as exc:
        raise CheckpointError(f"{weights} cannot be loaded into {against}: {_first_line(exc)}") from None
    if unexpected:
        raise CheckpointError(f"{weights} does not match {against}: it has no place for "
                              f"{len(unexpected)} weights, such as {sorted(unexpected)[0]}")
    if missing and against == "its config.json":
        raise CheckpointError(f"{weights} does not match its config.json: it lacks {len(missing)} weights, "
                              f"such as {sorted(missing)[0]}")
    _check_finite(model, header, weights)
    for name, head in model.heads.items():
        prefix = f"heads.{name}."
        new = [key[len(prefix):] for key in missing if key.startswith(prefix) and ".lora_" not in key]  # LoRA: fresh
        if new:
            head.start_from(model, new)
    if device is not None:
        model.to(device)
    return model.eval()


def _load_weights(model, weights: Path) -> tuple[list[str], list[str]]:
    """``load_model`` (not strict), then the weight of each layer that LoRA wraps in ``model`` but not in
    the file (a config with ``lora_rank`` over a checkpoint trained without it) into its base layer:
    ``...q.weight`` -> ``...q.base_layer.weight``. The names still missing and unexpected."""
    missing, unexpected = load_model(model, weights, strict=False)
    renamed = {key: based for key in unexpected if (based := _base_layer_name(key)) in missing}
    if renamed:
        from safetensors import safe_open

        with safe_open(weights, framework="pt") as file:
            model.load_state_dict({based: file.get_tensor(key) for key, based in renamed.items()}, strict=False)
        missing = [key for key in missing if key not in renamed.values()]
        unexpected = [key for key in unexpected if key not in renamed]
    return missing, unexpected


def _base_layer_name(key: str) -> str:
    module, _, name = key.rpartition(".")
    return f"{module}.base_layer.{name}"


def load_tokenizer(directory: Path):
    """The tokenizer saved beside a checkpoint, or None."""
    present = [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]
    if not present:
        return None
    for path in present:
        _read_json(path, "a tokenizer file")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as exc:  # noqa: BLE001 (the tokenizers library raises bare Exceptions for a bad file)
        raise CheckpointError(f"{present[0]} cannot be read as a tokenizer "
                              f"({type(exc).__name__}: {_first_line(exc)})") from None


# ----------------------------------------------------------------------------------------------
# Safetensors files with a checksum


def write_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to the safetensors file ``path`` with the checksum of its bytes, durably."""
    save_file(tensors, str(path), metadata={**(metadata or {}), CHECKSUM_KEY: _PLACEHOLDER})
    stamp_checksum(path)


def stamp_checksum(path: Path) -> None:
    """Write the checksum into the placeholder that a fresh file's header holds, then flush the file."""
    header_end = 8 + read_header(path)[1]
    with open(path, "r+b") as f:
        at = f.read(header_end).find(_PLACEHOLDER.encode())
        f.seek(at)
        f.write(CHECKSUM_KIND.encode() + _digest(path, header_end).encode())
    finish(path)


def verify_checksum(path: Path) -> bool:
    """Check ``path`` against the checksum in its header: True if it matched, False if it has none
    (or ``PIXELLLM_VERIFY_CHECKSUM=0``); ``CheckpointError`` if it does not match."""
    header, length = read_header(path)
    expected = header.get("__metadata__", {}).get(CHECKSUM_KEY)
    if expected is None or os.environ.get("PIXELLLM_VERIFY_CHECKSUM", "1") == "0":
        return False
    if not expected.startswith(CHECKSUM_KIND) or len(expected) != len(_PLACEHOLDER):
        raise CheckpointError(f"{path} is corrupt: the checksum in its header is malformed")
    actual = CHECKSUM_KIND + _digest(path, 8 + length, expected)
    if actual != expected:
        written, read = (value[len(CHECKSUM_KIND):][:12] for value in (expected, actual))
        raise CheckpointError(f"{path} is corrupt: its bytes do not match the checksum written with them "
                              f"({written}... written, {read}... read); restore it from a copy or write it again")
    return True


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, its header checked and its checksum verified first."""
    read_header(path)
    verify_checksum(path)
    try:
        return load_file(str(path))
    except (RuntimeError, ValueError, OSError, SafetensorError) as exc:
        raise CheckpointError(f"{path} cannot be read: {_first_line(exc)}") from None


def read_header(path: Path) -> tuple[dict, int]:
    """The header of a safetensors file and its length in bytes, every tensor's entry checked against
    the file's size: ``CheckpointError`` naming the file for an empty, truncated or garbled one."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            start = f.read(8)
            length = struct.unpack("<Q", start)[0] if len(start) == 8 else 0
            raw = f.read(length) if 0 < length <= min(size - 8, _MAX_HEADER) else b""
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    if size == 0:
        raise CheckpointError(f"{path} is empty")
    if not raw:
        raise CheckpointError(f"{path} is truncated or its header is corrupt: the header's length reads "
                              f"{length:,} bytes, the file has {max(size - 8, 0):,} after it")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is corrupt: its header is not a safetensors header (JSON of the tensors)")
    problem = _header_problem(header, size - 8 - length)
    if problem:
        raise CheckpointError(f"{path} is {problem}")
    return header, length


def _header_problem(header: dict, data_size: int) -> str | None:
    """What is wrong with a header whose tensors' bytes take ``data_size`` bytes, or None."""
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        return "corrupt: its header's metadata is not a mapping of strings"
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
                and isinstance(entry.get("shape"), list) and isinstance(entry.get("data_offsets"), list)
                and all(isinstance(n, int) and n >= 0 for n in entry["shape"] + entry["data_offsets"])
                and len(entry["data_offsets"]) == 2):
            return f"corrupt: the header's entry of tensor {name} is malformed"
        begin, end = entry["data_offsets"]
        if end > data_size:
            return f"truncated: tensor {name} ends at byte {end:,} of the data, which has {data_size:,}"
        itemsize = _DTYPE_BYTES.get(entry["dtype"])
        if begin > end or (itemsize is not None and end - begin != itemsize * _count(entry["shape"])):
            return f"corrupt: tensor {name} takes bytes {begin:,} to {end:,}, which its shape and dtype do not fill"
    return None


def _count(shape: list[int]) -> int:
    count = 1
    for n in shape:
        count *= n
    return count


def _digest(path: Path, header_end: int, written: str = _PLACEHOLDER) -> str:
    """The checksum's hex digest of ``path``, whose header (bytes before ``header_end``) holds
    ``written`` in the checksum's place."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
        header = view[:header_end].replace(written.encode(), _PLACEHOLDER.encode(), 1)
        spans = [(at, min(at + _CHUNK, len(view))) for at in range(header_end, len(view), _CHUNK)]

        def piece(span: tuple[int, int]) -> bytes:
            with memoryview(view)[span[0]:span[1]] as part:  # hashlib releases the GIL: chunks hash in parallel
                return hashlib.sha256(part).digest()

        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            pieces = list(pool.map(piece, spans))
    return hashlib.sha256(hashlib.sha256(header).digest() + b"".join(pieces)).hexdigest()


# ----------------------------------------------------------------------------------------------
# Loading, step by step


def _build(cls, config: PixelLLMConfig, tokenizer, directory: Path, against: str):
    """``cls.from_config``; a config that validates but cannot be built is the checkpoint's fault."""
    try:
        return cls.from_config(config, tokenizer=tokenizer)
    except PixelLLMError:
        raise
    # the parts' Hugging Face configs reach transformers as they are, and it raises many kinds of errors for
    # values it refuses (huggingface_hub's strict dataclasses derive from Exception alone)
    except Exception as exc:  # noqa: BLE001
        where = directory / CONFIG_NAME if against == "its config.json" else "the given config"
        raise CheckpointError(f"{where} describes a model that cannot be built "
                              f"({type(exc).__name__}: {_first_line(exc)})") from None


def _check_shapes(header: dict, state: dict[str, torch.Tensor], weights: Path, against: str) -> None:
    """The first tensor (in the model's order) whose shape in the file is not the model's is an error
    naming both shapes."""
    for name, tensor in state.items():
        if name in header and header[name]["shape"] != list(tensor.shape):
            raise CheckpointError(f"{weights} does not match {against}: tensor {name} has shape "
                                  f"{header[name]['shape']} in the file, {list(tensor.shape)} in the model")


def _check_finite(model, header: dict, weights: Path) -> None:
    """Every floating-point weight read from the file must be a finite number."""
    for name, tensor in model.state_dict().items():
        if name in header and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{weights}: tensor {name} holds {bad} non-finite values (NaN or infinity): the "
                                  "file is corrupt, or the training run that wrote it diverged")


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is corrupt: {what} that is not valid JSON") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _tied_names(model) -> set[str]:
    """Names of tensors that share storage with an earlier one (tied embeddings): a checkpoint
    holds each shared tensor once, as ``safetensors.torch.save_model`` writes it."""
    seen, tied = set(), set()
    for name, parameter in model.named_parameters(remove_duplicate=False):
        (tied.add(name) if id(parameter) in seen else seen.add(id(parameter)))
    return tied
