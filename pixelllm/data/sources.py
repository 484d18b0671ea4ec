"""From ``--data PATH`` (and optional ``--images DIR``, ``--split``) to the reader of a task's data.

``PATH`` is one of these layouts; the task picks the first that it can use:

=================================  ==========================================================  ==============
layout                             what ``PATH`` is                                            tasks
=================================  ==========================================================  ==============
shapes-world split                 a directory written by ``pixelllm synth`` (``images/``,     all but muse
                                   ``localized_narratives/``, ``refcoco/``, ``visual_genome/``)
Localized Narratives               a ``.jsonl`` file, or a directory of them                   trace, caption
Video Localized Narratives         a ``.jsonl`` file (or a directory of them) whose first      trace, caption
                                   line has ``actor_narratives``; no frames: its samples have  (no image)
                                   no image, so training refuses them and evaluation skips
                                   them (they serve alignment studies and a tokenizer's text)
RefCOCO / RefCOCO+ / RefCOCOg      a directory with ``refs(unc).p`` / ``refs(umd).p`` /         refer, refseg,
                                   ``refs(google).p`` and ``instances.json``, or the refs file  regioncap
MDETR referring JSON               a ``.json`` file whose first ``images`` entry has a          refer, refseg,
                                   ``caption`` (``final_refcoco_val.json`` ...)                 regioncap
COCO instances                     a ``.json`` file named ``instances*.json``: one region per   densecap,
                                   object, its category name as text (a name does not single   regioncap
                                   out one of several instances: no refer / refseg)
Visual Genome (official)           a directory with ``region_descriptions.json`` and            regioncap,
                                   ``image_data.json``, or ``region_descriptions.json`` itself  densecap
Visual Genome (GRiT densecap JSON) any other ``.json`` file holding a mapping: COCO-style       regioncap,
                                   ``images`` and ``annotations`` with ``caption``              densecap
                                   (``test.json``: 5,000 images)
MUSE (PixelLM)                     any other ``.json`` file holding a list of image entries     muse
                                   with ``questions`` and ``answers``
tar shards                         a directory with ``index.json``, written by                 all (training
                                   ``pixelllm.data.shards.ShardWriter`` (images inside)        streams them)
=================================  ==========================================================  ==============

``regioncap`` (the evaluation) and ``region`` (the training task of region captions) read the same
layouts. A ``.json`` file's layout is told from its name and its first megabyte, never by parsing
it whole (the real files are large).

Images: ``images`` when given, else the first folder that exists of ``<dir>/images``,
``<dir>/../images`` and ``<dir>`` itself, ``<dir>`` being the folder of the annotation files (so a
shapes-world split needs nothing more). Localized Narratives files name images only by id: a file
of the image folder is found by its name without extension (``{image_id}.jpg``, ``.png``...) or by
the number at the end of it (COCO's ``000000391895.jpg`` or ``COCO_val2014_000000391895.jpg`` for
image id ``391895``). Visual Genome images may sit in the ``VG_100K`` / ``VG_100K_2`` subfolders that
their ``url`` names. COCO-style files name each image's file (``file_name``, or the end of MUSE's
``coco_url``). Shards hold their images, and VidLN has none.

RefCOCO ``split``: ``val``, ``testA``, ... (the family, for checking the name, is the folder's name
when it is ``refcoco``, ``refcoco+`` or ``refcocog``, else ``refcocog`` for ``refs(umd).p`` /
``refs(google).p`` and ``refcoco`` otherwise). Without one: all refs when the file holds a single
split (a shapes-world split), else ``val``. MDETR files hold one split each.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from pixelllm.data.coco import CocoInstancesReader
from pixelllm.data.ln import LocalizedNarrativesReader
from pixelllm.data.muse import MuseReader
from pixelllm.data.refcoco import SPLITS, MdetrRefReader, RefCocoReader, load_refs
from pixelllm.data.report import Reader
from pixelllm.data.shards import INDEX_NAME, ShardReader
from pixelllm.data.vg import GritVgReader, VisualGenomeReader
from pixelllm.data.vidln import VidlnReader
from pixelllm.errors import DataError

LAYOUTS = {
    "trace": ("narratives", "vidln", "shards"),
    "caption": ("narratives", "vidln", "shards"),
    "refer": ("refcoco", "mdetr", "shards"),
    "refseg": ("refcoco", "mdetr", "shards"),
    "regioncap": ("vg", "grit", "refcoco", "mdetr", "coco", "shards"),
    "region": ("vg", "grit", "refcoco", "mdetr", "coco", "shards"),  # the training task of region captions
    "densecap": ("vg", "grit", "coco", "shards"),
    "muse": ("muse", "shards"),
    "locate": ("refcoco", "mdetr", "shards"),
    "detect": ("coco", "shards"),
}
EXPECTED = {
    "narratives": "a Localized Narratives .jsonl file (or a folder of them)",
    "vidln": "a Video Localized Narratives .jsonl file (or a folder of them)",
    "refcoco": "a RefCOCO folder (refs(unc).p and instances.json)",
    "mdetr": "an MDETR referring .json file (image entries with a caption)",
    "coco": "a COCO instances file (instances*.json)",
    "vg": "a Visual Genome folder (region_descriptions.json and image_data.json)",
    "grit": "a GRiT-style Visual Genome .json file",
    "muse": "a MUSE .json file (a list of image entries)",
    "shards": "a folder of tar shards with index.json",
}
REFS_FILES = ("refs(unc).p", "refs(umd).p", "refs(google).p")
SHAPES_FOLDERS = {"narratives": "localized_narratives", "refcoco": "refcoco", "vg": "visual_genome"}
NO_IMAGE_FOLDER = ("vidln", "shards")
HEAD_BYTES = 1 << 20  # how much of a .json file tells its layout
READERS = {
    "narratives": lambda files, images: LocalizedNarrativesReader(files, images, ImageIndex(images)),
    "vidln": lambda files, images: VidlnReader(files),
    "vg": lambda files, images: VisualGenomeReader(files[0], files[1], images),
    "grit": lambda files, images: GritVgReader(files[0], images),
    "mdetr": lambda files, images: MdetrRefReader(files[0], images),
    "coco": lambda files, images: CocoInstancesReader(files[0], images),
    "muse": lambda files, images: MuseReader(files[0], images),
    "shards": lambda files, images: ShardReader(files[0]),
}


@dataclass
class DataSource:
    """The reader of a task's data, the layout it was found in (a key of ``EXPECTED``), its image
    folder (the shard folder for shards), and the RefCOCO split evaluated (None for other data)."""

    reader: Reader
    layout: str
    images: Path
    split: str | None = None


def open_source(
    task: str, data: str | os.PathLike, *, images: str | os.PathLike | None = None, split: str | None = None
) -> DataSource:
    """The reader of ``task``'s samples at ``data``; ``DataError`` (one line) when ``data`` is not a
    dataset this task can use. See the module docstring for the layouts."""
    if task not in LAYOUTS:
        raise DataError(f"unknown task {task!r}; choose one of {', '.join(LAYOUTS)}")
    path = Path(data)
    if not path.exists():
        raise DataError(f"{path} does not exist")
    found = _layouts(_shapes_part(path, task))
    layout = next((name for name in LAYOUTS[task] if name in found), None)
    if layout is None:
        wanted = " or ".join(EXPECTED[name] for name in LAYOUTS[task])
        shapes = ", or a shapes-world split" if any(name in SHAPES_FOLDERS for name in LAYOUTS[task]) else ""
        raise DataError(f"{path} is not {task} data: expected {wanted}{shapes}")
    if split is not None and layout != "refcoco":
        raise DataError(f"split {split!r} applies to RefCOCO data only, and {path} is {EXPECTED[layout]}")
    if images is not None and layout in NO_IMAGE_FOLDER:
        raise DataError(f"{path} is {EXPECTED[layout]}, which takes no image folder")
    files = found[layout]
    image_dir = Path(images) if images is not None else _default_images(files[0].parent)
    if layout == "shards":
        image_dir = files[0]
    if not image_dir.is_dir():
        raise DataError(f"image folder not found: {image_dir}")
    if layout == "refcoco":
        return _refcoco_source(files, image_dir, split)
    return DataSource(READERS[layout](files, image_dir), layout, image_dir)


def _refcoco_source(files: list[Path], image_dir: Path, split: str | None) -> DataSource:
    refs, instances = files
    present = sorted({str(r.get("split")) for r in load_refs(refs) if isinstance(r, dict)})
    split = _refcoco_split(refs, split, present)
    # A file that holds one split only (a shapes-world split) is read whole, whatever its name.
    reader_split = None if len(present) == 1 else split
    reader = RefCocoReader(refs, instances, image_dir, _refcoco_family(refs), reader_split)
    return DataSource(reader, "refcoco", image_dir, split)


def _shapes_part(path: Path, task: str) -> Path:
    """The folder of this task's files inside a shapes-world split, or ``path`` itself."""
    if not (path.is_dir() and (path / "images").is_dir()):
        return path
    for layout in LAYOUTS[task]:
        folder = path / SHAPES_FOLDERS.get(layout, "")
        if layout in SHAPES_FOLDERS and folder.is_dir():
            return folder
    return path


