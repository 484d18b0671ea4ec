"""Visual Genome: the real official region descriptions, and the GRiT-processed layout."""

import json
from pathlib import Path

import numpy as np
import pytest

from pixelllm.data.vg import GritVgReader, VisualGenomeReader
from pixelllm.errors import DataError

FORMATS = Path(__file__).resolve().parents[1] / "fixtures" / "formats"


@pytest.fixture
def vg_paths(real_data):
    return (
        real_data / "vg" / "vg_region_descriptions_img1-5.json",
        real_data / "vg" / "vg_image_data_img1-5.json",
    )


def test_real_region_descriptions(vg_paths, tmp_path):
    reader = VisualGenomeReader(*vg_paths, tmp_path)
    samples = list(reader)
    assert [s.image_id for s in samples] == ["1", "2", "3", "4", "5"]
    assert sum(len(s.regions) for s in samples) == 1278  # all real regions are valid
    assert samples[0].image_size == (800, 600) and samples[2].image_size == (640, 480)
    first = samples[0].regions[0]
    # region 1382: x 421, y 57, width 82, height 139 -> (421, 57, 503, 196)
    assert first.region_id == "1382" and first.texts == ["the clock is green in colour"]
    np.testing.assert_allclose(first.box, [421, 57, 503, 196])
    assert samples[0].regions[1].texts == ["shade is along the street"]  # trailing space dropped
    for s in samples:
        w, h = s.image_size
        boxes = np.array([r.box for r in s.regions])
        assert boxes.min() >= 0 and boxes[:, 2].max() <= w and boxes[:, 3].max() <= h
        assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])


def test_image_paths_follow_the_url_folder(vg_paths, tmp_path):
    (tmp_path / "VG_100K_2").mkdir()
    (tmp_path / "VG_100K_2" / "1.jpg").write_bytes(b"")
    samples = list(VisualGenomeReader(*vg_paths, tmp_path))
    assert samples[0].image == tmp_path / "VG_100K_2" / "1.jpg"  # url .../VG_100K_2/1.jpg
    assert samples[1].image == tmp_path / "2.jpg"  # flat layout when the folder is absent


def test_malformed_official_regions(vg_paths, tmp_path):
    regions = json.loads(vg_paths[0].read_text())[:2]
    first = regions[0]["regions"]
    first[0] = {k: v for k, v in first[0].items() if k != "phrase"}
    first[1]["width"] = -5
    first[2]["x"] = 790  # 790 + 36 > 800
    first[3]["phrase"] = " "
    regions.append({"id": 77, "regions": []})  # not in image_data
    regions.append({"id": 3, "regions": [{**first[4], "image_id": 3, "width": 0}]})  # nothing usable left
    path = tmp_path / "regions.json"
    path.write_text(json.dumps(regions))
    reader = VisualGenomeReader(path, vg_paths[1], tmp_path)
    samples = list(reader)
    assert [len(s.regions) for s in samples] == [262 - 4, 256]
    assert dict(reader.report.skipped) == {
        "missing field 'phrase'": 1,
        "degenerate box": 2,
        "box outside the image": 1,
        "empty phrase": 1,
        "image missing from image_data": 1,
        "image without usable regions": 1,
    }


def test_unreadable_official_files(vg_paths, tmp_path):
    (tmp_path / "r.json").write_text("{}")
    with pytest.raises(DataError, match="expected JSON lists"):
        list(VisualGenomeReader(tmp_path / "r.json", vg_paths[1], tmp_path))
    (tmp_path / "cut.json").write_text(vg_paths[0].read_text()[:500])
    with pytest.raises(DataError, match="cut.json is not valid JSON"):
        list(VisualGenomeReader(tmp_path / "cut.json", vg_paths[1], tmp_path))


def test_grit_layout(vg_paths, tmp_path):
    reader = GritVgReader(FORMATS / "grit_vg_sample.json", tmp_path)
    [sample] = list(reader)
    official = list(VisualGenomeReader(*vg_paths, tmp_path))[0].regions[:4]
    assert sample.image == tmp_path / "1.jpg" and sample.image_size == (800, 600)
    assert [r.texts for r in sample.regions] == [r.texts for r in official]
    np.testing.assert_allclose([r.box for r in sample.regions], [r.box for r in official])
    assert dict(reader.report.skipped) == {
        "box outside the image": 1,
        "degenerate box": 1,
        "empty phrase": 1,
        "missing field 'bbox'": 1,
        "malformed image size": 1,
    }
    assert reader.summary() == (
        "vg-grit: kept 1, skipped 5 (box outside the image: 1, degenerate box: 1, "
        "empty phrase: 1, missing field 'bbox': 1, malformed image size: 1), repaired 0"
    )
