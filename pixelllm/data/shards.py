"""Sharded streaming: WebDataset-style tar shards and an ``IterableDataset`` that reads them.

A shard ``shard-000000.tar`` holds, per sample, ``{key}.{jpg|png|...}`` (the image's encoded
bytes, unchanged when it came from a file; arrays and PIL images are stored as PNG) and
``{key}.json`` (``samples.sample_to_dict``), keys being the global sample number ``000000``,
``000001``, ... The writer also writes ``index.json`` (shards and their sample counts).

Reading splits every epoch's samples into contiguous, equal (+-1) ranges, one per *global
worker* (``rank * num_workers + worker_id`` of ``world_size * num_workers``), over the shard order
of that epoch (shuffled with the seed when shuffling), so each sample is read by exactly one
worker per epoch and a worker opens only the shards its range touches. Rank and world size come
from the arguments, else from ``torch.distributed`` when initialized, else 0 and 1.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pixelllm.data.report import SkipReport
from pixelllm.data.samples import Sample, sample_from_dict, sample_to_dict
from pixelllm.errors import DataError

INDEX_NAME = "index.json"


class ShardWriter:
    """Writes samples into ``directory/{prefix}-NNNNNN.tar``, ``samples_per_shard`` per shard."""

    def __init__(self, directory: str | Path, samples_per_shard: int = 1000, prefix: str = "shard") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.samples_per_shard, self.prefix = samples_per_shard, prefix
        self.shards: list[dict[str, Any]] = []
        self.count = 0
        self._tar: tarfile.TarFile | None = None

    def write(self, sample: Sample) -> None:
        """Add one sample (its image is read now if it is a path)."""
        if self._tar is None or self.shards[-1]["count"] >= self.samples_per_shard:
            self._open_next()
        key = f"{self.count:06d}"
        if sample.image is not None:
            data, ext = _encode_image(sample.image)
            self._add(f"{key}.{ext}", data)
        self._add(f"{key}.json", json.dumps(sample_to_dict(sample)).encode())
        self.shards[-1]["count"] += 1
        self.count += 1

    def close(self) -> list[Path]:
        """Finish the last shard and write ``index.json`` (once); returns the shard paths."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            (self.directory / INDEX_NAME).write_text(json.dumps({"shards": self.shards, "total": self.count}))
        return [self.directory / s["file"] for s in self.shards]

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open_next(self) -> None:
        if self._tar is not None:
            self._tar.close()
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._tar = tarfile.open(self.directory / name, "w")  # noqa: SIM115 - closed by the writer
        self.shards.append({"file": name, "count": 0})

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        self._tar.addfile(info, io.BytesIO(data))


def write_shards(samples, directory: str | Path, samples_per_shard: int = 1000) -> list[Path]:
    """Write every sample of an iterable into shards; returns the shard paths."""
    with ShardWriter(directory, samples_per_shard) as writer:
        for sample in samples:
            writer.write(sample)
    return writer.close()


def _encode_image(image) -> tuple[bytes, str]:
    if isinstance(image, str | Path):
        path = Path(image)
        ext = path.suffix.lower().lstrip(".") or "img"
        return path.read_bytes(), "jpg" if ext == "jpeg" else ext
    if isinstance(image, bytes | bytearray):
        return bytes(image), "img"
    pil = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return buffer.getvalue(), "png"


