"""RefCOCO-family readers: refs pickles (safe unpickling, Python 2 pickles, splits) and MDETR JSON.

The objects are the real COCO annotations of image 39769 (two cats, a couch, remotes); the refs
around them are written here in the official layouts.
"""

import json
import os
import pickle
import struct

import numpy as np
import pytest

from pixelllm.data.refcoco import MdetrRefReader, RefCocoReader, load_refs
from pixelllm.errors import ConfigError, DataError

CAT_LEFT, CAT_RIGHT, REMOTE, REMOTE_2 = 2190839, 2190842, 1108446, 1110067


def sentence(text, sent_id):
    return {"sent": text.lower(), "raw": text, "tokens": text.lower().split(), "sent_id": sent_id}


REFS = [
    {
        "ref_id": 0,
        "ann_id": CAT_LEFT,
        "image_id": 39769,
        "split": "val",
        "category_id": 17,
        "file_name": "COCO_train2014_000000039769_2190839.jpg",
        "sentences": [sentence("Cat on the left", 0), sentence("left kitty", 1)],
    },
    {
        "ref_id": 1,
        "ann_id": CAT_RIGHT,
        "image_id": 39769,
        "split": "val",
        "category_id": 17,
        "file_name": "x.jpg",
        "sentences": [sentence("cat on the right", 2)],
    },
    {
        "ref_id": 2,
        "ann_id": REMOTE,
        "image_id": 39769,
        "split": "testA",
        "category_id": 75,
        "file_name": "x.jpg",
        "sentences": [sentence("remote near the café", 3)],
    },
    {
        "ref_id": 3,
        "ann_id": 999,
        "image_id": 39769,
        "split": "val",
        "category_id": 17,
        "file_name": "x.jpg",
        "sentences": [sentence("a ghost", 4)],
    },
    {
        "ref_id": 4,
        "ann_id": REMOTE_2,
        "image_id": 39769,
        "split": "val",
        "category_id": 75,
        "file_name": "x.jpg",
        "sentences": [],
    },
]


@pytest.fixture
def coco(real_data, tmp_path):
    annotations = json.loads((real_data / "coco" / "coco_annotations_39769.json").read_text())
    path = tmp_path / "instances.json"
    path.write_text(
        json.dumps(
            {
                "images": [
                    {"id": 39769, "file_name": "COCO_train2014_000000039769.jpg", "width": 640, "height": 480}
                ],
                "annotations": annotations,
                "categories": [{"id": 17, "name": "cat"}],
            }
        )
    )
    return path, {a["id"]: a for a in annotations}


def py2_pickle(value) -> bytes:
    """A protocol-2 pickle as Python 2 writes plain data: ``str`` as 8-bit SHORT_BINSTRING/BINSTRING."""

    def dump(v):
        if isinstance(v, bool) or v is None:
            raise TypeError(v)
        if isinstance(v, int):
            return b"J" + struct.pack("<i", v)
        if isinstance(v, str):
            data = v.encode("utf-8")
            return (
                b"U" + bytes([len(data)]) if len(data) < 256 else b"T" + struct.pack("<i", len(data))
            ) + data
        if isinstance(v, list):
            return b"](" + b"".join(dump(x) for x in v) + b"e"
        if isinstance(v, dict):
            return b"}(" + b"".join(dump(k) + dump(x) for k, x in v.items()) + b"u"
        raise TypeError(v)

    return b"\x80\x02" + dump(value) + b"."


def test_val_split(coco, tmp_path):
    instances, anns = coco
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps(REFS))
    reader = RefCocoReader(tmp_path / "refs(unc).p", instances, tmp_path / "images", "refcoco", "val")
    [sample] = list(reader)
    assert sample.image == tmp_path / "images" / "COCO_train2014_000000039769.jpg"
    assert sample.image_size == (640, 480)
    assert [r.region_id for r in sample.regions] == ["0", "1"]
    assert sample.regions[0].texts == ["cat on the left", "left kitty"]
    x, y, w, h = anns[CAT_LEFT]["bbox"]
    np.testing.assert_allclose(sample.regions[0].box, [x, y, x + w, y + h])
    assert sample.regions[0].segmentation == anns[CAT_LEFT]["segmentation"]
    assert dict(reader.report.skipped) == {"annotation missing from instances": 1, "no expression": 1}
    raw = RefCocoReader(tmp_path / "refs(unc).p", instances, tmp_path, "refcoco", "val", text_field="raw")
    assert next(iter(raw)).regions[0].texts == ["Cat on the left", "left kitty"]


