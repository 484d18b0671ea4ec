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

A worker's sequence for an epoch (its range, through the shuffle buffer) is a pure function of
the seed, the epoch and the worker, and each sample is mapped with an RNG seeded by its turn in
that sequence: so an epoch can resume at any turn (``ShardDataset.resume``) and go on exactly as it
would have, reading only the headers of the samples before it.
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

from pixelllm.data.report import Reader, SkipReport
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
        """Add one sample (its image is read now if it is a path: ``DataError`` if it cannot be, and
        nothing of the sample is written)."""
        image = _encode_image(sample.image) if sample.image is not None else None
        if self._tar is None or self.shards[-1]["count"] >= self.samples_per_shard:
            self._open_next()
        key = f"{self.count:06d}"
        if image is not None:
            data, ext = image
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
        try:
            return path.read_bytes(), "jpg" if ext == "jpeg" else ext
        except OSError as exc:
            raise DataError(f"cannot read image {path}: {exc.strerror or exc}") from None
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
    paths. ``shuffle_buffer > 0`` shuffles the shard order per epoch (seeded by ``(seed, epoch)``)
    and each worker's samples through a buffer of that size (seeded by ``(seed, epoch, worker)``);
    ``seed`` is an int or a tuple of ints. ``map`` (e.g. an ``ExampleBuilder``) is applied to each
    sample with the RNG seeded ``(seed, epoch, worker, k)``, ``k`` being the sample's turn in the
    worker's sequence, so an epoch resumed part-way (``resume``) maps every sample as the whole
    epoch would. ``None`` results (and malformed samples) are dropped, or yielded where
    ``keep_none`` (a consumer that counts turns). Call ``set_epoch`` before each epoch (with
    ``persistent_workers=False``, workers see it).
    """

    def __init__(
        self,
        source: str | Path | Sequence[str | Path],
        *,
        shuffle_buffer: int = 0,
        seed: int | Sequence[int] = 0,
        rank: int | None = None,
        world_size: int | None = None,
        map: Callable[[Sample, np.random.Generator], Any] | None = None,
        keep_none: bool = False,
    ) -> None:
        super().__init__()
        self.shards = _shard_list(source)
        self.shuffle_buffer = shuffle_buffer
        self.seed = (seed,) if isinstance(seed, int) else tuple(seed)
        self.rank, self.world_size, self.map, self.keep_none = rank, world_size, map, keep_none
        self.report = SkipReport("shards")
        self.set_epoch(0)

    @property
    def total(self) -> int:
        """Samples per epoch over all ranks and workers."""
        return sum(count for _, count in self.shards)

    def set_epoch(self, epoch: int) -> None:
        self.resume(epoch, [])

    def resume(self, epoch: int, starts: Sequence[int], rotation: int = 0) -> None:
        """Read epoch ``epoch`` from turn ``starts[w]`` of local worker ``w``'s sequence (0 where not
        given); DataLoader worker ``j`` reads as local worker ``(j + rotation) % num_workers``."""
        self.epoch, self.starts, self.rotation = epoch, list(starts), rotation

    def lengths(self, num_workers: int) -> list[int]:
        """The samples per epoch of each of this rank's local workers (``num_workers`` of them, or
        the process itself where 0)."""
        rank, world = _rank_and_world(self.rank, self.world_size)
        workers = max(num_workers, 1)
        return [end - start for start, end in (self._bounds(rank * workers + w, world * workers)
                                               for w in range(workers))]

    def __iter__(self) -> Iterator[Any]:
        rank, world = _rank_and_world(self.rank, self.world_size)
        local, workers = _local_worker()
        local = (local + self.rotation) % workers
        worker = rank * workers + local
        start, end = self._bounds(worker, world * workers)
        first = self.starts[local] if local < len(self.starts) else 0
        for k, sample in self._in_order(self._order(start, end, worker), start, first):
            rng = np.random.default_rng((*self.seed, self.epoch, worker, k))
            item = self.map(sample, rng) if self.map is not None and sample is not None else sample
            if item is not None or self.keep_none:
                yield item

    def _bounds(self, worker: int, workers: int) -> tuple[int, int]:
        """Global worker ``worker``'s contiguous range of positions in the epoch's sample order."""
        return self.total * worker // workers, self.total * (worker + 1) // workers

    def _order(self, start: int, end: int, worker: int) -> np.ndarray:
        """The positions ``start <= p < end`` in the order the worker yields them."""
        positions = range(start, end)
        if self.shuffle_buffer > 0:
            rng = np.random.default_rng((*self.seed, self.epoch, worker))
            positions = list(_shuffled(iter(positions), self.shuffle_buffer, rng))
        return np.asarray(positions, dtype=np.int64)

    def _in_order(self, order: np.ndarray, start: int, first: int) -> Iterator[tuple[int, Sample | None]]:
        """``(k, sample at order[k])`` for every turn ``k >= first`` (None for a malformed or missing
        sample). The shards are read once, in sequence: a sample waits in ``held`` for its turn (at
        most ``shuffle_buffer`` wait), and those of the turns before ``first`` are passed over unread."""
        turn = np.empty(len(order), dtype=np.int64)
        turn[order - start] = np.arange(len(order))
        held: dict[int, Sample | None] = {}
        k = first
        for position, sample in self._read_range(start, start + len(order), lambda p: turn[p - start] >= first):
            held[position] = sample
            while k < len(order) and int(order[k]) in held:
                yield k, held.pop(int(order[k]))
                k += 1
        for rest in range(k, len(order)):  # positions the shards lack (an index that overstates a count)
            if int(order[rest]) not in held:
                self.report.skip("missing shard sample")
            yield rest, held.pop(int(order[rest]), None)

    def _read_range(
        self, start: int, end: int, wanted: Callable[[int], bool]
    ) -> Iterator[tuple[int, Sample | None]]:
        """``(position, sample)`` of the wanted positions ``start <= p < end`` of this epoch's sample
        order; a worker opens only the shards its range touches."""
        position = 0
        for path, count in self._epoch_shards():
            if position + count > start and position < end:
                def read(index: int, base: int = position) -> bool:
                    return wanted(base + index)

                for index, members in _shard_members(path, max(start - position, 0), end - position, read):
                    if read(index):
                        yield position + index, self._sample(members)
            position += count

    def _epoch_shards(self) -> list[tuple[Path, int]]:
        """The shards in this epoch's order (shuffled with the seed when shuffling)."""
        order = list(self.shards)
        if self.shuffle_buffer > 0:
            permutation = np.random.default_rng((*self.seed, self.epoch)).permutation(len(order))
            order = [order[i] for i in permutation]
        return order

    def _sample(self, members: dict[str, bytes]) -> Sample | None:
        try:
            data = json.loads(members.pop("json"))
            return sample_from_dict(data, next(iter(members.values()), None))
        except (KeyError, ValueError, TypeError):
            self.report.skip("malformed shard sample")
            return None