def _layouts(path: Path) -> dict[str, list[Path]]:
    """The layouts found at ``path``, each with its files."""
    if path.is_file():
        return _file_layouts(path)
    if (path / INDEX_NAME).is_file():
        return {"shards": [path]}
    found: dict[str, list[Path]] = {}
    for jsonl in sorted(path.glob("*.jsonl")):
        found.setdefault(_jsonl_layout(jsonl), []).append(jsonl)
    refs = next((path / name for name in REFS_FILES if (path / name).is_file()), None)
    if refs is not None and (path / "instances.json").is_file():
        found["refcoco"] = [refs, path / "instances.json"]
    if (path / "region_descriptions.json").is_file() and (path / "image_data.json").is_file():
        found["vg"] = [path / "region_descriptions.json", path / "image_data.json"]
    return found


def _file_layouts(path: Path) -> dict[str, list[Path]]:
    if path.suffix == ".jsonl":
        return {_jsonl_layout(path): [path]}
    if path.name in REFS_FILES:
        return _layouts(path.parent)
    if path.name == "region_descriptions.json":
        return {"vg": [path, path.parent / "image_data.json"]}
    if path.suffix == ".json":
        layout = _json_layout(path)
        return {layout: [path]} if layout else {}
    return {}


def _jsonl_layout(path: Path) -> str:
    """``vidln`` when the file's first line is a Video Localized Narratives record, else
    ``narratives`` (whose reader reports what is wrong with a file that is neither)."""
    try:
        with open(path, "rb") as handle:
            line = next((line for line in handle if line.strip()), b"")
        record = json.loads(line)
    except (OSError, ValueError):
        return "narratives"
    return "vidln" if isinstance(record, dict) and "actor_narratives" in record else "narratives"