def test_python2_pickle_with_utf8(coco, tmp_path):
    instances, _ = coco
    (tmp_path / "refs(unc).p").write_bytes(py2_pickle(REFS))
    assert load_refs(tmp_path / "refs(unc).p") == REFS
    [sample] = list(RefCocoReader(tmp_path / "refs(unc).p", instances, tmp_path, "refcoco+", "testA"))
    assert sample.regions[0].texts == ["remote near the café"]


def test_splits_are_checked(coco, tmp_path):
    instances, _ = coco
    with pytest.raises(ConfigError, match="refcocog has no split 'testA'"):
        RefCocoReader(tmp_path / "r.p", instances, tmp_path, "refcocog", "testA")
    with pytest.raises(ConfigError, match="unknown referring dataset"):
        RefCocoReader(tmp_path / "r.p", instances, tmp_path, "refclef", "val")


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_unpickler_refuses_code(tmp_path):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 0, "payload": Evil()}]))
    with pytest.raises(DataError, match=r"refs\(unc\).p is not a readable refs pickle.*refuses to load"):
        load_refs(path)
    path.write_bytes(pickle.dumps(REFS)[:40])
    with pytest.raises(DataError, match="not a readable refs pickle"):
        load_refs(path)
    path.write_bytes(pickle.dumps({"not": "a list"}))
    with pytest.raises(DataError, match="expected a list"):
        load_refs(path)
    with pytest.raises(DataError, match="not found"):
        load_refs(tmp_path / "absent.p")


def mdetr_file(tmp_path, anns):
    def entry(i, caption):
        return {
            "id": i,
            "file_name": "COCO_train2014_000000039769.jpg",
            "height": 480,
            "width": 640,
            "original_id": 39769,
            "caption": caption,
            "dataset_name": "refcoco",
            "tokens_negative": [],
        }

    def ann(i, image_id, coco_id, with_original=True):
        a = anns[coco_id]
        out = {
            "id": i,
            "image_id": image_id,
            "bbox": a["bbox"],
            "area": a["area"],
            "iscrowd": 0,
            "category_id": a["category_id"],
            "segmentation": a["segmentation"],
            "tokens_positive": [[4, 7]],
        }
        return {**out, "original_id": coco_id} if with_original else out

    data = {
        "images": [
            entry(0, "the cat on the left"),
            entry(1, "cat right"),
            entry(2, "left kitty"),
            entry(3, " "),
        ],
        "annotations": [
            ann(10, 0, CAT_LEFT),
            ann(11, 1, CAT_RIGHT, with_original=False),
            ann(12, 2, CAT_LEFT),
            ann(13, 99, REMOTE),
            ann(14, 3, REMOTE),
        ],
        "categories": [{"id": 17, "name": "cat"}],
    }
    path = tmp_path / "final_refcoco_val.json"
    path.write_text(json.dumps(data))
    return path


def test_mdetr_groups_expressions_by_object(coco, tmp_path):
    _, anns = coco
    reader = MdetrRefReader(mdetr_file(tmp_path, anns), tmp_path)
    [sample] = list(reader)
    assert sample.image_id == "39769"
    by_id = {r.region_id: r for r in sample.regions}
    # annotations 10 and 12 are one COCO object (original_id); 11 has no original_id: its own id
    assert by_id[str(CAT_LEFT)].texts == ["the cat on the left", "left kitty"]
    assert by_id["11"].texts == ["cat right"]
    x, y, w, h = anns[CAT_RIGHT]["bbox"]
    np.testing.assert_allclose(by_id["11"].box, [x, y, x + w, y + h])
    assert dict(reader.report.skipped) == {"image missing from images": 1, "no expression": 1}


def test_mdetr_unreadable(tmp_path):
    (tmp_path / "x.json").write_text('{"images": 3}')
    with pytest.raises(DataError, match="MDETR referring JSON .*x.json is not COCO-style"):
        list(MdetrRefReader(tmp_path / "x.json", tmp_path))
