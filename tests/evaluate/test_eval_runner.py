"""The evaluation runner end to end on a tiny shapes-world split: a random tiny model on every task,
the ground-truth oracle at the metrics' maximum, malformed records skipped and counted, bad paths,
the per-sample file and the report. Expected counts are read from the files, not from the runner.
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from helpers import tiny_model, tokenizer

from pixelllm.data.refcoco import load_refs
from pixelllm.data.sources import ImageIndex
from pixelllm.data.synthetic import generate
from pixelllm.errors import DataError
from pixelllm.evaluate.runner import GroundTruthOracle, evaluate
from pixelllm.tasks import Predictor

TASKS = ("trace", "refer", "refseg", "regioncap", "densecap")
PERCENT = {"precision@1", "cIoU", "gIoU", "mAP", "mAP_detection", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4",
           "METEOR", "ROUGE-L"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the machine's two cores are shared, and two threads contending with other
    processes make small decodes many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes") / "val"
    generate(out, num_images=6, seed=3, split="val", workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    model = tiny_model()
    model.heads["proposals"].config.score_threshold = 0.0  # a random model scores every cell low
    return Predictor(model)


@pytest.fixture(scope="module")
def oracle() -> GroundTruthOracle:
    return GroundTruthOracle(tokenizer())


def expected_units(split: Path, task: str) -> int:
    """What ``num_samples`` must be, counted from the files."""
    if task == "trace":
        return len((split / "localized_narratives" / "shapes_val_localized_narratives.jsonl").read_text().splitlines())
    if task in ("refer", "refseg"):
        return sum(len(ref["sentences"]) for ref in load_refs(split / "refcoco" / "refs(unc).p"))
    regions = json.loads((split / "visual_genome" / "region_descriptions.json").read_text())
    return len(regions) if task == "densecap" else sum(len(image["regions"]) for image in regions)


@pytest.mark.parametrize("task", TASKS)
def test_a_random_model_gives_low_but_valid_numbers(task, split, predictor, meteor):
    result = evaluate(predictor, task, split, progress=False, meteor=meteor)
    assert result.num_samples == expected_units(split, task)
    assert result.num_skipped == 0 and result.skipped == {}
    for name, value in result.metrics.items():
        assert math.isfinite(value), name
        if name in PERCENT or name.startswith("mAP"):
            assert 0.0 <= value <= 100.0, name
    if task == "trace":
        assert 0.0 < result.metrics["point_l1"] <= 1.0
        assert 0.0 <= result.metrics["CIDEr"] <= 1000.0
        assert 0.0 <= result.metrics["narrative_word_grounding"] < 50.0  # the narratives' own words, read
    if task in ("refer", "refseg"):
        assert result.metrics["precision@1"] < 50.0
    if task == "refseg":
        assert result.metrics["cIoU"] < 50.0
    if task == "densecap":
        assert result.metrics["mAP"] < 10.0
    payload = result.to_dict()
    assert json.loads(json.dumps(payload)) == payload
    assert set(payload) >= {"task", "metrics", "num_samples"} and payload["task"] == task


# With one reference per sample, a caption equal to it has BLEU-n 100 for every n-gram order it has,
# ROUGE-L 100 and METEOR 100; CIDEr-D averages n = 1..4, each order contributing 10 x 100 when
# present: 1000 for the narratives, 750 for the 3-word region phrases (no 4-gram).
MAXIMUM = {
    "trace": {"point_l1": 0.0, "BLEU-4": 100.0, "METEOR": 100.0, "ROUGE-L": 100.0, "CIDEr": 1000.0},
    "refer": {"precision@1": 100.0},
    "refseg": {"cIoU": 100.0, "gIoU": 100.0, "precision@1": 100.0},
    "regioncap": {"BLEU-3": 100.0, "METEOR": 100.0, "ROUGE-L": 100.0, "CIDEr": 750.0},
    "densecap": {"mAP": 100.0, "mAP_detection": 100.0},
}


@pytest.mark.parametrize("task", TASKS)
def test_ground_truth_as_prediction_gives_the_maximum(task, split, oracle, meteor):
    result = evaluate(oracle, task, split, progress=False, meteor=meteor, batch_size=4)
    assert result.num_samples == expected_units(split, task)
    for name, best in MAXIMUM[task].items():
        assert result.metrics[name] == pytest.approx(best, abs=1e-6), name
    assert result.num_invalid_predictions == 0


@pytest.fixture(scope="module")
def broken(split, tmp_path_factory) -> Path:
    """The split with one malformed record of each kind."""
    out = tmp_path_factory.mktemp("broken") / "val"
    shutil.copytree(split, out)
    with open(out / "localized_narratives" / "shapes_val_localized_narratives.jsonl", "a") as f:
        f.write('{"caption": "a line cut in the mid\n')
    refs_path = out / "refcoco" / "refs(unc).p"
    refs = load_refs(refs_path)
    refs.append({**refs[0], "ref_id": 1, "ann_id": 999})  # no such annotation
    refs_path.write_bytes(pickle.dumps(refs, protocol=2))
    regions_path = out / "visual_genome" / "region_descriptions.json"
    regions = json.loads(regions_path.read_text())
    regions[0]["regions"][0]["width"] = -5  # degenerate box
    regions_path.write_text(json.dumps(regions))
    images = sorted((out / "images").iterdir())
    images[1].write_bytes(b"\x89PNG\r\n not really")  # corrupt
    images[2].unlink()  # missing
    return out


def units_on(split: Path, task: str, image_ids: set[str]) -> int:
    """Units of ``task`` on the given images, counted from the (intact) files."""
    if task in ("refer", "refseg"):
        return sum(len(r["sentences"]) for r in load_refs(split / "refcoco" / "refs(unc).p")
                   if str(r["image_id"]) in image_ids)
    regions = json.loads((split / "visual_genome" / "region_descriptions.json").read_text())
    return sum(len(image["regions"]) for image in regions if str(image["id"]) in image_ids)


@pytest.mark.parametrize(("task", "record_skip"), [
    ("trace", "malformed JSON line"),
    ("refseg", "annotation missing from instances"),
    ("regioncap", "degenerate box"),
])
def test_malformed_records_are_skipped_and_counted(task, record_skip, split, broken, oracle, meteor):
    result = evaluate(oracle, task, broken, progress=False, meteor=meteor)
    assert result.skipped == {record_skip: 1, "unreadable image": 1, "image not found": 1}
    assert result.num_skipped == 3
    lost = {path.stem for path in sorted((split / "images").iterdir())[1:3]}
    if task == "trace":
        assert result.num_samples == expected_units(split, task) - 2
    elif task == "refseg":
        assert result.num_samples == expected_units(split, task) - units_on(split, task, lost)
    else:
        first = json.loads((split / "visual_genome" / "region_descriptions.json").read_text())[0]
        assert str(first["id"]) not in lost
        assert result.num_samples == expected_units(split, task) - units_on(split, task, lost) - 1
    assert any("unreadable image: 1" in line for line in result.summary)


def test_a_model_evaluates_malformed_data_too(broken, predictor):
    result = evaluate(predictor, "refer", broken, progress=False)
    assert result.skipped["annotation missing from instances"] == 1
    assert result.num_samples > 0 and math.isfinite(result.metrics["precision@1"])


def test_per_sample_file_and_report(split, predictor, meteor, tmp_path):
    samples, report = tmp_path / "samples.jsonl", tmp_path / "report.md"
    result = evaluate(predictor, "regioncap", split, progress=False, meteor=meteor,
                      per_sample_path=samples, report_path=report)
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(records) == result.num_samples
    for record in records:
        assert set(record) == {"image_id", "image", "query", "prediction", "ground_truth", "scores"}
        assert len(record["query"]) == 4 and isinstance(record["prediction"], str)
        assert 0.0 <= record["scores"]["meteor"] <= 1.0
    lines = report.read_text().splitlines()
    table = {cells[1].strip(): cells[2] for cells in (line.split("|") for line in lines) if len(cells) == 4}
    assert set(table) == {"metric", "---", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "color_shape_accuracy"}
    for name in ("METEOR", "color_shape_accuracy"):
        assert float(table[name]) == pytest.approx(result.metrics[name], abs=0.01)
    worst = lines[lines.index("## Worst samples (lowest meteor)") + 4:]
    assert len(worst) == 5 and all(line.startswith("| ") for line in worst)
    assert [float(line.split("|")[-2]) for line in worst] == sorted(r["scores"]["meteor"] for r in records)[:5]


def test_images_are_batched_without_changing_the_answers(split, predictor, meteor, tmp_path):
    one, many = tmp_path / "one.jsonl", tmp_path / "many.jsonl"
    evaluate(predictor, "regioncap", split, batch_size=1, limit=3, progress=False, meteor=meteor,
             per_sample_path=one)
    evaluate(predictor, "regioncap", split, batch_size=3, limit=3, progress=False, meteor=meteor,
             per_sample_path=many)
    captions = [[json.loads(line)["prediction"] for line in path.read_text().splitlines()] for path in (one, many)]
    assert captions[0] == captions[1] and len(captions[0]) == units_on(split, "regioncap", _first_ids(split, 3))


def _first_ids(split: Path, count: int) -> set[str]:
    regions = json.loads((split / "visual_genome" / "region_descriptions.json").read_text())
    return {str(image["id"]) for image in regions[:count]}


def test_explicit_files_and_folders(split, oracle, meteor, tmp_path):
    vg = split / "visual_genome"
    grit = tmp_path / "test.json"
    images = json.loads((vg / "image_data.json").read_text())
    regions = json.loads((vg / "region_descriptions.json").read_text())
    grit.write_text(json.dumps({
        "images": [{"id": i["image_id"], "file_name": f"{i['image_id']}.png", "width": i["width"],
                    "height": i["height"]} for i in images],
        "annotations": [{"id": r["region_id"], "image_id": r["image_id"], "caption": r["phrase"],
                         "bbox": [r["x"], r["y"], r["width"], r["height"]]}
                        for image in regions for r in image["regions"]],
    }))
    jsonl = split / "localized_narratives" / "shapes_val_localized_narratives.jsonl"
    refs = split / "refcoco" / "refs(unc).p"
    objects = len(load_refs(refs))  # regioncap on RefCOCO: each object, against its expressions
    for task, data, kwargs, units in [
        ("trace", jsonl, {}, expected_units(split, "trace")),
        ("refer", split / "refcoco", {"split": "val"}, expected_units(split, "refer")),
        ("refer", refs, {}, expected_units(split, "refer")),
        ("regioncap", split / "refcoco", {}, objects),
        ("densecap", vg / "region_descriptions.json", {}, expected_units(split, "densecap")),
        ("densecap", grit, {"images": split / "images"}, expected_units(split, "densecap")),
    ]:
        result = evaluate(oracle, task, data, progress=False, meteor=meteor, **kwargs)
        assert result.num_samples == units, (task, data)


@pytest.mark.parametrize(("task", "data", "kwargs", "message"), [
    ("refer", "missing", {}, "does not exist"),
    ("trace", "images", {}, "is not trace data"),
    ("densecap", "refcoco", {}, "is not densecap data"),
    ("refer", "refcoco", {"split": "testB"}, "has no refs of split 'testB'"),
    ("regioncap", "visual_genome", {"split": "val"}, "applies to RefCOCO data only"),
    ("refer", "", {"images": "refcoco"}, "nothing to evaluate"),
])
def test_unusable_data_is_a_one_line_data_error(task, data, kwargs, message, split, oracle):
    kwargs = {key: split / value if key == "images" else value for key, value in kwargs.items()}
    with pytest.raises(DataError) as error:
        evaluate(oracle, task, split / data, progress=False, **kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_model_in_training_is_evaluated_and_left_training(split):
    model = tiny_model().train()
    result = evaluate(model, "refer", split, limit=1, progress=False)
    assert result.num_samples > 0 and model.training


def test_narrative_images_are_found_by_name_or_number(tmp_path):
    for name in ("COCO_val2014_000000000042.jpg", "0a1b2c.jpg", "17.png"):
        (tmp_path / name).touch()
    index = ImageIndex(tmp_path)
    assert index("coco", "42") == "COCO_val2014_000000000042.jpg"
    assert index("open_images", "0a1b2c") == "0a1b2c.jpg"
    assert index("shapes", "17") == "17.png"
    assert index("coco", "7") == "7.jpg"  # not there: reported as a missing image
