"""Streamed shard datasets of the training mixture: each sample once per epoch over 2 ranks x 2
DataLoader workers, and a stream resumed from its place goes on exactly as the uninterrupted one."""

from collections import Counter

import numpy as np
import pytest

from pixelllm.data.samples import Sample
from pixelllm.data.shards import write_shards
from pixelllm.data.streams import ShardStream, Streams, resume_point
from pixelllm.errors import ConfigError

SAMPLES = 11


def tag(sample, rng):
    """The stream's builder here: which sample, and the first draw of the RNG it is augmented with."""
    return sample.image_id, int(rng.integers(1 << 30))


@pytest.fixture
def shards(tmp_path):
    samples = [Sample(np.full((4, 6, 3), i, np.uint8), f"img{i}", (6, 4)) for i in range(SAMPLES)]
    write_shards(samples, tmp_path, samples_per_shard=4)
    return tmp_path


def stream(shards, rank=0, world=1, workers=2, shuffle=4):
    return ShardStream(shards, tag, seed=(7, 1), shuffle_buffer=shuffle, num_workers=workers, rank=rank, world=world)


@pytest.mark.parametrize("shuffle", [0, 4])
def test_each_sample_once_per_epoch_over_ranks_and_workers(shards, shuffle):
    epochs = [[], []]
    for rank in range(2):
        ranked = stream(shards, rank, 2, shuffle=shuffle)
        for epoch in epochs:
            epoch += [next(ranked)[0] for _ in range(sum(ranked.lengths))]
    for epoch in epochs:
        assert Counter(epoch) == Counter(f"img{i}" for i in range(SAMPLES))
    assert (epochs[0] != epochs[1]) == bool(shuffle)


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
@pytest.mark.parametrize("workers", [0, 2, 3])
def test_a_resumed_stream_goes_on_as_the_uninterrupted_one(shards, workers):
    total = 2 * SAMPLES + 5
    straight = stream(shards, workers=workers)
    expected = [next(straight) for _ in range(total)]
    for cut in (3, SAMPLES, SAMPLES + 4):  # mid-epoch (a worker reads first that is not worker 0), its end, past it
        first = stream(shards, workers=workers)
        head = [next(first) for _ in range(cut)]
        again = stream(shards, workers=workers)
        again.restore(first.epoch, first.taken)
        assert head + [next(again) for _ in range(total - cut)] == expected, cut


def round_robin(lengths):
    """``(worker, turn)`` in the order a DataLoader hands out its workers' items."""
    turns, order = [0] * len(lengths), []
    while any(t < n for t, n in zip(turns, lengths, strict=True)):
        for w, n in enumerate(lengths):
            if turns[w] < n:
                order.append((w, turns[w]))
                turns[w] += 1
    return order


@pytest.mark.parametrize("lengths", [[3, 3], [3, 2], [2, 3], [0, 1], [4, 4, 3], [1]])
def test_resume_point_matches_the_round_robin(lengths):
    order = round_robin(lengths)
    for taken in range(len(order) + 1):
        starts, first = resume_point(lengths, taken)
        assert starts == [sum(w == worker for w, _ in order[:taken]) for worker in range(len(lengths))]
        assert first == (order[taken][0] if taken < len(order) else 0)


def test_places_are_restored_or_the_epoch_restarts(shards, capsys):
    streams = Streams({0: stream(shards)}, rank=0, world=1, num_workers=2)
    saved = {"processes": 1, "workers": 2, "ranks": [{"0": [3, 5]}]}
    streams.restore({"step": 9, "streams": saved})
    assert (streams.streams[0].epoch, streams.streams[0].taken) == (3, 5)
    assert streams.state() == {"streams": saved}
    streams.restore({"streams": {"processes": 2, "workers": 2, "ranks": [{"0": [3, 5]}, {"0": [2, 9]}]}})
    assert (streams.streams[0].epoch, streams.streams[0].taken) == (2, 0)
    assert "now by 1 x 2: they restart their epoch" in capsys.readouterr().err


def test_too_few_samples_for_the_processes(shards):
    with pytest.raises(ConfigError, match="11 samples are too few for 12 processes x 1 workers"):
        stream(shards, rank=0, world=12, workers=0)