class ShardDataset(torch.utils.data.IterableDataset):
    """Streams ``Sample`` objects (image as encoded bytes) from shards, each exactly once per epoch
    across all ranks and DataLoader workers.

    ``source``: a shard directory (with ``index.json``, or any ``*.tar`` in it) or a list of shard
    paths. ``shuffle_buffer > 0`` shuffles the shard order per epoch and the samples through a
    buffer of that size, seeded by ``(seed, epoch)`` and the worker. ``map`` (e.g. an
    ``ExampleBuilder``) is applied to each sample with that worker's RNG; ``None`` results are
    dropped. Call ``set_epoch`` before each epoch (with ``persistent_workers=False``, workers see it).
    """

    def __init__(
        self,
        source: str | Path | Sequence[str | Path],
        *,
        shuffle_buffer: int = 0,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        map: Callable[[Sample, np.random.Generator], Any] | None = None,
    ) -> None:
        super().__init__()
        self.shards = _shard_list(source)
        self.shuffle_buffer, self.seed, self.epoch = shuffle_buffer, seed, 0
        self.rank, self.world_size, self.map = rank, world_size, map
        self.report = SkipReport("shards")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def worker_range(self) -> tuple[int, int, list[tuple[Path, int]]]:
        """This process's ``(start, end)`` in the epoch's global sample order, and that order's shards."""
        worker, workers = _global_worker(self.rank, self.world_size)
        order = list(self.shards)
        if self.shuffle_buffer > 0:
            permutation = np.random.default_rng((self.seed, self.epoch)).permutation(len(order))
            order = [order[i] for i in permutation]
        total = sum(count for _, count in order)
        return total * worker // workers, total * (worker + 1) // workers, order

    def __iter__(self) -> Iterator[Any]:
        start, end, order = self.worker_range()
        worker, _ = _global_worker(self.rank, self.world_size)
        rng = np.random.default_rng((self.seed, self.epoch, worker))
        samples = self._read_range(order, start, end)
        if self.shuffle_buffer > 0:
            samples = _shuffled(samples, self.shuffle_buffer, rng)
        for sample in samples:
            item = self.map(sample, rng) if self.map is not None else sample
            if item is not None:
                yield item

    def _read_range(self, order: list[tuple[Path, int]], start: int, end: int) -> Iterator[Sample]:
        position = 0
        for path, count in order:
            if position + count > start and position < end:
                yield from self._read_shard(path, start - position, end - position)
            position += count

    def _read_shard(self, path: Path, first: int, stop: int) -> Iterator[Sample]:
        """Samples number ``first <= i < stop`` (within the shard) of one shard."""
        for _, members in _shard_members(path, first, stop):
            try:
                data = json.loads(members.pop("json"))
                yield sample_from_dict(data, next(iter(members.values()), None))
            except (KeyError, ValueError, TypeError):
                self.report.skip("malformed shard sample")


def _shard_members(
    path: Path, first: int = 0, stop: int | None = None, read: bool = True
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` of samples ``first <= i < stop`` of a shard (a sample's members
    are adjacent in the tar); with ``read=False`` only headers are read and the dicts stay empty."""
    try:
        tar = tarfile.open(path, "r:")  # noqa: SIM115 - the `with` below needs the open error separately
    except (OSError, tarfile.TarError) as exc:
        raise DataError(f"cannot read shard {path}: {exc}") from None
    with tar:
        index, key, members = -1, None, {}
        for info in tar:
            if not info.isfile():
                continue
            name_key, _, ext = info.name.partition(".")
            if name_key != key:
                if key is not None and index >= first:
                    yield key, members
                index, key, members = index + 1, name_key, {}
                if stop is not None and index >= stop:
                    return
            if read and index >= first:
                members[ext] = tar.extractfile(info).read()
        if key is not None and index >= first:
            yield key, members


def _shuffled(items: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = int(rng.integers(len(buffer)))
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def _global_worker(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world_size = 0, 1
    info = torch.utils.data.get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * workers + worker, world_size * workers


def _shard_list(source: str | Path | Sequence[str | Path]) -> list[tuple[Path, int]]:
    """``[(path, sample count)]`` from ``index.json`` when present, else by counting keys."""
    if isinstance(source, str | Path) and Path(source).is_dir():
        directory = Path(source)
        index = directory / INDEX_NAME
        if index.is_file():
            try:
                entries = json.loads(index.read_text())["shards"]
                return [(directory / e["file"], int(e["count"])) for e in entries]
            except (ValueError, KeyError, TypeError):
                raise DataError(f"{index} is not a shard index") from None
        paths = sorted(directory.glob("*.tar"))
        if not paths:
            raise DataError(f"no shards (*.tar) in {directory}")
    else:
        paths = [Path(source)] if isinstance(source, str | Path) else [Path(p) for p in source]
    return [(p, sum(1 for _ in _shard_members(p, read=False))) for p in paths]
