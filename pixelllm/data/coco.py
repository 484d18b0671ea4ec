"""COCO instances: masks from polygons and RLE (through pycocotools), and a per-image reader.

``instances.json`` layout: ``images [{id, file_name, width, height}]``, ``annotations [{id,
image_id, bbox [x, y, w, h], segmentation, category_id, iscrowd, area}]``, ``categories [{id,
name}]``. ``segmentation`` is a list of polygons (flat ``[x0, y0, x1, y1, ...]`` in pixels), an
uncompressed RLE ``{size: [H, W], counts: [int, ...]}`` or a compressed RLE ``{size, counts: str}``;
RLE runs are column-major (Fortran order), starting with a run of zeros.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from pixelllm.data.report import Reader, SkipRecord, load_json_file, require
from pixelllm.data.samples import Region, Sample, check_box, xywh_to_xyxy
from pixelllm.errors import DataError


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """bool ``(H, W)`` mask of a COCO segmentation (polygons, uncompressed or compressed RLE).

    Raises ``ValueError`` for a malformed one.
    """
    problem = segmentation_problem(segmentation, height, width)
    if problem:
        raise ValueError(problem)
    if isinstance(segmentation, list):
        rle = mask_utils.merge(
            mask_utils.frPyObjects([list(map(float, p)) for p in segmentation], height, width)
        )
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        counts = segmentation["counts"]
        rle = {
            "size": list(segmentation["size"]),
            "counts": counts.encode() if isinstance(counts, str) else counts,
        }
    return mask_utils.decode(rle).astype(bool)


def segmentation_problem(segmentation: Any, height: int, width: int) -> str | None:
    """Why ``segmentation`` cannot be decoded for an ``height x width`` image, or None."""
    if isinstance(segmentation, list):
        if not segmentation or not all(
            isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in segmentation
        ):
            return "malformed polygon"
        return None
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if list(segmentation["size"]) != [height, width]:
            return "mask size differs from the image"
        counts = segmentation["counts"]
        if isinstance(counts, list):
            return None if sum(counts) == height * width else "RLE counts do not cover the image"
        return None if isinstance(counts, str | bytes) and counts else "malformed RLE"
    return "malformed segmentation"


@dataclass
class CocoInstances:
    """An ``instances.json`` indexed by id."""

    images: dict[int, dict]
    annotations: dict[int, dict]
    annotations_by_image: dict[int, list[dict]]
    category_names: dict[int, str]

    @classmethod
    def load(cls, path: str | Path) -> CocoInstances:
        """Read and index the file; ``DataError`` if it is not a COCO instances file."""
        data = load_coco_json(path, "COCO instances file")
        images = {im["id"]: im for im in data["images"] if isinstance(im, dict) and "id" in im}
        annotations = {a["id"]: a for a in data["annotations"] if isinstance(a, dict) and "id" in a}
        by_image: dict[int, list[dict]] = defaultdict(list)
        for ann in annotations.values():
            by_image[ann.get("image_id")].append(ann)
        names = {
            c["id"]: c.get("name", "")
            for c in data.get("categories", [])
            if isinstance(c, dict) and "id" in c
        }
        return cls(images, annotations, dict(by_image), names)


def load_coco_json(path: str | Path, what: str) -> dict:
    """A COCO-style JSON file (a mapping with ``images`` and ``annotations`` lists), or ``DataError``
    naming it (``what`` says what it should be)."""
    data = load_json_file(path, what)
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
    ):
        raise DataError(f"{what} {path} is not COCO-style (needs 'images' and 'annotations' lists)")
    return data


def image_header(image: dict) -> tuple[str, tuple[int, int]]:
    """``(file name, (W, H))`` of a COCO-style ``images`` entry: ``file_name``, else the last part of
    ``coco_url``; skips the record if there is neither, or no valid size."""
    name = isinstance(image, dict) and (image.get("file_name") or str(image.get("coco_url", "")).rsplit("/", 1)[-1])
    if not name:
        raise SkipRecord("missing field 'file_name'")
    return str(name), image_size(image)


def image_size(image: dict) -> tuple[int, int]:
    """``(W, H)`` of an ``images`` entry; skips the record if absent or not positive."""
    try:
        w, h = int(require(image, "width")), int(require(image, "height"))
    except (TypeError, ValueError):
        raise SkipRecord("malformed image size") from None
    if w <= 0 or h <= 0:
        raise SkipRecord("malformed image size")
    return w, h


def annotation_region(
    ann: dict, size: tuple[int, int], texts: list[str], region_id: str | None = None, with_mask: bool = True
) -> Region:
    """A ``Region`` from a COCO annotation (box checked against ``size``); raises ``SkipRecord``."""
    try:
        box = xywh_to_xyxy(require(ann, "bbox"))
    except (TypeError, ValueError):
        raise SkipRecord("malformed box") from None
    box, problem = check_box(box, size)
    if problem:
        raise SkipRecord(problem)
    segmentation = ann.get("segmentation") if with_mask else None
    if with_mask:
        problem = segmentation_problem(segmentation, size[1], size[0])
        if problem:
            raise SkipRecord(problem)
    return Region(box, texts, segmentation, ann.get("category_id"), region_id or str(ann.get("id")))


class CocoInstancesReader(Reader):
    """Samples (one per image with at least one usable annotation) from a COCO instances file.

    Each annotation becomes a ``Region`` with its box, its category name as text and its mask; an
    annotation with a ``color`` (the shapes world writes one) has its color and name as a second text.
    Crowd annotations are skipped unless ``include_crowd``; bad annotations are skipped and counted.
    """

    name = "coco"

    def __init__(
        self, instances_path: str | Path, image_dir: str | Path, include_crowd: bool = False
    ) -> None:
        super().__init__()
        self.instances_path = Path(instances_path)
        self.image_dir = Path(image_dir)
        self.include_crowd = include_crowd

    def _samples(self) -> Iterator[Sample]:
        coco = CocoInstances.load(self.instances_path)

        def region(ann: dict, size: tuple[int, int]) -> Region:
            if ann.get("iscrowd") and not self.include_crowd:
                raise SkipRecord("crowd annotation")
            name = coco.category_names.get(ann.get("category_id"), "")
            color = ann.get("color")  # the shapes world's attribute: a finer name, "red star"
            texts = [name, f"{color} {name}"] if isinstance(color, str) and name else [name]
            return annotation_region(ann, size, texts)

        yield from image_samples(coco.images.values(), coco.annotations_by_image, region, self)


def image_samples(
    images: Iterable[dict], annotations_by_image: dict, region: Callable[[dict, tuple[int, int]], Region], reader
) -> Iterator[Sample]:
    """One ``Sample`` per COCO-style ``images`` entry (its file under ``reader.image_dir``) with the
    ``region(annotation, (W, H))`` of each of its annotations: an entry, an annotation or an image
    left without any region is skipped and counted in ``reader.report``."""
    for image in images:
        try:
            image_id = require(image, "id")
            file_name, size = image_header(image)
        except SkipRecord as skip:
            reader.report.skip(str(skip))
            continue
        regions = []
        for ann in annotations_by_image.get(image_id, []):
            try:
                regions.append(region(ann, size))
            except SkipRecord as skip:
                reader.report.skip(str(skip))
        if not regions:
            reader.report.skip("image without usable regions")
            continue
        yield Sample(reader.image_dir / file_name, str(image_id), size, reader.name, regions=regions)
