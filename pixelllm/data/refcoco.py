"""Referring expressions: RefCOCO / RefCOCO+ / RefCOCOg (refs pickle + COCO instances) and MDETR JSON.

``refs(unc).p`` / ``refs(umd).p`` is a pickled list of dicts ``{ref_id, ann_id, image_id, split,
sentences: [{sent, raw, tokens, sent_id}], category_id, file_name}``; the object's box and mask
come from the COCO ``instances.json`` annotation ``ann_id``. Splits: refcoco and refcoco+ (``unc``):
train, val, testA, testB; refcocog (``umd``): train, val, test.

The pickle is read with an unpickler that refuses every global (these files hold only lists,
dicts, strings and numbers), so a tampered file cannot run code. Python 2 pickles are read with
``encoding="bytes"`` and their byte strings decoded as UTF-8.

MDETR-style JSON (``final_refcoco_train.json`` ...) is COCO-like: each ``images`` entry is one
expression (``caption``) on the COCO image ``original_id`` (or ``original_img_id``), and its
``annotations`` are the referred objects (``original_id`` names the COCO annotation).

One ``Sample`` per image; one ``Region`` per referred object, its expressions as ``texts``.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterator
from pathlib import Path

from pixelllm.data.coco import CocoInstances, annotation_region, image_header, image_size, load_coco_json
from pixelllm.data.report import JsonFileReader, Reader, SkipRecord, require
from pixelllm.data.samples import Region, Sample
from pixelllm.errors import ConfigError, DataError

SPLITS = {
    "refcoco": ("train", "val", "testA", "testB"),
    "refcoco+": ("train", "val", "testA", "testB"),
    "refcocog": ("train", "val", "test"),
}


class _PlainDataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(
            f"refuses to load {module}.{name}: only plain lists and dicts are allowed"
        )


def load_refs(path: str | Path) -> list[dict]:
    """The refs pickle as a list of dicts (strings decoded), or ``DataError`` naming the file."""
    path = Path(path)
    try:
        data = _PlainDataUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"refs file not found: {path}") from None
    except OSError as exc:
        raise DataError(f"cannot read refs file {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # any unpickling failure: truncated, foreign objects, not a pickle
        raise DataError(f"{path} is not a readable refs pickle ({' '.join(str(exc).split())})") from None
    data = _decode_bytes(data)
    if not isinstance(data, list):
        raise DataError(f"{path} is not a refs pickle (expected a list of refs, got {type(data).__name__})")
    return data


def _decode_bytes(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, list | tuple):
        return [_decode_bytes(v) for v in value]
    if isinstance(value, dict):
        return {_decode_bytes(k): _decode_bytes(v) for k, v in value.items()}
    return value


class RefCocoReader(Reader):
    """Samples of one RefCOCO-family split from ``refs(...).p`` + COCO ``instances.json``.

    ``dataset`` names the family (for split checking), ``split`` filters refs (None: all),
    ``text_field`` picks the sentence form: ``"sent"`` (lowercased, tokenized; the official
    choice) or ``"raw"``.
    """

    name = "refcoco"

    def __init__(
        self,
        refs_path: str | Path,
        instances_path: str | Path,
        image_dir: str | Path,
        dataset: str = "refcoco",
        split: str | None = None,
        text_field: str = "sent",
    ) -> None:
        super().__init__()
        if dataset not in SPLITS:
            raise ConfigError(f"unknown referring dataset {dataset!r}; choose one of {', '.join(SPLITS)}")
        if split is not None and split not in SPLITS[dataset]:
            raise ConfigError(
                f"{dataset} has no split {split!r}; its splits are {', '.join(SPLITS[dataset])}"
            )
        self.name = f"{dataset}:{split or 'all'}"
        self.report.name = self.name
        self.refs_path, self.instances_path = Path(refs_path), Path(instances_path)
        self.image_dir, self.dataset, self.split, self.text_field = (
            Path(image_dir),
            dataset,
            split,
            text_field,
        )

    def _samples(self) -> Iterator[Sample]:
        refs = load_refs(self.refs_path)
        coco = CocoInstances.load(self.instances_path)
        by_image: dict[int, list[Region]] = {}
        for ref in refs:
            if self.split is not None and isinstance(ref, dict) and ref.get("split") != self.split:
                continue
            try:
                image_id, region = self._region(ref, coco)
            except SkipRecord as skip:
                self.report.skip(str(skip))
                continue
            by_image.setdefault(image_id, []).append(region)
        for image_id, regions in by_image.items():
            image = coco.images[image_id]
            yield Sample(
                self.image_dir / image["file_name"],
                str(image_id),
                image_size(image),
                self.name,
                regions=regions,
            )

    def _region(self, ref: dict, coco: CocoInstances) -> tuple[int, Region]:
        ann = coco.annotations.get(require(ref, "ann_id"))
        if ann is None:
            raise SkipRecord("annotation missing from instances")
        image = coco.images.get(ann.get("image_id"))
        if image is None or "file_name" not in image:
            raise SkipRecord("image missing from instances")
        texts = [s.get(self.text_field, "").strip() for s in require(ref, "sentences") if isinstance(s, dict)]
        texts = [t for t in texts if t]
        if not texts:
            raise SkipRecord("no expression")
        return ann["image_id"], annotation_region(ann, image_size(image), texts, str(require(ref, "ref_id")))


class MdetrRefReader(JsonFileReader):
    """Samples from an MDETR-style referring JSON (one file per dataset split)."""

    name = "mdetr-ref"

    def _samples(self) -> Iterator[Sample]:
        data = load_coco_json(self.json_path, "MDETR referring JSON")
        entries = {im["id"]: im for im in data["images"] if isinstance(im, dict) and "id" in im}
        objects: dict[int, dict[int, Region]] = {}  # original image id -> original annotation id -> region
        files: dict[int, tuple[str, tuple[int, int]]] = {}
        for ann in data["annotations"]:
            try:
                original, key, caption, file_name, size = _mdetr_object(ann, entries)
                if key not in objects.get(original, {}):
                    objects.setdefault(original, {})[key] = annotation_region(
                        ann, size, [], str(key), with_mask="segmentation" in ann
                    )
            except SkipRecord as skip:
                self.report.skip(str(skip))
                continue
            objects[original][key].texts.append(caption)
            files[original] = (file_name, size)
        for original, regions in objects.items():
            file_name, size = files[original]
            yield Sample(
                self.image_dir / file_name, str(original), size, self.name, regions=list(regions.values())
            )


def _mdetr_object(ann: dict, entries: dict[int, dict]) -> tuple[int, int, str, str, tuple[int, int]]:
    """``(original image id, original annotation id, expression, file name, (W, H))`` of one annotation."""
    entry = entries.get(require(ann, "image_id"))
    if entry is None:
        raise SkipRecord("image missing from images")
    caption = str(require(entry, "caption")).strip()
    if not caption:
        raise SkipRecord("no expression")
    try:
        original = int(
            entry["original_img_id"] if "original_img_id" in entry else require(entry, "original_id")
        )
        key = int(ann["original_id"] if "original_id" in ann else require(ann, "id"))
    except (TypeError, ValueError):
        raise SkipRecord("malformed id") from None
    return original, key, caption, *image_header(entry)
