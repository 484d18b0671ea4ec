"""Records in the layouts of the real datasets, and the files that hold them.

Inside the package boxes are ``(x0, y0, x1, y1)`` in image pixels; the COCO, MUSE and Visual
Genome records use their own ``x, y, width, height``, and Localized Narratives normalizes trace
points to [0, 1] of the image.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from pixelllm.data.shapes.narrative import Word
from pixelllm.data.shapes.questions import MultiQuestion
from pixelllm.data.shapes.scene import Scene
from pixelllm.data.shapes.vocab import SHAPES

CATEGORIES = [{"supercategory": "shape", "id": i + 1, "name": name} for i, name in enumerate(SHAPES)]
CATEGORY_IDS = {c["name"]: c["id"] for c in CATEGORIES}

LN_FILE = "localized_narratives/shapes_{split}_localized_narratives.jsonl"
REFS_FILE = "refcoco/refs(unc).p"
INSTANCES_FILE = "refcoco/instances.json"
REGIONS_FILE = "visual_genome/region_descriptions.json"
IMAGE_DATA_FILE = "visual_genome/image_data.json"
MUSE_FILE = "muse/shapes_{split}.json"
IMAGES_DIR = "images"


def annotation_id(image_id: int, index: int) -> int:
    """Id of the ``index``-th object of an image (fewer than 10 objects per image); also its
    Visual Genome region id and its RefCOCO ref id."""
    return image_id * 10 + index


def coco_image(image_id: int, file_name: str, scene: Scene) -> dict[str, Any]:
    """A COCO ``images`` entry."""
    return {"file_name": file_name, "height": scene.height, "width": scene.width, "id": image_id}


def coco_annotations(scene: Scene, image_id: int) -> list[dict[str, Any]]:
    """COCO ``annotations`` entries: one polygon per object, ``bbox`` as ``[x, y, w, h]``, plus the
    attributes COCO has no field for (``color``, ``size`` and the drawn ``rgb``)."""
    records = []
    for index, obj in enumerate(scene.objects):
        x0, y0, x1, y1 = obj.box
        records.append(
            {
                "segmentation": [list(obj.polygon)],
                "area": float(obj.area),
                "iscrowd": 0,
                "image_id": image_id,
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "category_id": CATEGORY_IDS[obj.shape],
                "id": annotation_id(image_id, index),
                "color": obj.color,
                "size": obj.size,
                "rgb": list(obj.rgb),
            }
        )
    return records


def refcoco_refs(scene: Scene, image_id: int, split: str, sentences: list[list[str]]) -> list[dict[str, Any]]:
    """RefCOCO refs: one per object that has expressions, sentence ids derived from the ref id."""
    refs = []
    for index, texts in enumerate(sentences):
        if not texts:
            continue
        ref_id = annotation_id(image_id, index)
        entries = [
            {"tokens": text.split(), "raw": text, "sent_id": ref_id * 10 + k, "sent": text}
            for k, text in enumerate(texts)
        ]
        refs.append(
            {
                "sent_ids": [e["sent_id"] for e in entries],
                "file_name": f"{image_id}_{ref_id}.png",
                "ann_id": ref_id,
                "ref_id": ref_id,
                "image_id": image_id,
                "split": split,
                "sentences": entries,
                "category_id": CATEGORY_IDS[scene.objects[index].shape],
            }
        )
    return refs


def muse_entry(
    image: dict[str, Any], annotations: list[dict[str, Any]], scene: Scene, questions: list[MultiQuestion]
) -> dict[str, Any]:
    """A MUSE image entry (PixelLM's layout, ``pixelllm.data.muse``) from the image's COCO
    ``images`` entry and ``annotations``: ``ann_list`` holds every annotation (same ids, boxes and
    polygons) with ``category_name`` (the shape) and ``rephrased_name`` ("{size} {color} {shape}");
    ``answers[i]`` are the targets of ``questions[i]`` in reading order, ``text_answers[i]`` names
    them with one ``{seg}`` each."""
    ann_list = [
        {**ann, "category_name": obj.shape, "rephrased_name": obj.phrase}
        for ann, obj in zip(annotations, scene.objects, strict=True)
    ]
    return {
        **image,
        "ann_list": ann_list,
        "questions": [q.text for q in questions],
        "answers": [[ann_list[i] for i in q.targets] for q in questions],
        "text_answers": [q.answer for q in questions],
    }


def vg_image(image_id: int, file_name: str, scene: Scene) -> dict[str, Any]:
    """A Visual Genome ``image_data.json`` entry; ``url`` is the image's path from the split's
    directory."""
    return {
        "width": scene.width,
        "url": f"{IMAGES_DIR}/{file_name}",
        "height": scene.height,
        "image_id": image_id,
        "coco_id": None,
        "flickr_id": None,
    }


def vg_regions(scene: Scene, image_id: int) -> dict[str, Any]:
    """A Visual Genome ``region_descriptions.json`` entry: "{size} {color} {shape}" per object."""
    regions = []
    for index, obj in enumerate(scene.objects):
        x0, y0, x1, y1 = obj.box
        regions.append(
            {
                "region_id": annotation_id(image_id, index),
                "width": x1 - x0,
                "height": y1 - y0,
                "image_id": image_id,
                "phrase": obj.phrase,
                "y": y0,
                "x": x0,
            }
        )
    return {"regions": regions, "id": image_id}


def ln_record(
    scene: Scene,
    image_id: int,
    split: str,
    annotator_id: int,
    words: list[Word],
    times: list[tuple[float, float]],
    segments: list[np.ndarray],
) -> dict[str, Any]:
    """A Localized Narratives record: the caption, one timed utterance per word, and the trace
    segments with x, y normalized to the image and t in seconds. ``voice_recording`` names a
    recording that does not exist, in the dataset's naming scheme."""
    scale = np.array([scene.width, scene.height])
    traces = [
        [
            {"x": round(float(x), 4), "y": round(float(y), 4), "t": round(float(t), 3)}
            for (x, y), t in zip(segment[:, :2] / scale, segment[:, 2], strict=True)
        ]
        for segment in segments
    ]
    return {
        "dataset_id": f"shapes_{split}",
        "image_id": str(image_id),
        "annotator_id": annotator_id,
        "caption": " ".join(w.text for w in words),
        "timed_caption": [
            {"utterance": w.utterance, "start_time": round(start, 3), "end_time": round(end, 3)}
            for w, (start, end) in zip(words, times, strict=True)
        ],
        "traces": traces,
        "voice_recording": f"shapes_{split}/shapes_{split}_{image_id}_{annotator_id}.ogg",
    }


def _write(path: Path, content: str | bytes) -> None:
    """Write a file, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)


def _compact(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"))


def write_dataset(
    out_dir: Path, split: str, info: dict[str, Any], records: list[dict[str, Any]]
) -> dict[str, str]:
    """Write every annotation file of one split from the per-image ``records`` (each with keys
    ``coco_image``, ``annotations``, ``refs``, ``vg_image``, ``vg_regions``, ``narrative``,
    ``muse``); returns the files' paths relative to ``out_dir`` by kind."""
    files = {
        "images": IMAGES_DIR,
        "localized_narratives": LN_FILE.format(split=split),
        "refcoco_refs": REFS_FILE,
        "coco_instances": INSTANCES_FILE,
        "vg_region_descriptions": REGIONS_FILE,
        "vg_image_data": IMAGE_DATA_FILE,
        "muse": MUSE_FILE.format(split=split),
    }
    _write(
        out_dir / files["localized_narratives"], "".join(json.dumps(r["narrative"]) + "\n" for r in records)
    )
    instances = {
        "info": info,
        "images": [r["coco_image"] for r in records],
        "licenses": [],
        "annotations": [a for r in records for a in r["annotations"]],
        "categories": CATEGORIES,
    }
    _write(out_dir / INSTANCES_FILE, _compact(instances))
    refs = [ref for r in records for ref in r["refs"]]
    # Pickle shares repeated objects by identity, which differs between records drawn here and
    # records sent back by worker processes; a JSON round trip makes the bytes depend on content.
    # Protocol 2, as the original refs files: plain lists, dicts, str and int only.
    _write(out_dir / REFS_FILE, pickle.dumps(json.loads(json.dumps(refs)), protocol=2))
    _write(out_dir / REGIONS_FILE, _compact([r["vg_regions"] for r in records]))
    _write(out_dir / IMAGE_DATA_FILE, _compact([r["vg_image"] for r in records]))
    _write(out_dir / files["muse"], _compact([r["muse"] for r in records]))
    return files
