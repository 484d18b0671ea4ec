"""From a path on disk to the reader of a task's data.

``open_reader(task, path)`` accepts:

- a **shapes-world split directory** (what ``pixelllm synth`` writes: ``images/``,
  ``localized_narratives/*.jsonl``, ``refcoco/``, ``visual_genome/``), for every task;
- a **Localized Narratives** ``.jsonl`` file (trace), images in ``images`` (default: the file's folder);
- a **RefCOCO** directory holding ``refs(unc).p`` / ``refs(umd).p`` / ``refs(google).p`` and
  ``instances.json`` (refer, refseg), images in ``images`` (default: ``<dir>/images``);
- a **Visual Genome** directory holding ``region_descriptions.json`` and ``image_data.json``
  (region, densecap), images in ``images`` (default: ``<dir>/images``).
"""

from __future__ import annotations

from pathlib import Path

from pixelllm.data.ln import LocalizedNarrativesReader
from pixelllm.data.refcoco import RefCocoReader
from pixelllm.data.report import Reader
from pixelllm.data.vg import VisualGenomeReader
from pixelllm.errors import DataError

READERS = {
    "trace": "narratives", "caption": "narratives",
    "refer": "refcoco", "refseg": "refcoco",
    "region": "vg", "regioncap": "vg", "densecap": "vg",
}
REFS_FILES = {"refs(unc).p": "refcoco", "refs(umd).p": "refcocog", "refs(google).p": "refcocog"}


def is_shapes_split(path: Path) -> bool:
    return (path / "images").is_dir() and (path / "refcoco").is_dir() and (path / "visual_genome").is_dir()


def open_reader(task: str, path: str | Path, *, split: str | None = None,
                images: str | Path | None = None) -> Reader:
    """The reader of ``task``'s samples at ``path`` (see the module docstring for the layouts).

    ``split`` selects a RefCOCO split (``val``, ``testA``...); ``images`` overrides the image folder.
    """
    path = Path(path)
    if task not in READERS:
        raise DataError(f"unknown task {task!r}; choose one of {', '.join(sorted(READERS))}")
    if not path.exists():
        raise DataError(f"{path} does not exist")
    kind = READERS[task]
    if is_shapes_split(path):
        image_dir = Path(images) if images else path / "images"
        return _shapes_reader(kind, path, image_dir)
    if kind == "narratives":
        files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
        if not files:
            raise DataError(f"{path} holds no Localized Narratives .jsonl file")
        return LocalizedNarrativesReader(files, Path(images) if images else files[0].parent)
    if not path.is_dir():
        raise DataError(f"{path} is not a directory: {task} data is a {kind} directory")
    image_dir = Path(images) if images else path / "images"
    if kind == "refcoco":
        refs = next((path / name for name in REFS_FILES if (path / name).is_file()), None)
        if refs is None or not (path / "instances.json").is_file():
            raise DataError(f"{path} needs refs(unc).p (or refs(umd).p) and instances.json for {task}")
        return RefCocoReader(refs, path / "instances.json", image_dir, REFS_FILES[refs.name], split)
    regions, image_data = path / "region_descriptions.json", path / "image_data.json"
    if not regions.is_file() or not image_data.is_file():
        raise DataError(f"{path} needs region_descriptions.json and image_data.json for {task}")
    return VisualGenomeReader(regions, image_data, image_dir)


def _shapes_reader(kind: str, path: Path, image_dir: Path) -> Reader:
    if kind == "narratives":
        files = sorted((path / "localized_narratives").glob("*.jsonl"))
        return LocalizedNarrativesReader(files, image_dir, "{image_id}.png")
    if kind == "refcoco":
        return RefCocoReader(path / "refcoco" / "refs(unc).p", path / "refcoco" / "instances.json", image_dir)
    vg = path / "visual_genome"
    return VisualGenomeReader(vg / "region_descriptions.json", vg / "image_data.json", image_dir)
