"""``open_source``: every layout found from its files alone, read through its reader, and a one-line
``DataError`` for a path that is none of them. COCO-style files are built around the real objects
of COCO image 39769 (``tests/fixtures/real/coco``)."""

import json
from pathlib import Path

import pytest

from pixelllm.data.coco import CocoInstancesReader
from pixelllm.data.ln import LocalizedNarrativesReader
from pixelllm.data.muse import MuseReader
from pixelllm.data.refcoco import MdetrRefReader
from pixelllm.data.samples import sample_to_dict
from pixelllm.data.shards import ShardReader, write_shards
from pixelllm.data.sources import open_source
from pixelllm.data.vg import GritVgReader
from pixelllm.data.vidln import VidlnReader
from pixelllm.errors import DataError

FORMATS = Path(__file__).resolve().parents[1] / "fixtures" / "formats"
IMAGE = {"id": 39769, "file_name": "000000039769.png", "width": 640, "height": 480}
CATEGORIES = [{"id": 17, "name": "cat"}, {"id": 63, "name": "couch"}, {"id": 65, "name": "bed"},
              {"id": 75, "name": "remote"}]


@pytest.fixture
def annotations(real_data):
    return json.loads((real_data / "coco" / "coco_annotations_39769.json").read_text())


@pytest.fixture
def coco_images(real_data):
    return real_data / "coco"


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def mdetr(tmp_path, annotations) -> Path:
    """Two expressions (image entries) about the two cats, MDETR's layout."""
    cats = [a for a in annotations if a["category_id"] == 17]
    images = [{**IMAGE, "id": i, "original_id": 39769, "caption": caption, "dataset_name": "refcoco"}
              for i, caption in enumerate(["the cat on the left", "the other cat"])]
    anns = [{**a, "id": 10 + i, "image_id": i, "original_id": a["id"]} for i, a in enumerate(cats)]
    return write_json(tmp_path / "final_refcoco_val.json", {"images": images, "annotations": anns,
                                                            "categories": CATEGORIES[:1]})


def test_mdetr_json_serves_the_referring_tasks(tmp_path, annotations, coco_images):
    path = mdetr(tmp_path, annotations)
    for task in ("refer", "refseg", "regioncap"):
        source = open_source(task, path, images=coco_images)
        assert isinstance(source.reader, MdetrRefReader) and source.layout == "mdetr"
    [sample] = list(open_source("refer", path, images=coco_images).reader)
    assert sample.image == coco_images / "000000039769.png"
    assert sorted(t for r in sample.regions for t in r.texts) == ["the cat on the left", "the other cat"]
    assert all(r.segmentation is not None for r in sample.regions)  # refseg has its masks


def test_coco_instances_serve_densecap_and_region_captions(tmp_path, annotations, coco_images):
    path = write_json(tmp_path / "instances_val2017.json",
                      {"images": [IMAGE], "annotations": annotations, "categories": CATEGORIES})
    for task in ("densecap", "regioncap", "region"):
        assert isinstance(open_source(task, path, images=coco_images).reader, CocoInstancesReader)
    [sample] = list(open_source("densecap", path, images=coco_images).reader)
    assert sorted(r.texts[0] for r in sample.regions) == ["bed", "cat", "cat", "couch", "remote", "remote"]
    with pytest.raises(DataError, match="is not refer data: expected a RefCOCO folder"):
        open_source("refer", path, images=coco_images)


def test_a_grit_file_stays_grit(real_data):
    source = open_source("densecap", FORMATS / "grit_vg_sample.json", images=real_data / "photos")
    assert isinstance(source.reader, GritVgReader) and source.layout == "grit"


def test_vidln_files_serve_trace_without_images(real_data):
    for data in (real_data / "vidln", real_data / "vidln" / "oops_train_sample.jsonl"):
        source = open_source("trace", data)
        assert isinstance(source.reader, VidlnReader) and source.layout == "vidln"
    samples = list(open_source("caption", real_data / "vidln").reader)
    assert len(samples) == 22 and all(s.image is None and s.narratives for s in samples)
    with pytest.raises(DataError, match="takes no image folder"):
        open_source("trace", real_data / "vidln", images=real_data / "photos")


def test_image_narratives_stay_localized_narratives(tmp_path, real_data):
    record = next(VidlnReader(real_data / "vidln" / "OVIS_train_sample.jsonl").records())
    path = tmp_path / "narratives.jsonl"
    path.write_text(json.dumps(record) + "\n")
    source = open_source("trace", path)
    assert isinstance(source.reader, LocalizedNarrativesReader) and len(list(source.reader)) == 1


def test_muse_json_is_the_muse_layout(coco_images):
    source = open_source("muse", FORMATS / "muse_sample.json", images=coco_images)
    assert isinstance(source.reader, MuseReader) and source.layout == "muse"
    samples = list(source.reader)
    assert [len(s.questions) for s in samples] == [2, 1]
    with pytest.raises(DataError, match="is not densecap data"):
        open_source("densecap", FORMATS / "muse_sample.json", images=coco_images)


def test_tar_shards_serve_every_task(tmp_path, annotations, coco_images):
    samples = list(open_source("refer", mdetr(tmp_path, annotations), images=coco_images).reader)
    write_shards(samples * 3, tmp_path / "shards", samples_per_shard=2)
    for task in ("trace", "refer", "densecap", "muse"):
        source = open_source(task, tmp_path / "shards")
        assert isinstance(source.reader, ShardReader) and source.images == tmp_path / "shards"
    reader = open_source("refer", tmp_path / "shards").reader
    read = list(reader)
    assert len(reader) == len(read) == 3
    assert [sample_to_dict(s) for s in read] == [sample_to_dict(s) for s in samples * 3]
    assert read[0].image == (coco_images / "000000039769.png").read_bytes()
    assert reader.report.kept == 3


@pytest.mark.parametrize(("name", "content", "task", "message"), [
    ("notes.json", "42", "densecap", "is not densecap data: expected a Visual Genome folder"),
    ("empty.json", "", "muse", "is not muse data: expected a MUSE .json file"),
    ("notes.txt", "hello", "trace", "is not trace data: expected a Localized Narratives .jsonl file"),
    ("m.json", "[]", "refer", "is not refer data"),
])
def test_a_path_that_is_no_layout_is_a_one_line_error(tmp_path, name, content, task, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message) as error:
        open_source(task, tmp_path / name, images=tmp_path)
    assert "\n" not in str(error.value)


def test_muse_is_not_looked_for_in_a_shapes_world_split(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError) as error:
        open_source("muse", tmp_path)
    assert "shapes-world" not in str(error.value)
