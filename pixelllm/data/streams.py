"""Streamed datasets in the training mixture: a shard directory read as one process's endless
stream of examples, whose place survives a checkpoint exactly.

Training keeps the other datasets in memory and draws every slot of a micro-batch as a pure
function of (seed, step) (``pixelllm.train.MixtureBatches``): which dataset, and which sample. A
slot drawn for a streamed dataset takes the next example of that dataset's stream instead. The
stream reads this process's share of an epoch through ``ShardDataset`` (every sample once per
epoch over all processes and DataLoader workers), then the next epoch, and so on.

Its place is ``(epoch, taken)``, ``taken`` counting the slots it filled in the epoch (a sample
that the builder skips fills its slot with its ``Skip``, as an in-memory one does). The DataLoader hands
out its workers' examples round-robin over the workers that have any left, so example ``i`` of the
epoch is turn ``k`` of worker ``w`` in the order of ``(k, w)``, and ``resume_point`` turns a place
back into where each worker resumes and which one reads first: a resumed run reads what the
uninterrupted run would have, in the same order, augmented alike. That holds for the same number of
processes and workers; with others, every process's split differs, and ``Streams.restore``
restarts the epoch instead (the samples read before the checkpoint in that epoch are read again).
"""

from __future__ import annotations

import bisect
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from pixelllm.data.pipeline import Skip
from pixelllm.data.shards import ShardDataset
from pixelllm.errors import ConfigError


class StreamSlot(NamedTuple):
    """A micro-batch slot of streamed dataset ``dataset``, filled in the main process."""

    dataset: int


class ShardStream:
    """One process's examples of a shard directory, epoch after epoch, read by ``num_workers``
    DataLoader workers: ``next`` gives what ``builder(sample, rng)`` gives (``ExampleBuilder.build``:
    an ``Example`` or a ``Skip``), or a ``Skip`` of ``name`` for a malformed or missing sample."""

    def __init__(self, directory: str | Path, builder: Callable, *, seed: Sequence[int], shuffle_buffer: int,
                 num_workers: int, rank: int, world: int, name: str = "shards") -> None:
        self.dataset = ShardDataset(directory, shuffle_buffer=shuffle_buffer, seed=seed, rank=rank, world_size=world,
                                    map=builder, keep_none=True)
        self.num_workers, self.name = num_workers, name
        self.lengths = self.dataset.lengths(num_workers)
        if sum(self.lengths) == 0:
            raise ConfigError(f"{directory}: {self.dataset.total} samples are too few for {world} processes x "
                              f"{max(num_workers, 1)} workers (each process needs one)")
        self.epoch, self.taken = 0, 0
        self._items: Iterator[Any] | None = None

    def __iter__(self) -> ShardStream:
        return self

    def __next__(self):
        while True:
            if self._items is None:
                self._items = self._start()
            try:
                item = next(self._items)
            except StopIteration:
                self.epoch, self.taken, self._items = self.epoch + 1, 0, None
                continue
            self.taken += 1
            return item if item is not None else Skip(self.name, "malformed or missing shard sample")

    def restore(self, epoch: int, taken: int) -> None:
        """Go on from ``taken`` examples into epoch ``epoch``."""
        self.epoch, self.taken, self._items = epoch, taken, None

    def _start(self) -> Iterator[Any]:
        starts, rotation = resume_point(self.lengths, self.taken)
        self.dataset.resume(self.epoch, starts, rotation)
        # its own generator: the workers' seeds are drawn from it, not from the training's random state
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                                             collate_fn=_as_is, generator=torch.Generator())
        return iter(loader)


def resume_point(lengths: Sequence[int], taken: int) -> tuple[list[int], int]:
    """After ``taken`` examples of an epoch whose local workers have ``lengths`` samples each: the
    turn each worker resumes at, and the worker that reads next (0 once the epoch is done)."""

    def before(level: int) -> int:  # examples handed out before every worker's turn ``level``
        return sum(min(length, level) for length in lengths)

    level = bisect.bisect_right(range(max(lengths, default=0) + 1), taken, key=before) - 1
    active = [w for w, length in enumerate(lengths) if length > level]
    done = taken - before(level)  # the workers of ``active`` that already gave turn ``level``
    starts = [level + 1 if w in active[:done] else min(length, level) for w, length in enumerate(lengths)]
    return starts, active[done] if done < len(active) else 0


class Streams:
    """This process's streamed datasets (``{dataset index: ShardStream}``) and their places."""

    def __init__(self, streams: dict[int, ShardStream], rank: int, world: int, num_workers: int) -> None:
        self.streams, self.rank, self.world, self.num_workers = streams, rank, world, num_workers

    def __len__(self) -> int:
        return len(self.streams)

    def fill(self, micro_batches: Iterable[list], collate_fn: Callable[[list], Any]) -> Iterator[Any]:
        """``collate_fn`` of each micro-batch, its ``StreamSlot`` entries filled (``fill_slots``)."""
        for examples in micro_batches:
            yield collate_fn(self.fill_slots(examples))

    def fill_slots(self, examples: list) -> list:
        """``examples`` with each ``StreamSlot`` replaced by its stream's next example."""
        return [next(self.streams[e.dataset]) if isinstance(e, StreamSlot) else e for e in examples]

    def state(self) -> dict:
        """Every process's places, for the checkpoint (a collective: all processes call it)."""
        if not self.streams:
            return {}
        mine = {str(d): [s.epoch, s.taken] for d, s in self.streams.items()}
        ranks = [mine]
        if self.world > 1:
            ranks = [None] * self.world
            dist.all_gather_object(ranks, mine)
        return {"streams": {"processes": self.world, "workers": self.num_workers, "ranks": ranks}}

    def restore(self, state: dict) -> None:
        """Go on from the places of a checkpoint's ``state``; read by other numbers of processes or
        workers, every stream restarts the earliest epoch any process was in."""
        saved = state.get("streams")
        if not self.streams or saved is None:
            return
        if (saved["processes"], saved["workers"]) == (self.world, self.num_workers):
            places = saved["ranks"][self.rank]
        else:
            if self.rank == 0:
                print(f"warning: the streamed datasets were read by {saved['processes']} processes x "
                      f"{saved['workers']} workers, now by {self.world} x {self.num_workers}: they restart "
                      "their epoch", file=sys.stderr)
            places = {d: [min(rank[d][0] for rank in saved["ranks"]), 0] for d in saved["ranks"][0]}
        for d, stream in self.streams.items():
            stream.restore(*places.get(str(d), (0, 0)))


def _as_is(item):
    return item