class ShardReader(Reader):
    """Every sample of a shard directory, in order, in this process: ``open_source``'s reader of
    shards (evaluation, a tokenizer's texts); training streams them through ``ShardDataset``."""

    name = "shards"

    def __init__(self, directory: str | Path) -> None:
        super().__init__()
        self.directory = Path(directory)
        self.dataset = ShardDataset(self.directory, rank=0, world_size=1)
        self.dataset.report = self.report  # its skips count in this reader's report

    def __len__(self) -> int:
        return self.dataset.total

    def _samples(self) -> Iterator[Sample]:
        return iter(self.dataset)


def _shard_members(
    path: Path, first: int = 0, stop: int | None = None, read: Callable[[int], bool] = lambda index: True
) -> Iterator[tuple[int, dict[str, bytes]]]:
    """``(index, {extension: bytes})`` of samples ``first <= index < stop`` of a shard (a sample's
    members are adjacent in the tar); only the samples ``read`` wants have their members read, the
    others' dicts stay empty (their headers are all that is read)."""
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
                    yield index, members
                index, key, members = index + 1, name_key, {}
                if stop is not None and index >= stop:
                    return
            if index >= first and read(index):
                members[ext] = tar.extractfile(info).read()
        if key is not None and index >= first:
            yield index, members


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


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """The arguments, else ``torch.distributed``'s when initialized, else 0 and 1."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _local_worker() -> tuple[int, int]:
    """This DataLoader worker's id and the worker count (0 and 1 outside a worker)."""
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


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
    return [(p, sum(1 for _ in _shard_members(p, read=lambda index: False))) for p in paths]
