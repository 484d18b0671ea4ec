"""Tar shards: round trip, and every sample exactly once per epoch over 2 ranks x 2 DataLoader workers."""

import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

from pixelllm.data.images import load_image
from pixelllm.data.samples import Narrative, Question, Region, Sample, Utterance, sample_to_dict
from pixelllm.data.shards import INDEX_NAME, ShardDataset, write_shards
from pixelllm.errors import DataError


def make_samples(n):
    samples = []
    for i in range(n):
        trace = np.array([[0.1, 0.2, 0.0], [0.3 + i / 100, 0.4, 1.5]])
        region = Region((1.0, 2.0, 3.0 + i, 4.0), [f"thing {i}"], [[1, 1, 3, 1, 3, 3]], 5, f"r{i}")
        samples.append(
            Sample(
                np.full((8, 12, 3), i, np.uint8),
                f"img{i}",
                (12, 8),
                "test",
                narratives=[Narrative(f"caption {i}", [Utterance(f"caption {i}", 0.0, 1.0)], trace)],
                captions=[f"c{i}"],
                regions=[region],
                questions=[Question(f"q{i}?", "it is {seg}", [region])],
            )
        )
    return samples


def read_all(directory, rank, world_size, workers, epoch=0, **kwargs):
    dataset = ShardDataset(directory, rank=rank, world_size=world_size, **kwargs)
    dataset.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)
    return [s.image_id for s in loader]


def test_round_trip(tmp_path, real_data):
    samples = make_samples(7)
    photo = Sample(real_data / "photos" / "rocket.jpg", "rocket", (640, 427))
    paths = write_shards([*samples, photo], tmp_path, samples_per_shard=3)
    assert [p.name for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert json.loads((tmp_path / INDEX_NAME).read_text())["total"] == 8
    with tarfile.open(paths[0]) as tar:
        assert tar.getnames() == [
            "000000.png",
            "000000.json",
            "000001.png",
            "000001.json",
            "000002.png",
            "000002.json",
        ]
    read = list(ShardDataset(tmp_path))
    assert [sample_to_dict(s) for s in read] == [sample_to_dict(s) for s in [*samples, photo]]
    np.testing.assert_array_equal(np.asarray(load_image(read[3].image)), np.full((8, 12, 3), 3, np.uint8))
    assert read[-1].image == (real_data / "photos" / "rocket.jpg").read_bytes()  # stored unchanged


@pytest.mark.parametrize("shuffle_buffer", [0, 4])
def test_each_sample_once_per_epoch_over_ranks_and_workers(tmp_path, shuffle_buffer):
    write_shards(make_samples(23), tmp_path, samples_per_shard=5)
    orders = []
    for epoch in range(2):
        seen = [
            i
            for rank in range(2)
            for i in read_all(tmp_path, rank, 2, 2, epoch, shuffle_buffer=shuffle_buffer, seed=3)
        ]
        assert Counter(seen) == Counter(f"img{i}" for i in range(23))
        orders.append(seen)
    if shuffle_buffer:
        assert orders[0] != orders[1]
    else:
        assert orders[0] == orders[1]


def test_ranges_are_balanced_without_an_index(tmp_path):
    write_shards(make_samples(10), tmp_path, samples_per_shard=4)
    (tmp_path / INDEX_NAME).unlink()  # sample counts come from the tar headers instead
    sizes = [len(read_all(tmp_path, rank, 3, 0)) for rank in range(3)]
    assert sorted(sizes) == [3, 3, 4]


def test_map_and_malformed_members(tmp_path):
    write_shards(make_samples(3), tmp_path, samples_per_shard=10)
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "a") as tar:
        data = b"{broken"
        info = tarfile.TarInfo("000003.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    dataset = ShardDataset([shard], map=lambda s, rng: None if s.image_id == "img1" else s.image_id.upper())
    assert list(dataset) == ["IMG0", "IMG2"]
    assert dict(dataset.report.skipped) == {"malformed shard sample": 1}


def test_unreadable_shards(tmp_path):
    (tmp_path / "bad.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(DataError, match="bad.tar"):
        ShardDataset([tmp_path / "bad.tar"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no shards"):
        ShardDataset(tmp_path / "empty")
