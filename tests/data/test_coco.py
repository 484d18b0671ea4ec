"""COCO instances: real annotations (boxes, masks vs their own areas), every segmentation encoding."""

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pixelllm.data.coco import CocoInstancesReader, decode_segmentation
from pixelllm.errors import DataError

CATEGORIES = [
    {"id": 17, "name": "cat"},
    {"id": 63, "name": "couch"},
    {"id": 65, "name": "bed"},
    {"id": 75, "name": "remote"},
]


@pytest.fixture
def real_annotations(real_data):
    return json.loads((real_data / "coco" / "coco_annotations_39769.json").read_text())


def instances(tmp_path, annotations, images=None):
    """The real annotations wrapped in an instances.json (image 39769 is 640 x 480)."""
    data = {
        "images": images or [{"id": 39769, "file_name": "000000039769.png", "width": 640, "height": 480}],
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def test_real_boxes_and_masks(real_data, real_annotations, tmp_path):
    reader = CocoInstancesReader(instances(tmp_path, real_annotations), real_data / "coco")
    [sample] = list(reader)
    assert sample.image == real_data / "coco" / "000000039769.png" and sample.image_size == (640, 480)
    assert len(sample.regions) == 6
    for region, ann in zip(sample.regions, real_annotations, strict=True):
        x, y, w, h = ann["bbox"]
        np.testing.assert_allclose(region.box, [x, y, x + w, y + h])
        assert region.texts == [{17: "cat", 63: "couch", 65: "bed", 75: "remote"}[ann["category_id"]]]
        mask = decode_segmentation(region.segmentation, 480, 640)
        # rasterized polygon vs the polygon's own area: within 1% (the pixel boundary)
        assert abs(mask.sum() - ann["area"]) <= 0.01 * ann["area"]
        ys, xs = np.nonzero(mask)
        # the mask's pixel extent covers the annotated box up to the rasterization of its edges
        np.testing.assert_allclose([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], region.box, atol=1.5)


def test_rle_encodings_decode_to_the_polygon_mask(real_annotations):
    polygon = real_annotations[0]["segmentation"]
    mask = decode_segmentation(polygon, 480, 640)
    compressed = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    np.testing.assert_array_equal(decode_segmentation(compressed, 480, 640), mask)
    as_text = {"size": compressed["size"], "counts": compressed["counts"].decode("ascii")}
    np.testing.assert_array_equal(decode_segmentation(as_text, 480, 640), mask)
    # uncompressed RLE: run lengths of the column-major flattening, starting with zeros
    flat = mask.flatten(order="F").astype(int)
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    counts = runs if flat[0] == 0 else [0, *runs]
    np.testing.assert_array_equal(decode_segmentation({"size": [480, 640], "counts": counts}, 480, 640), mask)


def test_tiny_uncompressed_rle_by_hand():
    # 2 x 3, column-major: 1 zero, 2 ones, 3 zeros -> (0,0)=0, (1,0)=1, (0,1)=1, the rest 0
    mask = decode_segmentation({"size": [2, 3], "counts": [1, 2, 3]}, 2, 3)
    assert mask.tolist() == [[False, True, False], [True, False, False]]


@pytest.mark.parametrize(
    ("segmentation", "message"),
    [
        ([[1.0, 2.0, 3.0, 4.0]], "malformed polygon"),
        ({"size": [3, 3], "counts": [9]}, "mask size differs"),
        ({"size": [2, 3], "counts": [1, 2]}, "do not cover"),
        ("polygon", "malformed segmentation"),
    ],
)
def test_malformed_segmentations(segmentation, message):
    with pytest.raises(ValueError, match=message):
        decode_segmentation(segmentation, 2, 3)


def test_reader_skips_bad_annotations(real_data, real_annotations, tmp_path):
    good = real_annotations[0]
    bad = [
        {**good, "id": 1, "iscrowd": 1},
        {**good, "id": 2, "bbox": [600, 10, 100, 10]},  # x1 = 700 > 640
        {**good, "id": 3, "bbox": [10, 10, 0, 5]},
        {**good, "id": 4, "bbox": "10 10 5 5"},
        {**good, "id": 5, "segmentation": [[1, 2, 3]]},
        {**good, "id": 6, "image_id": 2, "iscrowd": 1},  # image 2 is left without usable annotations
    ]
    images = [
        {"id": 39769, "file_name": "000000039769.png", "width": 640, "height": 480},
        {"id": 2, "file_name": "2.jpg", "width": 640, "height": 480},
        {"id": 3, "file_name": "3.jpg"},
    ]
    reader = CocoInstancesReader(instances(tmp_path, [good, *bad], images), real_data / "coco")
    samples = list(reader)
    assert [len(s.regions) for s in samples] == [1]
    assert dict(reader.report.skipped) == {
        "crowd annotation": 2,
        "box outside the image": 1,
        "degenerate box": 1,
        "malformed box": 1,
        "malformed polygon": 1,
        "image without usable regions": 1,
        "missing field 'width'": 1,
    }
    reader = CocoInstancesReader(instances(tmp_path, [good, bad[0]]), real_data / "coco", include_crowd=True)
    assert len(next(iter(reader)).regions) == 2


def test_unreadable_instances_files(tmp_path):
    (tmp_path / "broken.json").write_text('{"images": [')
    with pytest.raises(DataError, match="broken.json is not valid JSON"):
        list(CocoInstancesReader(tmp_path / "broken.json", tmp_path))
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(DataError, match="list.json is not COCO-style"):
        list(CocoInstancesReader(tmp_path / "list.json", tmp_path))
    with pytest.raises(DataError, match="not found.*absent.json"):
        list(CocoInstancesReader(tmp_path / "absent.json", tmp_path))
