"""The training mixture: every micro-batch a pure function of (seed, step, global micro index).

``MixtureBatches`` draws each micro-batch's addresses (dataset by weight, sample uniformly) and
``MixtureDataset`` builds the example of an address; a slot of a streamed dataset is filled from its
stream in the main process instead (``pixelllm.data.streams``). A sample the builder cannot use (an
unreadable image, no target) leaves a ``Skip`` in its slot, and a micro-batch whose every slot was
skipped is drawn again with the next attempt's RNG (``MicroBatches``): bad data never ends a run,
and a resumed run redraws exactly as the uninterrupted one. ``DataReport`` counts both, by dataset
and reason, over every process and across resumes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from pixelllm.data.collate import collate
from pixelllm.data.pipeline import ExampleBuilder, Skip
from pixelllm.data.report import SkipReport
from pixelllm.data.shards import ShardReader
from pixelllm.data.streams import Streams, StreamSlot
from pixelllm.errors import DataError

MAX_DRAWS = 100  # draws of one micro-batch before the data counts as unusable


class MixtureDataset(torch.utils.data.Dataset):
    """Examples addressed by ``(dataset, sample, key)``; ``key`` seeds the augmentation. A sample the
    builder skips comes back as its ``Skip``; the slot of a streamed dataset as a ``StreamSlot``,
    which the main process fills from its stream (there the sample is the stream's next, not ``sample``)."""

    def __init__(self, sources: list[tuple[list | ShardReader, ExampleBuilder]]):
        self.sources = sources

    def __len__(self) -> int:
        return sum(len(samples) for samples, _ in self.sources)

    def __getitem__(self, address: tuple[int, int, tuple[int, ...]]):
        dataset, index, key = address
        samples, builder = self.sources[dataset]
        if isinstance(samples, ShardReader):
            return StreamSlot(dataset)
        return builder.build(samples[index], np.random.default_rng(key))


class MixtureBatches(torch.utils.data.Sampler):
    """For each step from ``start``: this process's micro-batches, as lists of addresses.

    Global micro-batch ``g`` of step ``s`` (``g = micro * world + rank``) is drawn with the RNG
    seeded ``(seed, s, g)``: datasets by weight (those whose ``starts`` step has come), samples
    uniformly (with replacement). Its redraw ``attempt`` (``draw``) is seeded ``(seed, s, g, attempt)``.
    """

    def __init__(self, sizes: list[int], weights: list[float], starts: list[int], batch_size: int,
                 accumulation: int, runtime, seed: int, start: int, steps: int):
        self.sizes = sizes
        self.weights, self.starts = np.asarray(weights, dtype=np.float64), np.asarray(starts)
        self.batch_size, self.accumulation = batch_size, accumulation
        self.rank, self.world, self.seed, self.start, self.steps = runtime.rank, runtime.world, seed, start, steps

    def __len__(self) -> int:
        return (self.steps - self.start) * self.accumulation

    def __iter__(self) -> Iterator[list[tuple[int, int, tuple[int, ...]]]]:
        return (self.draw(step, g) for step, g in self.slots())

    def slots(self) -> Iterator[tuple[int, int]]:
        """``(step, g)`` of this process's micro-batches, in order."""
        for step in range(self.start, self.steps):
            for micro in range(self.accumulation):
                yield step, micro * self.world + self.rank

    def draw(self, step: int, g: int, attempt: int = 0) -> list[tuple[int, int, tuple[int, ...]]]:
        """The addresses of global micro-batch ``g`` of ``step`` (drawn again: ``attempt`` > 0)."""
        key = (self.seed, step, g) if attempt == 0 else (self.seed, step, g, attempt)
        rng = np.random.default_rng(key)
        weights = self.weights * (self.starts <= step)
        datasets = rng.choice(len(self.sizes), size=self.batch_size, p=weights / weights.sum())
        return [(int(d), int(rng.integers(self.sizes[d])), (*key, slot)) for slot, d in enumerate(datasets)]


def collate_counting(items: list, pad_token_id: int) -> tuple[dict | None, Counter]:
    """The collated batch of ``items`` (None if every one was skipped) and its skips by
    ``(dataset, reason)``."""
    skipped = Counter((item.source, item.reason) for item in items if isinstance(item, Skip))
    return collate(items, pad_token_id), skipped


class MicroBatches:
    """This process's collated micro-batches, in the sampler's order, none empty: one whose every
    sample was skipped is drawn again here, up to ``MAX_DRAWS`` times. Skips and redraws go to ``report``."""

    def __init__(self, loader: Iterable, sampler: MixtureBatches, dataset: MixtureDataset, streams: Streams,
                 collate: Callable[[list], tuple[dict | None, Counter]], report: DataReport):
        """``loader`` yields ``collate(items)`` of each micro-batch (the address lists where ``streams``
        fill them)."""
        self.collate = collate
        loaded = streams.fill(loader, collate) if streams else iter(loader)
        self.batches = zip(sampler.slots(), loaded, strict=False)  # the loader ends with the sampler
        self.sampler, self.dataset, self.streams, self.report = sampler, dataset, streams, report

    def __iter__(self) -> MicroBatches:
        return self

    def __next__(self) -> dict:
        (step, g), (batch, skipped) = next(self.batches)
        self.report.add(skipped)
        attempt = 0
        while batch is None:
            attempt += 1
            if attempt == MAX_DRAWS:
                raise DataError(f"step {step + 1}: {MAX_DRAWS} draws of a micro-batch in a row found no usable "
                                f"sample ({self.report.reasons()}): check the datasets")
            items = [self.dataset[address] for address in self.sampler.draw(step, g, attempt)]
            batch, skipped = self.collate(self.streams.fill_slots(items) if self.streams else items)
            self.report.add(skipped, redrawn=1)
        return batch


class DataReport:
    """The samples the micro-batches skipped, by dataset and reason, and the micro-batches drawn
    again; and ``read``, the reports of the datasets' readers (the records they skipped). Each process
    counts its own; ``totals`` are every process's, since the run began."""

    def __init__(self, world: int, state: dict | None = None, main: bool = True, read: list[SkipReport] = ()):
        saved = (state or {}).get("data", {"skipped": {}, "redrawn": 0})
        self.world, self.read = world, list(read)
        self.skipped: Counter = Counter()
        self.redrawn = 0
        if main:  # the run's counts before the checkpoint are the main process's to carry on
            self.skipped.update({(source, reason): n for source, reasons in saved["skipped"].items()
                                 for reason, n in reasons.items()})
            self.redrawn = saved["redrawn"]
        self.totals = {"skipped_samples": sum(n for reasons in saved["skipped"].values() for n in reasons.values()),
                       "redrawn_micro_batches": saved["redrawn"]}
        self._new = [0, 0]

    def add(self, skipped: Counter, redrawn: int = 0) -> None:
        self.skipped.update(skipped)
        self.redrawn += redrawn
        self._new[0] += sum(skipped.values())
        self._new[1] += redrawn

    def step(self) -> dict:
        """The totals after this step's counts of every process (a collective: all processes call it)."""
        new = torch.tensor(self._new, dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(new)
        self.totals = {"skipped_samples": self.totals["skipped_samples"] + int(new[0]),
                       "redrawn_micro_batches": self.totals["redrawn_micro_batches"] + int(new[1])}
        self._new = [0, 0]
        return {**self.totals, "skipped_records": sum(sum(r.skipped.values()) for r in self.read)}

    def state(self) -> dict:
        """Every process's counts by dataset and reason, for the checkpoint (a collective)."""
        skipped, redrawn = self._gathered()
        by_source: dict[str, dict[str, int]] = {}
        for (source, reason), n in sorted(skipped.items()):
            by_source.setdefault(source, {})[reason] = n
        return {"data": {"skipped": by_source, "redrawn": redrawn}}

    def summary(self) -> str:
        """Every process's counts in a few lines (a collective), e.g. ``data: the batches skipped 3
        samples (region:data: unreadable image: 3), 1 micro-batch drawn again``, then each reader that
        skipped records."""
        skipped, redrawn = self._gathered()
        lines = [f"data: the batches skipped {sum(skipped.values())} samples ({_reasons(skipped)}), "
                 f"{redrawn} micro-batches drawn again"]
        return "\n".join(lines + [f"data: reader {r.summary()}" for r in self.read if r.skipped])

    def reasons(self) -> str:
        """This process's skips by dataset and reason, in a few words."""
        return _reasons(self.skipped)

    def _gathered(self) -> tuple[Counter, int]:
        if self.world == 1:
            return self.skipped, self.redrawn
        ranks = [None] * self.world
        dist.all_gather_object(ranks, (self.skipped, self.redrawn))
        return sum((counts for counts, _ in ranks), Counter()), sum(redrawn for _, redrawn in ranks)


def _reasons(skipped: Counter) -> str:
    return ", ".join(f"{source}: {reason}: {n}" for (source, reason), n in skipped.most_common()) or "none"
