"""Visual Genome region descriptions: the official JSON and the GRiT-processed COCO-style JSON.

Official: ``region_descriptions.json`` is a list of ``{id, regions: [{region_id, image_id, phrase,
x, y, width, height}]}`` per image, and ``image_data.json`` a list of ``{image_id, width, height,
url, ...}``; images live under ``VG_100K/`` or ``VG_100K_2/`` (the url says which) as
``{image_id}.jpg``.

GRiT-processed (``train.json``: 77,396 images, ``test.json``: 5,000, the densecap split): COCO-like,
``images [{id, file_name, width, height}]`` and ``annotations [{id, image_id, bbox [x, y, w, h],
caption}]``.

One ``Sample`` per image, one ``Region`` per region with its phrase (whitespace collapsed) as text.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from pixelllm.data.coco import image_samples, image_size, load_coco_json
from pixelllm.data.report import JsonFileReader, Reader, SkipRecord, load_json_file, require
from pixelllm.data.samples import Region, Sample, check_box, xywh_to_xyxy
from pixelllm.errors import DataError


def _phrase(value) -> str:
    if not isinstance(value, str) or not value.split():
        raise SkipRecord("empty phrase")
    return " ".join(value.split())


def _region(box_xywh, size: tuple[int, int], phrase, region_id) -> Region:
    try:
        box = xywh_to_xyxy(box_xywh)
    except (TypeError, ValueError):
        raise SkipRecord("malformed box") from None
    box, problem = check_box(box, size)
    if problem:
        raise SkipRecord(problem)
    return Region(box, [_phrase(phrase)], region_id=str(region_id))


class VisualGenomeReader(Reader):
    """Samples from the official ``region_descriptions.json`` + ``image_data.json``."""

    name = "visual-genome"

    def __init__(
        self, region_descriptions: str | Path, image_data: str | Path, image_dir: str | Path
    ) -> None:
        super().__init__()
        self.region_path, self.image_data_path, self.image_dir = (
            Path(region_descriptions),
            Path(image_data),
            Path(image_dir),
        )

    def _samples(self) -> Iterator[Sample]:
        infos = load_json_file(self.image_data_path, "Visual Genome image_data.json")
        images = load_json_file(self.region_path, "Visual Genome region_descriptions.json")
        if not isinstance(infos, list) or not isinstance(images, list):
            raise DataError(
                f"{self.region_path} / {self.image_data_path}: expected JSON lists (the official layout)"
            )
        info_by_id = {i.get("image_id", i.get("id")): i for i in infos if isinstance(i, dict)}
        for entry in images:
            try:
                regions = require(entry, "regions")
                image_id = entry.get("id", entry.get("image_id"))
                info = info_by_id.get(image_id)
                if info is None:
                    raise SkipRecord("image missing from image_data")
                size = image_size(info)
            except SkipRecord as skip:
                self.report.skip(str(skip))
                continue
            kept = []
            for r in regions if isinstance(regions, list) else []:
                try:
                    box = [require(r, k) for k in ("x", "y", "width", "height")]
                    kept.append(_region(box, size, require(r, "phrase"), require(r, "region_id")))
                except SkipRecord as skip:
                    self.report.skip(str(skip))
            if not kept:
                self.report.skip("image without usable regions")
                continue
            yield Sample(self._image_path(image_id, info), str(image_id), size, self.name, regions=kept)

    def _image_path(self, image_id, info: dict) -> Path:
        """``image_dir / <url's folder> / <url's file>`` when that file exists, else ``image_dir / <file>``
        (the file name being ``{image_id}.jpg`` when there is no url)."""
        parts = str(info.get("url", "")).rstrip("/").split("/")
        name = parts[-1] or f"{image_id}.jpg"
        nested = self.image_dir / parts[-2] / name if len(parts) >= 2 else None
        return nested if nested is not None and nested.is_file() else self.image_dir / name


class GritVgReader(JsonFileReader):
    """Samples from the GRiT-processed COCO-style Visual Genome JSON."""

    name = "vg-grit"

    def _samples(self) -> Iterator[Sample]:
        data = load_coco_json(self.json_path, "GRiT Visual Genome JSON")
        by_image: dict = defaultdict(list)
        for ann in data["annotations"]:
            by_image[ann.get("image_id") if isinstance(ann, dict) else None].append(ann)

        def region(ann: dict, size: tuple[int, int]) -> Region:
            return _region(require(ann, "bbox"), size, require(ann, "caption"), ann.get("id"))

        yield from image_samples(data["images"], by_image, region, self)