def _json_layout(path: Path) -> str | None:
    """The layout of a ``.json`` file from its name and first bytes, or None for none of them: a
    list is MUSE; a mapping is COCO instances by name, MDETR when its first image has a caption,
    else GRiT."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(HEAD_BYTES).decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    if head.startswith("["):
        return "muse"
    if not head.startswith("{"):
        return None
    if path.name.startswith("instances"):
        return "coco"
    first = _first_image(head)
    return "mdetr" if first is not None and "caption" in first else "grit"


def _first_image(head: str) -> dict | None:
    """The first entry of the ``images`` list in the text ``head`` of a JSON file, if it is there whole."""
    match = re.search(r'"images"\s*:\s*\[\s*', head)
    if match is None:
        return None
    try:
        entry, _ = json.JSONDecoder().raw_decode(head, match.end())
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None


def _default_images(folder: Path) -> Path:
    candidates = (folder / "images", folder.parent / "images", folder)
    return next(c for c in candidates if c.is_dir())


def _refcoco_family(refs: Path) -> str:
    if refs.parent.name in SPLITS:
        return refs.parent.name
    return "refcoco" if refs.name == "refs(unc).p" else "refcocog"


def _refcoco_split(refs: Path, split: str | None, present: list[str]) -> str | None:
    """The split to evaluate: ``split`` if the refs have it; without one, their only split, or ``val``."""
    if split is None:
        if len(present) <= 1:
            return present[0] if present else None
        if "val" not in present:
            raise DataError(f"{refs} holds the splits {', '.join(present)}: choose one")
        split = "val"
    if split not in present:
        raise DataError(f"{refs} has no refs of split {split!r}; its splits are {', '.join(present) or 'none'}")
    return split


class ImageIndex:
    """Finds the image file of a Localized Narratives ``image_id`` in one folder (the reader's
    ``image_name``): by the file's name without extension, or by the number it ends with."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._names: dict[str, str] | None = None

    def __call__(self, dataset_id: str, image_id: str) -> str:
        if self._names is None:
            self._names = self._scan()
        return self._names.get(image_id) or self._names.get(image_id.lstrip("0") or "0") or f"{image_id}.jpg"

    def _scan(self) -> dict[str, str]:
        names: dict[str, str] = {}
        with os.scandir(self.folder) as entries:
            for entry in entries:
                stem = Path(entry.name).stem
                names.setdefault(stem, entry.name)
                number = re.search(r"(\d+)$", stem)
                if number:
                    names.setdefault(number.group(1).lstrip("0") or "0", entry.name)
        return names
